// SPDX-License-Identifier: Apache-2.0
/// \file layer_norm.hpp
/// \brief nn::layer_norm: LayerNorm over the last dimension without affine parameters, as
/// PyTorch's `nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)` in DiT (biased variance).
///
/// y[r, :] = (x[r, :] - mean_r) * rstd_r with rstd_r = 1 / sqrt(var_r + eps). The cache keeps
/// the normalised rows (y itself: DiT's modulate needs them for its backward too), the means
/// and rstd, so backward needs neither x nor y.
#pragma once

#include <cmath>
#include <string>

#include "../backend/backend.hpp"
#include "../backend/tensor.hpp"
#include "../core/bf16.hpp"
#include "../core/error.hpp"
#include "../core/lane_sum.hpp"
#include "../core/view.hpp"

namespace promoe::nn {

namespace detail {

/// Row r: mean, biased variance (two passes), xhat = (x - mean) * rstd into the cache, and
/// y = xhat, or with `shift` given y = xhat * (1 + scale[sample]) + shift[sample] (DiT's
/// modulate(norm(x)) in the same pass; sample = r / tokens).
template <class T>
struct layer_norm_forward_functor {
  const T* x;  // [n, d], leading dimension ldx
  index_t ldx;
  T* y;  // [n, d], leading dimension ldy
  index_t ldy;
  T* xhat;  // [n, d] contiguous (cache)
  compute_t<T>* mean;  // [n]
  compute_t<T>* rstd;  // [n]
  index_t d;
  compute_t<T> eps;
  const T* shift = nullptr;  // [S, d], leading dimension ldsh; null: no modulation
  index_t ldsh = 0;
  const T* scale = nullptr;  // [S, d], leading dimension ldsc
  index_t ldsc = 0;
  index_t tokens = 1;

  PROMOE_HOST_DEVICE void operator()(index_t r) const {
    using std::sqrt;
    const T* xr = x + r * ldx;
    const compute_t<T> m = lane_sum<compute_t<T>>(d, [xr](index_t j) { return xr[j]; }) / compute_t<T>(d);
    const compute_t<T> v = lane_sum<compute_t<T>>(d, [xr, m](index_t j) { return (xr[j] - m) * (xr[j] - m); });
    const compute_t<T> rs = compute_t<T>(1) / sqrt(v / compute_t<T>(d) + eps);
    T* yr = y + r * ldy;
    T* hr = xhat + r * d;
    if (shift) {
      const T* sh = shift + (r / tokens) * ldsh;
      const T* sc = scale + (r / tokens) * ldsc;
      for (index_t j = 0; j < d; ++j) {
        const T h = (xr[j] - m) * rs;
        hr[j] = h;
        yr[j] = h * (T(1) + sc[j]) + sh[j];
      }
    } else {
      for (index_t j = 0; j < d; ++j) {
        const T h = (xr[j] - m) * rs;
        hr[j] = h;
        yr[j] = h;
      }
    }
    mean[r] = m;
    rstd[r] = rs;
  }
};

/// Row r: dx += rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy, or with `scale`
/// given g = dy * (1 + scale[sample]) (the gradient through DiT's modulate, formed on the fly;
/// sample = r / tokens).
template <class T>
struct layer_norm_backward_functor {
  const T* xhat;  // [n, d] contiguous
  const compute_t<T>* rstd;  // [n]
  const T* dy;    // [n, d], leading dimension lddy
  index_t lddy;
  T* dx;  // [n, d], leading dimension lddx
  index_t lddx;
  index_t d;
  const T* scale = nullptr;  // [S, d], leading dimension ldsc; null: no modulation
  index_t ldsc = 0;
  index_t tokens = 1;

  PROMOE_HOST_DEVICE void operator()(index_t r) const {
    if (scale) {
      const T* sc = scale + (r / tokens) * ldsc;
      row(r, [gr = dy + r * lddy, sc](index_t j) { return gr[j] * (T(1) + sc[j]); });
    } else {
      row(r, [gr = dy + r * lddy](index_t j) { return gr[j]; });
    }
  }

  template <class G>
  PROMOE_HOST_DEVICE void row(index_t r, G g) const {
    const T* hr = xhat + r * d;
    const compute_t<T> sg = lane_sum<compute_t<T>>(d, g);
    const compute_t<T> sgh = lane_sum<compute_t<T>>(d, [g, hr](index_t j) { return g(j) * hr[j]; });
    const compute_t<T> mg = sg / compute_t<T>(d), mgh = sgh / compute_t<T>(d), rs = rstd[r];
    T* dr = dx + r * lddx;
    for (index_t j = 0; j < d; ++j) dr[j] += rs * (g(j) - mg - hr[j] * mgh);
  }
};

}  // namespace detail

template <class T, class B>
class layer_norm {
 public:
  /// What backward needs; the caller owns it and may reuse it across calls.
  struct cache {
    tensor<T, B> xhat;  ///< [n, D] normalised rows (equal to the forward's y)
    tensor<compute_t<T>, B> mean;  ///< [n] (float for bf16)
    tensor<compute_t<T>, B> rstd;  ///< [n] 1 / sqrt(biased variance + eps)
  };

  layer_norm() = default;
  explicit layer_norm(index_t dim, double eps = 1e-6) : dim_(dim), eps_(eps) {
    PROMOE_CHECK(dim >= 1, "nn::layer_norm: dim must be positive, got ", dim);
    PROMOE_CHECK(eps > 0.0, "nn::layer_norm: eps must be positive, got ", eps);
  }

