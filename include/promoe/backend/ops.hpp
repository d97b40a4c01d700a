// SPDX-License-Identifier: Apache-2.0
/// \file ops.hpp
/// \brief Backend-generic dense helpers built on backend_traits: GEMM on views, bias rows,
/// bias gradients, elementwise maps. Each loop body is an index functor, so every backend
/// runs the same code.
#pragma once

#include <span>
#include <type_traits>

#include "../core/error.hpp"
#include "../core/view.hpp"
#include "backend.hpp"

namespace promoe::ops {

/// C = alpha * op(A) * op(B) + beta * C on views; shapes are checked.
template <class B, class T>
void gemm(const_matrix_view<T> a, transpose ta, const_matrix_view<T> b, transpose tb, matrix_view<T> c,
          T alpha = T(1), T beta = T(0)) {
  const index_t m = ta == transpose::yes ? a.cols : a.rows;
  const index_t k = ta == transpose::yes ? a.rows : a.cols;
  const index_t kb = tb == transpose::yes ? b.cols : b.rows;
  const index_t n = tb == transpose::yes ? b.rows : b.cols;
  PROMOE_CHECK(k == kb && c.rows == m && c.cols == n, "ops::gemm: inner or outer sizes disagree (", m, "x", k,
               " times ", kb, "x", n, " into ", c.rows, "x", c.cols, ")");
  backend_traits<B>::gemm(ta, tb, m, n, k, alpha, a.data, a.ld, b.data, b.ld, beta, c.data, c.ld);
}

/// For every i in [0, batch): C_i = alpha * op(A_i) * op(B_i) + beta * C_i, where X_i starts
/// at x + i * stride_x (raw pointers, row-major with leading dimensions). Backends with their
/// own strided-batched GEMM (backend_traits::gemm_strided_batched: one cuBLAS call, or tasks
/// side by side on the host) run it; others one GEMM per i.
template <class B, class T>
void gemm_strided_batched(transpose ta, transpose tb, index_t m, index_t n, index_t k, T alpha, const T* a,
                          index_t lda, index_t stride_a, const T* b, index_t ldb, index_t stride_b, T beta, T* c,
                          index_t ldc, index_t stride_c, index_t batch) {
  if constexpr (requires {
                  backend_traits<B>::gemm_strided_batched(ta, tb, m, n, k, alpha, a, lda, stride_a, b, ldb, stride_b,
                                                          beta, c, ldc, stride_c, batch);
                }) {
    backend_traits<B>::gemm_strided_batched(ta, tb, m, n, k, alpha, a, lda, stride_a, b, ldb, stride_b, beta, c, ldc,
                                            stride_c, batch);
  } else {
    for (index_t i = 0; i < batch; ++i)
      backend_traits<B>::gemm(ta, tb, m, n, k, alpha, a + i * stride_a, lda, b + i * stride_b, ldb, beta,
                              c + i * stride_c, ldc);
  }
}

/// Every problem of `problems` (independent: no C overlaps another problem's operands or C).
/// Backends with their own grouped GEMM (backend_traits::gemm_grouped: one cuBLAS call) run
/// it; elsewhere the problems run as tasks (side by side on the host). Empty problems (m or n
/// 0) are skipped; k = 0 scales C by beta.
template <class B, class T>
void gemm_grouped(std::span<const gemm_problem<T>> problems) {
  if constexpr (requires { backend_traits<B>::gemm_grouped(problems); }) {
    backend_traits<B>::gemm_grouped(problems);
  } else {
    backend_traits<B>::parallel_tasks(static_cast<index_t>(problems.size()), [&](index_t i) {
      const gemm_problem<T>& p = problems[static_cast<std::size_t>(i)];
      backend_traits<B>::gemm(p.ta, p.tb, p.m, p.n, p.k, p.alpha, p.a, p.lda, p.b, p.ldb, p.beta, p.c, p.ldc);
    });
  }
}

namespace detail {
/// to[i] = from[i], converted (widened or rounded).
template <class From, class To>
struct convert_functor {
  const From* from;
  To* to;
  PROMOE_HOST_DEVICE void operator()(index_t i) const { to[i] = static_cast<To>(from[i]); }
};
/// out[r, :] = bias, or += bias when accumulate.
template <class T>
struct broadcast_row_functor {
  T* out;  // [rows, cols], leading dimension ld
  index_t cols, ld;
  const T* bias;  // [cols]
  bool accumulate;
  PROMOE_HOST_DEVICE void operator()(index_t r) const {
    T* o = out + r * ld;
    for (index_t j = 0; j < cols; ++j) o[j] = accumulate ? T(o[j] + bias[j]) : bias[j];
  }
};
/// out[r, :] = in[r, :], or += when accumulate.
template <class T>
struct copy_rows_functor {
  const T* in;  // [rows, cols], leading dimension ldi
  index_t ldi;
  T* out;  // [rows, cols], leading dimension ldo
  index_t ldo, cols;
  bool accumulate;
  PROMOE_HOST_DEVICE void operator()(index_t r) const {
    for (index_t j = 0; j < cols; ++j) out[r * ldo + j] = (accumulate ? out[r * ldo + j] : T(0)) + in[r * ldi + j];
  }
};
}  // namespace detail

/// Every row of `out` := row (or += row when accumulate).
template <class B, class T>
void broadcast_row(matrix_view<T> out, const T* row, bool accumulate) {
  backend_traits<B>::parallel_for(out.rows, detail::broadcast_row_functor<T>{out.data, out.cols, out.ld, row, accumulate});
}

/// out = in (same shape, any leading dimensions).
template <class B, class T>
void copy(const_matrix_view<T> in, matrix_view<T> out) {
  PROMOE_CHECK(in.rows == out.rows && in.cols == out.cols, "ops::copy: shapes differ");
  if (in.ld == in.cols && out.ld == out.cols)
    backend_traits<B>::copy(in.data, in.rows * in.cols, out.data);
  else
    backend_traits<B>::parallel_for(in.rows, detail::copy_rows_functor<T>{in.data, in.ld, out.data, out.ld, in.cols, false});
}

/// to[i] = from[i] for i in [0, n): a copy, or converted (widened or rounded) where the types
/// differ (bf16 values and their float32 copies).
template <class B, class From, class To>
void convert(const From* from, index_t n, To* to) {
  if constexpr (std::is_same_v<From, To>) {
    backend_traits<B>::copy(from, n, to);
  } else if (n > 0) {
    backend_traits<B>::parallel_for(n, detail::convert_functor<From, To>{from, to});
  }
}

/// out += in (same shape, any leading dimensions).
template <class B, class T>
void add(const_matrix_view<T> in, matrix_view<T> out) {
  PROMOE_CHECK(in.rows == out.rows && in.cols == out.cols, "ops::add: shapes differ");
  backend_traits<B>::parallel_for(in.rows, detail::copy_rows_functor<T>{in.data, in.ld, out.data, out.ld, in.cols, true});
}

/// grad[cols] += column sums of d[rows, cols]: a GEMM against a ones vector, so BLAS does it.
/// `ones` holds at least d.rows ones.
template <class B, class T>
void accumulate_column_sums(const_matrix_view<T> d, const T* ones, T* grad) {
  if (d.rows == 0) return;
  backend_traits<B>::gemm(transpose::no, transpose::no, 1, d.cols, d.rows, T(1), ones, d.rows, d.data, d.ld,
                          T(1), grad, d.cols);
}

/// Throws promoe::error naming `what` and the [row, col] of the first NaN or Inf.
template <class B, class T>
void check_finite(const_matrix_view<T> m, const char* what) {
  if (m.empty()) return;
  const bool contiguous = m.ld == m.cols || m.rows == 1;
  for (index_t r = 0; r < (contiguous ? 1 : m.rows); ++r) {
    const index_t i = backend_traits<B>::first_non_finite(m.row(r), contiguous ? m.rows * m.cols : m.cols);
    PROMOE_CHECK(i < 0, what, " contains a non-finite value (NaN or Inf) at [", r + i / m.cols, ", ", i % m.cols,
                 "]");
  }
}

}  // namespace promoe::ops
