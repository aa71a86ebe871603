// Storage types of the CPU kernels and their conversions to and from float, bit-exact with
// IEEE 754 binary16 and with bfloat16 as PyTorch rounds it (round to nearest, ties to even; a NaN
// stays a quiet NaN). Every conversion is branch-free (selects, integer and float
// arithmetic only) so the loops that call them auto-vectorise; that is also why nothing here
// uses F16C intrinsics or torch's c10::Half: the kernels stay portable and torch-free.
#pragma once
#include <cstdint>
#include <cstring>

#include "ldmfast/common.h"

namespace ldmfast::cpu {

// Distinct types for the two 16-bit formats so that overloading picks the conversion.
struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};
static_assert(sizeof(Half) == 2 && sizeof(BFloat16) == 2, "16-bit storage types must be packed");

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// c ? a : b on bit patterns, written with masks. GCC will not if-convert a ternary whose arms
// hold float operations that may trap (the default -ftrapping-math), so a plain ?: would
// leave the conversion loops scalar; the masked form is always straight-line code.
inline uint32_t select_bits(bool c, uint32_t a, uint32_t b) {
  return b ^ ((a ^ b) & (0u - static_cast<uint32_t>(c)));
}

inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;  // exponent and mantissa
  // Normal numbers: move the 10-bit mantissa into place and rebias the exponent (15 -> 127).
  // Inf and NaN (exponent 31) need the exponent to land on 255, i.e. a second rebias.
  const uint32_t normal = (em << 13) + (em >= 0x7c00u ? 224u << 23 : 112u << 23);
  // Zero and subnormals are m * 2^-24, which float represents exactly.
  const uint32_t sub = float_to_bits(static_cast<float>(static_cast<int32_t>(em)) * 0x1p-24f);
  return bits_to_float(sign | select_bits(em < 0x0400u, sub, normal));
}

inline uint16_t float_to_half_bits(float f) {
  const uint32_t x = float_to_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t a = x & 0x7fffffffu;
  // Normal halves: rebias the exponent (add -112 << 23, mod 2^32) and round the 13 dropped
  // mantissa bits to nearest even. A carry out of the mantissa moves into the exponent, which
  // is exactly right, up to and including rounding 65520 and above to infinity (0x7c00).
  const uint32_t normal = (a + 0xc8000fffu + ((a >> 13) & 1u)) >> 13;
  // Below 2^-14 the result is a subnormal half, a multiple of 2^-24. Adding 0.5f makes the FPU
  // round at exactly that granularity (ties to even); the mantissa bits of the sum are the half.
  const uint32_t sub = float_to_bits(bits_to_float(a) + 0.5f) - 0x3f000000u;
  uint32_t r = select_bits(a < 0x38800000u, sub, normal);
  r = select_bits(a >= 0x47800000u, 0x7c00u, r);  // overflow, and infinity itself
  // NaN stays NaN, quietened, with the top of its payload, as the F16C instruction does.
  r = select_bits(a > 0x7f800000u, 0x7e00u | ((a >> 13) & 0x3ffu), r);
  return static_cast<uint16_t>(sign | r);
}

inline float bf16_bits_to_float(uint16_t b) { return bits_to_float(static_cast<uint32_t>(b) << 16); }

inline uint16_t float_to_bf16_bits(float f) {
  const uint32_t x = float_to_bits(f);
  const uint32_t rounded = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(select_bits((x & 0x7fffffffu) > 0x7f800000u, 0x7fc0u, rounded));
}

inline float to_float(float v) { return v; }
inline float to_float(Half v) { return half_bits_to_float(v.bits); }
inline float to_float(BFloat16 v) { return bf16_bits_to_float(v.bits); }

template <typename T>
inline T from_float(float v);
template <>
inline float from_float<float>(float v) {
  return v;
}
template <>
inline Half from_float<Half>(float v) {
  return Half{float_to_half_bits(v)};
}
template <>
inline BFloat16 from_float<BFloat16>(float v) {
  return BFloat16{float_to_bf16_bits(v)};
}

// Calls f(T{}) with T the storage type of `t`, so a kernel is written once as a template.
template <typename F>
inline void dispatch_dtype(DType t, F&& f) {
  switch (t) {
    case DType::kFloat32: f(float{}); return;
    case DType::kFloat16: f(Half{}); return;
    case DType::kBFloat16: f(BFloat16{}); return;
  }
}

}  // namespace ldmfast::cpu
