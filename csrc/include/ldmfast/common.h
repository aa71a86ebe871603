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

}  // namespace ldmfast
