// SPDX-License-Identifier: Apache-2.0
/// \file fast_math.hpp
/// \brief exp for the element-wise loops (activations, softmax): in float, a branch-free
/// polynomial the compiler vectorises (libm's expf is a call per element and blocks that);
/// in double, std::exp.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "bf16.hpp"
#include "config.hpp"

namespace promoe {

namespace detail {
PROMOE_HOST_DEVICE inline float bits_to_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
PROMOE_HOST_DEVICE inline std::uint32_t float_to_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
}  // namespace detail

/// e^x in float within 2 ulp of the exact value for x in [-87, 88]: x = n ln 2 + r with
/// |r| <= ln2 / 2, Cephes' degree-6 polynomial for e^r, and 2^n put into the exponent bits.
/// Saturates outside that range (e^-87.3 ~ 1e-38, e^88 ~ 1.7e38); NaN gives NaN.
PROMOE_HOST_DEVICE inline float exp_fast(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);
#else
  x = x > 88.0f ? 88.0f : x;
  x = x < -87.3f ? -87.3f : x;
  // n = round(x / ln 2) without a float -> int conversion: adding 1.5 * 2^23 leaves n in the
  // low mantissa bits.
  constexpr float shifter = 12582912.0f;
  const float t = x * 1.44269504088896341f + shifter;
  const float n = t - shifter;
  float r = x - n * 0.693359375f;  // ln 2 in two parts, so r is exact
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const std::uint32_t exponent = (detail::float_to_bits(t) - detail::float_to_bits(shifter) + 127u) << 23;
  return p * detail::bits_to_float(exponent);
#endif
}

/// exp_fast in float, std::exp in double (tests and references keep full precision).
template <class T>
PROMOE_HOST_DEVICE inline T fast_exp(T x) {
  if constexpr (sizeof(T) == sizeof(float) || is_storage_half_v<T>) {
    return T(exp_fast(static_cast<float>(x)));
  } else {
    using std::exp;
    return exp(x);
  }
}

}  // namespace promoe
