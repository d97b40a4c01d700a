// SPDX-License-Identifier: Apache-2.0
/// \file expert_choice.hpp
/// \brief router::expert_choice: the experts choose their tokens (EC-DiT as re-implemented by
/// ProMoE and DiffMoE). A linear gate (`gate.weight` [E, D]) scores every (token, expert)
/// pair; each expert takes its top C = floor(L / E * capacity) tokens, within each sample
/// (L tokens per sample) or over the whole batch (L = all tokens). The gate of a chosen
/// pair is its score. A token may get 0..E experts.
///
/// Inference: per-sample choice is already independent of the other samples and runs as in
/// training. Batch-level choice couples samples, so at inference expert e takes every token
/// whose score reaches a threshold tau_e kept during training as a running estimate of its
/// C-th score, tau_e <- m tau_e + (1 - m) s_C (from initial_threshold); the thresholds are
/// the router's buffer `threshold` [E].
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "../backend/ops.hpp"
#include "../backend/tensor.hpp"
#include "../core/error.hpp"
#include "../core/rng.hpp"
#include "../routing/dispatch_plan.hpp"
#include "../routing/loss_input.hpp"
#include "concept.hpp"
#include "running_thresholds.hpp"
#include "linear_gate.hpp"
#include "score.hpp"
#include "selection.hpp"

namespace promoe::router {

struct expert_choice {
  static constexpr const char* name = "expert_choice";

  struct options {
    double capacity = 1.0;               ///< C = floor(L / E * capacity)
    bool per_sample = true;              ///< choose within each sample (else over the batch)
    score_fn score = score_fn::softmax;  ///< softmax over experts, or identity (sigmoid works too)
    double threshold_momentum = 0.95;    ///< m of the inference thresholds (batch-level only)
    double initial_threshold = 0.0;      ///< tau_e before the first training batch
  };

  template <class T, class B>
  class impl {
   public:
    using traits = backend_traits<B>;
    static constexpr bool has_prototypes = false;

    struct cache {
      tensor<T, B> logits, scores, dlogits;  ///< [tokens, E]
      tensor<std::uint8_t, B> selected;      ///< [tokens, E] the chosen pairs
      tensor<T, B> kth;                      ///< [groups] the C-th score of each expert's choice
      top_in_groups_workspace<T, B> selection;
      loss_gradients<T, B> loss;
    };

    impl(const options& o, const router_layout& layout, rng& gen)
        : opt_(checked(o, layout)), layout_(layout), gate_(layout.routed, layout.dim, gen) {
      threshold_.reset(layout.routed, o.initial_threshold);
    }

    const options& opts() const { return opt_; }
    index_t slots_per_token() const { return layout_.routed; }

    void forward(const route_input<T>& in, cache& c, dispatch_plan<T, B>& plan) {
      const index_t n = in.x.rows, e = layout_.routed;
      gate_.forward(in.x, c.logits);
      c.scores.resize({n, e});
      traits::parallel_for(n, score::apply_rows_functor<T>{opt_.score, c.logits.data(), c.scores.data(), e});
      c.selected.resize({n, e});
      if (opt_.per_sample || in.training) {
        // an expert's group: the tokens of one sample (per-sample) or of the batch
        const index_t l = opt_.per_sample ? in.tokens_per_sample : n;
        if (opt_.per_sample)
          PROMOE_CHECK(l > 0 && n % l == 0, "router::expert_choice: ", n, " tokens do not split into samples of ", l);
        const index_t capacity = capacity_of(l);
        if (n > 0) {
          const score_groups groups{(n / l) * e, l, e, e, l * e};
          c.kth.resize({groups.groups});
          select_top_in_groups<B>(c.scores.data(), groups, capacity, c.selected.data(), c.kth.data(), c.selection);
          if (!opt_.per_sample && capacity > 0) threshold_.update(c.kth.data(), opt_.threshold_momentum);
        }
      } else {
        select_at_thresholds<B>(c.scores.data(), n, e, threshold_.data(), false, c.selected.data());
      }
      plan_from_selection(c.selected.data(), c.scores.data(), n, e, layout_.experts(), plan);
    }

    loss_input<T, B> loss_view(const route_input<T>& in, cache& c, const dispatch_plan<T, B>& plan,
                               bool for_backward) const {
      return c.loss.view(c.logits.data(), in.x, layout_.routed, plan, for_backward);
    }

    /// dgate [tokens, E]: slot e of a token is expert e, so it is the score gradient.
    void backward(const route_input<T>& in, cache& c, const dispatch_plan<T, B>&, const T* dgate, matrix_view<T> dx) {
      const index_t n = in.x.rows, e = layout_.routed;
      c.dlogits.resize({n, e});
      traits::parallel_for(n, score::backward_rows_functor<T>{opt_.score, c.scores.data(), dgate,
                                                              c.loss.extra_dlogits(),
                                                              c.dlogits.data(), e});
      gate_.backward(in.x, c.dlogits, dx);
      c.loss.fold_into(dx);
    }

    void zero_grad() { gate_.zero_grad(); }

    template <class F>
    void for_each_parameter(F&& f) {
      gate_.for_each_parameter(f);
    }
    /// Buffers: state that is saved but not trained (grad is null).
    template <class F>
    void for_each_buffer(F&& f) {
      if (!opt_.per_sample) f(named_parameter<T>{"threshold", {layout_.routed}, threshold_.data(), nullptr});
    }

   private:
    static const options& checked(const options& o, const router_layout& layout) {
      PROMOE_CHECK(layout.routed >= 1, "router::expert_choice: needs at least one routed expert, got ", layout.routed);
      PROMOE_CHECK(std::isfinite(o.capacity) && o.capacity > 0, "router::expert_choice: capacity must be positive, got ",
                   o.capacity);
      PROMOE_CHECK(o.threshold_momentum >= 0 && o.threshold_momentum < 1,
                   "router::expert_choice: threshold_momentum must be in [0, 1), got ", o.threshold_momentum);
      return o;
    }
    index_t capacity_of(index_t tokens) const {
      const double c = std::floor(static_cast<double>(tokens) / static_cast<double>(layout_.routed) * opt_.capacity);
      return std::min<index_t>(tokens, static_cast<index_t>(c));
    }

    options opt_;
    router_layout layout_;
    linear_gate<T, B> gate_;
    running_thresholds<T, B> threshold_;  // [E] inference thresholds (batch-level choice)
  };
};

static_assert(RouterPolicy<expert_choice>);

}  // namespace promoe::router
