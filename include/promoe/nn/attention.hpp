// SPDX-License-Identifier: Apache-2.0
/// \file attention.hpp
/// \brief nn::attention: multi-head self-attention as timm's `Attention` in DiT.
///
/// qkv = Linear(D, 3D) (bias), its columns ordered (q/k/v, head, head_dim) as timm's reshape
/// to [S, tokens, 3, heads, head_dim]; per (sample, head) P = softmax(q k^T / sqrt(head_dim))
/// and o = P v; heads concatenated in (head, head_dim) order; y = proj(o) with
/// proj = Linear(D, D) (bias). Attention runs within each sample's `tokens` contiguous rows.
///
/// Backends with their own attention core (the host: backend_traits::attention_forward, one
/// fused task per (sample, head)) run it; elsewhere, and under bf16 matmul precision (which
/// the GEMMs apply), the per-(sample, head) products are backend GEMMs on strided views of the
/// qkv rows (ld = 3D), so q, k and v are never copied out.
#pragma once

#include <cmath>
#include <string>
#include <type_traits>
#include <utility>

#include "../backend/backend.hpp"
#include "../backend/ops.hpp"
#include "../backend/tensor.hpp"
#include "../backend/softmax.hpp"
#include "../core/error.hpp"
#include "../core/precision.hpp"
#include "../core/rng.hpp"
#include "../core/view.hpp"
#include "linear.hpp"

namespace promoe::nn {


template <class T, class B>
class attention {
 public:
  /// What backward needs, plus its scratch; the caller owns it and may reuse it across calls
  /// (buffers only grow).
  struct cache {
    index_t samples = 0;  ///< S of the forward
    index_t tokens = 0;   ///< tokens per sample of the forward
    tensor<T, B> qkv;     ///< [S * tokens, 3D]: columns (q/k/v, head, head_dim)
    tensor<T, B> probs;   ///< [S, heads, tokens, tokens] softmax probabilities
    tensor<T, B> out;     ///< [S * tokens, D] heads concatenated, the input of proj
    // backward scratch
    tensor<T, B> d_out;    ///< [S * tokens, D]
    tensor<T, B> d_qkv;    ///< [S * tokens, 3D]
    tensor<T, B> d_probs;  ///< [S, heads, tokens, tokens]: dP, then dS (backend GEMM path only)
    tensor<T, B> ones;     ///< [S * tokens] ones for the bias gradients
  };

  attention() = default;
  attention(index_t dim, index_t heads) : dim_(dim), heads_(heads) {
    PROMOE_CHECK(dim >= 1 && heads >= 1, "nn::attention: dim and heads must be positive, got dim = ", dim,
                 ", heads = ", heads);
    PROMOE_CHECK(dim % heads == 0, "nn::attention: dim ", dim, " is not divisible by heads ", heads,
                 " (head_dim = dim / heads must be an integer)");
    qkv = linear<T, B>(dim, 3 * dim, true);
    proj = linear<T, B>(dim, dim, true);
  }

  index_t dim() const { return dim_; }
  index_t heads() const { return heads_; }
  index_t head_dim() const { return heads_ ? dim_ / heads_ : 0; }

  /// Xavier-uniform weights, zero biases (DiT's initialize_weights).
  void init(rng& gen) {
    qkv.init_xavier(gen);
    proj.init_xavier(gen);
  }

