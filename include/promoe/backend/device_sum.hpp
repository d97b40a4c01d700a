// SPDX-License-Identifier: Apache-2.0
/// \file device_sum.hpp
/// \brief ops::sum_into: a sum that stays in device memory, so a value needed only later (a
/// loss for the log) costs the device no wait for the host.
///
/// The sum is taken in double over fixed chunks of 1024 elements (each in index order), then
/// over the chunks in order by one thread: the result is the same on every thread count and
/// run, and on every host backend (a GPU compiler may fuse a multiply and an add, which can
/// change the last bits).
#pragma once

#include "backend.hpp"
#include "tensor.hpp"

namespace promoe::ops {

namespace detail {

/// Elements per partial sum.
inline constexpr index_t sum_chunk = 1024;
inline index_t sum_chunks(index_t n) { return (n + sum_chunk - 1) / sum_chunk; }

/// partial[c] = sum of p[i] (or p[i]^2 with Square) over chunk c of p, in double, in index order.
template <class S, bool Square = false>
struct chunk_sum_functor {
  const S* p;
  index_t n;
  double* partial;
  PROMOE_HOST_DEVICE void operator()(index_t c) const {
    const index_t first = c * sum_chunk;
    const index_t last = first + sum_chunk < n ? first + sum_chunk : n;
    double s = 0.0;
    for (index_t i = first; i < last; ++i) {
      const double v = static_cast<double>(p[i]);
      s += Square ? v * v : v;
    }
    partial[c] = s;
  }
};

/// Sum of partial[0..chunks) in order.
PROMOE_HOST_DEVICE inline double sum_in_order(const double* partial, index_t chunks) {
  double s = 0.0;
  for (index_t c = 0; c < chunks; ++c) s += partial[c];
  return s;
}

/// *out = scale * (sum of the partials) (one thread).
template <class R>
struct finish_sum_functor {
  const double* partial;
  index_t chunks;
  double scale;
  R* out;
  PROMOE_HOST_DEVICE void operator()(index_t) const { *out = static_cast<R>(scale * sum_in_order(partial, chunks)); }
};

}  // namespace detail

/// *out = scale * sum of p[0..n) (double accumulation, deterministic), with out in device
/// memory; nothing waits for the device. `partial` is workspace (reuse it and the sum stops
/// allocating). n = 0 writes 0.
template <class B, class S, class R>
void sum_into(const S* p, index_t n, double scale, R* out, tensor<double, B>& partial) {
  using traits = backend_traits<B>;
  const index_t chunks = detail::sum_chunks(n);
  if (chunks > 0) {
    partial.resize({chunks});
    traits::parallel_for(chunks, detail::chunk_sum_functor<S>{p, n, partial.data()});
  }
  traits::parallel_for(1, detail::finish_sum_functor<R>{chunks > 0 ? partial.data() : nullptr, chunks, scale, out});
}

}  // namespace promoe::ops
