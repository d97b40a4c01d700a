// SPDX-License-Identifier: Apache-2.0
/// \file conditional.hpp
/// \brief router::conditional<Inner>: ProMoE's first routing step. Every token of a sample
/// whose label is the null label goes to the unconditional expert(s) with gate 1 (split
/// evenly when there are several); the tokens of labelled samples go to `Inner`. With no
/// unconditional expert in the layout, every token goes to `Inner` (labels still checked).
///
/// How the labelled tokens reach `Inner`: a router that routes each token on its own
/// (`routes_per_token`: top_k, prototypical) sees every token, and the null-label tokens'
/// choices are overwritten, their gate gradients zeroed and the losses told to skip them
/// with a token mask. So every buffer is sized by the batch, not by how many samples label
/// dropout left labelled (no allocation when that number grows), and no rows are copied. A
/// router whose choices depend on the other tokens (expert choice, Expert Race) sees only
/// the labelled tokens, gathered into a buffer of their own.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../backend/ops.hpp"
#include "../backend/tensor.hpp"
#include "../core/error.hpp"
#include "../core/rng.hpp"
#include "../routing/dispatch_plan.hpp"
#include "../routing/loss_input.hpp"
#include "concept.hpp"

namespace promoe::router {

namespace detail {

/// out[r] = x[rows[r]]
template <class T>
struct gather_rows_functor {
  const T* x;  // [tokens, d], leading dimension ldx
  index_t ldx;
  const index_t* rows;  // [count]
  index_t d;
  T* out;  // [count, d]
  PROMOE_HOST_DEVICE void operator()(index_t r) const {
    for (index_t j = 0; j < d; ++j) out[r * d + j] = x[rows[r] * ldx + j];
  }
};

/// out[rows[r]] += in[r] (rows are distinct)
template <class T>
struct scatter_add_rows_functor {
  const T* in;          // [count, d]
  const index_t* rows;  // [count]
  index_t d;
  T* out;  // [tokens, d], leading dimension ldo
  index_t ldo;
  PROMOE_HOST_DEVICE void operator()(index_t r) const {
    for (index_t j = 0; j < d; ++j) out[rows[r] * ldo + j] += in[r * d + j];
  }
};

/// The outer plan's slots of token t: the inner router's slots for a labelled token, the
/// unconditional experts for a null-label token.
template <class T>
struct merge_slots_functor {
  const index_t* compact;             // [tokens] the token's row in the inner plan, -1 for null-label tokens
  const std::int32_t* inner_expert;   // [routed tokens, inner slots]
  const T* inner_gate;                // [routed tokens, inner slots]
  index_t inner_slots, slots;
  std::int32_t first_unconditional;   // id of the first unconditional expert
  index_t unconditional;
  std::int32_t* slot_expert;  // [tokens, slots], pre-filled with -1
  T* slot_gate;               // [tokens, slots]
  PROMOE_HOST_DEVICE void operator()(index_t t) const {
    const index_t c = compact[t];
    if (c >= 0) {
      for (index_t s = 0; s < inner_slots; ++s) {
        slot_expert[t * slots + s] = inner_expert[c * inner_slots + s];
        slot_gate[t * slots + s] = inner_gate[c * inner_slots + s];
      }
    } else {
      for (index_t u = 0; u < unconditional; ++u) {
        slot_expert[t * slots + u] = first_unconditional + static_cast<std::int32_t>(u);
        slot_gate[t * slots + u] = T(1) / T(unconditional);
      }
    }
  }
};

/// The inner router's gate gradients: token t's first inner slots go to the inner router's
/// row compact[t]; with `masked` (the inner router sees every token) a null-label token's
/// row t gets zeros.
template <class T>
struct inner_gates_functor {
  const T* dgate;          // [tokens, slots]
  const index_t* compact;  // [tokens] the token's row in the inner router's input, or -1
  index_t slots, inner_slots;
  bool masked;
  T* inner_dgate;  // [inner rows, inner slots]
  PROMOE_HOST_DEVICE void operator()(index_t t) const {
    const index_t c = compact[t];
    if (c >= 0) {
      for (index_t s = 0; s < inner_slots; ++s) inner_dgate[c * inner_slots + s] = dgate[t * slots + s];
    } else if (masked) {
      for (index_t s = 0; s < inner_slots; ++s) inner_dgate[t * inner_slots + s] = T(0);
    }
  }
};

template <class R>
constexpr bool has_prototypes_v = requires { requires R::has_prototypes; };
template <class R>
constexpr bool routes_per_token_v = requires { requires R::routes_per_token; };

}  // namespace detail

/// \tparam Inner the router of labelled samples' tokens (router::prototypical in ProMoE).
template <RouterPolicy Inner>
struct conditional {
  static constexpr const char* name = "conditional";

