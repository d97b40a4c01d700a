// SPDX-License-Identifier: Apache-2.0
/// \file openblas.hpp
/// \brief Which kernel runs the host GEMM's blocks: OpenBLAS's, where the build links it
/// (PROMOE_HAS_OPENBLAS) and OpenBLAS has a kernel for this CPU, or Eigen's.
///
/// Why a choice at all: on a CPU OpenBLAS knows it is about 20 % faster than Eigen's kernel
/// per core (single-threaded sgemm, AVX-512: 100 vs 80 GFLOP/s), but Debian's OpenBLAS runs
/// its generic Prescott kernel on CPUs it does not recognise, 3-4x slower than Eigen. The
/// choice is made once per process from the kernel OpenBLAS reports (never from a timing, so
/// that one machine always computes the same numbers), and the environment variable
/// PROMOE_GEMM=eigen|openblas overrides it.
///
/// OpenBLAS is then set to one thread: promoe splits a GEMM over its OpenMP threads itself
/// and runs the experts' GEMMs side by side as tasks, each block on one core.
#pragma once

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <string>
#include <string_view>
#include <type_traits>

#include "../core/error.hpp"
#include "backend.hpp"

#if defined(PROMOE_HAS_OPENBLAS)
#include <cblas.h>
extern "C" {
void openblas_set_num_threads(int num_threads);
char* openblas_get_corename(void);
}
#endif

namespace promoe::detail {

enum class host_gemm_kernel { eigen, openblas };

/// OpenBLAS kernels (as openblas_get_corename names them, lower case) with AVX2 or AVX-512
/// GEMM micro-kernels; any other name is a generic kernel that Eigen's beats.
inline bool openblas_kernel_is_tuned(std::string_view core) {
  for (std::string_view tuned : {"haswell", "zen", "skylakex", "cooperlake", "sapphirerapids"})
    if (core == tuned) return true;
  return false;
}

/// The OpenBLAS kernel name in lower case ("" without OpenBLAS; "unknown" when it has none).
inline std::string openblas_core_name() {
  std::string name;
#if defined(PROMOE_HAS_OPENBLAS)
  const char* core = openblas_get_corename();
  for (const char* p = core ? core : "unknown"; *p; ++p)
    name += static_cast<char>(std::tolower(static_cast<unsigned char>(*p)));
#endif
  return name;
}

/// The kernel for `wanted` (PROMOE_GEMM: "", "eigen" or "openblas") when OpenBLAS reports
/// kernel `openblas_core` ("" when promoe was built without OpenBLAS).
inline host_gemm_kernel pick_host_gemm_kernel(std::string_view wanted, std::string_view openblas_core) {
  PROMOE_CHECK(wanted.empty() || wanted == "eigen" || wanted == "openblas", "PROMOE_GEMM=", wanted,
               " is not a GEMM kernel; expected eigen or openblas");
  PROMOE_CHECK(wanted != "openblas" || !openblas_core.empty(),
               "PROMOE_GEMM=openblas, but promoe was built without OpenBLAS (CMake option PROMOE_ENABLE_BLAS)");
  if (wanted == "openblas" || (wanted.empty() && openblas_kernel_is_tuned(openblas_core)))
    return host_gemm_kernel::openblas;
  return host_gemm_kernel::eigen;
}

/// The kernel chosen for this process (decided on the first call).
inline host_gemm_kernel chosen_host_gemm_kernel() {
  static const host_gemm_kernel kernel = [] {
    const char* env = std::getenv("PROMOE_GEMM");
    const host_gemm_kernel k = pick_host_gemm_kernel(env ? env : "", openblas_core_name());
#if defined(PROMOE_HAS_OPENBLAS)
    if (k == host_gemm_kernel::openblas) openblas_set_num_threads(1);
#endif
    return k;
  }();
  return kernel;
}

/// GEMMs of at most this many multiply-adds stay on Eigen's kernel: OpenBLAS 0.3.21 sends
/// them (m n k <= 100^3) to its small-matrix kernels, which malloc on every call for some
/// shapes, and they are too small for the kernels to differ in speed.
inline constexpr double openblas_min_multiply_adds = 1 << 20;

/// C[m, n] = alpha * op(A) * op(B) + beta * C through OpenBLAS (float and double); false when
/// the chosen kernel is Eigen's, the product is small or T is another type, and nothing was
/// done.
template <class T>
bool openblas_gemm(transpose ta, transpose tb, index_t m, index_t n, index_t k, T alpha, const T* a, index_t lda,
                   const T* b, index_t ldb, T beta, T* c, index_t ldc) {
#if defined(PROMOE_HAS_OPENBLAS)
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    if (static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k) <= openblas_min_multiply_adds ||
        chosen_host_gemm_kernel() != host_gemm_kernel::openblas)
      return false;
    const auto op = [](transpose t) { return t == transpose::yes ? CblasTrans : CblasNoTrans; };
    PROMOE_CHECK(std::max({m, n, k, lda, ldb, ldc}) <= index_t{2147483647}, "OpenBLAS: GEMM dimensions beyond 32-bit (m ",
                 m, ", n ", n, ", k ", k, ")");
    const auto i = [](index_t v) { return static_cast<int>(v); };
    if constexpr (std::is_same_v<T, float>) {
      cblas_sgemm(CblasRowMajor, op(ta), op(tb), i(m), i(n), i(k), alpha, a, i(lda), b, i(ldb), beta, c, i(ldc));
    } else {
      cblas_dgemm(CblasRowMajor, op(ta), op(tb), i(m), i(n), i(k), alpha, a, i(lda), b, i(ldb), beta, c, i(ldc));
    }
    return true;
  }
#else
  (void)ta, (void)tb, (void)m, (void)n, (void)k, (void)alpha, (void)a, (void)lda, (void)b, (void)ldb, (void)beta,
      (void)c, (void)ldc;
#endif
  return false;
}

}  // namespace promoe::detail
