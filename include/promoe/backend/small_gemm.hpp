// SPDX-License-Identifier: Apache-2.0
/// \file small_gemm.hpp
/// \brief C = alpha * op(A) * B on one thread for products of a few hundred thousand
/// multiply-adds (one attention head), without packing and without zeroing C first.
///
/// Why not host_gemm: at these sizes Eigen's packing of both operands, its blocking set-up
/// and the pass that zeroes C before its accumulating kernel cost about as much as the
/// multiply-adds (attention heads of 64 tokens x 32 dims, thousands per training step). Here
/// B's rows are read in place, C is written once, and a tile of 4 rows x 2 SIMD packets of C
/// stays in registers over the whole depth (Eigen's packet primitives: SSE, AVX, AVX-512 or
/// NEON, whatever the build targets); the last columns take narrower packets, then single
/// columns, with their accumulators in registers too.
#pragma once

#include <Eigen/Core>

#include "../core/config.hpp"
#include "backend.hpp"

namespace promoe::detail {

// Eigen's packet types (__m512 and the like) are template arguments here.
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"
#endif

/// The C tile [Rows x Packets packets] at c = alpha * op(A) B over depth k, A addressed as
/// a[r * lda + p] (op = none) or a[p * lda + r] (op = transpose) for tile row r, depth p.
/// Packet is one of Eigen's packets of T, or T itself (one column).
template <class T, class Packet, transpose TA, int Rows, int Packets>
inline void small_gemm_tile(index_t k, T alpha, const T* a, index_t lda, const T* b, index_t ldb, T* c,
                            index_t ldc) {
  namespace ei = Eigen::internal;
  constexpr index_t lanes = ei::unpacket_traits<Packet>::size;
  Packet acc[Rows][Packets];
  for (int r = 0; r < Rows; ++r)
    for (int v = 0; v < Packets; ++v) acc[r][v] = ei::pset1<Packet>(T(0));
  for (index_t p = 0; p < k; ++p) {
    Packet bv[Packets];
    for (int v = 0; v < Packets; ++v) bv[v] = ei::ploadu<Packet>(b + p * ldb + v * lanes);
    for (int r = 0; r < Rows; ++r) {
      const Packet av = ei::pset1<Packet>(TA == transpose::no ? a[r * lda + p] : a[p * lda + r]);
      for (int v = 0; v < Packets; ++v) acc[r][v] = ei::pmadd(av, bv[v], acc[r][v]);
    }
  }
  const Packet scale = ei::pset1<Packet>(alpha);
  for (int r = 0; r < Rows; ++r)
    for (int v = 0; v < Packets; ++v) ei::pstoreu(c + r * ldc + v * lanes, ei::pmul(scale, acc[r][v]));
}

/// Columns [0, Packets packets) of C (b and c point at the first) for every row: tiles of 4
/// rows, then single rows.
template <class T, class Packet, transpose TA, int Packets>
inline void small_gemm_column_block(index_t m, index_t k, T alpha, const T* a, index_t lda, const T* b, index_t ldb,
                                    T* c, index_t ldc) {
  const auto a_rows = [&](index_t i) { return TA == transpose::no ? a + i * lda : a + i; };
  index_t i = 0;
  for (; i + 4 <= m; i += 4)
    small_gemm_tile<T, Packet, TA, 4, Packets>(k, alpha, a_rows(i), lda, b, ldb, c + i * ldc, ldc);
  for (; i < m; ++i) small_gemm_tile<T, Packet, TA, 1, Packets>(k, alpha, a_rows(i), lda, b, ldb, c + i * ldc, ldc);
}

/// Columns [j, n) of C: blocks of two full packets, then one, then the narrower packets
/// (half, quarter: AVX-512 -> AVX -> SSE), then single columns, so every tile keeps its
/// accumulators in registers.
template <class T, class Packet, transpose TA>
void small_gemm_columns(index_t j, index_t m, index_t n, index_t k, T alpha, const T* a, index_t lda, const T* b,
                        index_t ldb, T* c, index_t ldc) {
  namespace ei = Eigen::internal;
  constexpr index_t lanes = ei::unpacket_traits<Packet>::size;
  if constexpr (lanes > 1 && lanes == ei::packet_traits<T>::size) {
    for (; j + 2 * lanes <= n; j += 2 * lanes)
      small_gemm_column_block<T, Packet, TA, 2>(m, k, alpha, a, lda, b + j, ldb, c + j, ldc);
  }
  for (; j + lanes <= n; j += lanes) small_gemm_column_block<T, Packet, TA, 1>(m, k, alpha, a, lda, b + j, ldb, c + j, ldc);
  if constexpr (lanes > 1) {
    if (j == n) return;
    using half = typename ei::unpacket_traits<Packet>::half;
    if constexpr (ei::unpacket_traits<half>::size < lanes) {
      small_gemm_columns<T, half, TA>(j, m, n, k, alpha, a, lda, b, ldb, c, ldc);
    } else {
      small_gemm_columns<T, T, TA>(j, m, n, k, alpha, a, lda, b, ldb, c, ldc);
    }
  }
}

#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif

/// C[m, n] = alpha * op(A) * B, overwriting C (its old values, even NaN, are never read).
/// op(A) is [m, k]: A row-major [m, k] with leading dimension lda, or (TA = transpose::yes)
/// A row-major [k, m]. B row-major [k, n] (ldb), C row-major [m, n] (ldc). One thread.
template <class T, transpose TA>
void small_gemm(index_t m, index_t n, index_t k, T alpha, const T* a, index_t lda, const T* b, index_t ldb, T* c,
                index_t ldc) {
  small_gemm_columns<T, typename Eigen::internal::packet_traits<T>::type, TA>(0, m, n, k, alpha, a, lda, b, ldb, c,
                                                                             ldc);
}

}  // namespace promoe::detail
