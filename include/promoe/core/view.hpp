// SPDX-License-Identifier: Apache-2.0
/// \file view.hpp
/// \brief matrix_view: a non-owning row-major matrix in some backend's memory.
#pragma once

#include <type_traits>

#include "bf16.hpp"
#include "config.hpp"

namespace promoe {

/// Row-major matrix: element (r, c) at data[r * ld + c]. The pointer lives in the memory
/// space of the backend that made it (host for cpu, device for thrust-CUDA).
template <class T>
struct matrix_view {
  T* data = nullptr;
  index_t rows = 0;
  index_t cols = 0;
  index_t ld = 0;  ///< leading dimension (>= cols)

  constexpr matrix_view() = default;
  constexpr matrix_view(T* p, index_t r, index_t c) : data(p), rows(r), cols(c), ld(c) {}
  constexpr matrix_view(T* p, index_t r, index_t c, index_t l) : data(p), rows(r), cols(c), ld(l) {}

  /// A view of non-const T converts to a view of const T.
  template <class U>
    requires(std::is_same_v<const U, T> && !std::is_same_v<U, T>)
  constexpr matrix_view(const matrix_view<U>& o) : data(o.data), rows(o.rows), cols(o.cols), ld(o.ld) {}

  PROMOE_HOST_DEVICE T* row(index_t r) const { return data + r * ld; }
  constexpr bool empty() const { return rows == 0 || cols == 0; }
  /// Rows [first, first + count).
  constexpr matrix_view row_block(index_t first, index_t count) const {
    return {data + first * ld, count, cols, ld};
  }
  /// Columns [first, first + count).
  constexpr matrix_view col_block(index_t first, index_t count) const {
    return {data + first, rows, count, ld};
  }
};

template <class T>
using const_matrix_view = matrix_view<const T>;

}  // namespace promoe
