// SPDX-License-Identifier: Apache-2.0
/// \file thrust.hpp
/// \brief backend::thrust: buffers are thrust::device_vector and loops thrust::for_each on the
/// configured device system (THRUST_DEVICE_SYSTEM: CPP, OMP or CUDA).
///
/// On host device systems (CPP, OMP) "device" memory is host memory, so GEMMs go to Eigen
/// exactly as on backend::cpu. Under CUDA, GEMMs go to cuBLAS when PROMOE_HAS_CUBLAS is
/// defined (the promoe::thrust target links CUDA::cublas and defines it); otherwise a plain
/// one-thread-per-element kernel through the functor mechanism runs them (correct, not fast).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <deque>
#include <span>
#include <vector>

#include <thrust/binary_search.h>
#include <thrust/copy.h>
#include <thrust/device_free.h>
#include <thrust/device_malloc.h>
#include <thrust/device_vector.h>
#include <thrust/execution_policy.h>
#include <thrust/fill.h>
#include <thrust/find.h>
#include <thrust/for_each.h>
#include <thrust/iterator/counting_iterator.h>
#include <thrust/iterator/transform_iterator.h>
#include <thrust/reduce.h>
#include <thrust/sequence.h>
#include <thrust/sort.h>
#include <thrust/transform.h>

#if THRUST_DEVICE_SYSTEM == THRUST_DEVICE_SYSTEM_CUDA
#include <thrust/system/cuda/execution_policy.h>
#endif

#include "../core/bf16.hpp"
#include "../core/error.hpp"
#include "backend.hpp"
#include "counting_sort.hpp"

#if THRUST_DEVICE_SYSTEM != THRUST_DEVICE_SYSTEM_CUDA
#include "host_gemm.hpp"
#elif defined(PROMOE_HAS_CUBLAS)
#include "cublas_gemm.hpp"
#endif

namespace promoe {

namespace detail {

/// One thread per element of C: the portable GEMM used when no vendor GEMM is wired in.
template <class T>
struct naive_gemm_functor {
  bool ta, tb;
  index_t n, k;
  T alpha, beta;
  const T* a;  // [m, k] (or [k, m] when ta), row-major, leading dimension lda
  index_t lda;
  const T* b;  // [k, n] (or [n, k] when tb), row-major, leading dimension ldb
  index_t ldb;
  T* c;  // [m, n], leading dimension ldc
  index_t ldc;

  PROMOE_HOST_DEVICE void operator()(index_t idx) const {
    const index_t i = idx / n, j = idx % n;
    using C = compute_t<T>;  // bf16 products accumulate in float
    C acc = 0;
    for (index_t p = 0; p < k; ++p) {
      const C av = ta ? a[p * lda + i] : a[i * lda + p];
      const C bv = tb ? b[j * ldb + p] : b[p * ldb + j];
      acc += av * bv;
    }
    T& out = c[i * ldc + j];
    out = (beta == T(0) ? C(0) : C(beta) * C(out)) + C(alpha) * acc;
  }
};

/// Thrust's temporary storage (sorts, reductions) from blocks that are kept and reused: the
/// calling thread's blocks, the smallest free one that fits, else a new one. A training step
/// asks for the same sizes every time, so after the first it allocates nothing (on a GPU, no
/// cudaMalloc / cudaFree per sort; those synchronise the device).
class temporary_allocator {
 public:
  using value_type = char;

  char* allocate(std::ptrdiff_t bytes) {
    block* best = nullptr;
    for (block& b : blocks_)
      if (!b.in_use && b.bytes >= bytes && (!best || b.bytes < best->bytes)) best = &b;
    if (!best) {
      const std::ptrdiff_t size = std::max<std::ptrdiff_t>(bytes, 256);
      blocks_.push_back({::thrust::device_malloc<char>(static_cast<std::size_t>(size)), size, false});
      best = &blocks_.back();
    }
    best->in_use = true;
    return ::thrust::raw_pointer_cast(best->memory);
  }
  void deallocate(char* p, std::size_t) {
    for (block& b : blocks_)
      if (::thrust::raw_pointer_cast(b.memory) == p) b.in_use = false;
  }
  ~temporary_allocator() {
    for (block& b : blocks_) {
      try {
        ::thrust::device_free(b.memory);
      } catch (...) {
        // at process exit the CUDA runtime may already be gone; the memory goes with it
      }
    }
  }

  /// The calling thread's allocator.
  static temporary_allocator& of_this_thread() {
    thread_local temporary_allocator a;
    return a;
  }

