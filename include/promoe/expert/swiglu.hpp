// SPDX-License-Identifier: Apache-2.0
/// \file swiglu.hpp
/// \brief expert::swiglu: down_proj(silu(gate_proj(x)) * up_proj(x)), no biases (the shared
/// expert of DiT-MoE). gate_proj and up_proj are stored fused as one [2I, D] weight per
/// expert (gate rows first), so the forward is one GEMM for both.
#pragma once

#include <string>

#include "../backend/init.hpp"
#include "../backend/ops.hpp"
#include "../backend/tensor.hpp"
#include "../core/bf16.hpp"
#include "../core/rng.hpp"
#include "activation.hpp"
#include "bank_size.hpp"
#include "expert_rows.hpp"
#include "naming.hpp"

namespace promoe::expert {

namespace detail {
/// act[:, 2I:3I] = silu(act[:, 0:I]) * act[:, I:2I]
template <class T>
struct swiglu_functor {
  T* act;  // [rows, 3I]: gate pre-activation, up, product
  index_t hidden;
  PROMOE_HOST_DEVICE void operator()(index_t r) const {
    T* g = act + r * 3 * hidden;
    for (index_t j = 0; j < hidden; ++j)
      g[2 * hidden + j] = act::silu::value(static_cast<compute_t<T>>(g[j])) * g[hidden + j];
  }
};
/// From dA (in d[:, 0:I]) to dG (d[:, 0:I]) and dU (d[:, I:2I]).
template <class T>
struct swiglu_backward_functor {
  const T* act;  // [rows, 3I]
  T* d;          // [rows, 2I]
  index_t hidden;
  PROMOE_HOST_DEVICE void operator()(index_t r) const {
    const T* g = act + r * 3 * hidden;
    T* o = d + r * 2 * hidden;
    for (index_t j = 0; j < hidden; ++j) {
      const compute_t<T> da = o[j], gj = g[j];  // bf16: the activation runs in float
      o[hidden + j] = da * act::silu::value(gj);
      o[j] = da * g[hidden + j] * act::silu::derivative(gj);
    }
  }
};
}  // namespace detail

struct swiglu {
  static constexpr const char* name = "swiglu";
  static constexpr index_t cache_width(index_t hidden) { return 3 * hidden; }
  static constexpr index_t scratch_width(index_t hidden) { return 2 * hidden; }

  template <class T, class B>
  class bank : public bank_size {
   public:
    using traits = backend_traits<B>;

    bank() = default;
    bank(index_t count, index_t dim, index_t hidden) : bank_size(count, dim, hidden) {
      for (auto* t : {&wgu_, &gwgu_}) t->resize({count, 2 * hidden, dim});
      for (auto* t : {&wd_, &gwd_}) t->resize({count, dim, hidden});
      wgu_.fill(T(0));
      wd_.fill(T(0));
      zero_grad();
    }

    /// Xavier-uniform for each of gate_proj, up_proj, down_proj.
    void init(rng& gen) {
      for (index_t e = 0; e < count_; ++e) {
        init::xavier_uniform<B>(wgu(e), hidden_, dim_, gen);
        init::xavier_uniform<B>(wgu(e) + hidden_ * dim_, hidden_, dim_, gen);
        init::xavier_uniform<B>(wd(e), dim_, hidden_, gen);
      }
    }

    void zero_grad() {
      gwgu_.fill(T(0));
      gwd_.fill(T(0));
    }

    void forward(index_t e, const_matrix_view<T> x, matrix_view<T> act, matrix_view<T> y, bool accumulate) const {
      if (x.rows == 0) return;
      ops::gemm<B, T>(x, transpose::no, const_matrix_view<T>{wgu(e), 2 * hidden_, dim_}, transpose::yes,
                      act.col_block(0, 2 * hidden_));
      traits::parallel_for(x.rows, detail::swiglu_functor<T>{act.data, hidden_});
      ops::gemm<B, T>(act.col_block(2 * hidden_, hidden_), transpose::no, const_matrix_view<T>{wd(e), dim_, hidden_},
                      transpose::yes, y, T(1), accumulate ? T(1) : T(0));
    }

