// SPDX-License-Identifier: Apache-2.0
/// \file clip.hpp
/// \brief optim::grad_norm and optim::clip_grad_norm: the global L2 norm of the gradients of a
/// named_parameter list and torch.nn.utils.clip_grad_norm_ on it.
///
/// The sum of squares is accumulated in double over fixed chunks (each chunk in index order,
/// the chunks in order on the host), so the norm is the same on every backend, thread count
/// and run. clip_grad_norm scales by clip_coef = max_norm / (total_norm + 1e-6) when that is
/// below 1 (PyTorch multiplies by clamp(clip_coef, max=1), where 1 changes nothing).
#pragma once

#include <cmath>
#include <cstddef>
#include <vector>

#include "../backend/backend.hpp"
#include "../backend/tensor.hpp"
#include "../core/config.hpp"
#include "../core/error.hpp"

namespace promoe::optim {

namespace detail {

/// Elements per partial sum of the norm.
inline constexpr index_t norm_chunk = 1024;

/// partial[c] = sum of g[i]^2 over chunk c of g, in double, in index order.
template <class T>
struct sum_squares_chunk_functor {
  const T* g;
  index_t n;
  double* partial;
  PROMOE_HOST_DEVICE void operator()(index_t c) const {
    const index_t first = c * norm_chunk;
    const index_t last = first + norm_chunk < n ? first + norm_chunk : n;
    double s = 0.0;
    for (index_t i = first; i < last; ++i) {
      const double v = static_cast<double>(g[i]);
      s += v * v;
    }
    partial[c] = s;
  }
};

/// g[i] *= coef.
template <class T>
struct scale_functor {
  T* g;
  T coef;
  PROMOE_HOST_DEVICE void operator()(index_t i) const { g[i] = g[i] * coef; }
};

}  // namespace detail

/// Buffers of the norm computation; pass the same one every step and it stops allocating.
template <class B>
struct grad_norm_workspace {
  std::vector<index_t> first_chunk;
  tensor<double, B> partial;
  std::vector<double> partial_host, sums;
};

namespace detail {

/// Sum of squares of each gradient (double, deterministic) into w.sums; entries without a
/// grad give 0.
template <class T, class B>
const std::vector<double>& grad_sum_squares(const std::vector<named_parameter<T>>& params,
                                            grad_norm_workspace<B>& w) {
  using traits = backend_traits<B>;
  w.first_chunk.assign(params.size() + 1, 0);
  for (std::size_t k = 0; k < params.size(); ++k) {
    const index_t n = params[k].grad ? params[k].size() : 0;
    w.first_chunk[k + 1] = w.first_chunk[k] + (n + norm_chunk - 1) / norm_chunk;
  }
  const index_t chunks = w.first_chunk.back();
  w.sums.assign(params.size(), 0.0);
  if (chunks == 0) return w.sums;
  w.partial.resize({chunks});
  const auto sum_chunks_of = [&](std::size_t k) {
    const index_t c = w.first_chunk[k + 1] - w.first_chunk[k];
    if (c > 0)
      traits::parallel_for(c, sum_squares_chunk_functor<T>{params[k].grad, params[k].size(),
                                                           w.partial.data() + w.first_chunk[k]});
  };
  if constexpr (traits::concurrent_tasks) {
    // Most tensors are a chunk or two: one task each (their loops run inside the task) rather
    // than a short parallel loop per tensor with the other threads waiting.
    traits::parallel_tasks(static_cast<index_t>(params.size()),
                           [&](index_t k) { sum_chunks_of(static_cast<std::size_t>(k)); });
  } else {
    for (std::size_t k = 0; k < params.size(); ++k) sum_chunks_of(k);
  }
  w.partial.to_host(w.partial_host);
  for (std::size_t k = 0; k < params.size(); ++k)
    for (index_t c = w.first_chunk[k]; c < w.first_chunk[k + 1]; ++c)
      w.sums[k] += w.partial_host[static_cast<std::size_t>(c)];
  return w.sums;
}

}  // namespace detail

/// The L2 norm of all gradients together (entries with a null grad are skipped), accumulated
/// in double and deterministic. NaN or Inf in a gradient gives a non-finite result.
template <class T, class B>
double grad_norm(const std::vector<named_parameter<T>>& params) {
  grad_norm_workspace<B> w;
  double total = 0.0;
  for (double s : detail::grad_sum_squares<T, B>(params, w)) total += s;
  return std::sqrt(total);
}

/// torch.nn.utils.clip_grad_norm_(params, max_norm) (L2): returns the total norm of the
/// gradients before clipping and, when max_norm / (norm + 1e-6) < 1, multiplies every
/// gradient by that factor. max_norm must be > 0 (+inf only measures). A non-finite norm
/// throws promoe::error naming the first parameter whose gradient holds a NaN or Inf; the
/// gradients are then left untouched.
/// With a workspace kept across steps, it allocates nothing once sized.
template <class T, class B>
double clip_grad_norm(const std::vector<named_parameter<T>>& params, double max_norm, grad_norm_workspace<B>& w) {
  using traits = backend_traits<B>;
  PROMOE_CHECK(max_norm > 0.0, "optim::clip_grad_norm: max_norm must be > 0, got ", max_norm);
  const std::vector<double>& sums = detail::grad_sum_squares<T, B>(params, w);
  double total = 0.0;
  for (double s : sums) total += s;
  const double norm = std::sqrt(total);
  if (!std::isfinite(norm)) {
    for (std::size_t k = 0; k < params.size(); ++k) {
      if (std::isfinite(sums[k])) continue;
      const index_t i = traits::first_non_finite(static_cast<const T*>(params[k].grad), params[k].size());
      if (i >= 0)
        fail("optim::clip_grad_norm: the gradients contain NaN/Inf (first in '", params[k].name, "' at flat index ",
             i, "); the total gradient norm is not finite");
    }
    fail("optim::clip_grad_norm: the gradients contain NaN/Inf or overflow: the total gradient norm is ", norm);
  }
  const double clip_coef = max_norm / (norm + 1e-6);
  if (clip_coef < 1.0) {
    const T coef = static_cast<T>(clip_coef);
    for (const auto& p : params) {
      const index_t n = p.grad ? p.size() : 0;
      if (n > 0) traits::parallel_for(n, detail::scale_functor<T>{p.grad, coef});
    }
  }
  return norm;
}
template <class T, class B>
double clip_grad_norm(const std::vector<named_parameter<T>>& params, double max_norm) {
  grad_norm_workspace<B> w;
  return clip_grad_norm<T, B>(params, max_norm, w);
}

}  // namespace promoe::optim
