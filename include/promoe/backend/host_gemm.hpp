// SPDX-License-Identifier: Apache-2.0
/// \file host_gemm.hpp
/// \brief Row-major GEMM on host pointers, split over the OpenMP threads by promoe, each block
/// through OpenBLAS (where it has a kernel for the CPU: openblas.hpp) or Eigen's blocked
/// kernel, with packing buffers that the threads keep and reuse.
///
/// Why not `C.noalias() += A * B`: Eigen's product takes its packing buffers (about a
/// megabyte per call) from malloc on every call once they exceed its stack limit, which
/// would put heap allocations in every training step. Here the same packing routines and
/// micro-kernel run on buffers that belong to the calling thread and only ever grow, and the
/// threads split the rows (or columns) of C between them instead of Eigen's own split.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <atomic>
#include <cstddef>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "../core/bf16.hpp"
#include "../core/precision.hpp"
#include "backend.hpp"
#include "openblas.hpp"

namespace promoe::detail {

/// What a pair of per-thread GEMM buffers holds.
enum class gemm_buffer_use {
  packing,          ///< Eigen's packed panels of A and B
  rounded_operands,  ///< float copies of A and B holding bf16 values (bf16 GEMMs)
  widened_output,    ///< a float panel of a bf16 C
  attention_scratch  ///< one attention head's transposed k or v and its score gradients
};

/// Per-thread buffer pairs of the threads that run GEMMs (and the host attention kernels),
/// one pool per use. Each thread works
/// in its own pair; when one thread needs larger buffers, every thread's pair is raised to the
/// new high-water mark (a replacement is allocated for the others and swapped in at their
/// next GEMM), and the OpenMP team's threads are given their pair up front. So once one
/// training step has run every GEMM shape, no thread allocates again, whichever thread the
/// task scheduler hands a shape to in later steps.
template <class T, gemm_buffer_use Use>
class gemm_thread_buffers {
 public:
  using buffer = std::vector<T, Eigen::aligned_allocator<T>>;

  /// The calling thread's buffers, at least `size_a` and `size_b` elements long.
  static std::pair<T*, T*> acquire(Eigen::Index size_a, Eigen::Index size_b) {
    if constexpr (Use == gemm_buffer_use::packing) {
      // Never less than any product of at most 2^20 multiply-adds can ask for (Eigen packs at
      // most kc x (n rounded up to its 48-row panels) <= 2^20 + 624 * 47 and kc x nc <= 2^18
      // elements for them): whichever small shapes later steps send to Eigen's kernel beside
      // OpenBLAS (they change with the routing), they fit.
      size_a = std::max<Eigen::Index>(size_a, Eigen::Index{9} << 17);
      size_b = std::max<Eigen::Index>(size_b, Eigen::Index{1} << 18);
    }
    register_team();
    slot& s = this_thread_slot();
    if (s.has_pending.load(std::memory_order_acquire)) {
      std::lock_guard lock(state().mutex);
      s.a.swap(s.pending_a);
      s.b.swap(s.pending_b);
      s.pending_a = buffer();
      s.pending_b = buffer();
      s.has_pending.store(false, std::memory_order_relaxed);
    }
    if (size(s.a) < size_a || size(s.b) < size_b) raise(s, size_a, size_b);
    return {s.a.data(), s.b.data()};
  }

 private:
  struct slot;
  struct shared_state {
    std::mutex mutex;
    std::vector<slot*> slots;
    Eigen::Index hwm_a = 0, hwm_b = 0;  // the largest buffers any GEMM has needed
    std::atomic<int> team_registered{0};
  };
  static shared_state& state() {
    static shared_state st;
    return st;
  }

  struct slot {
    buffer a, b, pending_a, pending_b;
    std::atomic<bool> has_pending{false};
    slot() {
      auto& st = state();
      std::lock_guard lock(st.mutex);
      st.slots.push_back(this);
      offer(*this, st.hwm_a, st.hwm_b);
    }
    ~slot() {
      auto& st = state();
      std::lock_guard lock(st.mutex);
      std::erase(st.slots, this);
    }
  };

