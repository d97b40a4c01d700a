// SPDX-License-Identifier: Apache-2.0
/// \file routing_contrastive.hpp
/// \brief loss::routing_contrastive: ProMoE's routing contrastive loss (RCL).
///
/// Over the routed (labelled) tokens of the batch: each routed expert e that received at
/// least one token has a centroid m_e, the mean of its tokens (not detached, so the loss
/// also trains the features). With the active experts A (in index order),
/// L[i, j] = cos(p_{A_i}, m_{A_j}) / tau and RCL = mean_i CE(L[i, :], i): each prototype is
/// pulled towards its own centroid and pushed from the others. Zero with fewer than two
/// active experts. The layer adds weight * RCL (lambda in the paper).
#pragma once

#include <cmath>
#include <cstdint>

#include "../backend/ops.hpp"
#include "../backend/tensor.hpp"
#include "../core/error.hpp"
#include "concept.hpp"

namespace promoe::loss {

namespace detail {
/// a[t, e] = 1 when token t counts for expert e (its top-k, or only its top-1; no expert
/// when the token is masked out).
template <class T>
struct assignment_functor {
  const std::int32_t* slot_expert;  // [tokens, slots]
  const T* mask;                    // [tokens] or null
  index_t slots, experts, counted_slots;
  T* a;  // [tokens, experts]
  PROMOE_HOST_DEVICE void operator()(index_t t) const {
    for (index_t e = 0; e < experts; ++e) a[t * experts + e] = T(0);
    if (token_weight(mask, t) == T(0)) return;
    for (index_t s = 0; s < counted_slots; ++s) {
      const std::int32_t e = slot_expert[t * slots + s];
      if (e >= 0 && e < experts) a[t * experts + e] = T(1);
    }
  }
};

/// count[e] = the number of tokens counted for expert e (a column sum of the assignment).
template <class T>
struct assigned_count_functor {
  const T* a;  // [tokens, experts]
  index_t tokens, experts;
  double* count;  // [experts]
  PROMOE_HOST_DEVICE void operator()(index_t e) const {
    double s = 0;
    for (index_t t = 0; t < tokens; ++t) s += static_cast<double>(a[t * experts + e]);
    count[e] = s;
  }
};

/// active[0..a) = the experts with tokens, ascending; active[experts] = a (one thread).
struct active_experts_functor {
  const double* count;  // [experts]
  index_t experts;
  std::int32_t* active;  // [experts + 1]
  PROMOE_HOST_DEVICE void operator()(index_t) const {
    std::int32_t a = 0;
    for (index_t e = 0; e < experts; ++e)
      if (count[e] > 0) active[a++] = static_cast<std::int32_t>(e);
    active[experts] = a;
  }
};

/// y = v / max(|v|, eps) in place; returns |v|.
PROMOE_HOST_DEVICE inline double normalize_in_place(double* y, index_t d) {
  using std::sqrt;
  double s = 0;
  for (index_t j = 0; j < d; ++j) s += y[j] * y[j];
  const double n = sqrt(s), denom = n > 1e-12 ? n : 1e-12;
  for (index_t j = 0; j < d; ++j) y[j] /= denom;
  return n;
}
/// dv[j] (j < d) = the backward of normalize at (y, |v|) for gradient dy, scaled by `scale`.
template <class F>
PROMOE_HOST_DEVICE inline void normalize_backward(const double* y, double norm, const double* dy, index_t d,
                                                  double scale, F&& dv) {
  if (norm > 1e-12) {
    double dot = 0;
    for (index_t j = 0; j < d; ++j) dot += y[j] * dy[j];
    for (index_t j = 0; j < d; ++j) dv(j, scale * (dy[j] - y[j] * dot) / norm);
  } else {
    for (index_t j = 0; j < d; ++j) dv(j, scale * dy[j] / 1e-12);
  }
}

/// Row i of the active experts: the normalised prototype pn_i and centroid mn_i
/// (sum / count), with their norms.
template <class T>
struct normalize_active_functor {
  const T* prototypes;  // [experts, d]
  const T* sums;        // [experts, d]
  const double* count;  // [experts]
  const std::int32_t* active;
  index_t experts, d;
  double *pn, *mn, *pnorm, *mnorm;  // [experts, d] and [experts], rows 0..a
  PROMOE_HOST_DEVICE void operator()(index_t i) const {
    if (i >= active[experts]) return;
    const index_t x = active[i];
    for (index_t j = 0; j < d; ++j) {
      pn[i * d + j] = static_cast<double>(prototypes[x * d + j]);
      mn[i * d + j] = static_cast<double>(sums[x * d + j]) / count[x];
    }
    pnorm[i] = normalize_in_place(pn + i * d, d);
    mnorm[i] = normalize_in_place(mn + i * d, d);
  }
};

/// Row i of L = pn mn^T / tau over the active experts: softmax[i, :a] = softmax(L[i, :]) and
/// row_loss[i] = CE(L[i, :], i).
struct contrastive_rows_functor {
  const double *pn, *mn;
  const std::int32_t* active;
  index_t experts, d;
  double inv_temperature;
  double* softmax;   // [experts, experts], rows and columns 0..a
  double* row_loss;  // [experts]
  PROMOE_HOST_DEVICE void operator()(index_t i) const {
    using std::exp;
    using std::log;
    const index_t a = active[experts];
    if (i >= a) return;
    double* row = softmax + i * experts;
    double mx = -INFINITY;
    for (index_t j = 0; j < a; ++j) {
      double dot = 0;
      for (index_t q = 0; q < d; ++q) dot += pn[i * d + q] * mn[j * d + q];
      row[j] = dot * inv_temperature;
      mx = row[j] > mx ? row[j] : mx;
    }
    const double diag = row[i];
    double s = 0;
    for (index_t j = 0; j < a; ++j) s += exp(row[j] - mx);
    row_loss[i] = mx + log(s) - diag;
    for (index_t j = 0; j < a; ++j) row[j] = exp(row[j] - mx) / s;
  }
};

/// *value = weight * mean_i row_loss[i] over the a active experts, 0 when a < 2 (one thread).
template <class R>
struct contrastive_value_functor {
  const double* row_loss;
  const std::int32_t* active;
  index_t experts;
  double weight;
  R* value;
  PROMOE_HOST_DEVICE void operator()(index_t) const {
    const index_t a = active[experts];
    double s = 0;
    if (a >= 2)
      for (index_t i = 0; i < a; ++i) s += row_loss[i];
    *value = static_cast<R>(a >= 2 ? weight * s / static_cast<double>(a) : 0.0);
  }
};

/// The gradient of one side of L[i, j] = pn_i . mn_j / tau through its normalisation, for
/// active row r: with G[i, j] = softmax[i, j] - [i == j] (dL / dlogit times a / weight),
/// d(own)_r = scale sum_o G(r, o) other_o, where G(r, o) is G[r, o] for the prototypes
/// (Rows) and G[o, r] for the centroids. The result, divided by `divisor[x]` (the counts for a
/// centroid, null for 1) is added (prototypes) or written (centroid sums) into out[x, :],
/// x = active[r]. `work` [experts, d] holds d(own) per row.
template <class T, bool Rows>
struct contrastive_side_grad_functor {
  const double* softmax;  // [experts, experts]
  const double *own, *other, *own_norm;
  const std::int32_t* active;
  index_t experts, d;
  double weight_over_tau;
  const double* divisor;  // [experts] or null
  double* work;           // [experts, d]
  T* out;                 // [experts, d]
  bool accumulate;
  PROMOE_HOST_DEVICE void operator()(index_t r) const {
    const index_t a = active[experts];
    if (a < 2 || r >= a) return;
    double* dy = work + r * d;
    for (index_t q = 0; q < d; ++q) dy[q] = 0;
    for (index_t o = 0; o < a; ++o) {
      const double g = (Rows ? softmax[r * experts + o] : softmax[o * experts + r]) - (o == r ? 1.0 : 0.0);
      for (index_t q = 0; q < d; ++q) dy[q] += g * other[o * d + q];
    }
    const index_t x = active[r];
    const double scale = weight_over_tau / static_cast<double>(a) / (divisor ? divisor[x] : 1.0);
    T* dst = out + x * d;
    normalize_backward(own + r * d, own_norm[r], dy, d, scale, [&](index_t q, double v) {
      dst[q] = accumulate ? static_cast<T>(dst[q] + static_cast<T>(v)) : static_cast<T>(v);
    });
  }
};
}  // namespace detail

struct routing_contrastive {
  static constexpr const char* name = "routing_contrastive";
  /// Needs a router with prototypes (router::prototypical, router::promoe).
  static constexpr bool needs_prototypes = true;

