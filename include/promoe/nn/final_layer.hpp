// SPDX-License-Identifier: Apache-2.0
/// \file final_layer.hpp
/// \brief nn::final_layer: DiT's `final_layer` (LayerNorm without affine, eps 1e-6; adaLN
/// modulation SiLU + Linear(D -> 2D) split (shift, scale); modulate; Linear(D -> p*p*C_out)),
/// and nn::unpatchify, which turns its token rows back into NCHW images.
#pragma once

#include <string>

#include "../backend/ops.hpp"
#include "../backend/tensor.hpp"
#include "../core/error.hpp"
#include "../expert/activation.hpp"
#include "layer_norm.hpp"
#include "linear.hpp"
#include "modulation.hpp"
#include "parameter.hpp"
#include "patch_embed.hpp"

namespace promoe::nn {

/// images [N, C*H*W] = the token rows tokens [N*T, p*p*C] (columns in (p, q, C) order, the
/// reference's reshape (N, h, w, p, q, C) -> einsum nhwpqc->nchpwq -> (N, C, h*p, w*q)),
/// with g.channels = C (the output channels). Every pixel is written.
template <class B, class T>
void unpatchify(const_matrix_view<T> tokens, const patch_grid& g, matrix_view<T> images) {
  detail::check_patch_views("unpatchify", g, images.rows, images.cols, tokens.rows, tokens.cols, "images", "tokens");
  detail::run_patch_copy<B>(tokens.data, tokens.ld, images.data, images.ld, g, true, true, false);
}

/// The adjoint of unpatchify: dtokens [N*T, p*p*C] += the pixels of dimages [N, C*H*W]
/// gathered into token rows (columns in (p, q, C) order).
template <class B, class T>
void unpatchify_backward(const_matrix_view<T> dimages, const patch_grid& g, matrix_view<T> dtokens) {
  detail::check_patch_views("unpatchify_backward", g, dimages.rows, dimages.cols, dtokens.rows, dtokens.cols,
                            "dimages", "dtokens");
  detail::run_patch_copy<B>(dimages.data, dimages.ld, dtokens.data, dtokens.ld, g, true, false, true);
}

/// y [N*T, p*p*C_out] = linear(modulate(LayerNorm(x), shift, scale)) with
/// (shift, scale) = adaLN_modulation(c) = Linear(D -> 2D)(SiLU(c)) split in that order,
/// modulate(h, shift, scale) = h * (1 + scale) + shift per sample. x [N*T, D] holds the T
/// tokens of each sample contiguously, c [N, D] the per-sample conditioning.
template <class T, class B>
class final_layer {
 public:
  using backend_type = B;
  using value_type = T;
  /// The prefix of this module in the reference DiT state dict.
  static constexpr const char* default_prefix = "final_layer.";

  /// What backward needs, and its scratch; owned by the caller, reused across calls.
  struct cache {
    typename layer_norm<T, B>::cache norm;  ///< normalised tokens and rstd
    tensor<T, B> act;                       ///< [N, D] SiLU(c) (input of adaLN_modulation.1)
    tensor<T, B> mod;                       ///< [N, 2D] shift | scale
    tensor<T, B> xmod;                      ///< [N*T, D] modulated tokens (input of linear)
    tensor<T, B> dxmod, dmod, dact;  ///< backward scratch
    tensor<T, B> ones;                      ///< at least N*T ones (bias gradients)
    index_t samples = 0, tokens = 0;        ///< N and T of the last forward
  };

  final_layer() = default;
  /// dim D, patch size p, out_channels C_out (already doubled by the caller under learn_sigma).
  final_layer(index_t dim, index_t patch_size, index_t out_channels)
      : dim_(dim), patch_(patch_size), out_channels_(out_channels) {
    PROMOE_CHECK(dim >= 1 && patch_size >= 1 && out_channels >= 1,
                 "nn::final_layer: dim, patch_size and out_channels must be positive, got ", dim, ", ", patch_size,
                 ", ", out_channels);
    norm = layer_norm<T, B>(dim, 1e-6);
    modulation = linear<T, B>(dim, 2 * dim, true);
    output = linear<T, B>(dim, patch_size * patch_size * out_channels, true);
  }

  index_t dim() const { return dim_; }
  index_t patch_size() const { return patch_; }
  index_t out_channels() const { return out_channels_; }
  /// Columns of the output: p * p * C_out, in (p, q, C_out) order (see unpatchify).
  index_t out_features() const { return patch_ * patch_ * out_channels_; }

  /// Zero weights and biases in both linears (DiT's initialize_weights).
  void init_zero() {
    modulation.init_zero();
    output.init_zero();
  }

