// Scalar fp16 / bf16 <-> fp32 conversions for the CPU kernel (portable, round-to-nearest-even, no intrinsics).
#pragma once

#include <cstdint>
#include <cstring>

namespace emovec {

struct half_t { uint16_t bits; };
struct bfloat16_t { uint16_t bits; };

inline float bits_to_float(uint32_t bits) { float f; std::memcpy(&f, &bits, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

inline float to_float(float x) { return x; }
inline float to_float(bfloat16_t x) { return bits_to_float(static_cast<uint32_t>(x.bits) << 16); }
inline float to_float(half_t x) {
  const uint32_t sign = static_cast<uint32_t>(x.bits & 0x8000u) << 16;
  const uint32_t exponent = (x.bits >> 10) & 0x1Fu, mantissa = x.bits & 0x3FFu;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in fp32
    return bits_to_float(float_to_bits(static_cast<float>(mantissa) * 5.9604644775390625e-8f) | sign);
  }
  if (exponent == 31) return bits_to_float(sign | 0x7F800000u | (mantissa << 13));  // inf / nan
  return bits_to_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

template <typename T> T from_float(float f);
template <> inline float from_float<float>(float f) { return f; }
// the bits of the bf16 nearest an fp32's (ties to even; a NaN stays a quiet NaN), branch-free so loops vectorise
inline uint32_t bf16_rounded_bits(uint32_t u) {
  return (u & 0x7FFFFFFFu) > 0x7F800000u ? (u >> 16) | 0x40u : (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
}
template <> inline bfloat16_t from_float<bfloat16_t>(float f) {
  return {static_cast<uint16_t>(bf16_rounded_bits(float_to_bits(f)))};
}
template <> inline half_t from_float<half_t>(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t magnitude = u & 0x7FFFFFFFu;
  if (magnitude >= 0x7F800000u) return {static_cast<uint16_t>(sign | (magnitude > 0x7F800000u ? 0x7E00u : 0x7C00u))};
  if (magnitude >= 0x477FF000u) return {static_cast<uint16_t>(sign | 0x7C00u)};  // rounds to infinity
  if (magnitude < 0x38800000u) {
    // subnormal half: adding 0.5 puts the value's 2^-24 units in the low mantissa bits, rounded by the FPU
    const uint32_t t = float_to_bits(bits_to_float(magnitude) + 0.5f);
    return {static_cast<uint16_t>(sign | (t - 0x3F000000u))};
  }
  magnitude += 0xC8000FFFu + ((magnitude >> 13) & 1u);  // rebias exponent by -112, round to nearest even
  return {static_cast<uint16_t>(sign | (magnitude >> 13))};
}

}  // namespace emovec
