// SPDX-License-Identifier: Apache-2.0
/// \file top_k.hpp
/// \brief router::top_k: a linear gate (`gate.weight` [E, D], no bias), a score function over
/// the routed experts, top-k per token; the gate of a slot is the chosen expert's score,
/// optionally renormalised over the k chosen (DiT-MoE's baseline router).
#pragma once

#include <cmath>
#include <string>

#include "../backend/init.hpp"
#include "../backend/ops.hpp"
#include "../backend/tensor.hpp"
#include "../core/error.hpp"
#include "../core/rng.hpp"
#include "../routing/dispatch_plan.hpp"
#include "concept.hpp"
#include "score.hpp"

namespace promoe::router {

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
    T total = T(0);
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
    T sum_a = T(0), dot = T(0);
    for (index_t s = 0; s < k; ++s) {
      sum_a += p[se[s]];
      dot += dg[s] * sg[s];
    }
    T* dz = dlogits + t * experts;
    T weighted = T(0);  // sum_e dscore_e * p_e (for softmax)
    for (index_t s = 0; s < k; ++s) {
      const T da = renormalize ? (dg[s] - dot) / sum_a : dg[s];
      weighted += da * p[se[s]];
    }
    for (index_t e = 0; e < experts; ++e) {
      T da = T(0);
      for (index_t s = 0; s < k; ++s)
        if (se[s] == e) da = renormalize ? (dg[s] - dot) / sum_a : dg[s];
      T g;
      if (fn == score_fn::softmax) g = p[e] * (da - weighted);
      else if (fn == score_fn::sigmoid) g = da * p[e] * (T(1) - p[e]);
      else g = da;
      dz[e] = (extra ? extra[t * experts + e] : T(0)) + g;
    }
  }
};

}  // namespace detail

/// Linear top-k token-choice router.
struct top_k {
  static constexpr const char* name = "top_k";

  struct options {
    index_t k = 1;                      ///< experts per token, 1 <= k <= routed experts
    score_fn score = score_fn::softmax; ///< how logits become gate scores
    bool renormalize = false;           ///< divide the k chosen gates by their sum
  };

  template <class T, class B>
  class impl {
   public:
    using traits = backend_traits<B>;

    struct cache {
      tensor<T, B> logits;   ///< [tokens, E] x W^T
      tensor<T, B> scores;   ///< [tokens, E] activated
      tensor<T, B> dlogits;  ///< [tokens, E] backward workspace
    };

    impl(const options& o, const router_layout& layout, rng& gen) : opt_(o), layout_(layout) {
      PROMOE_CHECK(layout.routed >= 1, "router::top_k: needs at least one routed expert, got ", layout.routed);
      PROMOE_CHECK(o.k >= 1 && o.k <= layout.routed, "router::top_k: k = ", o.k, " is out of range; expected 1 <= k <= ",
                   layout.routed, " (the number of routed experts)");
      PROMOE_CHECK(!(o.renormalize && o.score == score_fn::identity),
                   "router::top_k: renormalize needs positive scores (softmax or sigmoid), not identity");
      weight_.resize({layout.routed, layout.dim});
      grad_.resize({layout.routed, layout.dim});
      grad_.fill(T(0));
      // DiT-MoE's gate is a bare Parameter with kaiming_uniform(a = sqrt(5)): U(-1/sqrt(D), 1/sqrt(D)).
      init::uniform<B>(weight_.data(), weight_.size(), 1.0 / std::sqrt(static_cast<double>(layout.dim)), gen);
    }

    const options& opts() const { return opt_; }
    index_t slots_per_token() const { return opt_.k; }
    index_t experts() const { return layout_.routed; }

    void forward(const route_input<T>& in, cache& c, dispatch_plan<T, B>& plan) const {
      const index_t n = in.x.rows, e = layout_.routed;
      c.logits.resize({n, e});
      c.scores.resize({n, e});
      ops::gemm<B, T>(in.x, transpose::no, weight_.cmatrix(), transpose::yes, c.logits.matrix());
      plan.reset(n, opt_.k, layout_.experts());
      traits::parallel_for(n, detail::top_k_select_functor<T>{c.logits.data(), c.scores.data(), e, opt_.k, opt_.score,
                                                              opt_.renormalize, plan.slot_expert.data(),
                                                              plan.slot_gate.data()});
      plan.group();
    }

    void backward(const route_input<T>& in, cache& c, const dispatch_plan<T, B>& plan, const T* dgate,
                  const T* extra_dlogits, matrix_view<T> dx) {
      const index_t n = in.x.rows, e = layout_.routed;
      c.dlogits.resize({n, e});
      traits::parallel_for(n, detail::top_k_backward_functor<T>{c.scores.data(), plan.slot_expert.data(),
                                                                plan.slot_gate.data(), dgate, extra_dlogits, e, opt_.k,
                                                                opt_.score, opt_.renormalize, c.dlogits.data()});
      ops::gemm<B, T>(c.dlogits.cmatrix(), transpose::yes, in.x, transpose::no, grad_.matrix(), T(1), T(1));
      ops::gemm<B, T>(c.dlogits.cmatrix(), transpose::no, weight_.cmatrix(), transpose::no, dx, T(1), T(1));
    }

    void zero_grad() { grad_.fill(T(0)); }

    template <class F>
    void for_each_parameter(F&& f) {
      f(named_parameter<T>{"gate.weight", {layout_.routed, layout_.dim}, weight_.data(), grad_.data()});
    }

   private:
    options opt_;
    router_layout layout_;
    tensor<T, B> weight_;  // [E, D]
    tensor<T, B> grad_;
  };
};

static_assert(RouterPolicy<top_k>);

}  // namespace promoe::router