  /// y [N*T, p*p*C_out] from x [N*T, D] and c [N, D] (N = c.rows, T = x.rows / N).
  void forward(const_matrix_view<T> x, const_matrix_view<T> c, matrix_view<T> y, cache& k) const {
    PROMOE_CHECK(c.cols == dim_, "nn::final_layer: c is [", c.rows, ", ", c.cols, "], expected [N, ", dim_, "]");
    PROMOE_CHECK(x.cols == dim_ && (c.rows == 0 ? x.rows == 0 : x.rows % c.rows == 0), "nn::final_layer: x is [",
                 x.rows, ", ", x.cols, "], expected [N*T, ", dim_, "] with N = ", c.rows,
                 " samples (the rows of c) of T tokens each");
    const index_t n = c.rows, tokens = n == 0 ? 0 : x.rows / n;
    PROMOE_CHECK(y.rows == x.rows && y.cols == out_features(), "nn::final_layer: y is [", y.rows, ", ", y.cols,
                 "], expected [", x.rows, ", ", out_features(), "] (p*p*C_out = ", patch_, "*", patch_, "*",
                 out_channels_, ")");
    k.samples = n;
    k.tokens = tokens;
    k.act.resize({n, dim_});
    k.mod.resize({n, 2 * dim_});
    k.xmod.resize({x.rows, dim_});
    if (n == 0 || tokens == 0) {
      norm.forward(x, k.xmod.matrix(), k.norm);
      return;
    }
    backend_traits<B>::parallel_for(n, act::apply_rows_functor<act::silu, T>{c.data, c.ld, k.act.data(), dim_, dim_});
    modulation.forward(k.act.cmatrix(), k.mod.matrix());
    const const_matrix_view<T> mod = k.mod.cmatrix();
    norm.forward_modulated(x, mod.col_block(0, dim_), mod.col_block(dim_, dim_), tokens, k.xmod.matrix(), k.norm);
    output.forward(k.xmod.cmatrix(), y);
  }

  /// Accumulates the parameter gradients of dy [N*T, p*p*C_out]; dx [N*T, D] += the token
  /// gradient and dc [N, D] += the conditioning gradient, each unless empty (data == nullptr).
  /// c is the forward's conditioning input.
  void backward(const_matrix_view<T> c, const_matrix_view<T> dy, matrix_view<T> dx, matrix_view<T> dc, cache& k) {
    const index_t n = k.samples, tokens = k.tokens, rows = n * tokens;
    PROMOE_CHECK(c.rows == n && c.cols == dim_, "nn::final_layer::backward: c is [", c.rows, ", ", c.cols,
                 "], expected [", n, ", ", dim_, "] (the forward's c)");
    PROMOE_CHECK(dy.rows == rows && dy.cols == out_features(), "nn::final_layer::backward: dy is [", dy.rows, ", ",
                 dy.cols, "], expected [", rows, ", ", out_features(), "] (the forward's y)");
    if (dx.data)
      PROMOE_CHECK(dx.rows == rows && dx.cols == dim_, "nn::final_layer::backward: dx is [", dx.rows, ", ", dx.cols,
                   "], expected [", rows, ", ", dim_, "] (the forward's x)");
    if (dc.data)
      PROMOE_CHECK(dc.rows == n && dc.cols == dim_, "nn::final_layer::backward: dc is [", dc.rows, ", ", dc.cols,
                   "], expected [", n, ", ", dim_, "] (the forward's c)");
    if (rows == 0) return;
    if (k.ones.size() < rows) {
      k.ones.resize({rows});
      k.ones.fill(T(1));
    }
    // linear: dW, db; dxmod = dy W
    k.dxmod.resize({rows, dim_});
    k.dxmod.fill(T(0));
    output.backward(k.xmod.cmatrix(), dy, k.dxmod.matrix(), k.ones.data());
    // modulate: dshift, dscale summed over each sample's tokens; LayerNorm's backward takes
    // dxhat = dxmod * (1 + scale) on the fly
    k.dmod.resize({n, 2 * dim_});
    k.dmod.fill(T(0));
    const const_matrix_view<T> mod = k.mod.cmatrix();
    const matrix_view<T> dmod = k.dmod.matrix();
    modulate<T, B>::backward(k.norm.xhat.cmatrix(), mod.col_block(dim_, dim_), tokens, k.dxmod.cmatrix(), {},
                             dmod.col_block(0, dim_), dmod.col_block(dim_, dim_));
    if (dx.data) norm.backward_modulated(k.norm, mod.col_block(dim_, dim_), tokens, k.dxmod.cmatrix(), dx);
    // adaLN_modulation.1: dW, db; dact = dmod W; dc += dact * SiLU'(c)
    matrix_view<T> dact{};
    if (dc.data) {
      k.dact.resize({n, dim_});
      k.dact.fill(T(0));
      dact = k.dact.matrix();
    }
    modulation.backward(k.act.cmatrix(), k.dmod.cmatrix(), dact, k.ones.data());
    if (dc.data)
      backend_traits<B>::parallel_for(
          n, act::backward_rows_functor<act::silu, T>{c.data, c.ld, k.dact.data(), dim_, dc.data, dc.ld, dim_, true});
  }

  void zero_grad() {
    modulation.zero_grad();
    output.zero_grad();
  }

  /// f(named_parameter) for `prefix`adaLN_modulation.1.weight [2D, D], .bias [2D],
  /// `prefix`linear.weight [p*p*C_out, D], .bias (prefix "final_layer." in DiT).
  template <class F>
  void for_each_parameter(const std::string& prefix, F&& f) {
    modulation.for_each_parameter(prefix + "adaLN_modulation.1.", f);
    output.for_each_parameter(prefix + "linear.", f);
  }

  layer_norm<T, B> norm;    ///< `norm_final`: no affine, eps 1e-6
  linear<T, B> modulation;  ///< `adaLN_modulation.1`: D -> 2D (shift, scale)
  linear<T, B> output;      ///< `linear`: D -> p*p*C_out

 private:
  index_t dim_ = 0, patch_ = 1, out_channels_ = 0;
};

}  // namespace promoe::nn