  struct options {
    double weight = 1.0;         ///< lambda (ProMoE: 1; 10 for DDPM at B size)
    double temperature = 0.07;   ///< tau
    bool top_k_counting = true;  ///< a token counts for every expert of its top-k (else its top-1)
  };

  template <class T, class B>
  class impl {
   public:
    using traits = backend_traits<B>;

    struct cache {
      tensor<T, B> assign;             ///< [tokens, E] 0/1
      tensor<T, B> sums;               ///< [E, D] sums of assigned tokens
      tensor<T, B> dsums;              ///< [E, D] backward
      tensor<double, B> count;         ///< [E] tokens per expert
      tensor<std::int32_t, B> active;  ///< [E + 1] active experts, ascending; the last entry: how many
      tensor<double, B> pn, mn;        ///< [E, D] rows 0..a: normalised prototypes and centroids of the active experts
      tensor<double, B> pnorm, mnorm;  ///< [E]
      tensor<double, B> softmax;       ///< [E, E] softmax of the logits rows
      tensor<double, B> row_loss;      ///< [E]
      tensor<double, B> work;          ///< [E, D] backward
      index_t dim = 0;
    };

    impl(const options& o, const router_layout&) : opt_(o) {
      PROMOE_CHECK(o.temperature > 0 && std::isfinite(o.temperature),
                   "loss::routing_contrastive: temperature must be positive, got ", o.temperature);
    }

