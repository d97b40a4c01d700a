// SPDX-License-Identifier: Apache-2.0
/// \file prototypical.hpp
/// \brief router::prototypical: learnable prototypes `cluster_centers` [E, D]; the logit of
/// (token, expert) is scale * cos(token, prototype); then a score function and top-k per
/// token as in every token-choice router. ProMoE's second routing step.
#pragma once

#include <cmath>

#include "../backend/init.hpp"
#include "../backend/ops.hpp"
#include "../backend/tensor.hpp"
#include "../core/bf16.hpp"
#include "../core/lane_sum.hpp"
#include "../core/rng.hpp"
#include "../routing/dispatch_plan.hpp"
#include "../routing/loss_input.hpp"
#include "concept.hpp"
#include "token_choice.hpp"

namespace promoe::router {

namespace detail {

/// F.normalize's epsilon: rows are divided by max(|row|, eps).
inline constexpr double normalize_eps = 1e-12;

template <class T>
PROMOE_HOST_DEVICE T inverse_norm(T norm) {
  return T(1) / (norm > T(normalize_eps) ? norm : T(normalize_eps));
}

/// norm[r] = |x[r]|.
template <class T>
struct row_norms_functor {
  const T* x;  // [rows, d], leading dimension ldx
  index_t ldx, d;
  T* norm;  // [rows]
  PROMOE_HOST_DEVICE void operator()(index_t r) const {
    using std::sqrt;
    const T* in = x + r * ldx;
    norm[r] = sqrt(lane_sum<compute_t<T>>(d, [in](index_t j) { return in[j] * in[j]; }));
  }
};

/// y[r] = x[r] / max(|x[r]|, eps); norm[r] = |x[r]|.
template <class T>
struct normalize_rows_functor {
  const T* x;  // [rows, d], leading dimension ldx
  index_t ldx, d;
  T* y;     // [rows, d]
  T* norm;  // [rows]
  PROMOE_HOST_DEVICE void operator()(index_t r) const {
    row_norms_functor<T>{x, ldx, d, norm}(r);
    const T inv = inverse_norm(norm[r]);
    for (index_t j = 0; j < d; ++j) y[r * d + j] = x[r * ldx + j] * inv;
  }
};

/// logits[r] *= 1 / max(|x[r]|, eps): x . p_e becomes the cosine (times the scale).
template <class T>
struct divide_by_norm_functor {
  T* logits;  // [rows, e]
  index_t e;
  const T* norm;  // [rows]
  PROMOE_HOST_DEVICE void operator()(index_t r) const {
    const T inv = inverse_norm(norm[r]);
    for (index_t j = 0; j < e; ++j) logits[r * e + j] *= inv;
  }
};

/// The backward of logits = scale * normalize(x) . pn^T, folded so that normalize(x) is never
/// written: g = scale * dlogits / max(|x|, eps) (in place of dlogits); then
/// dx = g . pn - coef * x with coef[r] = (g[r] . cos[r]) / |x[r]| (0 when |x| <= eps, where
/// normalize is x / eps), and dpn = g^T . x.
template <class T>
struct cosine_backward_functor {
  T* dlogits;        // [rows, e] in: dL/dlogits, out: g
  const T* logits;   // [rows, e] scale * cosine
  const T* norm;     // [rows]
  index_t e;
  T scale;
  T* coef;  // [rows]
  PROMOE_HOST_DEVICE void operator()(index_t r) const {
    const T inv = inverse_norm(norm[r]);
    compute_t<T> dot = 0;
    for (index_t j = 0; j < e; ++j) {
      T& g = dlogits[r * e + j];
      g *= scale * inv;
      dot += g * logits[r * e + j];
    }
    coef[r] = norm[r] > T(normalize_eps) ? T(dot * inv / scale) : T(0);
  }
};

/// dx[r] -= coef[r] * x[r].
template <class T>
struct subtract_scaled_rows_functor {
  const T* x;  // [rows, d], leading dimension ldx
  index_t ldx, d;
  const T* coef;  // [rows]
  T* dx;          // leading dimension lddx
  index_t lddx;
  PROMOE_HOST_DEVICE void operator()(index_t r) const {
    const T c = coef[r];
    if (c == T(0)) return;
    for (index_t j = 0; j < d; ++j) dx[r * lddx + j] -= c * x[r * ldx + j];
  }
};

/// dx[r] += (dy - y (y . dy)) / |x| when |x| > eps, else dy / eps: the backward of normalize.
template <class T>
struct normalize_backward_functor {
  const T* y;     // [rows, d] normalised rows
  const T* norm;  // [rows]
  const T* dy;    // [rows, d]
  index_t d;
  T* dx;  // [rows, d], leading dimension lddx
  index_t lddx;
  PROMOE_HOST_DEVICE void operator()(index_t r) const {
    const T* yr = y + r * d;
    const T* g = dy + r * d;
    T* out = dx + r * lddx;
    if (norm[r] > T(normalize_eps)) {
      const compute_t<T> dot = lane_sum<compute_t<T>>(d, [yr, g](index_t j) { return yr[j] * g[j]; });
      for (index_t j = 0; j < d; ++j) out[j] += (g[j] - yr[j] * dot) / norm[r];
    } else {
      for (index_t j = 0; j < d; ++j) out[j] += g[j] / T(normalize_eps);
    }
  }
};

}  // namespace detail

/// Cosine-to-prototype token-choice router.
struct prototypical {
  static constexpr const char* name = "prototypical";

