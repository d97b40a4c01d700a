// SPDX-License-Identifier: Apache-2.0
/// \file top_k.hpp
/// \brief router::top_k: a linear gate (`gate.weight` [E, D], no bias), a score function over
/// the routed experts, top-k per token; the gate of a slot is the chosen expert's score,
/// optionally renormalised over the k chosen (DiT-MoE's baseline router).
#pragma once

#include <cmath>

#include "../backend/init.hpp"
#include "../backend/ops.hpp"
#include "../backend/tensor.hpp"
#include "../core/rng.hpp"
#include "../routing/dispatch_plan.hpp"
#include "../routing/loss_input.hpp"
#include "concept.hpp"
#include "linear_gate.hpp"
#include "token_choice.hpp"

namespace promoe::router {

/// Linear top-k token-choice router.
struct top_k {
  static constexpr const char* name = "top_k";
  using options = token_choice_options;

  template <class T, class B>
  class impl {
   public:
    using traits = backend_traits<B>;
    static constexpr bool routes_per_token = true;
    static constexpr bool has_prototypes = false;

    struct cache {
      tensor<T, B> logits;   ///< [tokens, E] x W^T
      tensor<T, B> scores;   ///< [tokens, E] activated
      tensor<T, B> dlogits;  ///< [tokens, E] backward workspace
      loss_gradients<T, B> loss;
    };

    impl(const options& o, const router_layout& layout, rng& gen)
        : opt_(checked(o, layout)), layout_(layout), gate_(layout.routed, layout.dim, gen) {}

    const options& opts() const { return opt_; }
    index_t slots_per_token() const { return opt_.k; }

    void forward(const route_input<T>& in, cache& c, dispatch_plan<T, B>& plan) const {
      gate_.forward(in.x, c.logits);
      token_choice_select(opt_, c.logits, c.scores, layout_.experts(), plan);
    }

    loss_input<T, B> loss_view(const route_input<T>& in, cache& c, const dispatch_plan<T, B>& plan,
                               bool for_backward) const {
      return c.loss.view(c.logits.data(), in.x, layout_.routed, plan, for_backward);
    }

    void backward(const route_input<T>& in, cache& c, const dispatch_plan<T, B>& plan, const T* dgate,
                  matrix_view<T> dx) {
      token_choice_backward(opt_, c.scores, plan, dgate, c.loss.extra_dlogits(), c.dlogits);
      gate_.backward(in.x, c.dlogits, dx);
      c.loss.fold_into(dx);
    }

    void zero_grad() { gate_.zero_grad(); }

    template <class F>
    void for_each_parameter(F&& f) {
      gate_.for_each_parameter(f);
    }

   private:
    static const options& checked(const options& o, const router_layout& layout) {
      check_token_choice(o, layout.routed, name);
      return o;
    }

    options opt_;
    router_layout layout_;
    linear_gate<T, B> gate_;  // gate.weight [E, D]
  };
};

static_assert(RouterPolicy<top_k>);

}  // namespace promoe::router
