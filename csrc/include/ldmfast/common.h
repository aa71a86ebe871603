// Shared pieces of the op contracts. Plain C++: no torch, no CUDA runtime headers, so the same
// structs serve the torch bindings, the CUDA and CPU kernels and any other host program.
#pragma once
#include <cstdint>

// Forward declaration, so callers need no CUDA headers to name a stream.
typedef struct CUstream_st* cudaStream_t;

namespace ldmfast {

// Element type of the tensors an op reads and writes.
enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline int dtype_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
  }
  return "unknown";
}

namespace cuda {
// The CUDA runtime's name and description of an error code the kernels returned, e.g.
// "cudaErrorNoKernelImageForDevice: no kernel image is available for execution on the device".
const char* error_string(int err);
// The current device's compute capability as 10 * major + minor (0 if it cannot be read).
int device_compute_capability();
// The archs the kernels were compiled for, as given to the build (e.g. "80,90a,90-virtual").
const char* built_archs();
// The runtime's last error on this thread, cleared (0 if none). The ops read it before they
// launch: a launch's status is read the same way, and an error left by earlier work must not be
// reported as the launch's own.
int take_last_error();
}  // namespace cuda

}  // namespace ldmfast
