// SPDX-License-Identifier: Apache-2.0
/// \file host_attention.hpp
/// \brief The core of multi-head attention for one (sample, head) on one host thread:
/// scores, softmax and the weighted sum in one pass (and the backward), so the head's
/// [tokens, tokens] scores stay in cache between its products.
///
/// Layout (nn::attention's): q, k, v are [L, hd] blocks of the qkv rows with leading
/// dimension ld (3D there); k (v in backward) is first transposed into the thread's scratch
/// so each product reads its right operand row by row (detail::small_gemm).
#pragma once

#include "../core/config.hpp"
#include "backend.hpp"
#include "small_gemm.hpp"
#include "softmax.hpp"

namespace promoe::detail {

/// dst[cols, rows] = src[rows, cols]^T, src with leading dimension ld. Column by column:
/// the writes run contiguously, and the source rows (a few cache lines each) stay in L1.
template <class T>
void transpose_into(const T* src, index_t ld, index_t rows, index_t cols, T* dst) {
  for (index_t j = 0; j < cols; ++j)
    for (index_t r = 0; r < rows; ++r) dst[j * rows + r] = src[r * ld + j];
}

/// p [L, L] = softmax(scale q k^T), o = p v (o with leading dimension ldo, overwritten);
/// kt: scratch of hd * L.
template <class T>
void host_attention_head_forward(index_t L, index_t hd, T scale, const T* q, const T* k, const T* v, index_t ld,
                                 T* p, T* o, index_t ldo, T* kt) {
  transpose_into(k, ld, L, hd, kt);
  small_gemm<T, transpose::no>(L, L, hd, scale, q, ld, kt, L, p, L);
  const softmax_rows_functor<T> softmax{p, L};
  for (index_t r = 0; r < L; ++r) softmax(r);
  small_gemm<T, transpose::no>(L, hd, L, T(1), p, L, v, ld, o, ldo);
}

/// The backward of host_attention_head_forward: given p and d_o [L, hd] (leading dimension
/// ldo), overwrites dq, dk, dv [L, hd] (leading dimension ld); ds: scratch of L * L, vt:
/// scratch of hd * L.
template <class T>
void host_attention_head_backward(index_t L, index_t hd, T scale, const T* q, const T* k, const T* v, index_t ld,
                                  const T* p, const T* d_o, index_t ldo, T* dq, T* dk, T* dv, T* ds, T* vt) {
  // o = P v: dV = P^T dO, dP = dO v^T
  small_gemm<T, transpose::yes>(L, hd, L, T(1), p, L, d_o, ldo, dv, ld);
  transpose_into(v, ld, L, hd, vt);
  small_gemm<T, transpose::no>(L, L, hd, T(1), d_o, ldo, vt, L, ds, L);
  // P = softmax(S): dS = P * (dP - rowsum(dP * P))
  const softmax_backward_rows_functor<T> softmax_backward{p, ds, L};
  for (index_t r = 0; r < L; ++r) softmax_backward(r);
  // S = scale q k^T: dQ = scale dS k, dK = scale dS^T q
  small_gemm<T, transpose::no>(L, hd, L, scale, ds, L, k, ld, dq, ld);
  small_gemm<T, transpose::yes>(L, hd, L, scale, ds, L, q, ld, dk, ld);
}

}  // namespace promoe::detail
