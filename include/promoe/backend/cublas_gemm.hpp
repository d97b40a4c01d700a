// SPDX-License-Identifier: Apache-2.0
/// \file cublas_gemm.hpp
/// \brief Row-major GEMM on device pointers through cuBLAS (the Thrust backend's GEMM under
/// the CUDA device system): float32 and float64 GEMMs, float32 GEMMs on bf16 tensor cores under
/// matmul_precision::bf16, and bf16 GEMMs (bf16 A, B and C, float32 accumulation).
/// Needs <cublas_v2.h> and linking with cuBLAS (CUDA::cublas).
#pragma once

#include <cublas_v2.h>

#include <type_traits>

#include "../core/bf16.hpp"
#include "../core/error.hpp"
#include "../core/precision.hpp"
#include "backend.hpp"

namespace promoe::detail {

/// The calling thread's cuBLAS handle, created on first use (on the current device, default
/// stream, host pointer mode) and destroyed with the thread.
inline cublasHandle_t cublas_handle() {
  struct holder {
    cublasHandle_t handle = nullptr;
    holder() {
      const cublasStatus_t st = cublasCreate(&handle);
      if (st != CUBLAS_STATUS_SUCCESS)
        fail("cuBLAS: cublasCreate failed (", cublasGetStatusName(st), ": ", cublasGetStatusString(st),
             "); is a CUDA device available?");
    }
    ~holder() {
      if (handle) cublasDestroy(handle);
    }
    holder(const holder&) = delete;
    holder& operator=(const holder&) = delete;
  };
  thread_local holder h;
  return h.handle;
}

inline void cublas_check(cublasStatus_t st, const char* what, index_t m, index_t n, index_t k) {
  if (st != CUBLAS_STATUS_SUCCESS)
    fail("cuBLAS: ", what, " (m ", m, ", n ", n, ", k ", k, ") failed: ", cublasGetStatusName(st), ": ",
         cublasGetStatusString(st));
}

/// For i in [0, batch): C_i[m, n] = alpha * op(A_i) * op(B_i) + beta * C_i, all row-major with
/// leading dimensions, X_i = x + i * stride_x (one strided-batched call; batch 1 is a plain
/// GEMM). cuBLAS is column-major: a row-major C is a column-major C^T = op(B)^T op(A)^T, so
/// the operands swap places and keep their transpose flags.
template <class T>
void cublas_gemm_strided_batched(transpose ta, transpose tb, index_t m, index_t n, index_t k, T alpha, const T* a,
                                 index_t lda, index_t stride_a, const T* b, index_t ldb, index_t stride_b, T beta, T* c,
                                 index_t ldc, index_t stride_c, index_t batch) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double> || std::is_same_v<T, bf16>,
                "cublas_gemm: float, double or bf16");
  if (m == 0 || n == 0 || batch == 0) return;
  const cublasOperation_t opa = ta == transpose::yes ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t opb = tb == transpose::yes ? CUBLAS_OP_T : CUBLAS_OP_N;
  // cuBLAS wants every leading dimension >= 1 even when an operand is empty (k = 0)
  const auto i32 = [](index_t v) { return static_cast<int>(v > 0 ? v : 1); };
  PROMOE_CHECK(m < (index_t{1} << 31) && n < (index_t{1} << 31) && k < (index_t{1} << 31) && lda < (index_t{1} << 31) &&
                   ldb < (index_t{1} << 31) && ldc < (index_t{1} << 31) && batch < (index_t{1} << 31),
               "cuBLAS: GEMM dimensions beyond 32-bit (m ", m, ", n ", n, ", k ", k, ", batch ", batch, ")");
  cublasHandle_t h = cublas_handle();
  const auto sa = static_cast<long long>(stride_a), sb = static_cast<long long>(stride_b),
             sc = static_cast<long long>(stride_c);
  // cuBLAS's S or D GEMM, plain or strided-batched.
  const auto run_gemm = [&](auto plain, auto batched, const char* plain_name, const char* batched_name) {
    if (batch == 1) {
      cublas_check(plain(h, opb, opa, i32(n), i32(m), i32(k), &alpha, b, i32(ldb), a, i32(lda), &beta, c, i32(ldc)),
                   plain_name, m, n, k);
    } else {
      cublas_check(batched(h, opb, opa, i32(n), i32(m), i32(k), &alpha, b, i32(ldb), sb, a, i32(lda), sa, &beta, c,
                           i32(ldc), sc, i32(batch)),
                   batched_name, m, n, k);
    }
  };
  // cublasGemmEx / cublasGemmStridedBatchedEx on operands and C of cuBLAS type `type`, alpha and
  // beta as float (the 32F compute types' scaling type).
  const auto run_gemm_ex = [&](cudaDataType_t type, cublasComputeType_t compute, const char* name) {
    const float alpha_f = static_cast<float>(alpha), beta_f = static_cast<float>(beta);
    if (batch == 1) {
      cublas_check(cublasGemmEx(h, opb, opa, i32(n), i32(m), i32(k), &alpha_f, b, type, i32(ldb), a, type, i32(lda),
                                &beta_f, c, type, i32(ldc), compute, CUBLAS_GEMM_DEFAULT),
                   name, m, n, k);
    } else {
      cublas_check(cublasGemmStridedBatchedEx(h, opb, opa, i32(n), i32(m), i32(k), &alpha_f, b, type, i32(ldb), sb, a,
                                              type, i32(lda), sa, &beta_f, c, type, i32(ldc), sc, i32(batch), compute,
                                              CUBLAS_GEMM_DEFAULT),
                   name, m, n, k);
    }
  };
  if constexpr (std::is_same_v<T, bf16>) {
    // bf16 tensors (the layout of __nv_bfloat16): tensor cores, float32 accumulation, C rounded.
    run_gemm_ex(CUDA_R_16BF, CUBLAS_COMPUTE_32F, "cublasGemmEx (bf16 tensors)");
  } else if constexpr (std::is_same_v<T, float>) {
    if (get_matmul_precision() == matmul_precision::bf16) {
      // bf16 tensor cores: operands converted to bf16, float32 accumulation and output.
      run_gemm_ex(CUDA_R_32F, CUBLAS_COMPUTE_32F_FAST_16BF, "cublasGemmEx (bf16 precision)");
      return;
    }
    run_gemm(cublasSgemm, cublasSgemmStridedBatched, "cublasSgemm", "cublasSgemmStridedBatched");
  } else {
    run_gemm(cublasDgemm, cublasDgemmStridedBatched, "cublasDgemm", "cublasDgemmStridedBatched");
  }
}

/// C[m, n] = alpha * op(A) * op(B) + beta * C, all row-major with leading dimensions.
template <class T>
void cublas_gemm(transpose ta, transpose tb, index_t m, index_t n, index_t k, T alpha, const T* a, index_t lda,
                 const T* b, index_t ldb, T beta, T* c, index_t ldc) {
  cublas_gemm_strided_batched(ta, tb, m, n, k, alpha, a, lda, 0, b, ldb, 0, beta, c, ldc, 0, 1);
}

}  // namespace promoe::detail