 private:
  struct block {
    ::thrust::device_ptr<char> memory;
    std::ptrdiff_t bytes;
    bool in_use;
  };
  std::vector<block> blocks_;
};

#if THRUST_DEVICE_SYSTEM == THRUST_DEVICE_SYSTEM_CUDA
/// Host-to-device copies that do not wait for the device. A plain copy from pageable memory
/// (thrust::copy_n, cudaMemcpy) waits for all queued work first: every upload of a step's
/// labels, times or routing masks would be a host synchronisation. Here the bytes go into a
/// ring of pinned staging memory and cudaMemcpyAsync queues the copy on the default stream, in
/// order with the kernels around it. A region of the ring is written again only after the
/// copy out of it has finished (an event per copy; with 8 MiB of ring that wait almost never
/// happens). Copies larger than half the ring go the plain way.
class upload_ring {
 public:
  static constexpr std::size_t capacity = std::size_t{8} << 20;
  static constexpr std::size_t alignment = 256;

  void upload(const void* src, std::size_t bytes, void* dst) {
    if (bytes == 0) return;
    if (bytes > capacity / 2 || !ensure_staging()) {
      check(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice), "cudaMemcpy");
      return;
    }
    const std::size_t size = (bytes + alignment - 1) / alignment * alignment;
    if (head_ + size > capacity) head_ = 0;
    // retire the copies that have finished (oldest first), which keeps the list short
    while (!in_flight_.empty() && cudaEventQuery(in_flight_.front().done) == cudaSuccess) retire(0);
    // then wait for any earlier copy still reading the region about to be written
    for (std::size_t i = 0; i < in_flight_.size();) {
      const copy& c = in_flight_[i];
      if (c.begin < head_ + size && head_ < c.end) {
        check(cudaEventSynchronize(c.done), "cudaEventSynchronize");
        retire(i);
      } else {
        ++i;
      }
    }
    char* stage = staging_ + head_;
    std::memcpy(stage, src, bytes);
    check(cudaMemcpyAsync(dst, stage, bytes, cudaMemcpyHostToDevice, cudaStreamLegacy), "cudaMemcpyAsync");
    cudaEvent_t done;
    if (free_events_.empty()) {
      check(cudaEventCreateWithFlags(&done, cudaEventDisableTiming), "cudaEventCreate");
    } else {
      done = free_events_.back();
      free_events_.pop_back();
    }
    check(cudaEventRecord(done, cudaStreamLegacy), "cudaEventRecord");
    in_flight_.push_back({head_, head_ + size, done});
    head_ += size;
  }

  /// The calling thread's ring.
  static upload_ring& of_this_thread() {
    thread_local upload_ring r;
    return r;
  }

  upload_ring() = default;
  upload_ring(const upload_ring&) = delete;
  upload_ring& operator=(const upload_ring&) = delete;
  ~upload_ring() {
    // at process exit the CUDA runtime may already be gone; errors are ignored here
    for (const copy& c : in_flight_) {
      cudaEventSynchronize(c.done);
      cudaEventDestroy(c.done);
    }
    for (cudaEvent_t e : free_events_) cudaEventDestroy(e);
    if (staging_) cudaFreeHost(staging_);
  }

 private:
  struct copy {
    std::size_t begin, end;
    cudaEvent_t done;
  };

  void retire(std::size_t i) {
    free_events_.push_back(in_flight_[i].done);
    in_flight_.erase(in_flight_.begin() + static_cast<std::ptrdiff_t>(i));
  }
  bool ensure_staging() {
    if (!staging_ && !failed_) failed_ = cudaMallocHost(reinterpret_cast<void**>(&staging_), capacity) != cudaSuccess;
    if (failed_) (void)cudaGetLastError();  // no pinned memory: plain copies, and a clean error state
    return staging_ != nullptr;
  }
  static void check(cudaError_t e, const char* what) {
    PROMOE_CHECK(e == cudaSuccess, "CUDA upload: ", what, " failed: ", cudaGetErrorName(e), " (",
                 cudaGetErrorString(e), ")");
  }

  char* staging_ = nullptr;
  bool failed_ = false;
  std::size_t head_ = 0;
  std::deque<copy> in_flight_;  // in the order issued
  std::vector<cudaEvent_t> free_events_;
};
#endif

/// The execution policy of work whose result stays on the device: on CUDA par_nosync (queued
/// on the default stream, in order with the other launches and cuBLAS; the host goes on and
/// meets the results at its next copy to the host), elsewhere thrust::device; temporary
/// storage from temporary_allocator.
inline auto queued() {
#if THRUST_DEVICE_SYSTEM == THRUST_DEVICE_SYSTEM_CUDA
  return ::thrust::cuda::par_nosync(temporary_allocator::of_this_thread());
#else
  return ::thrust::device(temporary_allocator::of_this_thread());
#endif
}

/// The policy of work whose result the host reads right away (reductions): synchronous,
/// temporary storage from temporary_allocator.
inline auto synchronous() { return ::thrust::device(temporary_allocator::of_this_thread()); }

/// Typed scratch of n elements from temporary_allocator for one scope.
template <class U>
class temporary_array {
 public:
  explicit temporary_array(index_t n)
      : memory_(temporary_allocator::of_this_thread().allocate(static_cast<std::ptrdiff_t>(sizeof(U)) * n)) {}
  ~temporary_array() { temporary_allocator::of_this_thread().deallocate(memory_, 0); }
  temporary_array(const temporary_array&) = delete;
  temporary_array& operator=(const temporary_array&) = delete;
  ::thrust::device_ptr<U> begin() const { return ::thrust::device_pointer_cast(reinterpret_cast<U*>(memory_)); }

