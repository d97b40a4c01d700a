// SPDX-License-Identifier: Apache-2.0
/// \file token_choice.hpp
/// \brief Token-choice routing shared by routers that score every (token, expert) pair:
/// logits -> score function -> top-k per token -> gates, and the backward from gate
/// gradients to logit gradients. Routers differ only in how they make the logits.
#pragma once

#include "../backend/tensor.hpp"
#include "../core/bf16.hpp"
#include "../core/error.hpp"
#include "../routing/dispatch_plan.hpp"
#include "concept.hpp"
#include "score.hpp"

namespace promoe::router {

/// The options every token-choice router has (routers may add their own: any struct with
/// k, score and renormalize works with the functions below).
struct token_choice_options {
  index_t k = 1;                       ///< experts per token, 1 <= k <= routed experts
  score_fn score = score_fn::softmax;  ///< how logits become gate scores
  bool renormalize = false;           ///< divide the k chosen gates by their sum (with identity
                                      ///< scores a sum near 0 blows up, as in the reference code)
};

namespace detail {

/// Scores one token's logits and fills its k slots: ties go to the lower expert index and
/// slots are ordered by score, highest first.
template <class T>
struct top_k_select_functor {
  const T* logits;  // [tokens, E]
  T* scores;        // [tokens, E] activated scores
  index_t experts, k;
  score_fn fn;
  bool renormalize;
  std::int32_t* slot_expert;  // [tokens, k]
  T* slot_gate;               // [tokens, k]

  PROMOE_HOST_DEVICE void operator()(index_t t) const {
    const T* z = logits + t * experts;
    T* p = scores + t * experts;
    score::apply(fn, z, p, experts);
    std::int32_t* se = slot_expert + t * k;
    T* sg = slot_gate + t * k;
    compute_t<T> total = 0;
    for (index_t s = 0; s < k; ++s) {
      index_t best = -1;
      for (index_t e = 0; e < experts; ++e) {
        bool taken = false;
        for (index_t q = 0; q < s; ++q) taken = taken || se[q] == e;
        if (!taken && (best < 0 || p[e] > p[best])) best = e;
      }
      se[s] = static_cast<std::int32_t>(best);
      sg[s] = p[best];
      total += p[best];
    }
    if (renormalize)
      for (index_t s = 0; s < k; ++s) sg[s] /= total;
  }
};

/// dlogits[t, :] = extra[t, :] + d(gates)/d(logits)^T dgate[t, :]
template <class T>
struct top_k_backward_functor {
  const T* scores;                  // [tokens, E]
  const std::int32_t* slot_expert;  // [tokens, k]
  const T* slot_gate;               // [tokens, k]
  const T* dgate;                   // [tokens, k]
  const T* extra;                   // [tokens, E] or null
  index_t experts, k;
  score_fn fn;
  bool renormalize;
  T* dlogits;  // [tokens, E]

  PROMOE_HOST_DEVICE void operator()(index_t t) const {
    const T* p = scores + t * experts;
    const std::int32_t* se = slot_expert + t * k;
    const T* sg = slot_gate + t * k;
    const T* dg = dgate + t * k;
    // gradient at the chosen scores a_s; with renormalisation g_s = a_s / S
    using C = compute_t<T>;
    C sum_a = 0, dot = 0;
    for (index_t s = 0; s < k; ++s) {
      sum_a += p[se[s]];
      dot += dg[s] * sg[s];
    }
    T* dz = dlogits + t * experts;
    C weighted = 0;  // sum_e dscore_e * p_e (for softmax)
    for (index_t s = 0; s < k; ++s) {
      const C da = renormalize ? (dg[s] - dot) / sum_a : C(dg[s]);
      weighted += da * p[se[s]];
    }
    for (index_t e = 0; e < experts; ++e) {
      C da = 0;
      for (index_t s = 0; s < k; ++s)
        if (se[s] == e) da = renormalize ? (dg[s] - dot) / sum_a : C(dg[s]);
      C g;
      if (fn == score_fn::softmax) g = p[e] * (da - weighted);
      else if (fn == score_fn::sigmoid) g = da * p[e] * (C(1) - p[e]);
      else g = da;
      dz[e] = (extra ? C(extra[t * experts + e]) : C(0)) + g;
    }
  }
};

}  // namespace detail

/// Checks token-choice options against the number of routed experts.
template <class Options>
void check_token_choice(const Options& o, index_t routed, const char* router) {
  PROMOE_CHECK(routed >= 1, "router::", router, ": needs at least one routed expert, got ", routed);
  PROMOE_CHECK(o.k >= 1 && o.k <= routed, "router::", router, ": k = ", o.k,
               " is out of range; expected 1 <= k <= ", routed, " (the number of routed experts)");
}

/// Scores logits [n, routed] into `scores`, fills the plan (ids among `plan_experts`) and groups it.
template <class Options, class T, class B>
void token_choice_select(const Options& o, const tensor<T, B>& logits, tensor<T, B>& scores,
                         index_t plan_experts, dispatch_plan<T, B>& plan) {
  const index_t n = logits.dim(0), e = logits.dim(1);
  scores.resize({n, e});
  plan.reset(n, o.k, plan_experts);
  backend_traits<B>::parallel_for(n, detail::top_k_select_functor<T>{logits.data(), scores.data(), e, o.k, o.score,
                                                                     o.renormalize, plan.slot_expert.data(),
                                                                     plan.slot_gate.data()});
  plan.group();
}

/// dlogits [n, routed] = extra (or 0) + d(gates)/d(logits)^T dgate.
template <class Options, class T, class B>
void token_choice_backward(const Options& o, const tensor<T, B>& scores, const dispatch_plan<T, B>& plan,
                           const T* dgate, const T* extra, tensor<T, B>& dlogits) {
  const index_t n = scores.dim(0), e = scores.dim(1);
  dlogits.resize({n, e});
  backend_traits<B>::parallel_for(n, detail::top_k_backward_functor<T>{scores.data(), plan.slot_expert.data(),
                                                                       plan.slot_gate.data(), dgate, extra, e, o.k,
                                                                       o.score, o.renormalize, dlogits.data()});
}

}  // namespace promoe::router
