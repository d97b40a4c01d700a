// SPDX-License-Identifier: Apache-2.0
/// \file timestep_embedder.hpp
/// \brief nn::timestep_embedder: DiT's `t_embedder`. Scalar timesteps t [N] -> sinusoidal
/// frequency embedding [N, 256] = [cos(t f_0 .. t f_127), sin(t f_0 .. t f_127)] (COS FIRST,
/// the opposite of the position embedding), f_i = exp(-ln(10000) i / 128), then
/// Linear(256 -> D), SiLU, Linear(D -> D).
///
/// The angles t * f_i (and f_i) are computed in float64 and only the cos / sin values are
/// rounded to T: near t = 1000, float32 angles alone move the outputs by ~2e-5 relative.
/// (The reference computes freqs and angles in float32; this is the exact value it rounds.)
#pragma once

#include <cmath>
#include <string>

#include "../backend/ops.hpp"
#include "../backend/tensor.hpp"
#include "../core/bf16.hpp"
#include "../core/error.hpp"
#include "../core/rng.hpp"
#include "../expert/activation.hpp"
#include "linear.hpp"
#include "parameter.hpp"

namespace promoe::nn {

namespace detail {
/// out[r, :] = [cos(t_r f_0 ..), sin(t_r f_0 ..)], f_i = exp(-ln(max_period) i / half), in double.
template <class T, class Time = T>
struct timestep_frequency_functor {
  const Time* t;  // [n]
  T* out;      // [n, 2 * half], leading dimension ld
  index_t ld, half;
  double log_max_period;
  PROMOE_HOST_DEVICE void operator()(index_t r) const {
    using std::cos;
    using std::exp;
    using std::sin;
    const double tr = static_cast<double>(t[r]);
    T* o = out + r * ld;
    for (index_t i = 0; i < half; ++i) {
      const double angle = tr * exp(-log_max_period * static_cast<double>(i) / static_cast<double>(half));
      o[i] = static_cast<T>(cos(angle));
      o[half + i] = static_cast<T>(sin(angle));
    }
  }
};


}  // namespace detail

/// out [n, 2*half] = the sinusoidal embedding of the timesteps t [n] (backend memory):
/// cos in the first half of the columns, sin in the second, frequencies
/// f_i = max_period^(-i / half). out.cols must be even (half = out.cols / 2).
template <class B, class T, class Time>
void timestep_frequency_embedding(const Time* t, index_t n, matrix_view<T> out, double max_period = 10000.0) {
  PROMOE_CHECK(out.rows == n && out.cols >= 2 && out.cols % 2 == 0, "timestep_frequency_embedding: out is [",
               out.rows, ", ", out.cols, "], expected [", n, ", an even number of columns]");
  backend_traits<B>::parallel_for(
      n, detail::timestep_frequency_functor<T, Time>{t, out.data, out.ld, out.cols / 2, std::log(max_period)});
}

template <class T, class B>
class timestep_embedder {
 public:
  using backend_type = B;
  using value_type = T;
  /// Width of the sinusoidal embedding (128 frequencies, cos then sin).
  static constexpr index_t frequency_embedding_size = 256;
  /// The prefix of this module in the reference DiT state dict.
  static constexpr const char* default_prefix = "t_embedder.";

  /// What backward needs, and its scratch; owned by the caller, reused across calls.
  struct cache {
    tensor<T, B> freq;     ///< [n, 256] the sinusoidal embedding (input of mlp.0)
    tensor<T, B> hidden;   ///< [n, D] mlp.0 output (pre-activation)
    tensor<T, B> act;      ///< [n, D] SiLU(hidden) (input of mlp.2)
    tensor<T, B> dhidden;  ///< [n, D] backward scratch
    tensor<T, B> ones;     ///< at least n ones (bias gradients)
    index_t rows = 0;      ///< n of the last forward
  };

  timestep_embedder() = default;
  explicit timestep_embedder(index_t dim) : dim_(dim) {
    PROMOE_CHECK(dim >= 1, "nn::timestep_embedder: hidden size must be positive, got ", dim);
    mlp0 = linear<T, B>(frequency_embedding_size, dim, true);
    mlp2 = linear<T, B>(dim, dim, true);
  }

  index_t dim() const { return dim_; }

  /// N(0, 0.02^2) weights, zero biases (DiT's initialize_weights).
  void init(rng& gen) {
    mlp0.init_normal(0.02, gen);
    mlp2.init_normal(0.02, gen);
  }

  /// y [n, D] = mlp.2(SiLU(mlp.0(frequency_embedding(t)))) for timesteps t [n] in backend
  /// memory (any real values, e.g. 0 .. 1000; float for bf16 models, whose 8-bit mantissa
  /// would quantise the time).
  void forward(const compute_t<T>* t, index_t n, matrix_view<T> y, cache& c) const {
    PROMOE_CHECK(n >= 0 && (n == 0 || t != nullptr), "nn::timestep_embedder: t must hold n = ", n,
                 " timesteps");
    PROMOE_CHECK(y.rows == n && y.cols == dim_, "nn::timestep_embedder: y is [", y.rows, ", ", y.cols,
                 "], expected [", n, ", ", dim_, "] (one row per timestep)");
    c.rows = n;
    c.freq.resize({n, frequency_embedding_size});
    c.hidden.resize({n, dim_});
    c.act.resize({n, dim_});
    if (n == 0) return;
    timestep_frequency_embedding<B>(t, n, c.freq.matrix());
    mlp0.forward(c.freq.cmatrix(), c.hidden.matrix());
    backend_traits<B>::parallel_for(n, act::apply_rows_functor<act::silu, T>{c.hidden.data(), dim_, c.act.data(), dim_, dim_});
    mlp2.forward(c.act.cmatrix(), y);
  }

  /// Accumulates the parameter gradients of dy [n, D]. The timesteps get no gradient.
  void backward(const_matrix_view<T> dy, cache& c) {
    const index_t n = c.rows;
    PROMOE_CHECK(dy.rows == n && dy.cols == dim_, "nn::timestep_embedder::backward: dy is [", dy.rows, ", ",
                 dy.cols, "], expected [", n, ", ", dim_, "] (the forward's y)");
    if (n == 0) return;
    if (c.ones.size() < n) {
      c.ones.resize({n});
      c.ones.fill(T(1));
    }
    c.dhidden.resize({n, dim_});
    c.dhidden.fill(T(0));
    mlp2.backward(c.act.cmatrix(), dy, c.dhidden.matrix(), c.ones.data());
    backend_traits<B>::parallel_for(n,
                                    act::backward_rows_functor<act::silu, T>{c.hidden.data(), dim_, c.dhidden.data(), dim_,
                                                                             c.dhidden.data(), dim_, dim_, false});
    mlp0.backward(c.freq.cmatrix(), c.dhidden.cmatrix(), matrix_view<T>{}, c.ones.data());
  }

  void zero_grad() {
    mlp0.zero_grad();
    mlp2.zero_grad();
  }

  /// f(named_parameter) for `prefix`mlp.0.weight [D, 256], mlp.0.bias, mlp.2.weight [D, D],
  /// mlp.2.bias (prefix "t_embedder." in DiT).
  template <class F>
  void for_each_parameter(const std::string& prefix, F&& f) {
    mlp0.for_each_parameter(prefix + "mlp.0.", f);
    mlp2.for_each_parameter(prefix + "mlp.2.", f);
  }

  linear<T, B> mlp0;  ///< Linear(256 -> D), `mlp.0`
  linear<T, B> mlp2;  ///< Linear(D -> D), `mlp.2`

 private:
  index_t dim_ = 0;
};

}  // namespace promoe::nn
