// SPDX-License-Identifier: Apache-2.0
/// \file backends.hpp
/// \brief Backend and (backend, scalar) lists for TEMPLATE_LIST_TEST_CASE, plus small helpers
/// shared by the test files. backend::thrust joins the lists when PROMOE_TEST_THRUST is defined.
#pragma once

#include <cstdint>
#include <tuple>
#include <vector>

#include <promoe/backend/cpu.hpp>
#include <promoe/backend/tensor.hpp>
#include <promoe/core/rng.hpp>
#if defined(PROMOE_TEST_THRUST)
#include <promoe/backend/thrust.hpp>
#endif

namespace promoe_test {

/// A (backend, scalar) pair for TEMPLATE_LIST_TEST_CASE over test_configs.
template <class B, class T>
struct config {
  using backend = B;
  using scalar = T;
};

#if defined(PROMOE_TEST_THRUST)
using test_backends = std::tuple<promoe::backend::cpu, promoe::backend::thrust>;
using test_configs = std::tuple<config<promoe::backend::cpu, double>, config<promoe::backend::cpu, float>,
                                config<promoe::backend::thrust, double>, config<promoe::backend::thrust, float>>;
#else
using test_backends = std::tuple<promoe::backend::cpu>;
using test_configs = std::tuple<config<promoe::backend::cpu, double>, config<promoe::backend::cpu, float>>;
#endif

/// Host values -> tensor in backend B's memory (the count is checked against the shape).
template <class B, class T>
promoe::tensor<T, B> to_device(const std::vector<T>& values, std::vector<promoe::index_t> shape) {
  return promoe::tensor<T, B>::from_host(values, std::move(shape));
}

/// n values uniform in [-scale, scale) from stream 0 of promoe::rng(seed): reproducible.
template <class T>
std::vector<T> random_vector(std::size_t n, std::uint64_t seed, double scale = 1.0) {
  std::vector<T> v(n);
  for (std::size_t i = 0; i < n; ++i)
    v[i] = static_cast<T>((2.0 * promoe::rng::uniform(seed, 0, i) - 1.0) * scale);
  return v;
}

/// Relative tolerance for comparisons against float64 references: 1e-12 (double), 1e-5 (float).
template <class T>
constexpr double tolerance() {
  return sizeof(T) >= sizeof(double) ? 1e-12 : 1e-5;
}

}  // namespace promoe_test

// The test files use these names unqualified (promoe_test::tolerance stays qualified).
using promoe_test::config;
using promoe_test::random_vector;
using promoe_test::test_backends;
using promoe_test::test_configs;
using promoe_test::to_device;
