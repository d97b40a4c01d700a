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
/// fused task per (sample, head)) run it. Elsewhere (a GPU), and under bf16 matmul precision
/// (which the GEMMs apply), each product is one strided-batched GEMM per head over all samples
/// on the qkv rows in place (ld = 3D; cuBLAS's strided-batched call on a GPU), and one
/// softmax pass covers every row of every head: a handful of launches per layer instead of
/// several per (sample, head).
#pragma once

#include <cmath>
#include <string>
#include <type_traits>
#include <utility>

#include "../backend/backend.hpp"
#include "../backend/ops.hpp"
#include "../backend/tensor.hpp"
#include "../backend/softmax.hpp"
#include "../core/bf16.hpp"
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
    const matrix_view<T> out = c.out.matrix();
    if constexpr (backend_core_ && !is_storage_half_v<T>) {
      if (!rounds_to_bf16_()) {
        backend_traits<B>::attention_forward(s_count, tokens, heads_, hd, scale, c.qkv.data(), c.probs.data(),
                                             c.out.data());
        proj.forward(c.out.cmatrix(), y);
        return;
      }
    }
    // Per head, one strided-batched GEMM over the samples for each product (sample s's
    // blocks lie tokens rows further on), and one softmax over every row of every head.
    const index_t q_step = tokens * ld, p_step = heads_ * tokens * tokens, o_step = tokens * dim_;
    const T* q = c.qkv.data();
    T* p = c.probs.data();
    for (index_t h = 0; h < heads_; ++h)
      ops::gemm_strided_batched<B, T>(transpose::no, transpose::yes, tokens, tokens, hd, scale, q + h * hd, ld, q_step,
                                      q + dim_ + h * hd, ld, q_step, T(0), p + h * tokens * tokens, tokens, p_step,
                                      s_count);
    backend_traits<B>::parallel_for(s_count * heads_ * tokens, promoe::detail::softmax_rows_functor<T>{p, tokens});
    for (index_t h = 0; h < heads_; ++h)
      ops::gemm_strided_batched<B, T>(transpose::no, transpose::no, tokens, hd, tokens, T(1), p + h * tokens * tokens,
                                      tokens, p_step, q + 2 * dim_ + h * hd, ld, q_step, T(0), out.data + h * hd, dim_,
                                      o_step, s_count);
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

    const const_matrix_view<T> d_out = c.d_out.cmatrix();
    const matrix_view<T> d_qkv = c.d_qkv.matrix();
    // Every element of d_qkv is written exactly once (dQ, dK, dV of each head, each sample),
    // so no zeroing.
    const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(hd)));
    if constexpr (backend_core_ && !is_storage_half_v<T>) {
      if (!rounds_to_bf16_()) {
        backend_traits<B>::attention_backward(s_count, tokens, heads_, hd, scale, c.qkv.data(), c.probs.data(),
                                              c.d_out.data(), c.d_qkv.data());
        qkv.backward(x, c.d_qkv.cmatrix(), dx, c.ones.data());
        return;
      }
    }
    c.d_probs.resize({s_count, heads_, tokens, tokens});
    // As the forward: strided-batched GEMMs per head, one softmax backward over every row.
    const index_t q_step = tokens * ld, p_step = heads_ * tokens * tokens, o_step = tokens * dim_;
    const T* q = c.qkv.data();
    const T* p = c.probs.data();
    const T* d_o = d_out.data;
    T* d_s = c.d_probs.data();
    T* d_q = d_qkv.data;
    const auto batched = [&](transpose ta, transpose tb, index_t rows, index_t cols, index_t depth, T alpha,
                             const T* a, index_t lda, index_t sa, const T* b, index_t ldb, index_t sb, T* dst,
                             index_t ldd, index_t sd) {
      ops::gemm_strided_batched<B, T>(ta, tb, rows, cols, depth, alpha, a, lda, sa, b, ldb, sb, T(0), dst, ldd, sd,
                                      s_count);
    };
    for (index_t h = 0; h < heads_; ++h) {
      const index_t ph = h * tokens * tokens, qh = h * hd;
      // o = P v: dV = P^T dO, dP = dO v^T
      batched(transpose::yes, transpose::no, tokens, hd, tokens, T(1), p + ph, tokens, p_step, d_o + qh, dim_, o_step,
              d_q + 2 * dim_ + qh, ld, q_step);
      batched(transpose::no, transpose::yes, tokens, tokens, hd, T(1), d_o + qh, dim_, o_step, q + 2 * dim_ + qh, ld,
              q_step, d_s + ph, tokens, p_step);
    }
    // P = softmax(S): dS = P * (dP - rowsum(dP * P))
    backend_traits<B>::parallel_for(s_count * heads_ * tokens,
                                    promoe::detail::softmax_backward_rows_functor<T>{p, d_s, tokens});
    for (index_t h = 0; h < heads_; ++h) {
      const index_t ph = h * tokens * tokens, qh = h * hd;
      // S = q k^T * scale: dQ = scale dS k, dK = scale dS^T q
      batched(transpose::no, transpose::no, tokens, hd, tokens, scale, d_s + ph, tokens, p_step, q + dim_ + qh, ld,
              q_step, d_q + qh, ld, q_step);
      batched(transpose::yes, transpose::no, tokens, hd, tokens, scale, d_s + ph, tokens, p_step, q + qh, ld, q_step,
              d_q + dim_ + qh, ld, q_step);
    }
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
  /// bf16 products (bf16 tensors, or float ones under bf16 matmul precision) round or widen
  /// their operands, which the backend GEMMs do.
  static bool rounds_to_bf16_() {
    return std::is_same_v<T, bf16> || (std::is_same_v<T, float> && get_matmul_precision() == matmul_precision::bf16);
  }

  index_t dim_ = 0, heads_ = 0;
};

}  // namespace promoe::nn
