// SPDX-License-Identifier: Apache-2.0
/// \file parameter.hpp
/// \brief nn::parameter: a trainable tensor and its gradient, named on demand.
#pragma once

#include <string>
#include <vector>

#include "../backend/tensor.hpp"

namespace promoe::nn {

template <class T, class B>
struct parameter {
  tensor<T, B> value;
  tensor<T, B> grad;

  parameter() = default;
  explicit parameter(std::vector<index_t> shape) { resize(std::move(shape)); }

  /// Zero value and zero gradient of the given shape.
  void resize(std::vector<index_t> shape) {
    value.resize(shape);
    grad.resize(std::move(shape));
    value.fill(T(0));
    grad.fill(T(0));
  }
  void zero_grad() { grad.fill(T(0)); }
  named_parameter<T> named(std::string name) { return {std::move(name), value.shape(), value.data(), grad.data()}; }
};

}  // namespace promoe::nn