  struct options {
    index_t k = 1;                       ///< experts per token, 1 <= k <= routed experts
    score_fn score = score_fn::identity;  ///< ProMoE: the gate is the raw cosine
    bool renormalize = false;            ///< divide the k chosen gates by their sum
    double scale = 1.0;                  ///< logits = scale * cosine
  };

  template <class T, class B>
  class impl {
   public:
    using traits = backend_traits<B>;
    static constexpr bool routes_per_token = true;
    static constexpr bool has_prototypes = true;

    // The tokens are never normalised in memory: the logits are x . pn^T divided by |x| per
    // row, and the backward folds 1/|x| into the [tokens, E] gradient (one pass over x less
    // each way than writing and reading normalize(x)).
    struct cache {
      tensor<T, B> xnorm;      ///< [tokens] the tokens' norms
      tensor<T, B> pn, pnorm;  ///< [E, D] normalised prototypes, [E] their norms
      tensor<T, B> logits;     ///< [tokens, E] scale * cosine
      tensor<T, B> scores;     ///< [tokens, E] activated
      tensor<T, B> dlogits;    ///< [tokens, E]
      tensor<T, B> coef;       ///< [tokens] backward: the radial part of dx per row
      tensor<T, B> dpn;        ///< [E, D] backward workspace
      loss_gradients<T, B> loss;
    };

    impl(const options& o, const router_layout& layout, rng& gen) : opt_(o), layout_(layout) {
      check_token_choice(o, layout.routed, name);
      PROMOE_CHECK(std::isfinite(o.scale) && o.scale > 0, "router::prototypical: scale must be positive, got ", o.scale);
      prototypes_.resize({layout.routed, layout.dim});
      grad_.resize({layout.routed, layout.dim});
      grad_.fill(T(0));
      init::normal<B>(prototypes_.data(), prototypes_.size(), 0.02, gen);
    }

    const options& opts() const { return opt_; }
    index_t slots_per_token() const { return opt_.k; }

    void forward(const route_input<T>& in, cache& c, dispatch_plan<T, B>& plan) const {
      const index_t n = in.x.rows, e = layout_.routed, d = layout_.dim;
      c.xnorm.resize({n});
      for (auto* t : {&c.pn, &c.dpn}) t->resize({e, d});
      c.pnorm.resize({e});
      traits::parallel_for(n, detail::row_norms_functor<T>{in.x.data, in.x.ld, d, c.xnorm.data()});
      traits::parallel_for(e, detail::normalize_rows_functor<T>{prototypes_.data(), d, d, c.pn.data(), c.pnorm.data()});
      c.logits.resize({n, e});
      ops::gemm<B, T>(in.x, transpose::no, c.pn.cmatrix(), transpose::yes, c.logits.matrix(),
                      static_cast<T>(opt_.scale));
      traits::parallel_for(n, detail::divide_by_norm_functor<T>{c.logits.data(), e, c.xnorm.data()});
      token_choice_select(opt_, c.logits, c.scores, layout_.experts(), plan);
    }

    loss_input<T, B> loss_view(const route_input<T>& in, cache& c, const dispatch_plan<T, B>& plan,
                               bool for_backward) {
      return c.loss.view(c.logits.data(), in.x, layout_.routed, plan, for_backward, prototypes_.data(), grad_.data());
    }

    void backward(const route_input<T>& in, cache& c, const dispatch_plan<T, B>& plan, const T* dgate,
                  matrix_view<T> dx) {
      const index_t n = in.x.rows, e = layout_.routed, d = layout_.dim;
      token_choice_backward(opt_, c.scores, plan, dgate, c.loss.extra_dlogits(), c.dlogits);
      c.coef.resize({n});
      traits::parallel_for(n, detail::cosine_backward_functor<T>{c.dlogits.data(), c.logits.data(), c.xnorm.data(),
                                                                 e, static_cast<T>(opt_.scale), c.coef.data()});
      ops::gemm<B, T>(c.dlogits.cmatrix(), transpose::no, c.pn.cmatrix(), transpose::no, dx, T(1), T(1));
      traits::parallel_for(n, detail::subtract_scaled_rows_functor<T>{in.x.data, in.x.ld, d, c.coef.data(), dx.data,
                                                                      dx.ld});
      ops::gemm<B, T>(c.dlogits.cmatrix(), transpose::yes, in.x, transpose::no, c.dpn.matrix());
      traits::parallel_for(e, detail::normalize_backward_functor<T>{c.pn.data(), c.pnorm.data(), c.dpn.data(), d,
                                                                    grad_.data(), d});
      c.loss.fold_into(dx);
    }

    void zero_grad() { grad_.fill(T(0)); }

    template <class F>
    void for_each_parameter(F&& f) {
      f(named_parameter<T>{"cluster_centers", {layout_.routed, layout_.dim}, prototypes_.data(), grad_.data()});
    }

   private:
    options opt_;
    router_layout layout_;
    tensor<T, B> prototypes_;  // [E, D]
    tensor<T, B> grad_;
  };
};

static_assert(RouterPolicy<prototypical>);

}  // namespace promoe::router