    void backward(index_t e, const_matrix_view<T> x, const_matrix_view<T> act, const_matrix_view<T> dy,
                  matrix_view<T> dx, bool accumulate_dx, matrix_view<T> scratch, const T*) {
      if (x.rows == 0) return;
      auto d = scratch.col_block(0, 2 * hidden_);
      ops::gemm<B, T>(dy, transpose::yes, act.col_block(2 * hidden_, hidden_), transpose::no,
                      matrix_view<T>{gwd(e), dim_, hidden_}, T(1), T(1));
      ops::gemm<B, T>(dy, transpose::no, const_matrix_view<T>{wd(e), dim_, hidden_}, transpose::no,
                      d.col_block(0, hidden_));
      traits::parallel_for(x.rows, detail::swiglu_backward_functor<T>{act.data, d.data, hidden_});
      ops::gemm<B, T>(d, transpose::yes, x, transpose::no, matrix_view<T>{gwgu(e), 2 * hidden_, dim_}, T(1), T(1));
      ops::gemm<B, T>(d, transpose::no, const_matrix_view<T>{wgu(e), 2 * hidden_, dim_}, transpose::no, dx, T(1),
                      accumulate_dx ? T(1) : T(0));
    }

    /// forward() for every expert at once, y overwritten (see mlp's forward_grouped).
    void forward_grouped(const expert_rows& g, const_matrix_view<T> x, matrix_view<T> act, matrix_view<T> y) const {
      g.check(count_, x.rows, "expert::swiglu::forward_grouped");
      const index_t rows = g.total_rows();
      if (rows == 0) return;
      gemm_per_expert<B, T>(g, [&](index_t e, index_t first, index_t m, auto push) {
        push({transpose::no, transpose::yes, m, 2 * hidden_, dim_, T(1), x.row(first), x.ld, wgu(e), dim_, T(0),
              act.row(first), act.ld});
      });
      traits::parallel_for(rows, detail::swiglu_functor<T>{act.data, hidden_});
      const auto p = act.col_block(2 * hidden_, hidden_);
      gemm_per_expert<B, T>(g, [&](index_t e, index_t first, index_t m, auto push) {
        push({transpose::no, transpose::yes, m, dim_, hidden_, T(1), p.row(first), p.ld, wd(e), hidden_, T(0),
              y.row(first), y.ld});
      });
    }

    /// backward() for every expert at once, dx overwritten (see mlp's backward_grouped).
    void backward_grouped(const expert_rows& g, const_matrix_view<T> x, const_matrix_view<T> act,
                          const_matrix_view<T> dy, matrix_view<T> dx, matrix_view<T> scratch, const T*) {
      g.check(count_, x.rows, "expert::swiglu::backward_grouped");
      const index_t rows = g.total_rows();
      if (rows == 0) return;
      auto d = scratch.col_block(0, 2 * hidden_);
      const auto p = act.col_block(2 * hidden_, hidden_);
      gemm_per_expert<B, T>(g, [&](index_t e, index_t first, index_t m, auto push) {
        push({transpose::yes, transpose::no, dim_, hidden_, m, T(1), dy.row(first), dy.ld, p.row(first), p.ld, T(1),
              gwd(e), hidden_});
        push({transpose::no, transpose::no, m, hidden_, dim_, T(1), dy.row(first), dy.ld, wd(e), hidden_, T(0),
              d.row(first), d.ld});
      });
      traits::parallel_for(rows, detail::swiglu_backward_functor<T>{act.data, d.data, hidden_});
      gemm_per_expert<B, T>(g, [&](index_t e, index_t first, index_t m, auto push) {
        push({transpose::yes, transpose::no, 2 * hidden_, dim_, m, T(1), d.row(first), d.ld, x.row(first), x.ld, T(1),
              gwgu(e), dim_});
        push({transpose::no, transpose::no, m, dim_, 2 * hidden_, T(1), d.row(first), d.ld, wgu(e), dim_, T(0),
              dx.row(first), dx.ld});
      });
    }

    template <class F>
    void for_each_parameter(index_t e, const std::string& prefix, const param_naming&, F&& f) {
      f(named_parameter<T>{prefix + "gate_proj.weight", {hidden_, dim_}, wgu(e), gwgu(e)});
      f(named_parameter<T>{prefix + "up_proj.weight", {hidden_, dim_}, wgu(e) + hidden_ * dim_,
                           gwgu(e) + hidden_ * dim_});
      f(named_parameter<T>{prefix + "down_proj.weight", {dim_, hidden_}, wd(e), gwd(e)});
    }

   private:
    auto wgu(index_t e) const { return promoe::slice(wgu_, e); }
    auto wd(index_t e) const { return promoe::slice(wd_, e); }
    auto wgu(index_t e) { return promoe::slice(wgu_, e); }
    auto wd(index_t e) { return promoe::slice(wd_, e); }
    auto gwgu(index_t e) { return promoe::slice(gwgu_, e); }
    auto gwd(index_t e) { return promoe::slice(gwd_, e); }

    tensor<T, B> wgu_, wd_;    // [E, 2I, D] (gate rows then up rows), [E, D, I]
    tensor<T, B> gwgu_, gwd_;  // their gradients
  };
};

}  // namespace promoe::expert
