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
#include "../core/error.hpp"
#include "../core/lane_sum.hpp"
#include "../core/view.hpp"

namespace promoe::nn {

namespace detail {

/// Row r: mean, biased variance (two passes), y = xhat = (x - mean) * rstd, also into the cache.
template <class T>
struct layer_norm_forward_functor {
  const T* x;  // [n, d], leading dimension ldx
  index_t ldx;
  T* y;  // [n, d], leading dimension ldy
  index_t ldy;
  T* xhat;  // [n, d] contiguous (cache)
  T* mean;  // [n]
  T* rstd;  // [n]
  index_t d;
  T eps;

  PROMOE_HOST_DEVICE void operator()(index_t r) const {
    using std::sqrt;
    const T* xr = x + r * ldx;
    const T m = lane_sum<T>(d, [xr](index_t j) { return xr[j]; }) / T(d);
    const T v = lane_sum<T>(d, [xr, m](index_t j) { return (xr[j] - m) * (xr[j] - m); });
    const T rs = T(1) / sqrt(v / T(d) + eps);
    T* yr = y + r * ldy;
    T* hr = xhat + r * d;
    for (index_t j = 0; j < d; ++j) {
      const T h = (xr[j] - m) * rs;
      hr[j] = h;
      yr[j] = h;
    }
    mean[r] = m;
    rstd[r] = rs;
  }
};

/// Row r: dx += rstd * (dy - mean(dy) - xhat * mean(dy * xhat)).
template <class T>
struct layer_norm_backward_functor {
  const T* xhat;  // [n, d] contiguous
  const T* rstd;  // [n]
  const T* dy;    // [n, d], leading dimension lddy
  index_t lddy;
  T* dx;  // [n, d], leading dimension lddx
  index_t lddx;
  index_t d;

  PROMOE_HOST_DEVICE void operator()(index_t r) const {
    const T* hr = xhat + r * d;
    const T* gr = dy + r * lddy;
    const T sg = lane_sum<T>(d, [gr](index_t j) { return gr[j]; });
    const T sgh = lane_sum<T>(d, [gr, hr](index_t j) { return gr[j] * hr[j]; });
    const T mg = sg / T(d), mgh = sgh / T(d), rs = rstd[r];
    T* dr = dx + r * lddx;
    for (index_t j = 0; j < d; ++j) dr[j] += rs * (gr[j] - mg - hr[j] * mgh);
  }
};

}  // namespace detail

template <class T, class B>
class layer_norm {
 public:
  /// What backward needs; the caller owns it and may reuse it across calls.
  struct cache {
    tensor<T, B> xhat;  ///< [n, D] normalised rows (equal to the forward's y)
    tensor<T, B> mean;  ///< [n]
    tensor<T, B> rstd;  ///< [n] 1 / sqrt(biased variance + eps)
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
    PROMOE_CHECK(x.cols == dim_, "nn::layer_norm: x is [", x.rows, ", ", x.cols, "], expected [n, ", dim_, "]");
    PROMOE_CHECK(y.rows == x.rows && y.cols == dim_, "nn::layer_norm: y is [", y.rows, ", ", y.cols, "], expected [",
                 x.rows, ", ", dim_, "] (the shape of x)");
    const index_t n = x.rows;
    c.xhat.resize({n, dim_});
    c.mean.resize({n});
    c.rstd.resize({n});
    if (n == 0) return;
    backend_traits<B>::parallel_for(
        n, detail::layer_norm_forward_functor<T>{x.data, x.ld, y.data, y.ld, c.xhat.data(), c.mean.data(),
                                                 c.rstd.data(), dim_, static_cast<T>(eps_)});
  }

  /// dx [n, D] += dL/dx given dy [n, D] = dL/dy and the cache of the matching forward.
  void backward(const cache& c, const_matrix_view<T> dy, matrix_view<T> dx) const {
    const index_t n = c.xhat.rank() == 2 ? c.xhat.dim(0) : 0;
    PROMOE_CHECK(c.xhat.rank() == 2 && c.xhat.dim(1) == dim_,
                 "nn::layer_norm::backward: the cache holds no forward of this module (run forward first)");
    PROMOE_CHECK(dy.rows == n && dy.cols == dim_, "nn::layer_norm::backward: dy is [", dy.rows, ", ", dy.cols,
                 "], expected [", n, ", ", dim_, "] (the forward's shape)");
    PROMOE_CHECK(dx.rows == n && dx.cols == dim_, "nn::layer_norm::backward: dx is [", dx.rows, ", ", dx.cols,
                 "], expected [", n, ", ", dim_, "] (the forward's shape)");
    if (n == 0) return;
    backend_traits<B>::parallel_for(n, detail::layer_norm_backward_functor<T>{c.xhat.data(), c.rstd.data(), dy.data,
                                                                              dy.ld, dx.data, dx.ld, dim_});
  }

  /// No parameters (elementwise_affine=False); present so every module can be visited alike.
  template <class F>
  void for_each_parameter(const std::string&, F&&) {}
  void zero_grad() {}

 private:
  index_t dim_ = 0;
  double eps_ = 1e-6;
};

}  // namespace promoe::nn
