// SPDX-License-Identifier: Apache-2.0
/// \file expert_rows.hpp
/// \brief expert_rows: token rows in expert order, grouped by expert, and the pieces an expert
/// bank needs to run all its experts at once (a grouped GEMM per stage, per-row expert biases)
/// instead of one expert after another. Backends whose tasks run one after another (a GPU)
/// take this path: a handful of launches per layer instead of a handful per expert.
#pragma once

#include <span>
#include <vector>

#include "../backend/ops.hpp"
#include "../core/config.hpp"
#include "../core/error.hpp"

namespace promoe::expert {

/// Rows in expert order: expert e owns rows first(e) .. first(e) + rows(e) - 1 (a dispatch
/// plan's offsets, on the host and in the backend's memory).
struct expert_rows {
  std::span<const index_t> host_offsets;  ///< [experts + 1] on the host: the GEMMs' sizes
  const index_t* offsets = nullptr;       ///< the same in the backend's memory: each row's expert

  index_t experts() const { return static_cast<index_t>(host_offsets.size()) - 1; }
  index_t first(index_t e) const { return host_offsets[static_cast<std::size_t>(e)]; }
  index_t rows(index_t e) const { return first(e + 1) - first(e); }
  index_t total_rows() const { return host_offsets.empty() ? 0 : host_offsets.back(); }

  /// Throws unless these are the rows of `bank_experts` experts and the inputs have them all.
  void check(index_t bank_experts, index_t input_rows, const char* who) const {
    PROMOE_CHECK(experts() == bank_experts, who, ": rows grouped for ", experts(), " experts, the bank has ",
                 bank_experts);
    PROMOE_CHECK(input_rows == total_rows(), who, ": inputs have ", input_rows, " rows, the groups ", total_rows());
  }
};

/// The expert owning row r, given offsets[0] <= r < offsets[experts]: the last e with
/// offsets[e] <= r (experts without rows repeat an offset and are passed over).
PROMOE_HOST_DEVICE inline index_t expert_of_row(const index_t* offsets, index_t experts, index_t r) {
  index_t lo = 0, hi = experts;  // offsets[lo] <= r < offsets[hi]
  while (hi - lo > 1) {
    const index_t mid = lo + (hi - lo) / 2;
    if (offsets[mid] <= r)
      lo = mid;
    else
      hi = mid;
  }
  return lo;
}

/// Runs the row functor f on row r with f.bias moved to the bias of row r's expert (biases
/// stored [experts, stride]).
template <class F>
struct with_expert_bias {
  F f;
  const index_t* offsets;  // [experts + 1]
  index_t experts, stride;
  PROMOE_HOST_DEVICE void operator()(index_t r) const {
    F g = f;
    g.bias += expert_of_row(offsets, experts, r) * stride;
    g(r);
  }
};

/// One grouped GEMM over the experts that have rows: add(e, first, rows, push) calls
/// push(gemm_problem) for each GEMM of expert e (several per expert are independent stages
/// that share a launch). The problem list is the calling thread's, reused between calls.
template <class B, class T, class Add>
void gemm_per_expert(const expert_rows& g, Add&& add) {
  thread_local std::vector<gemm_problem<T>> problems;
  problems.clear();
  const auto push = [](const gemm_problem<T>& p) { problems.push_back(p); };
  for (index_t e = 0; e < g.experts(); ++e)
    if (g.rows(e) > 0) add(e, g.first(e), g.rows(e), push);
  ops::gemm_grouped<B, T>(std::span<const gemm_problem<T>>(problems));
}

}  // namespace promoe::expert
