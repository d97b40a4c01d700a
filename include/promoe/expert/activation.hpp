// SPDX-License-Identifier: Apache-2.0
/// \file activation.hpp
/// \brief Activation policies for experts: value and derivative, usable on host and device.
///
///  - act::gelu_tanh : GELU with the tanh approximation (DiT, ProMoE experts)
///  - act::gelu      : exact GELU (erf)
///  - act::silu      : x * sigmoid(x) (the gate of SwiGLU)
///  - act::relu
#pragma once

#include <cmath>
#include <concepts>

#include "../core/bf16.hpp"
#include "../core/config.hpp"
#include "../core/fast_math.hpp"

namespace promoe::act {

struct gelu_tanh {
  static constexpr const char* name = "gelu_tanh";
  /// 1 + tanh(u) = 2 / (1 + exp(-2u)): one exp, no cancellation where tanh(u) is near -1,
  /// and several times faster than tanh in libm.
  template <class T>
  PROMOE_HOST_DEVICE static T one_plus_tanh(T x) {
    const T c = T(0.7978845608028654);  // sqrt(2 / pi)
    return T(2) / (T(1) + fast_exp(T(-2) * c * (x + T(0.044715) * x * x * x)));
  }
  template <class T>
  PROMOE_HOST_DEVICE static T value(T x) {
    return T(0.5) * x * one_plus_tanh(x);
  }
  template <class T>
  PROMOE_HOST_DEVICE static T derivative(T x) {
    const T c = T(0.7978845608028654);
    const T p = one_plus_tanh(x);  // 1 + t;  1 - t^2 = p (2 - p)
    return T(0.5) * p + T(0.5) * x * p * (T(2) - p) * c * (T(1) + T(3 * 0.044715) * x * x);
  }
};

struct gelu {
  static constexpr const char* name = "gelu";
  template <class T>
  PROMOE_HOST_DEVICE static T value(T x) {
    using std::erf;
    return T(0.5) * x * (T(1) + erf(x * T(0.7071067811865476)));
  }
  template <class T>
  PROMOE_HOST_DEVICE static T derivative(T x) {
    using std::erf;
    using std::exp;
    return T(0.5) * (T(1) + erf(x * T(0.7071067811865476))) + x * exp(T(-0.5) * x * x) * T(0.3989422804014327);
  }
};

struct silu {
  static constexpr const char* name = "silu";
  template <class T>
  PROMOE_HOST_DEVICE static T value(T x) {
    return x / (T(1) + fast_exp(-x));
  }
  template <class T>
  PROMOE_HOST_DEVICE static T derivative(T x) {
    const T s = T(1) / (T(1) + fast_exp(-x));
    return s * (T(1) + x * (T(1) - s));
  }
};

struct relu {
  static constexpr const char* name = "relu";
  template <class T>
  PROMOE_HOST_DEVICE static T value(T x) { return x > T(0) ? x : T(0); }
  template <class T>
  PROMOE_HOST_DEVICE static T derivative(T x) { return x > T(0) ? T(1) : T(0); }
};

}  // namespace promoe::act

namespace promoe::act {

/// out[r, :] = Act(in[r, :]) for one row (any leading dimensions; out may be in).
template <class Act, class T>
struct apply_rows_functor {
  const T* in;  // [rows, cols], leading dimension ldi
  index_t ldi;
  T* out;  // [rows, cols], leading dimension ldo
  index_t ldo, cols;
  PROMOE_HOST_DEVICE void operator()(index_t r) const {
    for (index_t j = 0; j < cols; ++j) out[r * ldo + j] = Act::value(static_cast<compute_t<T>>(in[r * ldi + j]));
  }
};

/// h[r, :] += bias, then out[r, :] = Act(h[r, :]) for one row: a layer's bias and its
/// activation in one pass over the pre-activation a GEMM has just written (with beta 0),
/// instead of writing the bias first and activating after the GEMM.
template <class Act, class T>
struct bias_apply_rows_functor {
  T* h;  // [rows, cols], leading dimension ldh: in, GEMM output; out, GEMM output + bias
  index_t ldh;
  const T* bias;  // [cols]
  T* out;         // [rows, cols], leading dimension ldo
  index_t ldo, cols;
  PROMOE_HOST_DEVICE void operator()(index_t r) const {
    T* hr = h + r * ldh;
    T* o = out + r * ldo;
    for (index_t j = 0; j < cols; ++j) {
      const compute_t<T> v = hr[j] + bias[j];  // bf16: the activation runs in float
      hr[j] = v;
      o[j] = Act::value(v);
    }
  }
};

/// dx[r, :] (+)= dy[r, :] * Act'(x[r, :]) for one row; dx may be dy (then accumulate is false).
template <class Act, class T>
struct backward_rows_functor {
  const T* x;  // [rows, cols] the activation's input, leading dimension ldx
  index_t ldx;
  const T* dy;  // [rows, cols] gradient at its output, leading dimension lddy
  index_t lddy;
  T* dx;  // [rows, cols] gradient at its input, leading dimension lddx
  index_t lddx, cols;
  bool accumulate;
  PROMOE_HOST_DEVICE void operator()(index_t r) const {
    const T* xr = x + r * ldx;
    const T* gr = dy + r * lddy;
    T* o = dx + r * lddx;
    const auto g = [xr, gr](index_t j) {
      return static_cast<compute_t<T>>(gr[j]) * Act::derivative(static_cast<compute_t<T>>(xr[j]));
    };
    // Two loops, not a branch per element: each vectorises.
    if (accumulate) {
      for (index_t j = 0; j < cols; ++j) o[j] = o[j] + g(j);
    } else {
      for (index_t j = 0; j < cols; ++j) o[j] = g(j);
    }
  }
};

}  // namespace promoe::act

namespace promoe {
/// An activation: static value(x) and derivative(x) for float and double.
template <class A>
concept ActivationPolicy = requires(float f, double d) {
  { A::value(f) } -> std::same_as<float>;
  { A::derivative(d) } -> std::same_as<double>;
};
}  // namespace promoe
