// SPDX-License-Identifier: Apache-2.0
/// \file cpu.hpp
/// \brief backend::cpu: host memory, OpenMP loops, GEMM through OpenBLAS or Eigen (host_gemm.hpp).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include <Eigen/Core>

#include "backend.hpp"
#include "counting_sort.hpp"
#include "host_attention.hpp"
#include "host_gemm.hpp"

namespace promoe {

template <>
struct backend_traits<backend::cpu> {
  static constexpr const char* name = "cpu";
  /// Memory the host can read directly.
  static constexpr bool host_accessible = true;
  /// parallel_tasks runs tasks side by side (so callers may split work into more of them).
  static constexpr bool concurrent_tasks = true;
  /// Column reductions over rows (sums over a sample's tokens) take this many neighbouring
  /// columns per call, so the inner loop over columns vectorises.
  static constexpr index_t column_block = 16;

  template <class T>
  using buffer = std::vector<T, Eigen::aligned_allocator<T>>;

  /// Waits for queued work: none on the host.
  static void synchronize() {}

  template <class T>
  static T* raw(buffer<T>& b) { return b.data(); }
  template <class T>
  static const T* raw(const buffer<T>& b) { return b.data(); }

  /// f(i) for every i in [0, n); short loops, loops inside a task, and loops with one thread
  /// (for which libgomp would allocate a team on every region) stay serial.
  template <class F>
  static void parallel_for(index_t n, F f) {
#if defined(_OPENMP)
    if (n >= detail::serial_below && !omp_in_parallel() && omp_get_max_threads() > 1) {
#pragma omp parallel for schedule(static)
      for (index_t i = 0; i < n; ++i) f(i);
      return;
    }
#endif
    for (index_t i = 0; i < n; ++i) f(i);
  }

  /// piece(first, length) over [0, n) in pieces of 2^16 elements, split over the threads when
  /// there are several pieces: copies and fills of large buffers (gradient zeroing,
  /// workspaces) on one thread would leave the others idle.
  template <class F>
  static void in_pieces(index_t n, F piece) {
    constexpr index_t size = index_t{1} << 16;
    const index_t pieces = (n + size - 1) / size;
#if defined(_OPENMP)
    if (pieces > 1 && !omp_in_parallel() && omp_get_max_threads() > 1) {
#pragma omp parallel for schedule(static)
      for (index_t i = 0; i < pieces; ++i) piece(i * size, std::min(size, n - i * size));
      return;
    }
#endif
    for (index_t i = 0; i < pieces; ++i) piece(i * size, std::min(size, n - i * size));
  }

  /// task(i) for every i in [0, n), spread over the threads (dynamic schedule, so list the
  /// largest tasks first). Inside a task everything runs on its thread: Eigen's GEMM and
  /// parallel_for see the enclosing parallel region and stay serial. The first exception a
  /// task throws is rethrown here once all tasks are done.
  template <class F>
  static void parallel_tasks(index_t n, F&& task) {
#if defined(_OPENMP)
    if (n > 1 && !omp_in_parallel() && omp_get_max_threads() > 1) {
      std::exception_ptr error;
#pragma omp parallel for schedule(dynamic, 1)
      for (index_t i = 0; i < n; ++i) {
        try {
          task(i);
        } catch (...) {
#pragma omp critical(promoe_parallel_tasks)
          if (!error) error = std::current_exception();
        }
      }
      if (error) std::rethrow_exception(error);
      return;
    }
#endif
    for (index_t i = 0; i < n; ++i) task(i);
  }

  template <class T>
  static void gemm(transpose ta, transpose tb, index_t m, index_t n, index_t k, T alpha, const T* a,
                   index_t lda, const T* b, index_t ldb, T beta, T* c, index_t ldc) {
    detail::host_gemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }

  /// C_i = alpha * op(A_i) * op(B_i) + beta * C_i for i in [0, batch), X_i = x + i * stride_x:
  /// the products run side by side as tasks (each on one thread).
  template <class T>
  static void gemm_strided_batched(transpose ta, transpose tb, index_t m, index_t n, index_t k, T alpha, const T* a,
                                   index_t lda, index_t stride_a, const T* b, index_t ldb, index_t stride_b, T beta,
                                   T* c, index_t ldc, index_t stride_c, index_t batch) {
    parallel_tasks(batch, [&](index_t i) {
      detail::host_gemm(ta, tb, m, n, k, alpha, a + i * stride_a, lda, b + i * stride_b, ldb, beta, c + i * stride_c,
                        ldc);
    });
  }

