// SPDX-License-Identifier: Apache-2.0
/// \file mlp.hpp
/// \brief expert::mlp<Act>: Linear(D -> I) + bias, Act, Linear(I -> D) + bias, for a bank of
/// experts whose weights are stored batched ([E, I, D] and [E, D, I], PyTorch [out, in]).
#pragma once

#include <string>

#include "../backend/init.hpp"
#include "../backend/ops.hpp"
#include "../backend/tensor.hpp"
#include "../core/rng.hpp"
#include "activation.hpp"
#include "bank_size.hpp"
#include "expert_rows.hpp"
#include "naming.hpp"

namespace promoe::expert {

/// \tparam Act activation policy (act::gelu_tanh in DiT and ProMoE).
template <ActivationPolicy Act>
struct mlp {
  static constexpr const char* name = "mlp";
  using activation = Act;

  /// Per-row activations kept for backward: pre-activation and activation, 2I values.
  static constexpr index_t cache_width(index_t hidden) { return 2 * hidden; }
  /// Per-row scratch the backward needs: the gradient at the hidden layer, I values.
  static constexpr index_t scratch_width(index_t hidden) { return hidden; }

  template <class T, class B>
  class bank : public bank_size {
   public:
    using traits = backend_traits<B>;

    bank() = default;
    bank(index_t count, index_t dim, index_t hidden) : bank_size(count, dim, hidden) {
      for (auto* t : {&w1_, &gw1_}) t->resize({count, hidden, dim});
      for (auto* t : {&b1_, &gb1_}) t->resize({count, hidden});
      for (auto* t : {&w2_, &gw2_}) t->resize({count, dim, hidden});
      for (auto* t : {&b2_, &gb2_}) t->resize({count, dim});
      for (auto* t : {&w1_, &b1_, &w2_, &b2_}) t->fill(T(0));
      zero_grad();
    }

    /// Xavier-uniform weights, zero biases (DiT's initialisation of every Linear).
    void init(rng& gen) {
      for (index_t e = 0; e < count_; ++e) {
        init::xavier_uniform<B>(w1(e), hidden_, dim_, gen);
        init::xavier_uniform<B>(w2(e), dim_, hidden_, gen);
      }
      b1_.fill(T(0));
      b2_.fill(T(0));
    }

    void zero_grad() {
      for (auto* t : {&gw1_, &gb1_, &gw2_, &gb2_}) t->fill(T(0));
    }

    /// y (+)= expert e applied to the rows of x; act [rows, 2I] receives the activations.
    void forward(index_t e, const_matrix_view<T> x, matrix_view<T> act, matrix_view<T> y, bool accumulate) const {
      if (x.rows == 0) return;
      auto h = act.col_block(0, hidden_);
      auto a = act.col_block(hidden_, hidden_);
      ops::gemm<B, T>(x, transpose::no, const_matrix_view<T>{w1(e), hidden_, dim_}, transpose::yes, h);
      traits::parallel_for(x.rows, act::bias_apply_rows_functor<Act, T>{h.data, h.ld, b1(e), a.data, a.ld, hidden_});
      ops::broadcast_row<B>(y, b2(e), accumulate);
      ops::gemm<B, T>(a, transpose::no, const_matrix_view<T>{w2(e), dim_, hidden_}, transpose::yes, y, T(1), T(1));
    }

    /// Accumulates parameter gradients of expert e and writes (or adds) dx.
    /// scratch holds [rows, I]; ones holds at least rows ones (for bias gradients).
    void backward(index_t e, const_matrix_view<T> x, const_matrix_view<T> act, const_matrix_view<T> dy,
                  matrix_view<T> dx, bool accumulate_dx, matrix_view<T> scratch, const T* ones) {
      if (x.rows == 0) return;
      auto a = act.col_block(hidden_, hidden_);
      auto dh = scratch.col_block(0, hidden_);
      ops::gemm<B, T>(dy, transpose::yes, a, transpose::no, {gw2(e), dim_, hidden_}, T(1), T(1));
      ops::accumulate_column_sums<B>(dy, ones, gb2(e));
      ops::gemm<B, T>(dy, transpose::no, const_matrix_view<T>{w2(e), dim_, hidden_}, transpose::no, dh);
      traits::parallel_for(x.rows, act::backward_rows_functor<Act, T>{act.data, act.ld, dh.data, dh.ld, dh.data, dh.ld,
                                                                     hidden_, false});
      ops::gemm<B, T>(dh, transpose::yes, x, transpose::no, matrix_view<T>{gw1(e), hidden_, dim_}, T(1), T(1));
      ops::accumulate_column_sums<B>(const_matrix_view<T>(dh), ones, gb1(e));
      ops::gemm<B, T>(dh, transpose::no, const_matrix_view<T>{w1(e), hidden_, dim_}, transpose::no, dx, T(1),
                      accumulate_dx ? T(1) : T(0));
    }