    /// Everything after the assignment is E x E (or E x D) work: small functors on the
    /// device, so nothing waits for it.
    void forward(const loss_input<T, B>& in, cache& c, compute_t<T>* value) const {
      PROMOE_CHECK(in.prototypes != nullptr, "loss::routing_contrastive: the router has no prototypes");
      const index_t n = in.tokens, e = in.experts, d = in.x.cols;
      c.dim = d;
      c.active.resize({e + 1});
      c.active.fill(0);
      if (in.counted == 0) return traits::fill(value, 1, compute_t<T>(0));
      const auto& plan = *in.plan;
      c.assign.resize({n, e});
      traits::parallel_for(n, detail::assignment_functor<T>{plan.slot_expert.data(), in.token_mask,
                                                            plan.slots_per_token, e,
                                                            opt_.top_k_counting ? plan.slots_per_token : 1,
                                                            c.assign.data()});
      c.sums.resize({e, d});
      ops::gemm<B, T>(c.assign.cmatrix(), transpose::yes, in.x, transpose::no, c.sums.matrix());
      c.count.resize({e});
      traits::parallel_for(e, detail::assigned_count_functor<T>{c.assign.data(), n, e, c.count.data()});
      traits::parallel_for(1, detail::active_experts_functor{c.count.data(), e, c.active.data()});
      for (auto* t : {&c.pn, &c.mn}) t->resize({e, d});
      for (auto* t : {&c.pnorm, &c.mnorm, &c.row_loss}) t->resize({e});
      c.softmax.resize({e, e});
      traits::parallel_for(e, detail::normalize_active_functor<T>{in.prototypes, c.sums.data(), c.count.data(),
                                                                  c.active.data(), e, d, c.pn.data(), c.mn.data(),
                                                                  c.pnorm.data(), c.mnorm.data()});
      traits::parallel_for(e, detail::contrastive_rows_functor{c.pn.data(), c.mn.data(), c.active.data(), e, d,
                                                               1.0 / opt_.temperature, c.softmax.data(),
                                                               c.row_loss.data()});
      traits::parallel_for(1, detail::contrastive_value_functor<compute_t<T>>{c.row_loss.data(), c.active.data(), e,
                                                                              opt_.weight, value});
    }

    void backward(const loss_input<T, B>& in, cache& c) const {
      const index_t e = in.experts, d = c.dim;
      if (in.counted == 0) return;
      PROMOE_CHECK(in.dx != nullptr && in.dprototypes != nullptr,
                   "loss::routing_contrastive: backward needs token and prototype gradients");
      // dL/dlogit[i, j] = weight / a * (softmax[i, j] - [i == j]); logit = pn_i . mn_j / tau.
      // With fewer than two active experts the functors do nothing and dsums stays 0.
      const double weight_over_tau = opt_.weight / opt_.temperature;
      c.work.resize({e, d});
      c.dsums.resize({e, d});
      c.dsums.fill(T(0));
      traits::parallel_for(e, detail::contrastive_side_grad_functor<T, true>{
                                  c.softmax.data(), c.pn.data(), c.mn.data(), c.pnorm.data(), c.active.data(), e, d,
                                  weight_over_tau, nullptr, c.work.data(), in.dprototypes, true});
      // centroid m = sum / count, so d sums = d m / count
      traits::parallel_for(e, detail::contrastive_side_grad_functor<T, false>{
                                  c.softmax.data(), c.mn.data(), c.pn.data(), c.mnorm.data(), c.active.data(), e, d,
                                  weight_over_tau, c.count.data(), c.work.data(), c.dsums.data(), false});
      // d tokens = A dS: each token gets the centroid gradients of the experts it counts for
      ops::gemm<B, T>(c.assign.cmatrix(), transpose::no, c.dsums.cmatrix(), transpose::no,
                      matrix_view<T>{in.dx, in.tokens, d}, T(1), T(1));
    }

    const options& opts() const { return opt_; }

   private:
    options opt_;
  };
};

static_assert(LossPolicy<routing_contrastive>);

}  // namespace promoe::loss
