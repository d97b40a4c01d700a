// SPDX-License-Identifier: Apache-2.0
/// \file modulation.hpp
/// \brief adaLN pieces of a DiT block: modulate and the gated residual.
///
///  - nn::modulate<T, B>:       y = x * (1 + scale) + shift
///  - nn::gated_residual<T, B>: out = x + gate * h
///
/// Token rows are [S * tokens, D] with the `tokens` rows of each sample contiguous; shift,
/// scale and gate are per-sample rows [S, D], usually column blocks of the [S, 6D] adaLN
/// output (views with ld = 6D: the leading dimension of every view is honoured).
/// Backward ADDS into every gradient it writes; per-sample gradients are summed over the
/// sample's tokens by one functor call per (sample, column), in token order (deterministic,
/// no atomics). Any gradient view may be empty (null data) to skip it.
#pragma once

#include "../backend/backend.hpp"
#include "../core/bf16.hpp"
#include "../core/error.hpp"
#include "../core/view.hpp"

namespace promoe::nn {

namespace detail {

/// Row r (one per call, so the column loop vectorises): y = x * (1 + scale[sample]) + shift[sample].
template <class T>
struct modulate_forward_functor {
  const T* x;  // [S * tokens, d], leading dimension ldx
  index_t ldx;
  const T* shift;  // [S, d], leading dimension ldsh
  index_t ldsh;
  const T* scale;  // [S, d], leading dimension ldsc
  index_t ldsc;
  T* y;  // [S * tokens, d], leading dimension ldy
  index_t ldy;
  index_t d, tokens;

  PROMOE_HOST_DEVICE void operator()(index_t r) const {
    const index_t s = r / tokens;
    const T* xr = x + r * ldx;
    const T* sc = scale + s * ldsc;
    const T* sh = shift + s * ldsh;
    T* yr = y + r * ldy;
    for (index_t j = 0; j < d; ++j) yr[j] = xr[j] * (T(1) + sc[j]) + sh[j];
  }
};

/// Columns [j0, j0 + W) of sample s (idx = s * blocks + block) over the sample's tokens t:
/// dx += dy * (1 + scale), dshift += sum_t dy, dscale += sum_t dy * x. W is the backend's
/// column_block: neighbouring columns per call so that the host vectorises over them.
template <class T, index_t W>
struct modulate_backward_functor {
  const T* x;  // [S * tokens, d], leading dimension ldx (the forward's input)
  index_t ldx;
  const T* scale;  // [S, d], leading dimension ldsc
  index_t ldsc;
  const T* dy;  // [S * tokens, d], leading dimension lddy
  index_t lddy;
  T* dx;  // [S * tokens, d], leading dimension lddx; null: skipped
  index_t lddx;
  T* dshift;  // [S, d], leading dimension lddsh; null: skipped
  index_t lddsh;
  T* dscale;  // [S, d], leading dimension lddsc; null: skipped
  index_t lddsc;
  index_t d, tokens;

  PROMOE_HOST_DEVICE void operator()(index_t idx) const {
    const index_t blocks = (d + W - 1) / W, s = idx / blocks, j0 = idx % blocks * W;
    const index_t w = d - j0 < W ? d - j0 : W;
    using C = compute_t<T>;  // sums over the sample's tokens: float for bf16
    C a[W], gs[W], gc[W];
    for (index_t q = 0; q < w; ++q) {
      a[q] = C(1) + scale[s * ldsc + j0 + q];
      gs[q] = gc[q] = C(0);
    }
    for (index_t r = s * tokens; r < (s + 1) * tokens; ++r) {
      const T* g = dy + r * lddy + j0;
      const T* xr = x + r * ldx + j0;
      for (index_t q = 0; q < w; ++q) {
        gs[q] += g[q];
        gc[q] += g[q] * xr[q];
      }
      if (dx) {
        T* o = dx + r * lddx + j0;
        for (index_t q = 0; q < w; ++q) o[q] += g[q] * a[q];
      }
    }
    for (index_t q = 0; q < w; ++q) {
      if (dshift) dshift[s * lddsh + j0 + q] += gs[q];
      if (dscale) dscale[s * lddsc + j0 + q] += gc[q];
    }
  }
};

/// Row r (one per call, so the column loop vectorises): out = x + gate[sample] * h.
template <class T>
struct gated_residual_forward_functor {
  const T* x;  // [S * tokens, d], leading dimension ldx
  index_t ldx;
  const T* gate;  // [S, d], leading dimension ldg
  index_t ldg;
  const T* h;  // [S * tokens, d], leading dimension ldh
  index_t ldh;
  T* out;  // [S * tokens, d], leading dimension ldo
  index_t ldo;
  index_t d, tokens;

