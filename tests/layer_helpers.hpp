// SPDX-License-Identifier: Apache-2.0
/// \file layer_helpers.hpp
/// \brief Test helpers around moe_layer: the float64 reference's view of a layer's weights,
/// and norm-wise comparison.
#pragma once

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include <promoe/promoe.hpp>

#include "reference.hpp"

namespace promoe_test {

/// Every parameter (or its gradient) of `layer`, by name, as float64 host vectors.
template <class Layer>
reference::params read_params(Layer& layer, bool gradients = false) {
  using T = typename Layer::scalar;
  reference::params p;
  for (const auto& np : layer.parameters()) {
    std::vector<T> host(static_cast<std::size_t>(np.size()));
    Layer::traits::copy_to_host(gradients ? np.grad : np.value, np.size(), host.data());
    p.tensors[np.name] = reference::vec(host.begin(), host.end());
  }
  return p;
}
template <class Layer>
reference::params read_grads(Layer& layer) {
  return read_params(layer, true);
}

/// max |a - b| / max(max |b|, floor): a norm-wise relative error.
template <class A, class B>
double relative_error(const A& a, const B& b, double floor = 1e-300) {
  double diff = 0, scale = floor;
  for (std::size_t i = 0; i < b.size(); ++i) {
    diff = std::max(diff, std::abs(static_cast<double>(a[i]) - static_cast<double>(b[i])));
    scale = std::max(scale, std::abs(static_cast<double>(b[i])));
  }
  return diff / scale;
}

inline reference::score reference_score(promoe::score_fn f) {
  switch (f) {
    case promoe::score_fn::softmax: return reference::score::softmax;
    case promoe::score_fn::sigmoid: return reference::score::sigmoid;
    default: return reference::score::identity;
  }
}

}  // namespace promoe_test