 private:
  char* memory_;
};

template <class T>
struct is_not_finite {
  PROMOE_HOST_DEVICE bool operator()(T v) const {
    using std::isfinite;
    return !isfinite(v);
  }
};

template <class T>
struct to_double {
  PROMOE_HOST_DEVICE double operator()(T v) const { return static_cast<double>(v); }
};

/// Keys outside [0, num_keys) map to num_keys.
struct clamp_key {
  std::int32_t num_keys;
  PROMOE_HOST_DEVICE std::int32_t operator()(std::int32_t k) const { return k >= 0 && k < num_keys ? k : num_keys; }
};

}  // namespace detail

template <>
struct backend_traits<backend::thrust> {
  static constexpr const char* name = "thrust";
  static constexpr bool host_accessible = THRUST_DEVICE_SYSTEM != THRUST_DEVICE_SYSTEM_CUDA;
  /// parallel_tasks runs tasks one after another: fewer, larger operations are better.
  static constexpr bool concurrent_tasks = false;
  /// Columns per call of a column reduction: one on a GPU (neighbouring threads then read
  /// neighbouring addresses), a vector's worth on the host.
  static constexpr index_t column_block = THRUST_DEVICE_SYSTEM == THRUST_DEVICE_SYSTEM_CUDA ? 1 : 16;

  template <class T>
  using buffer = ::thrust::device_vector<T>;

  /// Waits for the device's queued work (timing, or before the host reads results some
  /// other way than through a buffer) and reports a failed launch or copy.
  static void synchronize() {
#if THRUST_DEVICE_SYSTEM == THRUST_DEVICE_SYSTEM_CUDA
    const cudaError_t e = cudaDeviceSynchronize();
    PROMOE_CHECK(e == cudaSuccess, "CUDA device: ", cudaGetErrorName(e), " (", cudaGetErrorString(e), ")");
#endif
  }

  template <class T>
  static T* raw(buffer<T>& b) { return ::thrust::raw_pointer_cast(b.data()); }
  template <class T>
  static const T* raw(const buffer<T>& b) { return ::thrust::raw_pointer_cast(b.data()); }

  /// f(i) for every i in [0, n) on the device system; on host systems short loops stay
  /// serial (detail::serial_below).
  template <class F>
  static void parallel_for(index_t n, F f) {
    if (n <= 0) return;
    if constexpr (host_accessible) {
      if (n < detail::serial_below) {
        for (index_t i = 0; i < n; ++i) f(i);
        return;
      }
    }
    ::thrust::for_each_n(detail::queued(), ::thrust::counting_iterator<index_t>(0), n, f);
  }

  /// task(i) for every i in [0, n), one after another: each task's own operations are the
  /// parallel ones on a device.
  template <class F>
  static void parallel_tasks(index_t n, F&& task) {
    for (index_t i = 0; i < n; ++i) task(i);
  }

  template <class T>
  static void gemm(transpose ta, transpose tb, index_t m, index_t n, index_t k, T alpha, const T* a,
                   index_t lda, const T* b, index_t ldb, T beta, T* c, index_t ldc) {
#if THRUST_DEVICE_SYSTEM != THRUST_DEVICE_SYSTEM_CUDA
    detail::host_gemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
#elif defined(PROMOE_HAS_CUBLAS)
    detail::cublas_gemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
#else
    if (m == 0 || n == 0) return;
    parallel_for(m * n, detail::naive_gemm_functor<T>{ta == transpose::yes, tb == transpose::yes, n, k,
                                                      alpha, beta, a, lda, b, ldb, c, ldc});
#endif
  }

#if THRUST_DEVICE_SYSTEM == THRUST_DEVICE_SYSTEM_CUDA && defined(PROMOE_HAS_CUBLAS)
  /// C_i = alpha * op(A_i) * op(B_i) + beta * C_i for i in [0, batch), X_i = x + i * stride_x:
  /// one cuBLAS call. (Elsewhere ops::gemm_strided_batched runs one gemm after another.)
  template <class T>
  static void gemm_strided_batched(transpose ta, transpose tb, index_t m, index_t n, index_t k, T alpha, const T* a,
                                   index_t lda, index_t stride_a, const T* b, index_t ldb, index_t stride_b, T beta,
                                   T* c, index_t ldc, index_t stride_c, index_t batch) {
    detail::cublas_gemm_strided_batched(ta, tb, m, n, k, alpha, a, lda, stride_a, b, ldb, stride_b, beta, c, ldc,
                                        stride_c, batch);
  }
  /// Every problem in one cuBLAS grouped GEMM. (Elsewhere ops::gemm_grouped runs one gemm
  /// after another.)
  template <class T>
  static void gemm_grouped(std::span<const gemm_problem<T>> problems) {
    detail::cublas_gemm_grouped(problems);
  }
#endif

