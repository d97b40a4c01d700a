// SPDX-License-Identifier: Apache-2.0
/// \file clip.hpp
/// \brief optim::grad_norm and optim::clip_grad_norm: the global L2 norm of the gradients of a
/// named_parameter list and torch.nn.utils.clip_grad_norm_ on it.
///
/// The sum of squares is accumulated in double over fixed chunks (each chunk in index order,
/// the chunks in order), so the norm is the same on every thread count and run (ops::sum_into
/// says where a GPU may differ in the last bits).
/// clip_grad_norm scales by clip_coef = max_norm / (total_norm + 1e-6) when that is below 1
/// (PyTorch multiplies by clamp(clip_coef, max=1), where 1 changes nothing).
///
/// clip_grad_norm reads the norm on the host: it can refuse NaN/Inf gradients before they are
/// applied, at the price of a wait for the device. queue_clip_grad_norm computes and applies
/// the factor on the device and only counts non-finite norms, for the caller to check when it
/// reads anyway (a log line, a checkpoint).
#pragma once

#include <cmath>
#include <cstddef>
#include <vector>

#include "../backend/backend.hpp"
#include "../backend/device_sum.hpp"
#include "../backend/tensor.hpp"
#include "../core/config.hpp"
#include "../core/error.hpp"

namespace promoe::optim {

namespace detail {

/// g[i] *= coef.
template <class T>
struct scale_functor {
  T* g;
  T coef;
  PROMOE_HOST_DEVICE void operator()(index_t i) const { g[i] = g[i] * coef; }
};

/// The norm of the partial sums of squares and the clip factor, on the device (one thread):
/// record = {norm, factor, non-finite count}; the factor is 1 (nothing to do) unless
/// clipping applies, and the count goes up by one when the norm is NaN or Inf.
struct clip_factor_functor {
  const double* partial;
  index_t chunks;
  double max_norm;
  double* record;  // [3]
  PROMOE_HOST_DEVICE void operator()(index_t) const {
    using std::isfinite;
    using std::sqrt;
    const double norm = sqrt(ops::detail::sum_in_order(partial, chunks));
    const double coef = max_norm / (norm + 1e-6);
    record[0] = norm;
    record[1] = isfinite(norm) && coef < 1.0 ? coef : 1.0;
    if (!isfinite(norm)) record[2] += 1.0;
  }
};

/// g[i] *= factor, read from the device record (nothing when it is 1).
template <class T>
struct scale_by_record_functor {
  T* g;
  const double* record;
  PROMOE_HOST_DEVICE void operator()(index_t i) const {
    if (record[1] != 1.0) g[i] = g[i] * static_cast<T>(record[1]);
  }
};

}  // namespace detail

/// What queue_clip_grad_norm left on the device, read back.
struct grad_norm_record {
  double last_norm = 0.0;       ///< the norm of the last call, before clipping
  index_t non_finite_calls = 0;  ///< calls whose norm was NaN or Inf (their gradients were not scaled)
};

/// Buffers of the norm computation; pass the same one every step and it stops allocating.
template <class B>
struct grad_norm_workspace {
  std::vector<index_t> first_chunk;
  tensor<double, B> partial;
  std::vector<double> partial_host, sums;
  tensor<double, B> record;  ///< [3] queue_clip_grad_norm: norm, factor, non-finite calls

  /// Reads queue_clip_grad_norm's record back (a wait for the device).
  grad_norm_record read_record() const {
    double r[3] = {0.0, 1.0, 0.0};
    if (record.size() == 3) backend_traits<B>::copy_to_host(record.data(), 3, r);
    return {r[0], static_cast<index_t>(r[2])};
  }
};

namespace detail {

/// The partial sums of squares of every gradient, in chunks of ops::detail::sum_chunk, into
/// w.partial (the chunks of params[k] from w.first_chunk[k]); returns the number of chunks.
template <class T, class B>
index_t grad_partial_sums(const std::vector<named_parameter<T>>& params,
                                            grad_norm_workspace<B>& w) {
  using traits = backend_traits<B>;
  w.first_chunk.assign(params.size() + 1, 0);
  for (std::size_t k = 0; k < params.size(); ++k) {
    const index_t n = params[k].grad ? params[k].size() : 0;
    w.first_chunk[k + 1] = w.first_chunk[k] + ops::detail::sum_chunks(n);
  }
  const index_t chunks = w.first_chunk.back();
  if (chunks == 0) return 0;
  w.partial.resize({chunks});
  const auto sum_chunks_of = [&](std::size_t k) {
    const index_t c = w.first_chunk[k + 1] - w.first_chunk[k];
    if (c > 0)
      traits::parallel_for(c, ops::detail::chunk_sum_functor<T, true>{params[k].grad, params[k].size(),
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
  return chunks;
}

/// Sum of squares of each gradient into w.sums (entries without a grad give 0); returns the
/// sum of all of them, taken over the chunks in order as the device does.
template <class T, class B>
double grad_sum_squares(const std::vector<named_parameter<T>>& params, grad_norm_workspace<B>& w) {
  const index_t chunks = grad_partial_sums<T, B>(params, w);
  w.sums.assign(params.size(), 0.0);
  if (chunks == 0) return 0.0;
  w.partial.to_host(w.partial_host);
  for (std::size_t k = 0; k < params.size(); ++k)
    for (index_t c = w.first_chunk[k]; c < w.first_chunk[k + 1]; ++c)
      w.sums[k] += w.partial_host[static_cast<std::size_t>(c)];
  return ops::detail::sum_in_order(w.partial_host.data(), chunks);
}

}  // namespace detail

/// The L2 norm of all gradients together (entries with a null grad are skipped), accumulated
/// in double and deterministic. NaN or Inf in a gradient gives a non-finite result.
template <class T, class B>
double grad_norm(const std::vector<named_parameter<T>>& params) {
  grad_norm_workspace<B> w;
  return std::sqrt(detail::grad_sum_squares<T, B>(params, w));
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
  const double norm = std::sqrt(detail::grad_sum_squares<T, B>(params, w));
  const std::vector<double>& sums = w.sums;
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

/// clip_grad_norm without a wait for the device: the norm and the factor are computed and
/// applied there. The gradients are scaled exactly as clip_grad_norm scales them. A NaN or Inf
/// norm leaves them untouched and is counted in the workspace's record instead of thrown:
/// check w.read_record().non_finite_calls when reading anyway (before saving weights that
/// such gradients reached).
template <class T, class B>
void queue_clip_grad_norm(const std::vector<named_parameter<T>>& params, double max_norm, grad_norm_workspace<B>& w) {
  using traits = backend_traits<B>;
  PROMOE_CHECK(max_norm > 0.0, "optim::queue_clip_grad_norm: max_norm must be > 0, got ", max_norm);
  if (w.record.size() != 3) {
    w.record.resize({3});
    w.record.fill(0.0);
  }
  const index_t chunks = detail::grad_partial_sums<T, B>(params, w);
  traits::parallel_for(1, detail::clip_factor_functor{chunks > 0 ? w.partial.data() : nullptr, chunks, max_norm,
                                                      w.record.data()});
  for (const auto& p : params) {
    const index_t n = p.grad ? p.size() : 0;
    if (n > 0) traits::parallel_for(n, detail::scale_by_record_functor<T>{p.grad, w.record.data()});
  }
}

}  // namespace promoe::optim