  /// Per-thread scratch of the attention tasks. Acquired once by the calling thread before
  /// the tasks start, which gives every thread of the team buffers of the size the tasks
  /// need (so no thread allocates inside a later step, whichever tasks it happens to run).
  template <class T>
  using attention_scratch = detail::gemm_thread_buffers<T, detail::gemm_buffer_use::attention_scratch>;

  /// The core of multi-head self-attention for every (sample, head), one task each through
  /// the host kernels (host_attention.hpp), in nn::attention's layout: qkv [S * tokens, 3D]
  /// with columns (q/k/v, head, head_dim), D = heads * hd; probs [S, heads, tokens, tokens]
  /// (written); out [S * tokens, D] (written): per head P = softmax(scale q k^T), o = P v.
  template <class T>
  static void attention_forward(index_t samples, index_t tokens, index_t heads, index_t hd, T scale, const T* qkv,
                                T* probs, T* out) {
    const index_t dim = heads * hd, ld = 3 * dim;
    attention_scratch<T>::acquire(hd * tokens, 1);
    parallel_tasks(samples * heads, [&](index_t task) {
      const index_t s = task / heads, h = task % heads;
      T* kt = attention_scratch<T>::acquire(hd * tokens, 1).first;
      const T* q = qkv + s * tokens * ld + h * hd;
      detail::host_attention_head_forward(tokens, hd, scale, q, q + dim, q + 2 * dim, ld, probs + task * tokens * tokens,
                                          out + s * tokens * dim + h * hd, dim, kt);
    });
  }
  /// Its backward: given the forward's qkv and probs and d_out [S * tokens, D], overwrites
  /// d_qkv [S * tokens, 3D] (every element).
  template <class T>
  static void attention_backward(index_t samples, index_t tokens, index_t heads, index_t hd, T scale, const T* qkv,
                                 const T* probs, const T* d_out, T* d_qkv) {
    const index_t dim = heads * hd, ld = 3 * dim;
    attention_scratch<T>::acquire(tokens * tokens, hd * tokens);
    parallel_tasks(samples * heads, [&](index_t task) {
      const index_t s = task / heads, h = task % heads;
      const auto [ds, vt] = attention_scratch<T>::acquire(tokens * tokens, hd * tokens);
      const index_t at = s * tokens * ld + h * hd;
      detail::host_attention_head_backward(tokens, hd, scale, qkv + at, qkv + at + dim, qkv + at + 2 * dim, ld,
                                           probs + task * tokens * tokens, d_out + s * tokens * dim + h * hd, dim,
                                           d_qkv + at, d_qkv + at + dim, d_qkv + at + 2 * dim, ds, vt);
    });
  }

  /// Stable counting sort: order lists the indices i with 0 <= keys[i] < num_keys grouped by
  /// key (ascending), in index order within a key; offsets[num_keys + 1] delimit the groups.
  static void group_by_key(const std::int32_t* keys, index_t n, index_t num_keys, index_t* order,
                           index_t* offsets) {
    detail::host_group_by_key(keys, n, num_keys, order, offsets);
  }

  template <class T>
  static void copy_to_host(const T* src, index_t n, T* host_dst) {
    if (n > 0) std::memcpy(host_dst, src, sizeof(T) * n);
  }
  template <class T>
  static void copy_from_host(const T* host_src, index_t n, T* dst) {
    if (n > 0) std::memcpy(dst, host_src, sizeof(T) * n);
  }
  template <class T>
  static void copy(const T* src, index_t n, T* dst) {
    in_pieces(n, [=](index_t first, index_t len) { std::memcpy(dst + first, src + first, sizeof(T) * len); });
  }
  template <class T>
  static void fill(T* p, index_t n, T value) {
    in_pieces(n, [=](index_t first, index_t len) { std::fill(p + first, p + first + len, value); });
  }
  /// Sum in index order, accumulated in double (deterministic).
  template <class T>
  static T sum(const T* p, index_t n) {
    double s = 0;
    for (index_t i = 0; i < n; ++i) s += static_cast<double>(p[i]);
    return static_cast<T>(s);
  }
  /// Index of the first NaN or Inf, or -1.
  template <class T>
  static index_t first_non_finite(const T* p, index_t n) {
    for (index_t i = 0; i < n; ++i)
      if (!std::isfinite(p[i])) return i;
    return -1;
  }
};

static_assert(Backend<backend::cpu>);

}  // namespace promoe