  /// Stable grouping by key. On a GPU: keys outside [0, num_keys) become num_keys (so they
  /// sort last and are dropped), one stable sort of (key, index) pairs (the pairs and the
  /// sort's temporary storage from temporary_allocator), then a vectorised lower_bound for the group
  /// offsets. (Mapping first also sidesteps radix sorts that misorder negative keys in some
  /// Thrust releases.) On host systems the host's counting sort: Thrust's host sorts take
  /// temporary buffers of their own on every call.
  static void group_by_key(const std::int32_t* keys, index_t n, index_t num_keys, index_t* order,
                           index_t* offsets) {
    if constexpr (host_accessible) {
      detail::host_group_by_key(keys, n, num_keys, order, offsets);
      return;
    }
    auto k = ::thrust::device_pointer_cast(keys);
    const detail::temporary_array<std::int32_t> sorted_keys(n);
    const detail::temporary_array<index_t> indices(n);
    const auto sorted = sorted_keys.begin();
    const auto idx = indices.begin();
    ::thrust::transform(detail::queued(), k, k + n, sorted, detail::clamp_key{static_cast<std::int32_t>(num_keys)});
    ::thrust::sequence(detail::queued(), idx, idx + n);
    ::thrust::stable_sort_by_key(detail::queued(), sorted, sorted + n, idx);
    auto off = ::thrust::device_pointer_cast(offsets);
    ::thrust::lower_bound(detail::queued(), sorted, sorted + n, ::thrust::counting_iterator<std::int32_t>(0),
                          ::thrust::counting_iterator<std::int32_t>(static_cast<std::int32_t>(num_keys + 1)),
                          off);
    const index_t kept = off[num_keys];
    ::thrust::copy_n(detail::queued(), idx, kept, ::thrust::device_pointer_cast(order));
  }

  template <class T>
  static void copy_to_host(const T* src, index_t n, T* host_dst) {
    if (n > 0) ::thrust::copy_n(::thrust::device_pointer_cast(src), n, host_dst);
  }
  /// Host to device. On a GPU queued without waiting for the device (detail::upload_ring): the
  /// host may reuse host_src as soon as this returns.
  template <class T>
  static void copy_from_host(const T* host_src, index_t n, T* dst) {
    if (n <= 0) return;
#if THRUST_DEVICE_SYSTEM == THRUST_DEVICE_SYSTEM_CUDA
    detail::upload_ring::of_this_thread().upload(host_src, sizeof(T) * static_cast<std::size_t>(n), dst);
#else
    ::thrust::copy_n(host_src, n, ::thrust::device_pointer_cast(dst));
#endif
  }
  template <class T>
  static void copy(const T* src, index_t n, T* dst) {
    if (n > 0)
      ::thrust::copy_n(detail::queued(), ::thrust::device_pointer_cast(src), n, ::thrust::device_pointer_cast(dst));
  }
  template <class T>
  static void fill(T* p, index_t n, T value) {
    if (n > 0) ::thrust::fill_n(detail::queued(), ::thrust::device_pointer_cast(p), n, value);
  }
  template <class T>
  static T sum(const T* p, index_t n) {
    if (n <= 0) return T(0);
    auto first = ::thrust::make_transform_iterator(::thrust::device_pointer_cast(p), detail::to_double<T>{});
    return static_cast<T>(::thrust::reduce(detail::synchronous(), first, first + n, 0.0));
  }
  template <class T>
  static index_t first_non_finite(const T* p, index_t n) {
    if (n <= 0) return -1;
    auto first = ::thrust::device_pointer_cast(p);
    auto it = ::thrust::find_if(detail::synchronous(), first, first + n, detail::is_not_finite<T>{});
    return it == first + n ? index_t{-1} : static_cast<index_t>(it - first);
  }
};

static_assert(Backend<backend::thrust>);

}  // namespace promoe
