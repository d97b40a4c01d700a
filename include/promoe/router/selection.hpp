// SPDX-License-Identifier: Apache-2.0
/// \file selection.hpp
/// \brief Top-C selection within groups of (token, expert) scores, for routers whose
/// choice is not per token (expert choice, Expert Race), and the plan they produce.
///
/// Runs on the host over a host copy of the scores: selection is a small share of the
/// layer's work, and std::nth_element is hard to beat there. Ties go to the lower flat
/// index (token-major), so results are deterministic.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "../backend/tensor.hpp"
#include "../routing/dispatch_plan.hpp"

namespace promoe::router {

/// Marks in `selected` the `count` items of `items` with the highest scores and returns the
/// count-th highest score (or -inf when nothing is selected). `items` is reordered.
template <class T>
T select_top(const std::vector<T>& scores, std::vector<index_t>& items, index_t count, std::vector<std::uint8_t>& selected) {
  count = std::min<index_t>(count, static_cast<index_t>(items.size()));
  if (count <= 0) return -std::numeric_limits<T>::infinity();
  const auto higher = [&](index_t a, index_t b) { return scores[a] > scores[b] || (scores[a] == scores[b] && a < b); };
  std::nth_element(items.begin(), items.begin() + (count - 1), items.end(), higher);
  for (index_t i = 0; i < count; ++i) selected[items[i]] = 1;
  T kth = scores[items[count - 1]];
  for (index_t i = 0; i < count; ++i) kth = std::min(kth, scores[items[i]]);
  return kth;
}

/// Fills a plan with one slot per expert: slot e of token t holds expert e with gate
/// gates[t, e] when selected[t, e], else it is empty. Then groups the plan.
template <class T, class B>
void plan_from_mask(const std::vector<std::uint8_t>& selected, const std::vector<T>& gates, index_t tokens,
                    index_t experts, index_t plan_experts, dispatch_plan<T, B>& plan) {
  plan.reset(tokens, experts, plan_experts);
  auto& slot_expert = plan.host_slot_expert;
  auto& slot_gate = plan.host_slot_gate;
  slot_expert.assign(static_cast<std::size_t>(tokens * experts), -1);
  slot_gate.assign(static_cast<std::size_t>(tokens * experts), T(0));
  for (index_t i = 0; i < tokens * experts; ++i)
    if (selected[i]) {
      slot_expert[i] = static_cast<std::int32_t>(i % experts);
      slot_gate[i] = gates[i];
    }
  backend_traits<B>::copy_from_host(slot_expert.data(), tokens * experts, plan.slot_expert.data());
  backend_traits<B>::copy_from_host(slot_gate.data(), tokens * experts, plan.slot_gate.data());
  plan.group();
}

}  // namespace promoe::router
