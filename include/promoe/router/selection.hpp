// SPDX-License-Identifier: Apache-2.0
/// \file selection.hpp
/// \brief Top-C selection within groups of (token, expert) scores, for routers whose choice
/// is not per token (expert choice, Expert Race), and the plan they produce: both where the
/// scores are (on a GPU, the device), so routing waits for no copy to the host.
///
/// select_top_in_groups: the top `count` scores of every group; ties go to the lower flat
/// index (token-major), so results are deterministic.
/// A radix select: each score maps to an unsigned key with the same order, and the count-th
/// largest key of every group is found one bit at a time from the top (a count per chunk of
/// the group, then one decision per group). Ties at that key go to the lower flat index.
/// One pass per key bit (32 for float and bf16, 64 for
/// double) of two small launches each, instead of copying every score to the host.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "../backend/backend.hpp"
#include "../backend/tensor.hpp"
#include "../core/bf16.hpp"
#include "../core/config.hpp"
#include "../routing/dispatch_plan.hpp"

namespace promoe::router {

/// Groups of items of a flat score array. Group g = (outer o, inner i) with o = g / inner and
/// i = g % inner holds `size` items; its item j is at o * outer_stride + i + j * stride.
///  - per-sample expert choice over [tokens, E]: inner = E, outer = the samples,
///    outer_stride = L E, stride = E, size = L (tokens per sample);
///  - batch-level expert choice: the same with one outer group and size = tokens;
///  - Expert Race: one group of every score (size = tokens E, stride 1).
struct score_groups {
  index_t groups = 0, size = 0, stride = 1, inner = 1, outer_stride = 0;
  /// Items per partial count.
  static constexpr index_t chunk = 1024;

