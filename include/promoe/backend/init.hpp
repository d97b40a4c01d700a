// SPDX-License-Identifier: Apache-2.0
/// \file init.hpp
/// \brief Parameter initialisers (Xavier-uniform, normal, uniform) drawn from promoe::rng on
/// the host and copied to the backend, so every backend starts from identical weights.
#pragma once

#include <cmath>
#include <vector>

#include "../core/rng.hpp"
#include "backend.hpp"

namespace promoe::init {

/// dst[i] = U(-bound, bound) from a fresh stream of `gen`.
template <class B, class T>
void uniform(T* dst, index_t n, double bound, rng& gen) {
  const auto stream = gen.next_stream();
  std::vector<T> host(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i) host[i] = static_cast<T>((2.0 * gen.uniform(stream, i) - 1.0) * bound);
  backend_traits<B>::copy_from_host(host.data(), n, dst);
}

/// Xavier-uniform for a PyTorch Linear weight [out, in]: bound sqrt(6 / (in + out)).
template <class B, class T>
void xavier_uniform(T* dst, index_t out, index_t in, rng& gen) {
  uniform<B>(dst, out * in, std::sqrt(6.0 / static_cast<double>(in + out)), gen);
}

/// dst[i] = N(0, std^2) from a fresh stream of `gen`.
template <class B, class T>
void normal(T* dst, index_t n, double std, rng& gen) {
  const auto stream = gen.next_stream();
  std::vector<T> host(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i) host[i] = static_cast<T>(std * gen.normal(stream, i));
  backend_traits<B>::copy_from_host(host.data(), n, dst);
}

}  // namespace promoe::init