  struct options {
    typename Inner::options inner{};
    std::int64_t null_label = -1;  ///< the label after classifier-free-guidance dropout (num_classes)
  };

  template <class T, class B>
  class impl {
   public:
    using traits = backend_traits<B>;
    using inner_impl = typename Inner::template impl<T, B>;
    static constexpr bool has_prototypes = detail::has_prototypes_v<inner_impl>;
    /// The inner router sees every token (masked) rather than the gathered labelled ones.
    static constexpr bool masked = detail::routes_per_token_v<inner_impl>;

    struct cache {
      std::vector<index_t> host_compact;  ///< [tokens] the token's row in the inner router's input, or -1
      std::vector<T> host_mask;           ///< masked: [tokens] 1 for a labelled token, 0 for a null-label one
      std::vector<index_t> host_rows;     ///< gathered: the labelled tokens, in token order
      std::vector<std::int64_t> labels;   ///< gathered: the labels of the labelled samples
      index_t counted = 0;                ///< labelled tokens
      tensor<index_t, B> compact, rows;
      tensor<T, B> mask;
      tensor<T, B> xc;  ///< gathered: [labelled tokens, D]
      typename inner_impl::cache inner;
      dispatch_plan<T, B> plan;  ///< the inner router's plan
      tensor<T, B> dgate;        ///< [inner rows, inner slots]
      tensor<T, B> dxc;          ///< gathered: [labelled tokens, D]
    };

    impl(const options& o, const router_layout& layout, rng& gen)
        : opt_(o), layout_(layout), inner_(o.inner, router_layout{layout.dim, layout.routed, 0}, gen) {
      PROMOE_CHECK(o.null_label >= 0, "router::conditional: null_label must be set (>= 0), got ", o.null_label);
    }

    const options& opts() const { return opt_; }
    inner_impl& inner() { return inner_; }
    index_t slots_per_token() const { return std::max(inner_.slots_per_token(), layout_.unconditional); }

    void forward(const route_input<T>& in, cache& c, dispatch_plan<T, B>& plan) const {
      const index_t n = in.x.rows, d = layout_.dim, slots = slots_per_token();
      split(in, c);
      if constexpr (masked) {
        inner_.forward(in, c.inner, c.plan);
      } else {
        const index_t nc = c.counted;
        c.xc.resize({nc, d});
        traits::parallel_for(nc, detail::gather_rows_functor<T>{in.x.data, in.x.ld, c.rows.data(), d, c.xc.data()});
        if (nc > 0) {
          inner_.forward(inner_input(in, c), c.inner, c.plan);
        } else {
          c.plan.reset(0, inner_.slots_per_token(), layout_.routed);
          c.plan.group();
        }
      }
      plan.reset(n, slots, layout_.experts());
      traits::parallel_for(n, detail::merge_slots_functor<T>{c.compact.data(), c.plan.slot_expert.data(),
                                                             c.plan.slot_gate.data(), inner_.slots_per_token(), slots,
                                                             static_cast<std::int32_t>(layout_.routed),
                                                             layout_.unconditional, plan.slot_expert.data(),
                                                             plan.slot_gate.data()});
      plan.group();
    }

    /// The losses see the labelled tokens only.
    loss_input<T, B> loss_view(const route_input<T>& in, cache& c, const dispatch_plan<T, B>&, bool for_backward) {
      if constexpr (masked) {
        loss_input<T, B> li = inner_.loss_view(in, c.inner, c.plan, for_backward);
        li.token_mask = c.mask.data();
        li.counted = c.counted;
        return li;
      } else {
        return inner_.loss_view(inner_input(in, c), c.inner, c.plan, for_backward);
      }
    }

