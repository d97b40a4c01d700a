// SPDX-License-Identifier: Apache-2.0
/// \file softmax.hpp
/// \brief Row softmax and its backward as index functors (one row per call), shared by the
/// backend-generic attention and the host attention kernels.
#pragma once

#include "../core/bf16.hpp"
#include "../core/config.hpp"
#include "../core/fast_math.hpp"
#include "../core/lane_sum.hpp"

namespace promoe::detail {

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
    const compute_t<T> inv = compute_t<T>(1) / lane_sum<compute_t<T>>(n, [row](index_t j) { return row[j]; });
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
    const compute_t<T> dot = lane_sum<compute_t<T>>(n, [gr, pr](index_t j) { return gr[j] * pr[j]; });
    for (index_t j = 0; j < n; ++j) gr[j] = pr[j] * (gr[j] - dot);
  }
};

}  // namespace promoe::detail
