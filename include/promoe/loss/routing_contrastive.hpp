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
#include <vector>

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

/// y = v / max(|v|, eps) for a host vector; returns |v|.
inline double normalize_host(const double* v, index_t d, double* y) {
  double s = 0;
  for (index_t j = 0; j < d; ++j) s += v[j] * v[j];
  const double n = std::sqrt(s), denom = n > 1e-12 ? n : 1e-12;
  for (index_t j = 0; j < d; ++j) y[j] = v[j] / denom;
  return n;
}
/// dv += backward of normalize at (y, |v|) for gradient dy.
inline void normalize_backward_host(const double* y, double norm, const double* dy, index_t d, double* dv) {
  if (norm > 1e-12) {
    double dot = 0;
    for (index_t j = 0; j < d; ++j) dot += y[j] * dy[j];
    for (index_t j = 0; j < d; ++j) dv[j] += (dy[j] - y[j] * dot) / norm;
  } else {
    for (index_t j = 0; j < d; ++j) dv[j] += dy[j] / 1e-12;
  }
}
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
      tensor<T, B> assign;            ///< [tokens, E] 0/1
      tensor<T, B> sums;              ///< [E, D] sums of assigned tokens
      tensor<T, B> dsums, dprot;      ///< [E, D] backward
      std::vector<index_t> active;    ///< active experts, ascending
      std::vector<double> count;      ///< [E] tokens per expert
      std::vector<double> pn, mn;     ///< [a, D] normalised prototypes and centroids of the active experts
      std::vector<double> pnorm, mnorm;
      std::vector<double> softmax;    ///< [a, a] softmax of the logits rows
      // host workspaces, kept so that a steady batch stops allocating
      std::vector<T> assign_host, sums_host, prototypes_host, dprot_host, dsums_host;
      std::vector<double> v, dpn, dmn;
      index_t dim = 0;
    };

    impl(const options& o, const router_layout&) : opt_(o) {
      PROMOE_CHECK(o.temperature > 0 && std::isfinite(o.temperature),
                   "loss::routing_contrastive: temperature must be positive, got ", o.temperature);
    }

    T forward(const loss_input<T, B>& in, cache& c) const {
      PROMOE_CHECK(in.prototypes != nullptr, "loss::routing_contrastive: the router has no prototypes");
      const index_t n = in.tokens, e = in.experts, d = in.x.cols;
      c.dim = d;
      c.active.clear();
      c.count.assign(static_cast<std::size_t>(e), 0.0);
      if (in.counted == 0) return T(0);
      const auto& plan = *in.plan;
      c.assign.resize({n, e});
      traits::parallel_for(n, detail::assignment_functor<T>{plan.slot_expert.data(), in.token_mask,
                                                            plan.slots_per_token, e,
                                                            opt_.top_k_counting ? plan.slots_per_token : 1,
                                                            c.assign.data()});
      c.sums.resize({e, d});
      ops::gemm<B, T>(c.assign.cmatrix(), transpose::yes, in.x, transpose::no, c.sums.matrix());
      // The E x E part is tiny: on the host, in double.
      c.assign.to_host(c.assign_host);
      const auto& a_host = c.assign_host;
      for (index_t t = 0; t < n; ++t)
        for (index_t x = 0; x < e; ++x) c.count[x] += static_cast<double>(a_host[t * e + x]);
      for (index_t x = 0; x < e; ++x)
        if (c.count[x] > 0) c.active.push_back(x);
      const index_t a = static_cast<index_t>(c.active.size());
      if (a < 2) return T(0);
      auto& sums_t = c.sums_host;
      auto& prot_t = c.prototypes_host;
      c.sums.to_host(sums_t);
      prot_t.resize(static_cast<std::size_t>(e * d));
      traits::copy_to_host(in.prototypes, e * d, prot_t.data());
      c.pn.assign(static_cast<std::size_t>(a * d), 0.0);
      c.mn.assign(static_cast<std::size_t>(a * d), 0.0);
      c.pnorm.assign(static_cast<std::size_t>(a), 0.0);
      c.mnorm.assign(static_cast<std::size_t>(a), 0.0);
      auto& v = c.v;
      v.resize(static_cast<std::size_t>(d));
      for (index_t i = 0; i < a; ++i) {
        const index_t x = c.active[i];
        for (index_t j = 0; j < d; ++j) v[j] = static_cast<double>(prot_t[x * d + j]);
        c.pnorm[i] = detail::normalize_host(v.data(), d, &c.pn[i * d]);
        for (index_t j = 0; j < d; ++j) v[j] = static_cast<double>(sums_t[x * d + j]) / c.count[x];
        c.mnorm[i] = detail::normalize_host(v.data(), d, &c.mn[i * d]);
      }
      c.softmax.assign(static_cast<std::size_t>(a * a), 0.0);
      double loss = 0;
      for (index_t i = 0; i < a; ++i) {
        double* row = &c.softmax[i * a];
        double mx = -INFINITY;
        for (index_t j = 0; j < a; ++j) {
          double dot = 0;
          for (index_t q = 0; q < d; ++q) dot += c.pn[i * d + q] * c.mn[j * d + q];
          row[j] = dot / opt_.temperature;
          mx = std::max(mx, row[j]);
        }
        const double diag = row[i];
        double s = 0;
        for (index_t j = 0; j < a; ++j) s += std::exp(row[j] - mx);
        loss += mx + std::log(s) - diag;
        for (index_t j = 0; j < a; ++j) row[j] = std::exp(row[j] - mx) / s;
      }
      return static_cast<T>(opt_.weight * loss / static_cast<double>(a));
    }

    void backward(const loss_input<T, B>& in, cache& c) const {
      const index_t a = static_cast<index_t>(c.active.size()), e = in.experts, d = c.dim;
      if (a < 2) return;
      PROMOE_CHECK(in.dx != nullptr && in.dprototypes != nullptr,
                   "loss::routing_contrastive: backward needs token and prototype gradients");
      // dL/dlogit[i, j] = weight / a * (softmax[i, j] - [i == j]); logit = pn_i . mn_j / tau
      auto& dpn = c.dpn;
      auto& dmn = c.dmn;
      dpn.assign(static_cast<std::size_t>(a * d), 0.0);
      dmn.assign(static_cast<std::size_t>(a * d), 0.0);
      const double scale = opt_.weight / static_cast<double>(a) / opt_.temperature;
      for (index_t i = 0; i < a; ++i)
        for (index_t j = 0; j < a; ++j) {
          const double g = scale * (c.softmax[i * a + j] - (i == j ? 1.0 : 0.0));
          for (index_t q = 0; q < d; ++q) {
            dpn[i * d + q] += g * c.mn[j * d + q];
            dmn[j * d + q] += g * c.pn[i * d + q];
          }
        }
      auto& dprot = c.dprot_host;
      auto& dsums = c.dsums_host;
      dprot.assign(static_cast<std::size_t>(e * d), T(0));
      dsums.assign(static_cast<std::size_t>(e * d), T(0));
      auto& tmp = c.v;  // forward is done with it
      tmp.resize(static_cast<std::size_t>(d));
      for (index_t i = 0; i < a; ++i) {
        const index_t x = c.active[i];
        std::fill(tmp.begin(), tmp.end(), 0.0);
        detail::normalize_backward_host(&c.pn[i * d], c.pnorm[i], &dpn[i * d], d, tmp.data());
        for (index_t q = 0; q < d; ++q) dprot[x * d + q] = static_cast<T>(tmp[q]);
        std::fill(tmp.begin(), tmp.end(), 0.0);
        detail::normalize_backward_host(&c.mn[i * d], c.mnorm[i], &dmn[i * d], d, tmp.data());
        for (index_t q = 0; q < d; ++q) dsums[x * d + q] = static_cast<T>(tmp[q] / c.count[x]);  // m = sum / count
      }
      c.dprot.resize({e, d});
      c.dsums.resize({e, d});
      traits::copy_from_host(dprot.data(), e * d, c.dprot.data());
      traits::copy_from_host(dsums.data(), e * d, c.dsums.data());
      ops::add<B>(c.dprot.cmatrix(), matrix_view<T>{in.dprototypes, e, d});
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
