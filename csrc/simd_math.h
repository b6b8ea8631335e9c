// Scalar helpers the CPU kernels share (csrc/dino_loss.cpp, csrc/sinkhorn.cpp, csrc/cross_entropy.cpp):
// forced inlining, per-ISA clones, a vectorizable fp32 exp and widening of bf16/fp16 rows.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

// Every includer's kernels round x / tau identically in every pass (see csrc/dino_loss.cpp).
#pragma GCC optimize("fp-contract=off")

namespace {

#if defined(__GNUC__)
#define DF_INLINE inline __attribute__((always_inline))
#else
#define DF_INLINE inline
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define DF_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DF_CLONES
#endif

// exp(x) = 2^n * exp(r), n = round(x / ln 2), |r| <= ln(2) / 2, Cephes' degree-6 polynomial for
// exp(r) (about 1 ulp). Branch-free, so `omp simd` loops calling it vectorize. Inputs are clamped to
// [-87, 88]: below, the result (1.6e-38) is negligible next to the sums it enters, which are >= 1.
// The float whose bits are `bits`: std::bit_cast without C++20 (this file must stay C++17, the
// standard torch < 2.12's headers build with). memcpy of 4 bytes compiles to one register move.
DF_INLINE float float_from_bits(int32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

DF_INLINE float vexp(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  float n = x * 1.44269504088896341f + 12582912.0f;  // adding 1.5 * 2^23 rounds to an integer
  n -= 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * float_from_bits((static_cast<int32_t>(n) + 127) << 23);
}

DF_INLINE double vexp(double x) { return std::exp(x); }

// A row as acc_t: the input itself when it already is, else widened into `buffer`.
template <typename scalar_t, typename acc_t>
DF_INLINE const acc_t* widen(const scalar_t* row, int64_t K, acc_t* buffer) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return row;
  } else {
#pragma omp simd
    for (int64_t k = 0; k < K; ++k) buffer[k] = static_cast<acc_t>(row[k]);
    return buffer;
  }
}

}  // namespace
