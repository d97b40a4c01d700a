// SPDX-License-Identifier: Apache-2.0
/// \file z_loss.hpp
/// \brief loss::z_loss: router z-loss (ST-MoE), weight * mean_t (logsumexp_e logits[t, e])^2.
/// It keeps router logits small, which keeps the softmax well conditioned.
#pragma once

#include <cmath>

#include "../backend/device_sum.hpp"
#include "../backend/tensor.hpp"
#include "../core/bf16.hpp"
#include "concept.hpp"

namespace promoe::loss {

namespace detail {
template <class T>
struct logsumexp_functor {
  const T* logits;  // [tokens, E]
  index_t experts;
  const T* mask;  // [tokens] or null
  compute_t<T>* lse;     // [tokens] (float for bf16: exp(z - lse) in the backward needs its bits)
  compute_t<T>* square;  // [tokens] w_t lse^2, w_t the token's mask value
  PROMOE_HOST_DEVICE void operator()(index_t t) const {
    using std::exp;
    using std::log;
    const T* z = logits + t * experts;
    T m = z[0];
    for (index_t e = 1; e < experts; ++e) m = z[e] > m ? z[e] : m;
    compute_t<T> s = 0;
    for (index_t e = 0; e < experts; ++e) s += exp(z[e] - m);
    lse[t] = m + log(s);
    square[t] = token_weight(mask, t) * lse[t] * lse[t];
  }
};
/// dlogits[t, e] += w_t scale * lse_t * softmax(z_t)_e,  scale = 2 weight / N
template <class T>
struct z_loss_backward_functor {
  const T* logits;  // [tokens, E]
  const compute_t<T>* lse;  // [tokens]
  const T* mask;            // [tokens] or null
  index_t experts;
  compute_t<T> scale;
  T* dlogits;  // [tokens, E]
  PROMOE_HOST_DEVICE void operator()(index_t t) const {
    using std::exp;
    const compute_t<T> w = token_weight(mask, t) * scale;
    if (w == 0) return;
    for (index_t e = 0; e < experts; ++e)
      dlogits[t * experts + e] += w * lse[t] * exp(logits[t * experts + e] - lse[t]);
  }
};
}  // namespace detail

struct z_loss {
  static constexpr const char* name = "z_loss";
  struct options {
    double weight = 1e-3;  ///< ST-MoE's coefficient
  };

  template <class T, class B>
  class impl {
   public:
    using traits = backend_traits<B>;
    struct cache {
      tensor<compute_t<T>, B> lse;     ///< [tokens]
      tensor<compute_t<T>, B> square;  ///< [tokens]
      tensor<double, B> partial;       ///< the sum's workspace
    };

    impl(const options& o, const router_layout&) : opt_(o) {}

    void forward(const loss_input<T, B>& in, cache& c, compute_t<T>* value) const {
      const index_t n = in.tokens;
      c.lse.resize({n});
      c.square.resize({n});
      if (in.counted == 0) return traits::fill(value, 1, compute_t<T>(0));
      traits::parallel_for(n, detail::logsumexp_functor<T>{in.logits, in.experts, in.token_mask, c.lse.data(),
                                                           c.square.data()});
      ops::sum_into<B>(c.square.data(), n, opt_.weight / static_cast<double>(in.counted), value, c.partial);
    }

    void backward(const loss_input<T, B>& in, cache& c) const {
      const index_t n = in.tokens;
      if (in.counted == 0) return;
      const auto scale = static_cast<compute_t<T>>(2.0 * opt_.weight / static_cast<double>(in.counted));
      traits::parallel_for(n, detail::z_loss_backward_functor<T>{in.logits, c.lse.data(), in.token_mask, in.experts,
                                                                 scale, in.dlogits});
    }

    const options& opts() const { return opt_; }

   private:
    options opt_;
  };
};

static_assert(LossPolicy<z_loss>);

}  // namespace promoe::loss