    void backward(const route_input<T>& in, cache& c, const dispatch_plan<T, B>& plan, const T* dgate,
                  matrix_view<T> dx) {
      const index_t n = in.x.rows, nc = c.counted, d = layout_.dim, ki = inner_.slots_per_token();
      if (nc == 0) return;  // null-label tokens have constant gates: nothing to train
      const index_t inner_rows = masked ? n : nc;
      c.dgate.resize({inner_rows * ki});
      traits::parallel_for(n, detail::inner_gates_functor<T>{dgate, c.compact.data(), plan.slots_per_token, ki,
                                                             masked, c.dgate.data()});
      if constexpr (masked) {
        inner_.backward(in, c.inner, c.plan, c.dgate.data(), dx);
      } else {
        c.dxc.resize({nc, d});
        c.dxc.fill(T(0));
        inner_.backward(inner_input(in, c), c.inner, c.plan, c.dgate.data(), c.dxc.matrix());
        traits::parallel_for(nc, detail::scatter_add_rows_functor<T>{c.dxc.data(), c.rows.data(), d, dx.data, dx.ld});
      }
    }

    /// The CFG fast path: when every sample has the null label and there is one
    /// unconditional expert, all tokens go to it with gate 1 (its id), else -1.
    index_t dense_expert(const route_input<T>& in) const {
      if (layout_.unconditional != 1 || in.labels.empty()) return -1;
      check_labels(in);
      for (std::int64_t l : in.labels)
        if (l != opt_.null_label) return -1;
      return layout_.routed;
    }

    void zero_grad() { inner_.zero_grad(); }

    template <class F>
    void for_each_parameter(F&& f) {
      inner_.for_each_parameter(f);
    }
    template <class F>
    void for_each_buffer(F&& f) {
      if constexpr (requires { inner_.for_each_buffer(f); }) inner_.for_each_buffer(f);
    }

   private:
    void check_labels(const route_input<T>& in) const {
      PROMOE_CHECK(!in.labels.empty(), "router::conditional: needs one label per sample, but labels is empty");
      for (std::size_t b = 0; b < in.labels.size(); ++b)
        PROMOE_CHECK(in.labels[b] >= 0 && in.labels[b] <= opt_.null_label, "router::conditional: labels[", b, "] = ",
                     in.labels[b], " is out of range; expected 0..", opt_.null_label, " (", opt_.null_label,
                     " is the null label)");
    }

    /// Which tokens are labelled (the inner router's rows, the losses' mask), copied to the
    /// backend.
    void split(const route_input<T>& in, cache& c) const {
      check_labels(in);
      const index_t n = in.x.rows, spt = in.tokens_per_sample;
      c.host_compact.assign(static_cast<std::size_t>(n), -1);
      c.counted = 0;
      if constexpr (masked) {
        c.host_mask.assign(static_cast<std::size_t>(n), T(0));
      } else {
        c.host_rows.clear();
        c.labels.clear();
      }
      for (std::size_t b = 0; b < in.labels.size(); ++b) {
        if (in.labels[b] == opt_.null_label && layout_.unconditional > 0) continue;
        if constexpr (!masked) c.labels.push_back(in.labels[b]);
        for (index_t t = static_cast<index_t>(b) * spt; t < static_cast<index_t>(b + 1) * spt; ++t) {
          if constexpr (masked) {
            c.host_compact[t] = t;
            c.host_mask[t] = T(1);
          } else {
            c.host_compact[t] = c.counted;
            c.host_rows.push_back(t);
          }
          ++c.counted;
        }
      }
      c.compact.resize({n});
      traits::copy_from_host(c.host_compact.data(), n, c.compact.data());
      if constexpr (masked) {
        c.mask.resize({n});
        traits::copy_from_host(c.host_mask.data(), n, c.mask.data());
      } else {
        c.rows.resize({c.counted});
        traits::copy_from_host(c.host_rows.data(), c.counted, c.rows.data());
      }
    }

    route_input<T> inner_input(const route_input<T>& in, const cache& c) const {
      return {c.xc.cmatrix(), c.labels, in.tokens_per_sample, in.training};
    }

    options opt_;
    router_layout layout_;
    inner_impl inner_;
  };
};

}  // namespace promoe::router
