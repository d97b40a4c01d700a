// SPDX-License-Identifier: Apache-2.0
/// \file cublas_gemm.hpp
/// \brief Row-major GEMM on device pointers through cuBLAS (the Thrust backend's GEMM under
/// the CUDA device system): float32 and float64 GEMMs, float32 GEMMs on bf16 tensor cores under
/// matmul_precision::bf16, and bf16 GEMMs (bf16 A, B and C, float32 accumulation).
/// Needs <cublas_v2.h> and linking with cuBLAS (CUDA::cublas).
#pragma once

#include <cublas_v2.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <type_traits>
#include <vector>

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

/// A leading dimension as cuBLAS's int: at least 1, as cuBLAS wants even for an empty operand
/// (k = 0). Sizes go over as they are: k = 0 is valid and means C = beta C.
inline int cublas_ld(index_t ld) { return static_cast<int>(ld > 0 ? ld : 1); }
/// Whether every size fits cuBLAS's 32-bit int.
template <class... V>
bool fit_cublas_int(V... v) {
  return ((v < (index_t{1} << 31)) && ...);
}

/// For i in [0, batch): C_i[m, n] = alpha * op(A_i) * op(B_i) + beta * C_i, all row-major with
/// leading dimensions, X_i = x + i * stride_x (one strided-batched call; batch 1 is a plain
/// GEMM). cuBLAS is column-major: a row-major C is a column-major C^T = op(B)^T op(A)^T, so
/// the operands swap places and keep their transpose flags.
/// (A grouped GEMM's problems swap the same way: cublas_gemm_grouped.)
template <class T>
void cublas_gemm_strided_batched(transpose ta, transpose tb, index_t m, index_t n, index_t k, T alpha, const T* a,
                                 index_t lda, index_t stride_a, const T* b, index_t ldb, index_t stride_b, T beta, T* c,
                                 index_t ldc, index_t stride_c, index_t batch) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double> || std::is_same_v<T, bf16>,
                "cublas_gemm: float, double or bf16");
  if (m == 0 || n == 0 || batch == 0) return;
  const cublasOperation_t opa = ta == transpose::yes ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t opb = tb == transpose::yes ? CUBLAS_OP_T : CUBLAS_OP_N;
  PROMOE_CHECK(fit_cublas_int(m, n, k, lda, ldb, ldc, batch), "cuBLAS: GEMM dimensions beyond 32-bit (m ", m, ", n ",
               n, ", k ", k, ", batch ", batch, ")");
  const int mi = static_cast<int>(m), ni = static_cast<int>(n), ki = static_cast<int>(k);
  cublasHandle_t h = cublas_handle();
  const auto sa = static_cast<long long>(stride_a), sb = static_cast<long long>(stride_b),
             sc = static_cast<long long>(stride_c);
  // cuBLAS's S or D GEMM, plain or strided-batched.
  const auto run_gemm = [&](auto plain, auto batched, const char* plain_name, const char* batched_name) {
    if (batch == 1) {
      cublas_check(plain(h, opb, opa, ni, mi, ki, &alpha, b, cublas_ld(ldb), a, cublas_ld(lda), &beta, c,
                         cublas_ld(ldc)),
                   plain_name, m, n, k);
    } else {
      cublas_check(batched(h, opb, opa, ni, mi, ki, &alpha, b, cublas_ld(ldb), sb, a, cublas_ld(lda), sa, &beta, c,
                           cublas_ld(ldc), sc, static_cast<int>(batch)),
                   batched_name, m, n, k);
    }
  };
  // cublasGemmEx / cublasGemmStridedBatchedEx on operands and C of cuBLAS type `type`, alpha and
  // beta as float (the 32F compute types' scaling type).
  const auto run_gemm_ex = [&](cudaDataType_t type, cublasComputeType_t compute, const char* name) {
    const float alpha_f = static_cast<float>(alpha), beta_f = static_cast<float>(beta);
    if (batch == 1) {
      cublas_check(cublasGemmEx(h, opb, opa, ni, mi, ki, &alpha_f, b, type, cublas_ld(ldb), a, type, cublas_ld(lda),
                                &beta_f, c, type, cublas_ld(ldc), compute, CUBLAS_GEMM_DEFAULT),
                   name, m, n, k);
    } else {
      cublas_check(cublasGemmStridedBatchedEx(h, opb, opa, ni, mi, ki, &alpha_f, b, type, cublas_ld(ldb), sb, a,
                                              type, cublas_ld(lda), sa, &beta_f, c, type, cublas_ld(ldc), sc,
                                              static_cast<int>(batch), compute, CUBLAS_GEMM_DEFAULT),
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

/// Pointers for cuBLAS's grouped GEMM, written into device memory by a kernel whose argument
/// carries them: ordered on the stream with the GEMMs before and after it, with no host
/// synchronisation and no staging buffer the host could overwrite too early.
struct device_pointer_batch {
  static constexpr int capacity = 96;  // 768 bytes of kernel argument
  void* pointers[capacity];
  int count;
};

template <class Batch>  // a template: defined in every translation unit without an ODR clash
__global__ void write_device_pointers(Batch batch, void** out) {
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (i < batch.count) out[i] = batch.pointers[i];
}

/// The calling thread's device array of pointers for grouped GEMMs; grows (cudaFree waits for
/// the device, so a grouped GEMM still queued keeps its array) and is kept for the next call.
inline void** grouped_gemm_pointer_array(std::size_t count) {
  struct holder {
    void** data = nullptr;
    std::size_t capacity = 0;
    ~holder() {
      if (data) cudaFree(data);
    }
  };
  thread_local holder h;
  if (count > h.capacity) {
    if (h.data) cudaFree(h.data);
    h.data = nullptr;
    const cudaError_t e = cudaMalloc(reinterpret_cast<void**>(&h.data), count * sizeof(void*));
    PROMOE_CHECK(e == cudaSuccess, "cuBLAS grouped GEMM: cudaMalloc of ", count, " pointers failed: ",
                 cudaGetErrorName(e));
    h.capacity = count;
  }
  return h.data;
}

/// Every problem of a grouped GEMM (row-major, as ops::gemm_grouped): one
/// cublasGemmGroupedBatchedEx call with one group per problem (the experts' row counts
/// differ). Sizes, transposes and scales are host arrays; the A, B and C pointer arrays go to
/// the device by write_device_pointers. Run as plain GEMMs instead: float64, float under
/// matmul_precision::bf16, cuBLAS before 12.5; and problems the grouped call cannot take (k = 0,
/// or a pointer or leading dimension off 16-byte alignment: cuBLAS cannot see the pointers in
/// device memory to pick a kernel for them, as cublasGemmEx does).
template <class T>
void cublas_gemm_grouped(std::span<const gemm_problem<T>> problems) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double> || std::is_same_v<T, bf16>,
                "cublas_gemm_grouped: float, double or bf16");
  const auto plain = [](const gemm_problem<T>& p) {
    cublas_gemm_strided_batched(p.ta, p.tb, p.m, p.n, p.k, p.alpha, p.a, p.lda, 0, p.b, p.ldb, 0, p.beta, p.c, p.ldc,
                                0, 1);
  };
  constexpr std::size_t align = 16;
  const auto aligned = [](const void* ptr, index_t ld) {
    return reinterpret_cast<std::uintptr_t>(ptr) % align == 0 &&
           (static_cast<std::size_t>(ld) * sizeof(T)) % align == 0;
  };
  // empty problems do nothing; the grouped call takes the rest unless in_group says no
  const auto in_group = [&](const gemm_problem<T>& p) {
    return p.k > 0 && aligned(p.a, p.lda) && aligned(p.b, p.ldb) && aligned(p.c, p.ldc);
  };
  const auto one_by_one = [&] {
    for (const gemm_problem<T>& p : problems) plain(p);
  };
#if CUBLAS_VERSION < 120500
  (void)in_group;
  one_by_one();  // cublasGemmGroupedBatchedEx arrived in cuBLAS 12.5
#else
  if constexpr (std::is_same_v<T, double>) {
    return one_by_one();  // float64 (tests, references): no grouped path needed
  } else if constexpr (std::is_same_v<T, float>) {
    if (get_matmul_precision() == matmul_precision::bf16) return one_by_one();
  }
  using scale = float;  // the scaling type of CUBLAS_COMPUTE_32F
  struct host_arrays {
    std::vector<cublasOperation_t> opa, opb;
    std::vector<int> m, n, k, lda, ldb, ldc, size;
    std::vector<scale> alpha, beta;
    std::vector<void*> pointers;  // B of every group, then A, then C (cuBLAS's A, B, C)
    std::vector<const gemm_problem<T>*> grouped;  // the problems of the grouped call
  };
  thread_local host_arrays h;  // reused: no allocation once grown
  for (auto* v : {&h.m, &h.n, &h.k, &h.lda, &h.ldb, &h.ldc, &h.size}) v->clear();
  h.opa.clear();
  h.opb.clear();
  h.alpha.clear();
  h.beta.clear();
  h.pointers.clear();
  h.grouped.clear();
  for (const gemm_problem<T>& p : problems) {
    if (p.m == 0 || p.n == 0) continue;
    if (!in_group(p)) {
      plain(p);
      continue;
    }
    PROMOE_CHECK(fit_cublas_int(p.m, p.n, p.k, p.lda, p.ldb, p.ldc), "cuBLAS: grouped GEMM dimensions beyond 32-bit (m ",
                 p.m, ", n ", p.n, ", k ", p.k, ")");
    h.grouped.push_back(&p);
    // row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: operands swap
    h.opa.push_back(p.tb == transpose::yes ? CUBLAS_OP_T : CUBLAS_OP_N);
    h.opb.push_back(p.ta == transpose::yes ? CUBLAS_OP_T : CUBLAS_OP_N);
    h.m.push_back(static_cast<int>(p.n));
    h.n.push_back(static_cast<int>(p.m));
    h.k.push_back(static_cast<int>(p.k));
    h.lda.push_back(cublas_ld(p.ldb));
    h.ldb.push_back(cublas_ld(p.lda));
    h.ldc.push_back(cublas_ld(p.ldc));
    h.size.push_back(1);
    h.alpha.push_back(static_cast<scale>(p.alpha));
    h.beta.push_back(static_cast<scale>(p.beta));
  }
  const std::size_t groups = h.grouped.size();
  if (groups == 0) return;
  h.pointers.resize(3 * groups);
  for (std::size_t g = 0; g < groups; ++g) {
    h.pointers[g] = const_cast<T*>(h.grouped[g]->b);
    h.pointers[groups + g] = const_cast<T*>(h.grouped[g]->a);
    h.pointers[2 * groups + g] = h.grouped[g]->c;
  }
  cublasHandle_t handle = cublas_handle();
  cudaStream_t stream = nullptr;
  cublas_check(cublasGetStream(handle, &stream), "cublasGetStream", 0, 0, 0);
  void** device_pointers = grouped_gemm_pointer_array(h.pointers.size());
  // clear a stale non-error status (cudaEventQuery's "not ready") so the check below sees
  // only these launches; our own calls check their results where they are made
  (void)cudaGetLastError();
  for (std::size_t first = 0; first < h.pointers.size(); first += device_pointer_batch::capacity) {
    device_pointer_batch batch{};
    batch.count = static_cast<int>(std::min<std::size_t>(device_pointer_batch::capacity, h.pointers.size() - first));
    for (int i = 0; i < batch.count; ++i) batch.pointers[i] = h.pointers[first + static_cast<std::size_t>(i)];
    write_device_pointers<<<1, device_pointer_batch::capacity, 0, stream>>>(batch, device_pointers + first);
  }
  const cudaError_t launched = cudaGetLastError();
  PROMOE_CHECK(launched == cudaSuccess, "cuBLAS grouped GEMM: launching the kernel that writes the pointer arrays "
               "failed: ", cudaGetErrorName(launched));
  // float32, or bf16 tensors; float32 accumulation either way
  const cudaDataType_t type = std::is_same_v<T, bf16> ? CUDA_R_16BF : CUDA_R_32F;
  const cublasComputeType_t compute = CUBLAS_COMPUTE_32F;
  const int count = static_cast<int>(groups);
  const cublasStatus_t st = cublasGemmGroupedBatchedEx(
      handle, h.opa.data(), h.opb.data(), h.m.data(), h.n.data(), h.k.data(), h.alpha.data(), device_pointers, type,
      h.lda.data(), device_pointers + groups, type, h.ldb.data(), h.beta.data(),
      device_pointers + 2 * groups, type, h.ldc.data(), count, h.size.data(), compute);
  if (st == CUBLAS_STATUS_NOT_SUPPORTED) {  // the others ran above
    for (const gemm_problem<T>* p : h.grouped) plain(*p);
    return;
  }
  cublas_check(st, "cublasGemmGroupedBatchedEx", h.n.front(), h.m.front(), h.k.front());
#endif
}

/// C[m, n] = alpha * op(A) * op(B) + beta * C, all row-major with leading dimensions.
template <class T>
void cublas_gemm(transpose ta, transpose tb, index_t m, index_t n, index_t k, T alpha, const T* a, index_t lda,
                 const T* b, index_t ldb, T beta, T* c, index_t ldc) {
  cublas_gemm_strided_batched(ta, tb, m, n, k, alpha, a, lda, 0, b, ldb, 0, beta, c, ldc, 0, 1);
}

}  // namespace promoe::detail