  PROMOE_HOST_DEVICE void operator()(index_t r) const {
    const index_t s = r / tokens;
    const T* xr = x + r * ldx;
    const T* g = gate + s * ldg;
    const T* hr = h + r * ldh;
    T* o = out + r * ldo;
    for (index_t j = 0; j < d; ++j) o[j] = xr[j] + g[j] * hr[j];
  }
};

/// Columns [j0, j0 + W) of sample s (idx = s * blocks + block) over the sample's tokens t:
/// dx += dout, dh += gate * dout, dgate += sum_t dout * h (W as in modulate_backward_functor).
template <class T, index_t W>
struct gated_residual_backward_functor {
  const T* gate;  // [S, d], leading dimension ldg
  index_t ldg;
  const T* h;  // [S * tokens, d], leading dimension ldh (the forward's branch input)
  index_t ldh;
  const T* dout;  // [S * tokens, d], leading dimension lddo
  index_t lddo;
  T* dx;  // [S * tokens, d], leading dimension lddx; null: skipped
  index_t lddx;
  T* dh;  // [S * tokens, d], leading dimension lddh; null: skipped
  index_t lddh;
  T* dgate;  // [S, d], leading dimension lddg; null: skipped
  index_t lddg;
  index_t d, tokens;

  PROMOE_HOST_DEVICE void operator()(index_t idx) const {
    const index_t blocks = (d + W - 1) / W, s = idx / blocks, j0 = idx % blocks * W;
    const index_t w = d - j0 < W ? d - j0 : W;
    using C = compute_t<T>;  // sums over the sample's tokens: float for bf16
    C g[W], acc[W];
    for (index_t q = 0; q < w; ++q) {
      g[q] = gate[s * ldg + j0 + q];
      acc[q] = C(0);
    }
    for (index_t r = s * tokens; r < (s + 1) * tokens; ++r) {
      const T* go = dout + r * lddo + j0;
      const T* hr = h + r * ldh + j0;
      for (index_t q = 0; q < w; ++q) acc[q] += go[q] * hr[q];
      if (dh) {
        T* o = dh + r * lddh + j0;
        for (index_t q = 0; q < w; ++q) o[q] += g[q] * go[q];
      }
      if (dx) {
        T* o = dx + r * lddx + j0;
        for (index_t q = 0; q < w; ++q) o[q] += go[q];
      }
    }
    if (dgate)
      for (index_t q = 0; q < w; ++q) dgate[s * lddg + j0 + q] += acc[q];
  }
};

/// Shape checks shared by both pieces: token rows [S * tokens, d] and per-sample rows [S, d].
template <class T>
void check_token_rows(const char* fn, const char* what, const matrix_view<T>& m, index_t rows, index_t d) {
  PROMOE_CHECK(m.rows == rows && m.cols == d, fn, ": ", what, " is [", m.rows, ", ", m.cols, "], expected [", rows,
               ", ", d, "]");
}
template <class T>
void check_optional_rows(const char* fn, const char* what, const matrix_view<T>& m, index_t rows, index_t d) {
  if (m.data) check_token_rows(fn, what, m, rows, d);
}

}  // namespace detail

/// DiT's `modulate(x, shift, scale) = x * (1 + scale) + shift` with per-sample shift/scale.
template <class T, class B>
struct modulate {
  /// y [S*tokens, D] = x * (1 + scale[s]) + shift[s] for the rows of sample s; y may be x.
  static void forward(const_matrix_view<T> x, const_matrix_view<T> shift, const_matrix_view<T> scale, index_t tokens,
                      matrix_view<T> y) {
    const char* fn = "nn::modulate::forward";
    check_(fn, x, shift, tokens);
    const index_t d = x.cols;
    detail::check_token_rows(fn, "scale", scale, shift.rows, d);
    detail::check_token_rows(fn, "y", y, x.rows, d);
    if (x.rows == 0 || d == 0) return;
    backend_traits<B>::parallel_for(x.rows, detail::modulate_forward_functor<T>{x.data, x.ld, shift.data, shift.ld,
                                                                                    scale.data, scale.ld, y.data, y.ld,
                                                                                    d, tokens});
  }

