// What the torch bindings (or any host program) need to explain a failed launch, without
// including the CUDA runtime headers themselves.
#include <cstdio>

#include "common.cuh"
#include "ldmfast/common.h"

#ifndef LDMFAST_BUILT_ARCHS
#define LDMFAST_BUILT_ARCHS "unknown"
#endif

namespace ldmfast::cuda {

const char* error_string(int err) {
  // One buffer per thread: the text must outlive the call, and callers may run concurrently.
  thread_local char text[256];
  const cudaError_t e = static_cast<cudaError_t>(err);
  std::snprintf(text, sizeof(text), "%s: %s", cudaGetErrorName(e), cudaGetErrorString(e));
  return text;
}

int device_compute_capability() {
  const int major = detail::device_attribute(cudaDevAttrComputeCapabilityMajor, 0);
  return major == 0 ? 0 : 10 * major + detail::device_attribute(cudaDevAttrComputeCapabilityMinor, 0);
}

const char* built_archs() { return LDMFAST_BUILT_ARCHS; }

int take_last_error() { return static_cast<int>(cudaGetLastError()); }

}  // namespace ldmfast::cuda
