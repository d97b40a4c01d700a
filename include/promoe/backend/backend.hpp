// SPDX-License-Identifier: Apache-2.0
/// \file backend.hpp
/// \brief Backend tags, the primary backend_traits template and the Backend concept.
///
/// Backends:
///  - backend::cpu    : host memory, loops under OpenMP, GEMM through Eigen (BLAS when
///                      EIGEN_USE_BLAS). Include <promoe/backend/cpu.hpp>.
///  - backend::thrust : any Thrust device system (CPP or OMP on the host, CUDA on a GPU).
///                      Include <promoe/backend/thrust.hpp>.
#pragma once

#include <cstdint>
#include <concepts>
#include <type_traits>

#include "../core/config.hpp"

namespace promoe {

namespace backend {
struct cpu {};
struct thrust {};
}  // namespace backend

namespace detail {
template <class>
inline constexpr bool always_false = false;

/// Host loops shorter than this run serially: opening a parallel region costs more than a
/// hundred short per-token bodies, and far more when the cores are oversubscribed.
inline constexpr index_t serial_below = 128;
}  // namespace detail

/// Specialised once per backend tag; the primary template names what is missing.
template <class Tag>
struct backend_traits {
  static_assert(detail::always_false<Tag>,
                "promoe: no backend_traits<Tag> for this tag. Use backend::cpu "
                "(<promoe/backend/cpu.hpp>) or backend::thrust (<promoe/backend/thrust.hpp>), or "
                "specialise backend_traits for your own tag.");
};

enum class transpose : bool { no = false, yes = true };

/// One GEMM of a grouped GEMM (ops::gemm_grouped): C[m, n] = alpha * op(A) * op(B) + beta * C,
/// row-major with leading dimensions, pointers in the backend's memory space.
template <class T>
struct gemm_problem {
  transpose ta, tb;
  index_t m, n, k;
  T alpha;
  const T* a;
  index_t lda;
  const T* b;
  index_t ldb;
  T beta;
  T* c;
  index_t ldc;
};

namespace detail {
/// A functor type used only to check the Backend concept.
struct probe_functor {
  PROMOE_HOST_DEVICE void operator()(index_t) const {}
};
struct probe_task {
  void operator()(index_t) const {}
};
}  // namespace detail

/// The buffer type of backend B for T (thrust::device_vector, std::vector, ...).
template <class B, class T>
using buffer_t = typename backend_traits<B>::template buffer<T>;

/// What the library needs from a backend. Every pointer is in the backend's memory space.
template <class B>
concept Backend = requires(index_t n, float* f, const float* cf, double* d, const double* cd,
                           const std::int32_t* keys, index_t* idx, float* host) {
  typename buffer_t<B, float>;
  typename buffer_t<B, double>;
  // run f(i) for i in [0, n), in any order, possibly concurrently
  backend_traits<B>::parallel_for(n, detail::probe_functor{});
  // run host-side tasks task(i), i in [0, n), possibly on several threads
  backend_traits<B>::parallel_tasks(n, detail::probe_task{});
  { backend_traits<B>::concurrent_tasks } -> std::convertible_to<bool>;
  // C = alpha op(A) op(B) + beta C, row-major
  backend_traits<B>::gemm(transpose::no, transpose::no, n, n, n, 1.0f, cf, n, cf, n, 0.0f, f, n);
  backend_traits<B>::gemm(transpose::no, transpose::no, n, n, n, 1.0, cd, n, cd, n, 0.0, d, n);
  // stable grouping of indices by key in [0, num_keys); negative keys dropped
  backend_traits<B>::group_by_key(keys, n, n, idx, idx);
  backend_traits<B>::copy_to_host(cf, n, host);
  backend_traits<B>::copy_from_host(cf, n, f);
  backend_traits<B>::copy(cf, n, f);
  backend_traits<B>::fill(f, n, 0.0f);
  { backend_traits<B>::sum(cd, n) } -> std::same_as<double>;
  { backend_traits<B>::first_non_finite(cf, n) } -> std::same_as<index_t>;
  // wait for queued device work (timing)
  backend_traits<B>::synchronize();
};

}  // namespace promoe