    /// y = every expert on its rows of x (rows in expert order as `g` says); act [rows, 2I]
    /// receives the activations. Two grouped GEMMs and two row passes for the whole bank.
    void forward_grouped(const expert_rows& g, const_matrix_view<T> x, matrix_view<T> act, matrix_view<T> y) const {
      g.check(count_, x.rows, "expert::mlp::forward_grouped");
      const index_t rows = g.total_rows();
      if (rows == 0) return;
      auto h = act.col_block(0, hidden_);
      auto a = act.col_block(hidden_, hidden_);
      gemm_per_expert<B, T>(g, [&](index_t e, index_t first, index_t m, auto push) {
        push({transpose::no, transpose::yes, m, hidden_, dim_, T(1), x.row(first), x.ld, w1(e), dim_, T(0),
              h.row(first), h.ld});
      });
      traits::parallel_for(rows, with_expert_bias<act::bias_apply_rows_functor<Act, T>>{
                                     {h.data, h.ld, b1_.data(), a.data, a.ld, hidden_}, g.offsets, count_, hidden_});
      // the output bias first, then the product added to it: one rounding in bf16, as forward()
      traits::parallel_for(rows, with_expert_bias<ops::detail::broadcast_row_functor<T>>{
                                     {y.data, dim_, y.ld, b2_.data(), false}, g.offsets, count_, dim_});
      gemm_per_expert<B, T>(g, [&](index_t e, index_t first, index_t m, auto push) {
        push({transpose::no, transpose::yes, m, dim_, hidden_, T(1), a.row(first), a.ld, w2(e), hidden_, T(1),
              y.row(first), y.ld});
      });
    }

    /// backward() for every expert at once (rows as `g` says): parameter gradients
    /// accumulate, dx is overwritten. Two grouped GEMMs of three stages each.
    void backward_grouped(const expert_rows& g, const_matrix_view<T> x, const_matrix_view<T> act,
                          const_matrix_view<T> dy, matrix_view<T> dx, matrix_view<T> scratch, const T* ones) {
      g.check(count_, x.rows, "expert::mlp::backward_grouped");
      const index_t rows = g.total_rows();
      if (rows == 0) return;
      auto a = act.col_block(hidden_, hidden_);
      auto dh = scratch.col_block(0, hidden_);
      gemm_per_expert<B, T>(g, [&](index_t e, index_t first, index_t m, auto push) {
        push({transpose::yes, transpose::no, dim_, hidden_, m, T(1), dy.row(first), dy.ld, a.row(first), a.ld, T(1),
              gw2(e), hidden_});
        push({transpose::no, transpose::no, 1, dim_, m, T(1), ones, ones_ld(m), dy.row(first), dy.ld, T(1), gb2(e),
              dim_});
        push({transpose::no, transpose::no, m, hidden_, dim_, T(1), dy.row(first), dy.ld, w2(e), hidden_, T(0),
              dh.row(first), dh.ld});
      });
      traits::parallel_for(rows, act::backward_rows_functor<Act, T>{act.data, act.ld, dh.data, dh.ld, dh.data, dh.ld,
                                                                   hidden_, false});
      gemm_per_expert<B, T>(g, [&](index_t e, index_t first, index_t m, auto push) {
        push({transpose::yes, transpose::no, hidden_, dim_, m, T(1), dh.row(first), dh.ld, x.row(first), x.ld, T(1),
              gw1(e), dim_});
        push({transpose::no, transpose::no, 1, hidden_, m, T(1), ones, ones_ld(m), dh.row(first), dh.ld, T(1), gb1(e),
              hidden_});
        push({transpose::no, transpose::no, m, dim_, hidden_, T(1), dh.row(first), dh.ld, w1(e), dim_, T(0),
              dx.row(first), dx.ld});
      });
    }

    /// f(named_parameter) for expert e under `prefix` (e.g. "experts.3.").
    template <class F>
    void for_each_parameter(index_t e, const std::string& prefix, const param_naming& names, F&& f) {
      f(named_parameter<T>{prefix + names.mlp_in + ".weight", {hidden_, dim_}, w1(e), gw1(e)});
      f(named_parameter<T>{prefix + names.mlp_in + ".bias", {hidden_}, b1(e), gb1(e)});
      f(named_parameter<T>{prefix + names.mlp_out + ".weight", {dim_, hidden_}, w2(e), gw2(e)});
      f(named_parameter<T>{prefix + names.mlp_out + ".bias", {dim_}, b2(e), gb2(e)});
    }

   private:
    /// Leading dimension of the ones row [1, m] in a grouped bias gradient: any value >= m
    /// reads the same, and a multiple of 8 keeps the problem in cuBLAS's grouped call.
    static index_t ones_ld(index_t m) { return (m + 7) / 8 * 8; }

    auto w1(index_t e) const { return promoe::slice(w1_, e); }
    auto b1(index_t e) const { return promoe::slice(b1_, e); }
    auto w2(index_t e) const { return promoe::slice(w2_, e); }
    auto b2(index_t e) const { return promoe::slice(b2_, e); }
    auto w1(index_t e) { return promoe::slice(w1_, e); }
    auto b1(index_t e) { return promoe::slice(b1_, e); }
    auto w2(index_t e) { return promoe::slice(w2_, e); }
    auto b2(index_t e) { return promoe::slice(b2_, e); }
    auto gw1(index_t e) { return promoe::slice(gw1_, e); }
    auto gb1(index_t e) { return promoe::slice(gb1_, e); }
    auto gw2(index_t e) { return promoe::slice(gw2_, e); }
    auto gb2(index_t e) { return promoe::slice(gb2_, e); }

    tensor<T, B> w1_, b1_, w2_, b2_;      // [E, I, D], [E, I], [E, D, I], [E, D]
    tensor<T, B> gw1_, gb1_, gw2_, gb2_;  // their gradients
  };
};

}  // namespace promoe::expert
