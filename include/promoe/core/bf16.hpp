// SPDX-License-Identifier: Apache-2.0
/// \file bf16.hpp
/// \brief bf16: the bfloat16 format as a storage scalar (float32's sign, exponent and top 7
/// mantissa bits; the layout of CUDA's __nv_bfloat16 and of safetensors' BF16), and
/// compute_t<T>, the type arithmetic on T runs in.
///
/// A model instantiated with T = bf16 keeps weights, activations and gradients in bf16 (half
/// the memory and memory traffic of float32). A bf16 converts to float implicitly and from any
/// arithmetic type (round to nearest, ties to even), so templated code written for float works
/// on it: a + b on two bf16 is float arithmetic, the result rounds when stored. Code that
/// accumulates (sums, dot products, GEMMs) does so in compute_t<T> (float for bf16, T
/// otherwise), and the optimizer keeps float32 master weights (optim::adamw): the
/// mixed-precision recipe of bf16 training.
///
/// (Named bf16, not bfloat16: OpenBLAS's cblas.h declares a global `bfloat16` typedef.)
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "config.hpp"

namespace promoe {

struct bf16 {
  std::uint16_t bits = 0;

  bf16() = default;
  PROMOE_HOST_DEVICE bf16(float f) : bits(round_(f)) {}  // NOLINT: implicit, as float's narrowing
  /// Other arithmetic types go through float: a double within 2^-24 of a tie between two bf16
  /// values may round the other way (double rounding).
  template <class U>
    requires(std::is_arithmetic_v<U> && !std::is_same_v<U, float>)
  PROMOE_HOST_DEVICE bf16(U u) : bits(round_(static_cast<float>(u))) {}  // NOLINT

  PROMOE_HOST_DEVICE operator float() const {  // NOLINT: implicit widening, exact
    const std::uint32_t u = std::uint32_t{bits} << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }

  /// From a raw bit pattern (file formats).
  PROMOE_HOST_DEVICE static bf16 from_bits(std::uint16_t b) {
    bf16 h;
    h.bits = b;
    return h;
  }

  PROMOE_HOST_DEVICE bf16& operator+=(float x) { return *this = bf16(float(*this) + x); }
  PROMOE_HOST_DEVICE bf16& operator-=(float x) { return *this = bf16(float(*this) - x); }
  PROMOE_HOST_DEVICE bf16& operator*=(float x) { return *this = bf16(float(*this) * x); }
  PROMOE_HOST_DEVICE bf16& operator/=(float x) { return *this = bf16(float(*this) / x); }

 private:
  /// Round to nearest, ties to even; NaN stays a (quiet) NaN, overflow goes to infinity.
  /// Branch-free (a select), so loops that store bf16 vectorise.
  PROMOE_HOST_DEVICE static std::uint16_t round_(float f) {
    std::uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    const std::uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const std::uint32_t quiet_nan = (u >> 16) | 0x40u;
    const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
    return static_cast<std::uint16_t>(nan ? quiet_nan : rounded);
  }
};

static_assert(sizeof(bf16) == 2 && std::is_trivially_copyable_v<bf16>);

/// True for the 16-bit storage types (arithmetic on them runs in float).
template <class T>
inline constexpr bool is_storage_half_v = std::is_same_v<T, bf16>;

/// The type arithmetic on values of T runs in and accumulates in.
template <class T>
using compute_t = std::conditional_t<is_storage_half_v<T>, float, T>;

}  // namespace promoe

template <>
class std::numeric_limits<promoe::bf16> {
 public:
  static constexpr bool is_specialized = true;
  static constexpr bool is_signed = true;
  static constexpr bool is_integer = false;
  static constexpr bool is_exact = false;
  static constexpr bool has_infinity = true;
  static constexpr bool has_quiet_NaN = true;
  static constexpr int digits = 8;
  static constexpr int radix = 2;
  static promoe::bf16 lowest() { return promoe::bf16::from_bits(0xff7f); }
  static promoe::bf16 min() { return promoe::bf16::from_bits(0x0080); }
  static promoe::bf16 max() { return promoe::bf16::from_bits(0x7f7f); }
  static promoe::bf16 epsilon() { return promoe::bf16::from_bits(0x3c00); }  // 2^-7
  static promoe::bf16 infinity() { return promoe::bf16::from_bits(0x7f80); }
  static promoe::bf16 quiet_NaN() { return promoe::bf16::from_bits(0x7fc0); }
};