  /// y [S * tokens, D] = attention(x [S * tokens, D]), each sample's `tokens` rows attending
  /// among themselves. y may be x.
  void forward(const_matrix_view<T> x, index_t tokens, matrix_view<T> y, cache& c) const {
    PROMOE_CHECK(dim_ >= 1, "nn::attention::forward: the module is default-constructed (no dim / heads)");
    PROMOE_CHECK(tokens >= 1, "nn::attention::forward: tokens per sample must be positive, got ", tokens);
    PROMOE_CHECK(x.cols == dim_ && x.rows % tokens == 0, "nn::attention::forward: x is [", x.rows, ", ", x.cols,
                 "], expected [samples * ", tokens, ", ", dim_, "] (a whole number of samples of ", tokens,
                 " tokens)");
    PROMOE_CHECK(y.rows == x.rows && y.cols == dim_, "nn::attention::forward: y is [", y.rows, ", ", y.cols,
                 "], expected [", x.rows, ", ", dim_, "] (the shape of x)");
    const index_t n = x.rows, s_count = n / tokens, hd = head_dim(), ld = 3 * dim_;
    c.samples = s_count;
    c.tokens = tokens;
    c.qkv.resize({n, ld});
    c.probs.resize({s_count, heads_, tokens, tokens});
    c.out.resize({n, dim_});
    if (n == 0) return;

    qkv.forward(x, c.qkv.matrix());
    const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(hd)));
    const const_matrix_view<T> qkv_m = c.qkv.cmatrix();
    const matrix_view<T> out = c.out.matrix();
    if constexpr (backend_core_) {
      if (!rounds_to_bf16_()) {
        backend_traits<B>::attention_forward(s_count, tokens, heads_, hd, scale, c.qkv.data(), c.probs.data(),
                                             c.out.data());
        proj.forward(c.out.cmatrix(), y);
        return;
      }
    }
    // One task per (sample, head): its small GEMMs and softmax run on one thread.
    backend_traits<B>::parallel_tasks(s_count * heads_, [&](index_t task) {
      const index_t s = task / heads_, h = task % heads_;
      const matrix_view<T> p = probs_(c.probs, s, h, tokens);
      ops::gemm<B, T>(q_(qkv_m, s, h, tokens), transpose::no, k_(qkv_m, s, h, tokens), transpose::yes, p, scale, T(0));
      backend_traits<B>::parallel_for(tokens, promoe::detail::softmax_rows_functor<T>{p.data, tokens});
      ops::gemm<B, T>(const_matrix_view<T>(p), transpose::no, v_(qkv_m, s, h, tokens), transpose::no,
                      out.row_block(s * tokens, tokens).col_block(h * hd, hd), T(1), T(0));
    });
    proj.forward(c.out.cmatrix(), y);
  }

  /// Given the forward's input x and dy = dL/dy: accumulates the parameter gradients and
  /// dx += dL/dx (dx may be empty to skip it; it must not alias dy).
  void backward(cache& c, const_matrix_view<T> x, const_matrix_view<T> dy, matrix_view<T> dx) {
    const index_t tokens = c.tokens, s_count = c.samples, n = s_count * tokens;
    PROMOE_CHECK(tokens >= 1 && c.qkv.rank() == 2 && c.qkv.dim(0) == n && c.qkv.dim(1) == 3 * dim_,
                 "nn::attention::backward: the cache holds no forward of this module (run forward first)");
    PROMOE_CHECK(x.rows == n && x.cols == dim_, "nn::attention::backward: x is [", x.rows, ", ", x.cols,
                 "], expected [", n, ", ", dim_, "] (the forward's input)");
    PROMOE_CHECK(dy.rows == n && dy.cols == dim_, "nn::attention::backward: dy is [", dy.rows, ", ", dy.cols,
                 "], expected [", n, ", ", dim_, "] (the forward's output shape)");
    PROMOE_CHECK(!dx.data || (dx.rows == n && dx.cols == dim_), "nn::attention::backward: dx is [", dx.rows, ", ",
                 dx.cols, "], expected [", n, ", ", dim_, "] (the shape of x) or empty");
    if (n == 0) return;
    const index_t hd = head_dim(), ld = 3 * dim_;
    c.ones.resize({n});
    c.ones.fill(T(1));
    c.d_out.resize({n, dim_});
    c.d_out.fill(T(0));
    c.d_qkv.resize({n, ld});

    // y = o W_p^T + b_p
    proj.backward(c.out.cmatrix(), dy, c.d_out.matrix(), c.ones.data());

    const const_matrix_view<T> qkv_m = c.qkv.cmatrix(), d_out = c.d_out.cmatrix();
    const matrix_view<T> d_qkv = c.d_qkv.matrix();
    // One task per (sample, head), writing only its own blocks. Every column of d_qkv is
    // written exactly once (dQ, dK, dV of each head), so no zeroing.
    const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(hd)));
    if constexpr (backend_core_) {
      if (!rounds_to_bf16_()) {
        backend_traits<B>::attention_backward(s_count, tokens, heads_, hd, scale, c.qkv.data(), c.probs.data(),
                                              c.d_out.data(), c.d_qkv.data());
        qkv.backward(x, c.d_qkv.cmatrix(), dx, c.ones.data());
        return;
      }
    }
    c.d_probs.resize({s_count, heads_, tokens, tokens});
    backend_traits<B>::parallel_tasks(s_count * heads_, [&](index_t task) {
      const index_t s = task / heads_, h = task % heads_;
      const const_matrix_view<T> d_o = d_out.row_block(s * tokens, tokens).col_block(h * hd, hd);
      const const_matrix_view<T> p = probs_(std::as_const(c.probs), s, h, tokens);
      const matrix_view<T> d_s = probs_(c.d_probs, s, h, tokens);
      // o = P v: dV = P^T dO, dP = dO v^T
      ops::gemm<B, T>(p, transpose::yes, d_o, transpose::no, v_(d_qkv, s, h, tokens), T(1), T(0));
      ops::gemm<B, T>(d_o, transpose::no, v_(qkv_m, s, h, tokens), transpose::yes, d_s, T(1), T(0));
      // P = softmax(S): dS = P * (dP - rowsum(dP * P))
      backend_traits<B>::parallel_for(tokens, promoe::detail::softmax_backward_rows_functor<T>{p.data, d_s.data, tokens});
      // S = q k^T * scale: dQ = scale dS k, dK = scale dS^T q
      ops::gemm<B, T>(const_matrix_view<T>(d_s), transpose::no, k_(qkv_m, s, h, tokens), transpose::no,
                      q_(d_qkv, s, h, tokens), scale, T(0));
      ops::gemm<B, T>(const_matrix_view<T>(d_s), transpose::yes, q_(qkv_m, s, h, tokens), transpose::no,
                      k_(d_qkv, s, h, tokens), scale, T(0));
    });
    qkv.backward(x, c.d_qkv.cmatrix(), dx, c.ones.data());
  }

  void zero_grad() {
    qkv.zero_grad();
    proj.zero_grad();
  }

  /// f(named_parameter) for `prefix`qkv.weight, qkv.bias, proj.weight, proj.bias
  /// (prefix like "blocks.0.attn.").
  template <class F>
  void for_each_parameter(const std::string& prefix, F&& f) {
    qkv.for_each_parameter(prefix + "qkv.", f);
    proj.for_each_parameter(prefix + "proj.", f);
  }

  linear<T, B> qkv;   ///< D -> 3D
  linear<T, B> proj;  ///< D -> D

 private:
  /// Whether the backend runs the attention core itself (backend_traits::attention_forward
  /// and attention_backward).
  static constexpr bool backend_core_ = requires(index_t i, T x, const T* in, T* io) {
    backend_traits<B>::attention_forward(i, i, i, i, x, in, io, io);
    backend_traits<B>::attention_backward(i, i, i, i, x, in, in, in, io);
  };
  /// Under bf16 matmul precision float products round their operands, which the backend
  /// GEMMs do.
  static bool rounds_to_bf16_() { return std::is_same_v<T, float> && get_matmul_precision() == matmul_precision::bf16; }

  /// The [tokens, head_dim] block of q (which = 0), k (1) or v (2) of head h in sample s's
  /// rows of a [S * tokens, 3D] matrix.
  template <class U>
  matrix_view<U> part_(matrix_view<U> m, index_t which, index_t s, index_t h, index_t tokens) const {
    const index_t hd = head_dim();
    return m.row_block(s * tokens, tokens).col_block(which * dim_ + h * hd, hd);
  }
  template <class U>
  matrix_view<U> q_(matrix_view<U> m, index_t s, index_t h, index_t tokens) const { return part_(m, 0, s, h, tokens); }
  template <class U>
  matrix_view<U> k_(matrix_view<U> m, index_t s, index_t h, index_t tokens) const { return part_(m, 1, s, h, tokens); }
  template <class U>
  matrix_view<U> v_(matrix_view<U> m, index_t s, index_t h, index_t tokens) const { return part_(m, 2, s, h, tokens); }
  /// The [tokens, tokens] block of (sample s, head h) in a [S, heads, tokens, tokens] tensor.
  static matrix_view<T> probs_(tensor<T, B>& p, index_t s, index_t h, index_t tokens) {
    return {p.data() + ((s * p.dim(1) + h) * tokens) * tokens, tokens, tokens};
  }
  static const_matrix_view<T> probs_(const tensor<T, B>& p, index_t s, index_t h, index_t tokens) {
    return {p.data() + ((s * p.dim(1) + h) * tokens) * tokens, tokens, tokens};
  }

  index_t dim_ = 0, heads_ = 0;
};

}  // namespace promoe::nn
