// SPDX-License-Identifier: Apache-2.0
/// \file load_balance.hpp
/// \brief loss::load_balance: the Switch Transformer balance loss weight * E * sum_e f_e * P_e.
///
/// f_e is the share of filled routed slots that went to expert e (for top-k: count / (N k),
/// the DiT-MoE form; for k = 1 Switch's fraction of tokens), P_e the mean over tokens of
/// softmax(logits)_e. f carries no gradient.
#pragma once

#include <cstdint>
#include <vector>

#include "../backend/ops.hpp"
#include "../backend/tensor.hpp"
#include "../core/bf16.hpp"
#include "../router/score.hpp"
#include "concept.hpp"

namespace promoe::loss {

namespace detail {
/// dlogits[t, e] += w_t p[t, e] (g_e - sum_j g_j p[t, j]),  g_e = weight * E * f_e / N,
/// w_t the token's mask value.
template <class T>
struct load_balance_backward_functor {
  const T* probs;  // [tokens, E]
  const T* g;      // [E]
  const T* mask;   // [tokens] or null
  index_t experts;
  T* dlogits;  // [tokens, E]
  PROMOE_HOST_DEVICE void operator()(index_t t) const {
    const T w = token_weight(mask, t);
    if (w == T(0)) return;
    const T* p = probs + t * experts;
    compute_t<T> dot = 0;
    for (index_t e = 0; e < experts; ++e) dot += g[e] * p[e];
    for (index_t e = 0; e < experts; ++e) dlogits[t * experts + e] += w * p[e] * (g[e] - dot);
  }
};

/// From the slots per expert (the masked counts, or the plan's offsets without a mask) and the
/// mean probabilities P: f_e = slots_e / total, *value = weight E sum_e f_e P_e and the
/// backward's coefficients g_e = weight E f_e / counted. One thread: E is small, and nothing
/// waits for the device.
template <class T>
struct load_balance_value_functor {
  const compute_t<T>* masked_count;  // [E], or null: the plan's offsets
  const index_t* offsets;            // [E + 1]
  const T* mean;                     // [E]
  index_t experts;
  double weight, counted;
  T* g;                 // [E]
  compute_t<T>* value;  // [1]
  PROMOE_HOST_DEVICE double slots(index_t e) const {
    return masked_count ? static_cast<double>(masked_count[e]) : static_cast<double>(offsets[e + 1] - offsets[e]);
  }
  PROMOE_HOST_DEVICE void operator()(index_t) const {
    double total = 0;
    for (index_t e = 0; e < experts; ++e) total += slots(e);
    double sum = 0;
    for (index_t e = 0; e < experts; ++e) {
      const double f = total > 0 ? slots(e) / total : 0.0;
      sum += f * static_cast<double>(mean[e]);
      g[e] = static_cast<T>(weight * static_cast<double>(experts) * f / counted);
    }
    *value = static_cast<compute_t<T>>(weight * static_cast<double>(experts) * sum);
  }
};

/// count[e] = the filled slots of masked-in tokens that went to expert e.
template <class T>
struct masked_expert_count_functor {
  const std::int32_t* slot_expert;  // [tokens, slots]
  const T* mask;                    // [tokens]
  index_t tokens, slots;
  compute_t<T>* count;  // [E] (float for bf16: counts above 256 are not bf16 values)
  PROMOE_HOST_DEVICE void operator()(index_t e) const {
    compute_t<T> s = 0;
    for (index_t t = 0; t < tokens; ++t)
      for (index_t q = 0; q < slots; ++q)
        if (slot_expert[t * slots + q] == e) s += mask[t];
    count[e] = s;
  }
};
}  // namespace detail

struct load_balance {
  static constexpr const char* name = "load_balance";
  struct options {
    double weight = 0.01;  ///< DiT-MoE's coefficient
  };

  template <class T, class B>
  class impl {
   public:
    using traits = backend_traits<B>;
    struct cache {
      tensor<T, B> probs;  ///< [tokens, E] softmax of the logits
      tensor<T, B> mean;   ///< [E] P_e
      tensor<T, B> g;      ///< [E] gradient coefficients weight E f_e / counted (f_e: dispatch fractions)
      tensor<compute_t<T>, B> count;  ///< [E] slots per expert of masked-in tokens (with a token mask)
    };

    impl(const options& o, const router_layout&) : opt_(o) {}

    void forward(const loss_input<T, B>& in, cache& c, compute_t<T>* value) const {
      const index_t n = in.tokens, e = in.experts;
      c.probs.resize({n, e});
      c.mean.resize({e});
      c.g.resize({e});
      if (in.counted == 0) return traits::fill(value, 1, compute_t<T>(0));
      traits::parallel_for(n, detail::softmax_rows_functor<T>{in.logits, c.probs.data(), e});
      traits::parallel_for(e, detail::column_mean_functor<T>{c.probs.data(), in.token_mask, n, e, in.counted,
                                                             c.mean.data()});
      if (in.token_mask) {
        c.count.resize({e});
        traits::parallel_for(e, detail::masked_expert_count_functor<T>{in.plan->slot_expert.data(), in.token_mask, n,
                                                                       in.plan->slots_per_token, c.count.data()});
      }
      traits::parallel_for(1, detail::load_balance_value_functor<T>{in.token_mask ? c.count.data() : nullptr,
                                                                    in.plan->offsets.data(), c.mean.data(), e,
                                                                    opt_.weight, static_cast<double>(in.counted),
                                                                    c.g.data(), value});
    }

    void backward(const loss_input<T, B>& in, cache& c) const {
      if (in.counted == 0) return;
      traits::parallel_for(in.tokens, detail::load_balance_backward_functor<T>{c.probs.data(), c.g.data(),
                                                                               in.token_mask, in.experts, in.dlogits});
    }

    const options& opts() const { return opt_; }

   private:
    options opt_;
  };
};

static_assert(LossPolicy<load_balance>);

}  // namespace promoe::loss
