// SPDX-License-Identifier: Apache-2.0
/// \file eigen_gemm.hpp
/// \brief Row-major GEMM on host pointers through Eigen (which calls BLAS under EIGEN_USE_BLAS).
#pragma once

#include <Eigen/Core>

#include "backend.hpp"

namespace promoe::detail {

/// C[m, n] = alpha * op(A) * op(B) + beta * C, all row-major with leading dimensions.
template <class T>
void eigen_gemm(transpose ta, transpose tb, index_t m, index_t n, index_t k, T alpha, const T* a,
                index_t lda, const T* b, index_t ldb, T beta, T* c, index_t ldc) {
  using mat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using cmap = Eigen::Map<const mat, Eigen::Unaligned, Eigen::OuterStride<>>;
  using map = Eigen::Map<mat, Eigen::Unaligned, Eigen::OuterStride<>>;
  if (m == 0 || n == 0) return;
  map C(c, m, n, Eigen::OuterStride<>(ldc));
  if (beta == T(0)) {
    C.setZero();  // beta = 0 overwrites, even NaN, as BLAS does
  } else if (beta != T(1)) {
    C *= beta;
  }
  if (k == 0 || alpha == T(0)) return;
  const cmap A(a, ta == transpose::yes ? k : m, ta == transpose::yes ? m : k, Eigen::OuterStride<>(lda));
  const cmap B(b, tb == transpose::yes ? n : k, tb == transpose::yes ? k : n, Eigen::OuterStride<>(ldb));
  if (ta == transpose::no && tb == transpose::no) {
    C.noalias() += alpha * A * B;
  } else if (ta == transpose::no) {
    C.noalias() += alpha * A * B.transpose();
  } else if (tb == transpose::no) {
    C.noalias() += alpha * A.transpose() * B;
  } else {
    C.noalias() += alpha * A.transpose() * B.transpose();
  }
}

}  // namespace promoe::detail
