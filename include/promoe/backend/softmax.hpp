// SPDX-License-Identifier: Apache-2.0
/// \file softmax.hpp
/// \brief Row softmax and its backward as index functors (one row per call), shared by the
/// backend-generic attention and the host attention kernels.
#pragma once

#include "../core/config.hpp"
#include "../core/fast_math.hpp"

namespace promoe::detail {

/// sum_j x[j] * y[j] (y = nullptr: sum_j x[j]) in 8 interleaved partial sums, so the adds
/// vectorise and do not wait on each other (a single running sum is one long dependency
/// chain, which the compiler may not reorder).
template <class T>
PROMOE_HOST_DEVICE inline T row_sum(const T* x, const T* y, index_t n) {
  constexpr index_t lanes = 8;
  T part[lanes] = {};
  index_t j = 0;
  for (; j + lanes <= n; j += lanes)
    for (index_t u = 0; u < lanes; ++u) part[u] += y ? x[j + u] * y[j + u] : x[j + u];
  T s = T(0);
  for (; j < n; ++j) s += y ? x[j] * y[j] : x[j];
  for (index_t u = 0; u < lanes; ++u) s += part[u];
  return s;
}

/// Row r of the scores: in place, p = exp(s - max s) / sum exp(s - max s).
template <class T>
struct softmax_rows_functor {
  T* p;  // [rows, n] contiguous: scores in, probabilities out
  index_t n;

  PROMOE_HOST_DEVICE void operator()(index_t r) const {
    T* row = p + r * n;
    T m = row[0];
    for (index_t j = 1; j < n; ++j) m = row[j] > m ? row[j] : m;
    for (index_t j = 0; j < n; ++j) row[j] = fast_exp(row[j] - m);  // vectorises
    const T inv = T(1) / row_sum<T>(row, nullptr, n);
    for (index_t j = 0; j < n; ++j) row[j] *= inv;
  }
};

/// Row r, in place: dS = P * (dP - sum_j dP * P) (the softmax backward; a scale of the
/// scores is applied by whatever consumes dS).
template <class T>
struct softmax_backward_rows_functor {
  const T* p;  // [rows, n] probabilities
  T* g;        // [rows, n] contiguous: dP in, dS out
  index_t n;

  PROMOE_HOST_DEVICE void operator()(index_t r) const {
    const T* pr = p + r * n;
    T* gr = g + r * n;
    const T dot = row_sum(gr, pr, n);
    for (index_t j = 0; j < n; ++j) gr[j] = pr[j] * (gr[j] - dot);
  }
};

}  // namespace promoe::detail