  /// Given dy = dL/dy and the forward's x and scale: dx += dy * (1 + scale),
  /// dshift += sum over the sample's tokens of dy, dscale += sum of dy * x. Empty (null)
  /// gradient views are skipped. dx must not alias dy.
  static void backward(const_matrix_view<T> x, const_matrix_view<T> scale, index_t tokens, const_matrix_view<T> dy,
                       matrix_view<T> dx, matrix_view<T> dshift, matrix_view<T> dscale) {
    const char* fn = "nn::modulate::backward";
    check_(fn, x, scale, tokens);
    const index_t d = x.cols, samples = scale.rows;
    detail::check_token_rows(fn, "dy", dy, x.rows, d);
    detail::check_optional_rows(fn, "dx", dx, x.rows, d);
    detail::check_optional_rows(fn, "dshift", dshift, samples, d);
    detail::check_optional_rows(fn, "dscale", dscale, samples, d);
    if (samples == 0 || d == 0) return;
    constexpr index_t w = backend_traits<B>::column_block;
    backend_traits<B>::parallel_for(
        samples * ((d + w - 1) / w),
        detail::modulate_backward_functor<T, w>{x.data, x.ld, scale.data, scale.ld, dy.data, dy.ld, dx.data, dx.ld,
                                                dshift.data, dshift.ld, dscale.data, dscale.ld, d, tokens});
  }

 private:
  /// x [S * tokens, D] against a per-sample view `per_sample` [S, D].
  static void check_(const char* fn, const_matrix_view<T> x, const_matrix_view<T> per_sample, index_t tokens) {
    PROMOE_CHECK(tokens >= 1, fn, ": tokens per sample must be positive, got ", tokens);
    PROMOE_CHECK(per_sample.cols == x.cols && x.rows == per_sample.rows * tokens, fn, ": x is [", x.rows, ", ",
                 x.cols, "] but the per-sample rows are [", per_sample.rows, ", ", per_sample.cols, "] with ", tokens,
                 " tokens per sample; expected x [", per_sample.rows * tokens, ", ", per_sample.cols, "]");
  }
};

/// DiT's gated residual `x + gate * h` with a per-sample gate.
template <class T, class B>
struct gated_residual {
  /// out [S*tokens, D] = x + gate[s] * h for the rows of sample s; out may be x or h.
  static void forward(const_matrix_view<T> x, const_matrix_view<T> gate, const_matrix_view<T> h, index_t tokens,
                      matrix_view<T> out) {
    const char* fn = "nn::gated_residual::forward";
    check_(fn, gate, h, tokens);
    const index_t d = h.cols;
    detail::check_token_rows(fn, "x", x, h.rows, d);
    detail::check_token_rows(fn, "out", out, h.rows, d);
    if (h.rows == 0 || d == 0) return;
    backend_traits<B>::parallel_for(h.rows, detail::gated_residual_forward_functor<T>{x.data, x.ld, gate.data,
                                                                                          gate.ld, h.data, h.ld,
                                                                                          out.data, out.ld, d, tokens});
  }

  /// Given dout = dL/dout and the forward's gate and h: dx += dout, dh += gate * dout,
  /// dgate += sum over the sample's tokens of dout * h. Empty (null) gradient views are
  /// skipped: pass an empty dx when dout already is the residual stream's gradient buffer
  /// (dx must not alias dout, nor dh).
  static void backward(const_matrix_view<T> gate, const_matrix_view<T> h, index_t tokens, const_matrix_view<T> dout,
                       matrix_view<T> dx, matrix_view<T> dh, matrix_view<T> dgate) {
    const char* fn = "nn::gated_residual::backward";
    check_(fn, gate, h, tokens);
    const index_t d = h.cols, samples = gate.rows;
    detail::check_token_rows(fn, "dout", dout, h.rows, d);
    detail::check_optional_rows(fn, "dx", dx, h.rows, d);
    detail::check_optional_rows(fn, "dh", dh, h.rows, d);
    detail::check_optional_rows(fn, "dgate", dgate, samples, d);
    if (samples == 0 || d == 0) return;
    constexpr index_t w = backend_traits<B>::column_block;
    backend_traits<B>::parallel_for(
        samples * ((d + w - 1) / w),
        detail::gated_residual_backward_functor<T, w>{gate.data, gate.ld, h.data, h.ld, dout.data, dout.ld, dx.data,
                                                      dx.ld, dh.data, dh.ld, dgate.data, dgate.ld, d, tokens});
  }

 private:
  /// h [S * tokens, D] against gate [S, D].
  static void check_(const char* fn, const_matrix_view<T> gate, const_matrix_view<T> h, index_t tokens) {
    PROMOE_CHECK(tokens >= 1, fn, ": tokens per sample must be positive, got ", tokens);
    PROMOE_CHECK(gate.cols == h.cols && h.rows == gate.rows * tokens, fn, ": h is [", h.rows, ", ", h.cols,
                 "] but gate is [", gate.rows, ", ", gate.cols, "] with ", tokens, " tokens per sample; expected h [",
                 gate.rows * tokens, ", ", gate.cols, "]");
  }
};

}  // namespace promoe::nn
