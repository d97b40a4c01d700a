// SPDX-License-Identifier: Apache-2.0
/// \file linear_gate.hpp
/// \brief linear_gate: logits = x W^T with W [E, D] and no bias (`gate.weight`), with its
/// backward; the scoring layer of the linear top-k and expert-choice routers.
#pragma once

#include <cmath>
#include <string>

#include "../backend/init.hpp"
#include "../backend/ops.hpp"
#include "../backend/tensor.hpp"
#include "../core/rng.hpp"

namespace promoe::router {

template <class T, class B>
class linear_gate {
 public:
  linear_gate(index_t experts, index_t dim, rng& gen, std::string name = "gate.weight") : name_(std::move(name)) {
    weight_.resize({experts, dim});
    grad_.resize({experts, dim});
    grad_.fill(T(0));
    // DiT-MoE's gate is a bare Parameter with kaiming_uniform(a = sqrt(5)): U(-1/sqrt(D), 1/sqrt(D)).
    init::uniform<B>(weight_.data(), weight_.size(), 1.0 / std::sqrt(static_cast<double>(dim)), gen);
  }

  /// logits [tokens, E] = x W^T
  void forward(const_matrix_view<T> x, tensor<T, B>& logits) const {
    logits.resize({x.rows, weight_.dim(0)});
    ops::gemm<B, T>(x, transpose::no, weight_.cmatrix(), transpose::yes, logits.matrix());
  }

  /// W.grad += dlogits^T x; dx += dlogits W
  void backward(const_matrix_view<T> x, const tensor<T, B>& dlogits, matrix_view<T> dx) {
    ops::gemm<B, T>(dlogits.cmatrix(), transpose::yes, x, transpose::no, grad_.matrix(), T(1), T(1));
    ops::gemm<B, T>(dlogits.cmatrix(), transpose::no, weight_.cmatrix(), transpose::no, dx, T(1), T(1));
  }

  void zero_grad() { grad_.fill(T(0)); }

  template <class F>
  void for_each_parameter(F&& f) {
    f(named_parameter<T>{name_, weight_.shape(), weight_.data(), grad_.data()});
  }

 private:
  std::string name_;
  tensor<T, B> weight_;  // [E, D]
  tensor<T, B> grad_;
};

}  // namespace promoe::router
