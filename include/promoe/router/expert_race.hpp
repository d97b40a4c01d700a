// SPDX-License-Identifier: Apache-2.0
/// \file expert_race.hpp
/// \brief router::expert_race: Expert Race (Race-DiT, arXiv 2503.16057).
///
/// What is taken from the paper: the router is a small MLP, Linear(D -> D), GELU,
/// Linear(D -> E) (`gate.0.*`, `gate.2.*`); the gate of a (token, expert) pair is its raw
/// logit (identity); training routes with ONE top-K over all tokens x experts logits of the
/// batch, K = k * tokens, so a token may get 0..E experts and an expert 0..tokens tokens,
/// with no capacity limit. For batch-independent inference a threshold is learned during
/// training as a running estimate of the K-th logit, tau <- m tau + (1 - m) z_K (m = 0.95,
/// tau starts at 1), and inference routes every pair whose logit reaches tau (buffer
/// `threshold` [1]). The paper's router-similarity loss and per-layer regularisation are
/// not part of this router.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "../backend/init.hpp"
#include "../backend/ops.hpp"
#include "../backend/tensor.hpp"
#include "../core/error.hpp"
#include "../core/rng.hpp"
#include "../expert/activation.hpp"
#include "../routing/dispatch_plan.hpp"
#include "../routing/loss_input.hpp"
#include "concept.hpp"
#include "running_thresholds.hpp"
#include "selection.hpp"

namespace promoe::router {

namespace detail {
/// dz = dgate (+ extra): the gate is the logit itself.
template <class T>
struct race_dlogits_functor {
  const T* dgate;  // [n]
  const T* extra;  // [n] or null
  T* dz;           // [n]
  PROMOE_HOST_DEVICE void operator()(index_t i) const { dz[i] = dgate[i] + (extra ? extra[i] : T(0)); }
};
}  // namespace detail

struct expert_race {
  static constexpr const char* name = "expert_race";

  struct options {
    index_t k = 1;                     ///< K = k * tokens pairs are routed in training
    double threshold_momentum = 0.95;  ///< m of the inference threshold
    double initial_threshold = 1.0;    ///< tau before the first training batch
  };

  template <class T, class B>
  class impl {
   public:
    using traits = backend_traits<B>;
    static constexpr bool has_prototypes = false;

    struct cache {
      tensor<T, B> h, a;           ///< [tokens, D] hidden pre-activation and activation
      tensor<T, B> logits;         ///< [tokens, E]
      tensor<T, B> dlogits, dh;    ///< backward workspaces
      tensor<T, B> ones;           ///< [tokens] for bias gradients
      tensor<std::uint8_t, B> selected;  ///< [tokens, E] the pairs that won the race
      tensor<T, B> kth;                  ///< [1] the (k N)-th logit
      top_in_groups_workspace<T, B> selection;
      loss_gradients<T, B> loss;
    };

    impl(const options& o, const router_layout& layout, rng& gen) : opt_(checked(o, layout)), layout_(layout) {
      const index_t d = layout.dim, e = layout.routed;
      for (auto* t : {&w1_, &gw1_}) t->resize({d, d});
      for (auto* t : {&b1_, &gb1_}) t->resize({d});
      for (auto* t : {&w2_, &gw2_}) t->resize({e, d});
      for (auto* t : {&b2_, &gb2_}) t->resize({e});
      zero_grad();
      init::xavier_uniform<B>(w1_.data(), d, d, gen);
      init::xavier_uniform<B>(w2_.data(), e, d, gen);
      b1_.fill(T(0));
      b2_.fill(T(0));
      threshold_.reset(1, o.initial_threshold);
    }

    const options& opts() const { return opt_; }
    index_t slots_per_token() const { return layout_.routed; }

    void forward(const route_input<T>& in, cache& c, dispatch_plan<T, B>& plan) {
      const index_t n = in.x.rows, d = layout_.dim, e = layout_.routed;
      for (auto* t : {&c.h, &c.a}) t->resize({n, d});
      c.logits.resize({n, e});
      ops::gemm<B, T>(in.x, transpose::no, w1_.cmatrix(), transpose::yes, c.h.matrix());
      traits::parallel_for(n, act::bias_apply_rows_functor<act::gelu, T>{c.h.data(), d, b1_.data(), c.a.data(), d, d});
      ops::broadcast_row<B>(c.logits.matrix(), b2_.data(), false);
      ops::gemm<B, T>(c.a.cmatrix(), transpose::no, w2_.cmatrix(), transpose::yes, c.logits.matrix(), T(1), T(1));
      c.selected.resize({n, e});
      if (in.training) {
        // one group of every (token, expert) logit; the k N highest win
        c.kth.resize({1});
        select_top_in_groups<B>(c.logits.data(), score_groups{1, n * e, 1, 1, 0}, opt_.k * n, c.selected.data(),
                                c.kth.data(), c.selection);
        if (n > 0) threshold_.update(c.kth.data(), opt_.threshold_momentum);
      } else {
        select_at_thresholds<B>(c.logits.data(), n, e, threshold_.data(), true, c.selected.data());
      }
      plan_from_selection(c.selected.data(), c.logits.data(), n, e, layout_.experts(), plan);
    }