  PROMOE_HOST_DEVICE index_t flat(index_t g, index_t j) const {
    return (g / inner) * outer_stride + g % inner + j * stride;
  }
  index_t chunks() const { return (size + chunk - 1) / chunk; }
  /// Cell q of a [groups, chunks] grid: its group and its items [first, last).
  struct cell_range {
    index_t group, first, last;
  };
  PROMOE_HOST_DEVICE cell_range cell(index_t q, index_t chunks) const {
    const index_t first = (q % chunks) * chunk;
    return {q / chunks, first, first + chunk < size ? first + chunk : size};
  }
};

namespace detail {

template <class T>
using radix_key_t = std::conditional_t<std::is_same_v<T, double>, std::uint64_t, std::uint32_t>;

/// An unsigned key in the order of the scores: -0 equals +0, NaN is below every number.
template <class T>
PROMOE_HOST_DEVICE inline radix_key_t<T> to_radix_key(T s) {
  using K = radix_key_t<T>;
  using F = std::conditional_t<std::is_same_v<T, double>, double, float>;
  F v = static_cast<F>(s);
  if (v != v) return K(0);
  v = v + F(0);  // -0 + 0 = +0
  K u;
  std::memcpy(&u, &v, sizeof u);
  constexpr K sign = K(1) << (8 * sizeof(K) - 1);
  return (u & sign) ? K(~u) : K(u | sign);
}
/// The score of a key (NaN for the NaN key 0).
template <class T>
PROMOE_HOST_DEVICE inline T from_radix_key(radix_key_t<T> k) {
  using K = radix_key_t<T>;
  using F = std::conditional_t<std::is_same_v<T, double>, double, float>;
  constexpr K sign = K(1) << (8 * sizeof(K) - 1);
  const K u = (k & sign) ? K(k & ~sign) : K(~k);
  F v;
  std::memcpy(&v, &u, sizeof v);
  return static_cast<T>(v);
}

/// counts[g, c] = items of chunk c of group g whose key is at least prefix[g] | bit.
template <class T>
struct count_at_least_functor {
  const T* scores;
  score_groups groups;
  index_t chunks;
  const radix_key_t<T>* prefix;  // [groups]
  radix_key_t<T> bit;
  index_t* counts;  // [groups, chunks]
  PROMOE_HOST_DEVICE void operator()(index_t q) const {
    const auto [g, first, last] = groups.cell(q, chunks);
    const radix_key_t<T> candidate = prefix[g] | bit;
    index_t n = 0;
    for (index_t j = first; j < last; ++j) n += to_radix_key(scores[groups.flat(g, j)]) >= candidate ? 1 : 0;
    counts[q] = n;
  }
};

/// prefix[g] |= bit when group g has at least `count` items at or above it.
template <class T>
struct decide_bit_functor {
  const index_t* counts;  // [groups, chunks]
  index_t chunks, count;
  radix_key_t<T> bit;
  radix_key_t<T>* prefix;
  PROMOE_HOST_DEVICE void operator()(index_t g) const {
    index_t total = 0;
    for (index_t c = 0; c < chunks; ++c) total += counts[g * chunks + c];
    if (total >= count) prefix[g] |= bit;
  }
};

/// Per chunk: the items above the group's key (counts) and at it (ties).
template <class T>
struct count_above_and_at_functor {
  const T* scores;
  score_groups groups;
  index_t chunks;
  const radix_key_t<T>* prefix;
  index_t *above, *at;  // [groups, chunks]
  PROMOE_HOST_DEVICE void operator()(index_t q) const {
    const auto [g, first, last] = groups.cell(q, chunks);
    index_t a = 0, e = 0;
    for (index_t j = first; j < last; ++j) {
      const radix_key_t<T> k = to_radix_key(scores[groups.flat(g, j)]);
      a += k > prefix[g] ? 1 : 0;
      e += k == prefix[g] ? 1 : 0;
    }
    above[q] = a;
    at[q] = e;
  }
};

/// Per group: at[g, c] becomes the ties before chunk c (an exclusive scan), above[g, 0] the
/// ties the group takes (count - items above), kth[g] the count-th largest score.
template <class T>
struct take_ties_functor {
  index_t chunks, count;
  const radix_key_t<T>* prefix;
  index_t *above, *at;
  T* kth;  // [groups]
  PROMOE_HOST_DEVICE void operator()(index_t g) const {
    index_t n_above = 0, ties_before = 0;
    for (index_t c = 0; c < chunks; ++c) {
      n_above += above[g * chunks + c];
      const index_t here = at[g * chunks + c];
      at[g * chunks + c] = ties_before;
      ties_before += here;
    }
    above[g * chunks] = count - n_above;
    constexpr auto lowest = -std::numeric_limits<compute_t<T>>::infinity();
    kth[g] = count > 0 ? from_radix_key<T>(prefix[g]) : static_cast<T>(lowest);
  }
};

/// selected[item] = 1 for the items above the key and the first ties (in flat-index order).
template <class T>
struct mark_selected_functor {
  const T* scores;
  score_groups groups;
  index_t chunks;
  const radix_key_t<T>* prefix;
  const index_t *ties_taken, *ties_before;  // above[g, 0] and at[g, c] of take_ties_functor
  bool none;                                // count 0: select nothing
  std::uint8_t* selected;
  PROMOE_HOST_DEVICE void operator()(index_t q) const {
    const auto [g, first, last] = groups.cell(q, chunks);
    index_t tie = ties_before[q];
    const index_t take = ties_taken[g * chunks];
    for (index_t j = first; j < last; ++j) {
      const index_t i = groups.flat(g, j);
      const radix_key_t<T> k = to_radix_key(scores[i]);
      bool pick = false;
      if (!none) {
        if (k > prefix[g]) pick = true;
        else if (k == prefix[g]) pick = tie++ < take;
      }
      selected[i] = pick ? 1 : 0;
    }
  }
};

}  // namespace detail

/// Buffers of select_top_in_groups; reuse one and it stops allocating.
template <class T, class B>
struct top_in_groups_workspace {
  tensor<detail::radix_key_t<T>, B> prefix;  ///< [groups]
  tensor<index_t, B> above, at;              ///< [groups, chunks]
};

/// For every group: selected = 1 on its `count` highest scores (all of them when count >=
/// size, none when count <= 0), 0 on its other items; kth[g] = the count-th highest score
/// (-inf when nothing is selected). Ties go to the lower flat index.
/// `selected` and `kth` are in the backend's memory; nothing waits for the device.
template <class B, class T>
void select_top_in_groups(const T* scores, const score_groups& groups, index_t count, std::uint8_t* selected,
                          T* kth, top_in_groups_workspace<T, B>& w) {
  using traits = backend_traits<B>;
  using K = detail::radix_key_t<T>;
  if (groups.groups <= 0 || groups.size <= 0) return;
  count = count < groups.size ? count : groups.size;
  const index_t chunks = groups.chunks(), cells = groups.groups * chunks;
  w.prefix.resize({groups.groups});
  w.above.resize({groups.groups, chunks});
  w.at.resize({groups.groups, chunks});
  const bool none = count <= 0;
  // With nothing to select, the all-ones key (no score maps to it) marks nothing.
  w.prefix.fill(none ? ~K(0) : K(0));
  if (!none)
    for (int b = 8 * static_cast<int>(sizeof(K)) - 1; b >= 0; --b) {
      const K bit = K(1) << b;
      traits::parallel_for(cells, detail::count_at_least_functor<T>{scores, groups, chunks, w.prefix.data(), bit,
                                                                   w.above.data()});
      traits::parallel_for(groups.groups,
                           detail::decide_bit_functor<T>{w.above.data(), chunks, count, bit, w.prefix.data()});
    }
  traits::parallel_for(cells, detail::count_above_and_at_functor<T>{scores, groups, chunks, w.prefix.data(),
                                                                   w.above.data(), w.at.data()});
  traits::parallel_for(groups.groups, detail::take_ties_functor<T>{chunks, none ? 0 : count, w.prefix.data(),
                                                                  w.above.data(), w.at.data(), kth});
  traits::parallel_for(cells, detail::mark_selected_functor<T>{scores, groups, chunks, w.prefix.data(),
                                                              w.above.data(), w.at.data(), none, selected});
}

namespace detail {
/// Slot e of token t holds expert e with gate gates[t, e] when selected[t, e], else nothing.
template <class T>
struct slots_from_selection_functor {
  const std::uint8_t* selected;  // [tokens, experts]
  const T* gates;                // [tokens, experts]
  index_t experts;
  std::int32_t* slot_expert;  // [tokens, experts]
  T* slot_gate;
  PROMOE_HOST_DEVICE void operator()(index_t i) const {
    slot_expert[i] = selected[i] ? static_cast<std::int32_t>(i % experts) : -1;
    slot_gate[i] = selected[i] ? gates[i] : T(0);
  }
};
/// selected[t, e] = scores[t, e] >= tau[e] (or tau[0] for every expert with one threshold).
template <class T>
struct at_threshold_functor {
  const T* scores;
  const T* tau;
  index_t experts;
  bool one_threshold;
  std::uint8_t* selected;
  PROMOE_HOST_DEVICE void operator()(index_t i) const {
    selected[i] = scores[i] >= tau[one_threshold ? 0 : i % experts] ? 1 : 0;
  }
};
}  // namespace detail

/// Fills a plan with one slot per expert from a selection [tokens, experts] (slot e of token t
/// holds expert e with gate gates[t, e] when selected) and groups it.
template <class T, class B>
void plan_from_selection(const std::uint8_t* selected, const T* gates, index_t tokens, index_t experts,
                         index_t plan_experts, dispatch_plan<T, B>& plan) {
  plan.reset(tokens, experts, plan_experts);
  if (tokens * experts > 0)
    backend_traits<B>::parallel_for(tokens * experts, detail::slots_from_selection_functor<T>{
                                                          selected, gates, experts, plan.slot_expert.data(),
                                                          plan.slot_gate.data()});
  plan.group();
}

/// selected[t, e] = scores[t, e] >= tau[e] (tau [experts]), or >= tau[0] with one_threshold.
template <class B, class T>
void select_at_thresholds(const T* scores, index_t tokens, index_t experts, const T* tau, bool one_threshold,
                          std::uint8_t* selected) {
  if (tokens * experts > 0)
    backend_traits<B>::parallel_for(tokens * experts,
                                    detail::at_threshold_functor<T>{scores, tau, experts, one_threshold, selected});
}

}  // namespace promoe::router
