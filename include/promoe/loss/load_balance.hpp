// SPDX-License-Identifier: Apache-2.0
/// \file load_balance.hpp
/// \brief loss::load_balance: the Switch Transformer balance loss weight * E * sum_e f_e * P_e.
///
/// f_e is the share of filled routed slots that went to expert e (for top-k: count / (N k),
/// the DiT-MoE form; for k = 1 Switch's fraction of tokens), P_e the mean over tokens of
/// softmax(logits)_e. f carries no gradient.
#pragma once

#include <vector>

#include "../backend/ops.hpp"
#include "../backend/tensor.hpp"
#include "../router/score.hpp"
#include "concept.hpp"

namespace promoe::loss {

namespace detail {
/// dlogits[t, e] += p[t, e] * (g_e - sum_j g_j p[t, j]),  g_e = weight * E * f_e / N
template <class T>
struct load_balance_backward_functor {
  const T* probs;  // [tokens, E]
  const T* g;      // [E]
  index_t experts;
  T* dlogits;  // [tokens, E]
  PROMOE_HOST_DEVICE void operator()(index_t t) const {
    const T* p = probs + t * experts;
    T dot = T(0);
    for (index_t e = 0; e < experts; ++e) dot += g[e] * p[e];
    for (index_t e = 0; e < experts; ++e) dlogits[t * experts + e] += p[e] * (g[e] - dot);
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
      tensor<T, B> g;      ///< [E] gradient coefficients
      std::vector<double> f;  ///< [E] dispatch fractions (host)
      std::vector<T> mean_host, g_host;
    };

    impl(const options& o, const router_layout&) : opt_(o) {}

    T forward(const loss_input<T, B>& in, cache& c) const {
      const index_t n = in.tokens, e = in.experts;
      c.probs.resize({n, e});
      c.mean.resize({e});
      c.f.assign(static_cast<std::size_t>(e), 0.0);
      if (n == 0) return T(0);
      traits::parallel_for(n, detail::softmax_rows_functor<T>{in.logits, c.probs.data(), e});
      traits::parallel_for(e, detail::column_mean_functor<T>{c.probs.data(), n, e, c.mean.data()});
      double total = 0;
      for (index_t x = 0; x < e; ++x) total += static_cast<double>(in.plan->expert_rows(x));
      c.mean.to_host(c.mean_host);
      const auto& mean = c.mean_host;
      double value = 0;
      for (index_t x = 0; x < e; ++x) {
        c.f[x] = total > 0 ? static_cast<double>(in.plan->expert_rows(x)) / total : 0.0;
        value += c.f[x] * static_cast<double>(mean[x]);
      }
      return static_cast<T>(opt_.weight * static_cast<double>(e) * value);
    }

    void backward(const loss_input<T, B>& in, cache& c) const {
      const index_t n = in.tokens, e = in.experts;
      if (n == 0) return;
      auto& g = c.g_host;
      g.resize(static_cast<std::size_t>(e));
      for (index_t x = 0; x < e; ++x) g[x] = static_cast<T>(opt_.weight * e * c.f[x] / static_cast<double>(n));
      c.g.resize({e});
      traits::copy_from_host(g.data(), e, c.g.data());
      traits::parallel_for(n, detail::load_balance_backward_functor<T>{c.probs.data(), c.g.data(), e, in.dlogits});
    }

    const options& opts() const { return opt_; }

   private:
    options opt_;
  };
};

static_assert(LossPolicy<load_balance>);

}  // namespace promoe::loss