  static Eigen::Index size(const buffer& v) { return static_cast<Eigen::Index>(v.size()); }
  static slot& this_thread_slot() {
    thread_local slot s;
    return s;
  }
  /// Gives every thread of the OpenMP team its slot (called outside parallel regions).
  static void register_team() {
#if defined(_OPENMP)
    if (omp_in_parallel()) return;
    const int team = omp_get_max_threads();
    if (state().team_registered.load(std::memory_order_relaxed) >= team) return;
#pragma omp parallel
    { (void)this_thread_slot(); }
    state().team_registered.store(team, std::memory_order_relaxed);
#endif
  }
  /// Queues buffers of (size_a, size_b) for another thread's slot (mutex held).
  static void offer(slot& s, Eigen::Index size_a, Eigen::Index size_b) {
    if (size(s.a) >= size_a && size(s.b) >= size_b) return;
    s.pending_a.resize(static_cast<std::size_t>(std::max(size_a, size(s.a))));
    s.pending_b.resize(static_cast<std::size_t>(std::max(size_b, size(s.b))));
    s.has_pending.store(true, std::memory_order_release);
  }
  /// Raises the high-water mark to cover (size_a, size_b) and every thread to it.
  static void raise(slot& own, Eigen::Index size_a, Eigen::Index size_b) {
    auto& st = state();
    std::lock_guard lock(st.mutex);
    st.hwm_a = std::max(st.hwm_a, size_a);
    st.hwm_b = std::max(st.hwm_b, size_b);
    own.a.resize(static_cast<std::size_t>(st.hwm_a));
    own.b.resize(static_cast<std::size_t>(st.hwm_b));
    for (slot* s : st.slots)
      if (s != &own) offer(*s, st.hwm_a, st.hwm_b);
  }
};

/// Eigen's cache blocking for one sequential GEMM, its buffers from the thread's workspace.
template <class T>
class workspace_blocking : public Eigen::internal::level3_blocking<T, T> {
 public:
  /// rows, cols, depth of the column-major product Eigen runs.
  workspace_blocking(Eigen::Index rows, Eigen::Index cols, Eigen::Index depth) {
    this->m_mc = rows;
    this->m_nc = cols;
    this->m_kc = depth;
    Eigen::internal::computeProductBlockingSizes<T, T, 1, Eigen::Index>(this->m_kc, this->m_mc, this->m_nc, 1);
    std::tie(this->m_blockA, this->m_blockB) =
        gemm_thread_buffers<T, gemm_buffer_use::packing>::acquire(this->m_kc * this->m_mc, this->m_kc * this->m_nc);
  }
};

/// C = beta * C for a row-major block (beta 0 overwrites, even NaN, as BLAS does).
template <class T>
void scale_block(index_t m, index_t n, T beta, T* c, index_t ldc) {
  if (beta == T(1)) return;
  using mat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  Eigen::Map<mat, Eigen::Unaligned, Eigen::OuterStride<>> C(c, m, n, Eigen::OuterStride<>(ldc));
  if (beta == T(0)) {
    C.setZero();
  } else {
    C *= beta;
  }
}

/// C[m, n] = alpha * op(A) * op(B) + beta * C on one thread through OpenBLAS or Eigen; A, B,
/// C row-major with leading dimensions.
template <class T, transpose TA, transpose TB>
void host_gemm_block(index_t m, index_t n, index_t k, T alpha, const T* a, index_t lda, const T* b, index_t ldb,
                     T beta, T* c, index_t ldc) {
  if (openblas_gemm<T>(TA, TB, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)) return;
  scale_block(m, n, beta, c, ldc);
  constexpr int a_order = TA == transpose::no ? Eigen::RowMajor : Eigen::ColMajor;
  constexpr int b_order = TB == transpose::no ? Eigen::RowMajor : Eigen::ColMajor;
  using product = Eigen::internal::general_matrix_matrix_product<Eigen::Index, T, a_order, false, T, b_order, false,
                                                                 Eigen::RowMajor, 1>;
  // A row-major C is computed as the column-major C^T = op(B)^T op(A)^T: rows n, cols m.
  workspace_blocking<T> blocking(n, m, k);
  product::run(m, n, k, a, lda, b, ldb, c, 1, ldc, alpha, blocking, nullptr);
}

/// dst[rows, cols] (dense float) = the block src[rows, cols] (leading dimension ld) rounded
/// to bf16; bf16 sources are widened exactly. Row by row, contiguous: vectorises.
template <class S>
void copy_rounded_to_bf16(const S* src, index_t ld, index_t rows, index_t cols, float* dst) {
  for (index_t r = 0; r < rows; ++r) {
    const S* in = src + r * ld;
    float* out = dst + r * cols;
    if constexpr (std::is_same_v<S, bf16>) {
      for (index_t j = 0; j < cols; ++j) out[j] = static_cast<float>(in[j]);
    } else {
      for (index_t j = 0; j < cols; ++j) out[j] = round_to_bf16(in[j]);
    }
  }
}

/// A GEMM on bf16 operands with float32 products and accumulation, on one thread: float
/// operands under matmul_precision::bf16 (S = float) or bf16 tensors (S = bf16, whose C is
/// accumulated in a float panel and rounded once at the end). C is computed in panels of
/// rows x columns x depth, each from float copies of the operands' blocks holding bf16 values
/// (copied as stored; the float GEMM applies the transposes). The panels have fixed sizes, so
/// the thread's buffers are the same for every shape (no allocation when later steps bring
/// other shapes).
template <class S, transpose TA, transpose TB>
void host_gemm_bf16(index_t m, index_t n, index_t k, float alpha, const S* a, index_t lda, const S* b, index_t ldb,
                    float beta, S* c, index_t ldc) {
  constexpr index_t rows = 256, cols = 1024, depth = 256;
  constexpr bool widened_c = std::is_same_v<S, bf16>;
  const auto [ra, rb] =
      gemm_thread_buffers<float, gemm_buffer_use::rounded_operands>::acquire(rows * depth, depth * cols);
  float* rc = widened_c ? gemm_thread_buffers<float, gemm_buffer_use::widened_output>::acquire(rows * cols, 0).first
                        : nullptr;
  for (index_t i0 = 0; i0 < m; i0 += rows) {
    const index_t mi = std::min(rows, m - i0);
    for (index_t j0 = 0; j0 < n; j0 += cols) {
      const index_t nj = std::min(cols, n - j0);
      float* cp;
      index_t ldcp;
      if constexpr (widened_c) {
        cp = rc, ldcp = nj;
        if (beta != 0.0f) copy_rounded_to_bf16(c + i0 * ldc + j0, ldc, mi, nj, cp);
      } else {
        cp = c + i0 * ldc + j0, ldcp = ldc;
      }
      for (index_t p0 = 0; p0 < k; p0 += depth) {
        const index_t kp = std::min(depth, k - p0);
        // op(A)'s block [mi, kp] is stored as [mi, kp] (or [kp, mi] when transposed); op(B)'s
        // [kp, nj] as [kp, nj] (or [nj, kp]).
        if constexpr (TA == transpose::no) copy_rounded_to_bf16(a + i0 * lda + p0, lda, mi, kp, ra);
        else copy_rounded_to_bf16(a + p0 * lda + i0, lda, kp, mi, ra);
        if constexpr (TB == transpose::no) copy_rounded_to_bf16(b + p0 * ldb + j0, ldb, kp, nj, rb);
        else copy_rounded_to_bf16(b + j0 * ldb + p0, ldb, nj, kp, rb);
        host_gemm_block<float, TA, TB>(mi, nj, kp, alpha, ra, TA == transpose::no ? kp : mi, rb,
                                       TB == transpose::no ? nj : kp, p0 == 0 ? beta : 1.0f, cp, ldcp);
      }
      if constexpr (widened_c)
        for (index_t i = 0; i < mi; ++i)
          for (index_t j = 0; j < nj; ++j) c[(i0 + i) * ldc + j0 + j] = bf16(cp[i * ldcp + j]);
    }
  }
}

/// C[m, n] = alpha * op(A) * op(B) + beta * C on one thread; A, B, C row-major with leading
/// dimensions (bf16 GEMMs, and float GEMMs under matmul_precision::bf16, through host_gemm_bf16).
template <class T, transpose TA, transpose TB>
void host_gemm_sequential(index_t m, index_t n, index_t k, T alpha, const T* a, index_t lda, const T* b,
                          index_t ldb, T beta, T* c, index_t ldc) {
  if constexpr (std::is_same_v<T, bf16>) {
    host_gemm_bf16<bf16, TA, TB>(m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  } else if constexpr (std::is_same_v<T, float>) {
    if (get_matmul_precision() == matmul_precision::bf16) {
      host_gemm_bf16<float, TA, TB>(m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
      return;
    }
  }
  host_gemm_block<T, TA, TB>(m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

/// C[m, n] = alpha * op(A) * op(B) + beta * C, split over the OpenMP threads by rows of C (or
/// by columns when C has few rows) when called outside a parallel region and worth it; each
/// thread also applies beta to its own block.
template <class T, transpose TA, transpose TB>
void host_gemm_split(index_t m, index_t n, index_t k, T alpha, const T* a, index_t lda, const T* b, index_t ldb,
                     T beta, T* c, index_t ldc) {
  int threads = 1;
#if defined(_OPENMP)
  if (!omp_in_parallel()) {
    // Eigen's own rule: at least 50000 multiply-adds per thread.
    const double work = static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k);
    threads = static_cast<int>(std::min<double>(omp_get_max_threads(), work / 50000.0));
  }
#endif
  // Chunks are multiples of 32 rows/columns, so every thread's kernel runs on full panels.
  constexpr index_t grain = 32;
  const bool by_rows = m >= n || m >= grain * threads;
  const index_t extent = by_rows ? m : n;
  threads = static_cast<int>(std::min<index_t>(threads, (extent + grain - 1) / grain));
  if (threads <= 1) {
    host_gemm_sequential<T, TA, TB>(m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
#if defined(_OPENMP)
  const index_t chunk = ((extent + threads - 1) / threads + grain - 1) / grain * grain;
  // The region keeps the default team size even when fewer chunks are worth it: libgomp
  // caches one team, and a region of another size would allocate a new one.
#pragma omp parallel for schedule(static, 1)
  for (int t = 0; t < threads; ++t) {
    const index_t begin = std::min<index_t>(extent, t * chunk);
    const index_t len = std::min<index_t>(extent, begin + chunk) - begin;
    if (len == 0) continue;
    if (by_rows) {
      const T* at = TA == transpose::no ? a + begin * lda : a + begin;
      host_gemm_sequential<T, TA, TB>(len, n, k, alpha, at, lda, b, ldb, beta, c + begin * ldc, ldc);
    } else {
      const T* bt = TB == transpose::no ? b + begin : b + begin * ldb;
      host_gemm_sequential<T, TA, TB>(m, len, k, alpha, a, lda, bt, ldb, beta, c + begin, ldc);
    }
  }
#endif
}

/// C[m, n] = alpha * op(A) * op(B) + beta * C, all row-major with leading dimensions.
template <class T>
void host_gemm(transpose ta, transpose tb, index_t m, index_t n, index_t k, T alpha, const T* a,
                index_t lda, const T* b, index_t ldb, T beta, T* c, index_t ldc) {
  using mat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using map = Eigen::Map<mat, Eigen::Unaligned, Eigen::OuterStride<>>;
  if (m == 0 || n == 0) return;
  // Matrix-vector products stay with Eigen's GEMV below (it packs nothing), except bf16 ones
  // (bf16 tensors, or float under bf16 precision), which round or widen operands on the way in.
  const bool rounds = std::is_same_v<T, bf16> ||
                      (std::is_same_v<T, float> && get_matmul_precision() == matmul_precision::bf16);
  if ((m > 1 && n > 1) || rounds) {
    if (k == 0 || alpha == T(0)) {
      scale_block(m, n, beta, c, ldc);
      return;
    }
    if (ta == transpose::no && tb == transpose::no) {
      host_gemm_split<T, transpose::no, transpose::no>(m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    } else if (ta == transpose::no) {
      host_gemm_split<T, transpose::no, transpose::yes>(m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    } else if (tb == transpose::no) {
      host_gemm_split<T, transpose::yes, transpose::no>(m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    } else {
      host_gemm_split<T, transpose::yes, transpose::yes>(m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    }
    return;
  }
#if defined(_OPENMP)
  // A long GEMV (a bias gradient: ones^T dY over every token) is split over the threads, by
  // columns of a row-vector result or rows of a column-vector one; each part runs below.
  if ((m == 1) != (n == 1) && !omp_in_parallel() && omp_get_max_threads() > 1 &&
      static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k) >= double{1 << 17}) {
    const int threads = omp_get_max_threads();
    const index_t extent = m == 1 ? n : m;
    const index_t chunk = ((extent + threads - 1) / threads + 15) / 16 * 16;
#pragma omp parallel for schedule(static, 1)
    for (int t = 0; t < threads; ++t) {
      const index_t begin = std::min<index_t>(extent, t * chunk);
      const index_t len = std::min<index_t>(extent, begin + chunk) - begin;
      if (len == 0) continue;
      if (m == 1) {
        host_gemm(ta, tb, 1, len, k, alpha, a, lda, tb == transpose::no ? b + begin : b + begin * ldb, ldb, beta,
                  c + begin, ldc);
      } else {
        host_gemm(ta, tb, len, 1, k, alpha, ta == transpose::no ? a + begin * lda : a + begin, lda, b, ldb, beta,
                  c + begin * ldc, ldc);
      }
    }
    return;
  }
#endif
  scale_block(m, n, beta, c, ldc);
  if (k == 0 || alpha == T(0)) return;
  map C(c, m, n, Eigen::OuterStride<>(ldc));
  // Eigen's GEMV. alpha scales the matrix operand: a scaled vector would be evaluated into a
  // temporary.
  using cmap = Eigen::Map<const mat, Eigen::Unaligned, Eigen::OuterStride<>>;
  const cmap A(a, ta == transpose::yes ? k : m, ta == transpose::yes ? m : k, Eigen::OuterStride<>(lda));
  const cmap B(b, tb == transpose::yes ? n : k, tb == transpose::yes ? k : n, Eigen::OuterStride<>(ldb));
  const auto add_product = [&](const auto& opa, const auto& opb) {
    if (m == 1) {
      C.noalias() += opa * (alpha * opb);
    } else {
      C.noalias() += (alpha * opa) * opb;
    }
  };
  if (ta == transpose::no && tb == transpose::no) {
    add_product(A, B);
  } else if (ta == transpose::no) {
    add_product(A, B.transpose());
  } else if (tb == transpose::no) {
    add_product(A.transpose(), B);
  } else {
    add_product(A.transpose(), B.transpose());
  }
}

}  // namespace promoe::detail
