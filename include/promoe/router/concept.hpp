// SPDX-License-Identifier: Apache-2.0
/// \file concept.hpp
/// \brief The router contract: route_input, router_layout and the RouterPolicy concept.
///
/// Router policies:
///  - router::top_k          : linear gate, softmax/sigmoid/identity scores, top-k per token
///                             (the DiT-MoE baseline; renormalisation optional)
///  - router::prototypical   : cosine to learnable prototypes, then as top_k (ProMoE step 2)
///  - router::conditional<R> : null-label samples to the unconditional expert(s), the rest
///                             to R (ProMoE step 1)
///  - router::promoe         : conditional<prototypical>
///  - router::expert_choice  : experts take their top-C tokens, per sample or per batch
///                             (EC-DiT; batch-level uses learned thresholds at inference)
///  - router::expert_race    : one top-K over all (token, expert) logits of the batch
///                             (Race-DiT; a learned threshold at inference)
#pragma once

#include <cstdint>
#include <span>
#include <string>

#include "../backend/cpu.hpp"
#include "../backend/tensor.hpp"
#include "../core/rng.hpp"
#include "../core/view.hpp"
#include "../routing/dispatch_plan.hpp"

namespace promoe {

/// What a router sees of the layer: widths and expert counts. Routed experts have ids
/// 0..routed-1, unconditional experts routed..routed+unconditional-1.
struct router_layout {
  index_t dim = 0;
  index_t routed = 0;
  index_t unconditional = 0;
  index_t experts() const { return routed + unconditional; }
};

/// The tokens to route: x [tokens, D] in backend memory; labels per sample on the host
/// (may be empty for routers that do not use them); tokens are grouped by sample.
template <class T>
struct route_input {
  const_matrix_view<T> x;
  std::span<const std::int64_t> labels;
  index_t tokens_per_sample = 0;
  bool training = true;
};

/// A router policy R has R::options and R::impl<T, Backend> with:
///  - impl(const options&, const router_layout&, rng&)       (throws promoe::error on bad options)
///  - slots_per_token()                                        (plan width)
///  - impl::cache                                              (what backward needs)
///  - forward(route_input, cache&, dispatch_plan&)             (fills slots, calls plan.group())
///  - backward(route_input, cache&, plan, dgate, dx)
///        dgate [tokens*slots]; dx is accumulated; folds in the gradients the auxiliary
///        losses left in the cache (see loss_view)
///  - zero_grad(), for_each_parameter(f) with f(named_parameter<T>)
/// Optional members:
///  - loss_view(route_input, cache&, plan, bool for_backward) -> loss_input<T, B>
///        required to use auxiliary losses; with for_backward it prepares zeroed gradient
///        buffers that its backward then folds in
///  - static constexpr bool has_prototypes           (for loss::routing_contrastive)
///  - static constexpr bool routes_per_token         (a token's slots depend on that token
///        alone and its backward is linear in dgate, so a zero dgate gives zero gradient:
///        conditional<R> then routes every token through R and masks, with no gather)
///  - for_each_buffer(f)                              (saved, untrained state; grad null)
///  - dense_expert(route_input) -> index_t           (an expert every token goes to with
///        gate 1, or -1: the inference fast path for classifier-free guidance's null batch)
template <class R>
concept RouterPolicy =
    requires { typename R::options; typename R::template impl<double, backend::cpu>; } &&
    std::constructible_from<typename R::template impl<double, backend::cpu>, const typename R::options&,
                            const router_layout&, rng&> &&
    requires(typename R::template impl<double, backend::cpu> r, const typename R::options& o,
             const router_layout& l, rng& gen, const route_input<double>& in,
             typename R::template impl<double, backend::cpu>::cache& c, dispatch_plan<double, backend::cpu>& plan,
             const double* dgate, matrix_view<double> dx) {
      { r.slots_per_token() } -> std::convertible_to<index_t>;
      r.forward(in, c, plan);
      r.backward(in, c, plan, dgate, dx);
      r.zero_grad();
      r.for_each_parameter(detail::parameter_sink{});
    };

}  // namespace promoe