    loss_input<T, B> loss_view(const route_input<T>& in, cache& c, const dispatch_plan<T, B>& plan,
                               bool for_backward) const {
      return c.loss.view(c.logits.data(), in.x, layout_.routed, plan, for_backward);
    }

    void backward(const route_input<T>& in, cache& c, const dispatch_plan<T, B>&, const T* dgate, matrix_view<T> dx) {
      const index_t n = in.x.rows, d = layout_.dim, e = layout_.routed;
      c.dlogits.resize({n, e});
      c.dh.resize({n, d});
      if (c.ones.size() < n) {
        c.ones.resize({n});
        c.ones.fill(T(1));
      }
      traits::parallel_for(n * e, detail::race_dlogits_functor<T>{dgate, c.loss.extra_dlogits(),
                                                                  c.dlogits.data()});
      ops::gemm<B, T>(c.dlogits.cmatrix(), transpose::yes, c.a.cmatrix(), transpose::no, gw2_.matrix(), T(1), T(1));
      ops::accumulate_column_sums<B>(c.dlogits.cmatrix(), c.ones.data(), gb2_.data());
      ops::gemm<B, T>(c.dlogits.cmatrix(), transpose::no, w2_.cmatrix(), transpose::no, c.dh.matrix());
      traits::parallel_for(n, act::backward_rows_functor<act::gelu, T>{c.h.data(), d, c.dh.data(), d, c.dh.data(), d, d,
                                                                         false});
      ops::gemm<B, T>(c.dh.cmatrix(), transpose::yes, in.x, transpose::no, gw1_.matrix(), T(1), T(1));
      ops::accumulate_column_sums<B>(c.dh.cmatrix(), c.ones.data(), gb1_.data());
      ops::gemm<B, T>(c.dh.cmatrix(), transpose::no, w1_.cmatrix(), transpose::no, dx, T(1), T(1));
      c.loss.fold_into(dx);
    }

    void zero_grad() {
      for (auto* t : {&gw1_, &gb1_, &gw2_, &gb2_}) t->fill(T(0));
    }

    template <class F>
    void for_each_parameter(F&& f) {
      f(named_parameter<T>{"gate.0.weight", w1_.shape(), w1_.data(), gw1_.data()});
      f(named_parameter<T>{"gate.0.bias", b1_.shape(), b1_.data(), gb1_.data()});
      f(named_parameter<T>{"gate.2.weight", w2_.shape(), w2_.data(), gw2_.data()});
      f(named_parameter<T>{"gate.2.bias", b2_.shape(), b2_.data(), gb2_.data()});
    }
    /// Buffers: state that is saved but not trained (grad is null).
    template <class F>
    void for_each_buffer(F&& f) {
      f(named_parameter<T>{"threshold", {1}, threshold_.data(), nullptr});
    }

   private:
    static const options& checked(const options& o, const router_layout& layout) {
      PROMOE_CHECK(layout.routed >= 1, "router::expert_race: needs at least one routed expert, got ", layout.routed);
      PROMOE_CHECK(o.k >= 1 && o.k <= layout.routed, "router::expert_race: k = ", o.k,
                   " is out of range; expected 1 <= k <= ", layout.routed, " (the number of routed experts)");
      PROMOE_CHECK(o.threshold_momentum >= 0 && o.threshold_momentum < 1,
                   "router::expert_race: threshold_momentum must be in [0, 1), got ", o.threshold_momentum);
      return o;
    }

    options opt_;
    router_layout layout_;
    tensor<T, B> w1_, b1_, w2_, b2_;      // [D, D], [D], [E, D], [E]
    tensor<T, B> gw1_, gb1_, gw2_, gb2_;
    running_thresholds<T, B> threshold_;  // [1]
  };
};

static_assert(RouterPolicy<expert_race>);

}  // namespace promoe::router
