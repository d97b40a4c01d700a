// SPDX-License-Identifier: Apache-2.0
/// \file concept.hpp
/// \brief The auxiliary-loss contract: loss_input, LossPolicy and the losses<...> list.
///
/// Loss policies:
///  - loss::load_balance : Switch load balancing, weight * E * sum_e f_e * P_e
///  - loss::z_loss       : router z-loss, weight * mean_t logsumexp(logits_t)^2
///  - loss::routing_contrastive : ProMoE's RCL between prototypes and expert centroids
#pragma once

#include <vector>

#include "../backend/cpu.hpp"
#include "../core/bf16.hpp"
#include "../router/concept.hpp"
#include "../router/score.hpp"
#include "../routing/dispatch_plan.hpp"
#include "../routing/loss_input.hpp"

namespace promoe {

/// A loss policy L has L::options (with a `weight`) and L::impl<T, Backend> with:
///  - impl(const options&, const router_layout&)
///  - impl::cache
///  - forward(loss_input, cache&, compute_t<T>* value): writes the weighted loss value into
///    `value`, one element of device memory, without waiting for the device (the layer reads
///    the values only when they are asked for);
///    or forward(loss_input, cache&) -> T, the weighted value computed on the host (simpler
///    for a loss of your own; the layer stores it);
///  - backward(loss_input, cache&)        (adds its gradients into the input's dlogits, dx,
///                                          dprototypes)
/// and optionally `static constexpr bool needs_prototypes = true` when it reads prototypes.
template <class L, class T, class B>
concept loss_writes_device_value =
    requires(const typename L::template impl<T, B> l, const loss_input<T, B>& in,
             typename L::template impl<T, B>::cache& c, compute_t<T>* value) { l.forward(in, c, value); };

template <class L>
concept LossPolicy =
    requires { typename L::options; typename L::template impl<double, backend::cpu>; } &&
    std::constructible_from<typename L::template impl<double, backend::cpu>, const typename L::options&,
                            const router_layout&> &&
    requires(typename L::template impl<double, backend::cpu> l, const typename L::options& o,
             const loss_input<double, backend::cpu>& in, typename L::template impl<double, backend::cpu>::cache& c) {
      o.weight;
      l.backward(in, c);
      { L::name } -> std::convertible_to<const char*>;
    } &&
    (loss_writes_device_value<L, double, backend::cpu> ||
     requires(typename L::template impl<double, backend::cpu> l, const loss_input<double, backend::cpu>& in,
              typename L::template impl<double, backend::cpu>::cache& c) {
       { l.forward(in, c) } -> std::convertible_to<double>;
     });

/// The auxiliary losses of a layer, in order.
template <LossPolicy... L>
struct losses {
  static constexpr std::size_t size = sizeof...(L);
};

namespace loss {

/// The value of the Switch load-balance loss and friends need column means of softmax(logits).
namespace detail {
template <class T>
struct softmax_rows_functor {
  const T* logits;  // [tokens, E]
  T* probs;         // [tokens, E]
  index_t experts;
  PROMOE_HOST_DEVICE void operator()(index_t t) const {
    score::apply(score_fn::softmax, logits + t * experts, probs + t * experts, experts);
  }
};
/// mean[e] = sum_t w_t m[t, e] / counted, w_t the token's mask value (1 without a mask),
/// summed in token order (deterministic).
template <class T>
struct column_mean_functor {
  const T* m;  // [tokens, E]
  const T* mask;  // [tokens] or null
  index_t tokens, experts, counted;
  T* mean;  // [E]
  PROMOE_HOST_DEVICE void operator()(index_t e) const {
    compute_t<T> s = 0;
    for (index_t t = 0; t < tokens; ++t) s += token_weight(mask, t) * m[t * experts + e];
    mean[e] = counted ? T(s / compute_t<T>(counted)) : T(0);
  }
};
}  // namespace detail

}  // namespace loss
}  // namespace promoe
