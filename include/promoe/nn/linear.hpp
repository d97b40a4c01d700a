// SPDX-License-Identifier: Apache-2.0
/// \file linear.hpp
/// \brief nn::linear: y = x W^T + b with W [out, in] (PyTorch layout) and an optional bias.
///
/// Conventions of every nn module: inputs and outputs are row-major matrices in backend
/// memory; forward writes its output; backward ADDS into the input gradient (callers zero
/// it where a fresh gradient is wanted) and accumulates parameter gradients; whatever
/// backward needs beyond the forward's input lives in a `cache` the caller owns.
#pragma once

#include <string>

#include "../backend/init.hpp"
#include "../backend/ops.hpp"
#include "../backend/tensor.hpp"
#include "../core/error.hpp"
#include "../core/rng.hpp"
#include "parameter.hpp"

namespace promoe::nn {

template <class T, class B>
class linear {
 public:
  linear() = default;
  linear(index_t in, index_t out, bool bias = true) : in_(in), out_(out), has_bias_(bias) {
    PROMOE_CHECK(in >= 1 && out >= 1, "nn::linear: sizes must be positive, got in = ", in, ", out = ", out);
    weight.resize({out, in});
    if (bias) this->bias.resize({out});
  }

  index_t in_features() const { return in_; }
  index_t out_features() const { return out_; }
  bool has_bias() const { return has_bias_; }

  /// Xavier-uniform weight, zero bias (DiT's initialisation of every Linear).
  void init_xavier(rng& gen) {
    init::xavier_uniform<B>(weight.value.data(), out_, in_, gen);
    if (has_bias_) bias.value.fill(T(0));
  }
  /// N(0, std^2) weight, zero bias.
  void init_normal(double std, rng& gen) {
    init::normal<B>(weight.value.data(), weight.value.size(), std, gen);
    if (has_bias_) bias.value.fill(T(0));
  }
  /// Zero weight and bias (adaLN-Zero, the final layer).
  void init_zero() {
    weight.value.fill(T(0));
    if (has_bias_) bias.value.fill(T(0));
  }

  /// y [n, out] = x [n, in] W^T + b
  void forward(const_matrix_view<T> x, matrix_view<T> y) const {
    PROMOE_CHECK(x.cols == in_ && y.cols == out_ && y.rows == x.rows, "nn::linear: x [", x.rows, ", ", x.cols,
                 "] -> y [", y.rows, ", ", y.cols, "], expected [n, ", in_, "] -> [n, ", out_, "]");
    if (has_bias_) ops::broadcast_row<B>(y, bias.value.data(), false);
    ops::gemm<B, T>(x, transpose::no, weight.value.cmatrix(), transpose::yes, y, T(1), has_bias_ ? T(1) : T(0));
  }

  /// W.grad += dy^T x; b.grad += column sums of dy (`ones`: at least n ones); dx += dy W
  /// (dx may be empty to skip it).
  void backward(const_matrix_view<T> x, const_matrix_view<T> dy, matrix_view<T> dx, const T* ones) {
    ops::gemm<B, T>(dy, transpose::yes, x, transpose::no, weight.grad.matrix(), T(1), T(1));
    if (has_bias_) ops::accumulate_column_sums<B>(dy, ones, bias.grad.data());
    if (dx.data) ops::gemm<B, T>(dy, transpose::no, weight.value.cmatrix(), transpose::no, dx, T(1), T(1));
  }

  void zero_grad() {
    weight.zero_grad();
    if (has_bias_) bias.zero_grad();
  }

  /// f(named_parameter) for `prefix`weight and `prefix`bias (prefix like "blocks.0.attn.qkv.").
  template <class F>
  void for_each_parameter(const std::string& prefix, F&& f) {
    f(weight.named(prefix + "weight"));
    if (has_bias_) f(bias.named(prefix + "bias"));
  }

  parameter<T, B> weight;  ///< [out, in]
  parameter<T, B> bias;    ///< [out] (empty without bias)

 private:
  index_t in_ = 0, out_ = 0;
  bool has_bias_ = true;
};

}  // namespace promoe::nn
