// What the torch bindings (or any host program) need to explain a failed launch, without
// including the CUDA runtime headers themselves.
#include <cuda_runtime.h>

#include <cstdio>

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
  int dev = 0, major = 0, minor = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return 10 * major + minor;
}

const char* built_archs() { return LDMFAST_BUILT_ARCHS; }

}  // namespace ldmfast::cuda
