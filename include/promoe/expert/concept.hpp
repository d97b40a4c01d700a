// SPDX-License-Identifier: Apache-2.0
/// \file concept.hpp
/// \brief ExpertPolicy: what an expert policy must provide.
///
/// Expert policies:
///  - expert::mlp<Act> : Linear + bias, Act, Linear + bias (DiT and ProMoE experts; Act =
///                       act::gelu_tanh there)
///  - expert::swiglu   : SwiGLU without biases (DiT-MoE's shared expert)
#pragma once

#include <string>

#include "../backend/cpu.hpp"
#include "../backend/tensor.hpp"
#include "../core/rng.hpp"
#include "naming.hpp"

namespace promoe {

/// An expert policy E has static cache_width(hidden) and scratch_width(hidden), and a
/// template E::bank<T, Backend> holding `count` experts of one width, constructible from
/// (count, dim, hidden), with init(rng&), zero_grad(), forward(e, x, act, y, accumulate),
/// backward(e, x, act, dy, dx, accumulate_dx, scratch, ones) and
/// for_each_parameter(e, prefix, naming, f).
template <class E>
concept ExpertPolicy = requires(index_t n) {
  { E::cache_width(n) } -> std::convertible_to<index_t>;
  { E::scratch_width(n) } -> std::convertible_to<index_t>;
  typename E::template bank<double, backend::cpu>;
} && std::constructible_from<typename E::template bank<double, backend::cpu>, index_t, index_t, index_t> && requires(typename E::template bank<double, backend::cpu> b, const typename E::template bank<double, backend::cpu> cb,
              index_t i, rng& gen, const_matrix_view<double> cv, matrix_view<double> v, const double* ones,
              const std::string& prefix, const param_naming& names) {
  b.init(gen);
  b.zero_grad();
  cb.forward(i, cv, v, v, true);
  b.backward(i, cv, cv, cv, v, true, v, ones);
  b.for_each_parameter(i, prefix, names, detail::parameter_sink{});
};

}  // namespace promoe
