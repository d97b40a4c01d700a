// SPDX-License-Identifier: Apache-2.0
/// \file lane_sum.hpp
/// \brief lane_sum: a sum over a row in 8 interleaved partial sums.
///
/// A plain running sum is one dependency chain (each add waits for the previous one) that
/// the compiler may not reorder under strict IEEE semantics; 8 independent partial sums
/// vectorise into one SIMD add per 8 elements and are at least as accurate. Every backend
/// runs the same order, so results stay identical across backends.
#pragma once

#include "bf16.hpp"
#include "config.hpp"

namespace promoe {

/// f(0) + f(1) + ... + f(n - 1), accumulated in 8 interleaved partial sums of type T.
template <class T, class F>
PROMOE_HOST_DEVICE inline T lane_sum(index_t n, F f) {
  constexpr index_t lanes = 8;
  T part[lanes] = {};
  index_t j = 0;
  for (; j + lanes <= n; j += lanes)
    for (index_t u = 0; u < lanes; ++u) part[u] += f(j + u);
  for (index_t u = 0; j < n; ++j, ++u) part[u] += f(j);
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

}  // namespace promoe