  index_t dim() const { return dim_; }
  double eps() const { return eps_; }

  /// y [n, D] = LayerNorm(x [n, D]); y may be x itself (in place).
  void forward(const_matrix_view<T> x, matrix_view<T> y, cache& c) const {
    forward_("nn::layer_norm", x, y, c, {}, {}, 1);
  }

  /// DiT's modulate(LayerNorm(x), shift, scale) in one pass: y [n, D] = xhat * (1 + scale) +
  /// shift, with shift and scale per sample ([S, D] views, e.g. column blocks of the adaLN
  /// output) and x's rows grouped in samples of `tokens` rows (n = S * tokens). The cache
  /// holds xhat as forward's does (nn::modulate::backward takes it as its input); y may be x.
  void forward_modulated(const_matrix_view<T> x, const_matrix_view<T> shift, const_matrix_view<T> scale,
                         index_t tokens, matrix_view<T> y, cache& c) const {
    const char* fn = "nn::layer_norm::forward_modulated";
    check_per_sample_(fn, "shift", shift, x.rows, tokens);
    check_per_sample_(fn, "scale", scale, x.rows, tokens);
    forward_(fn, x, y, c, shift, scale, tokens);
  }

  /// dx [n, D] += dL/dx given dy [n, D] = dL/dy and the cache of the matching forward.
  void backward(const cache& c, const_matrix_view<T> dy, matrix_view<T> dx) const {
    backward_("nn::layer_norm::backward", c, dy, dx, {}, 1);
  }

  /// The backward of forward_modulated's LayerNorm part: dx [n, D] += dL/dx given dy = dL/dy
  /// of the modulated output and the forward's scale (dL/dxhat = dy * (1 + scale) is formed
  /// on the fly). shift's and scale's own gradients are nn::modulate::backward's (with an
  /// empty dx).
  void backward_modulated(const cache& c, const_matrix_view<T> scale, index_t tokens, const_matrix_view<T> dy,
                          matrix_view<T> dx) const {
    const char* fn = "nn::layer_norm::backward_modulated";
    check_per_sample_(fn, "scale", scale, c.xhat.rank() == 2 ? c.xhat.dim(0) : 0, tokens);
    backward_(fn, c, dy, dx, scale, tokens);
  }

  /// No parameters (elementwise_affine=False); present so every module can be visited alike.
  template <class F>
  void for_each_parameter(const std::string&, F&&) {}
  void zero_grad() {}

 private:
  /// A per-sample [S, D] view for n token rows in samples of `tokens`.
  void check_per_sample_(const char* fn, const char* what, const_matrix_view<T> v, index_t n, index_t tokens) const {
    PROMOE_CHECK(tokens >= 1 && n == v.rows * tokens && v.cols == dim_, fn, ": ", what, " is [", v.rows, ", ", v.cols,
                 "], expected [", tokens >= 1 ? n / tokens : 0, ", ", dim_, "] (one row per sample of ", tokens,
                 " tokens)");
  }

  /// forward / forward_modulated (shift.data null: no modulation).
  void forward_(const char* fn, const_matrix_view<T> x, matrix_view<T> y, cache& c, const_matrix_view<T> shift,
                const_matrix_view<T> scale, index_t tokens) const {
    PROMOE_CHECK(x.cols == dim_, fn, ": x is [", x.rows, ", ", x.cols, "], expected [n, ", dim_, "]");
    PROMOE_CHECK(y.rows == x.rows && y.cols == dim_, fn, ": y is [", y.rows, ", ", y.cols, "], expected [", x.rows,
                 ", ", dim_, "] (the shape of x)");
    const index_t n = x.rows;
    c.xhat.resize({n, dim_});
    c.mean.resize({n});
    c.rstd.resize({n});
    if (n == 0) return;
    backend_traits<B>::parallel_for(
        n, detail::layer_norm_forward_functor<T>{x.data,        x.ld,        y.data,       y.ld,
                                                 c.xhat.data(), c.mean.data(), c.rstd.data(), dim_,
                                                 static_cast<compute_t<T>>(eps_), shift.data, shift.ld, scale.data,
                                                 scale.ld,      tokens});
  }

  /// backward / backward_modulated (scale.data null: no modulation).
  void backward_(const char* fn, const cache& c, const_matrix_view<T> dy, matrix_view<T> dx,
                 const_matrix_view<T> scale, index_t tokens) const {
    const index_t n = c.xhat.rank() == 2 ? c.xhat.dim(0) : 0;
    PROMOE_CHECK(c.xhat.rank() == 2 && c.xhat.dim(1) == dim_, fn,
                 ": the cache holds no forward of this module (run forward first)");
    PROMOE_CHECK(dy.rows == n && dy.cols == dim_, fn, ": dy is [", dy.rows, ", ", dy.cols, "], expected [", n, ", ",
                 dim_, "] (the forward's shape)");
    PROMOE_CHECK(dx.rows == n && dx.cols == dim_, fn, ": dx is [", dx.rows, ", ", dx.cols, "], expected [", n, ", ",
                 dim_, "] (the forward's shape)");
    if (n == 0) return;
    backend_traits<B>::parallel_for(n, detail::layer_norm_backward_functor<T>{c.xhat.data(), c.rstd.data(), dy.data,
                                                                              dy.ld, dx.data, dx.ld, dim_, scale.data,
                                                                              scale.ld, tokens});
  }

  index_t dim_ = 0;
  double eps_ = 1e-6;
};

}  // namespace promoe::nn
