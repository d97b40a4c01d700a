// SPDX-License-Identifier: Apache-2.0
/// \file tensor.hpp
/// \brief tensor<T, B>: an owning, shaped buffer in backend B's memory.
#pragma once

#include <cstddef>
#include <functional>
#include <initializer_list>
#include <numeric>
#include <string>
#include <vector>

#include "../core/error.hpp"
#include "../core/view.hpp"
#include "backend.hpp"

namespace promoe {

/// A dense row-major tensor. resize() keeps the allocation when it shrinks, so buffers that
/// live across calls (caches, workspaces) stop allocating once they have seen the largest batch.
template <class T, class B>
class tensor {
 public:
  using traits = backend_traits<B>;
  using value_type = T;

  tensor() = default;
  explicit tensor(std::vector<index_t> shape) { resize(std::move(shape)); }

  /// Copies host values in; checks the count against the shape.
  static tensor from_host(const std::vector<T>& values, std::vector<index_t> shape) {
    tensor t(std::move(shape));
    PROMOE_CHECK(static_cast<index_t>(values.size()) == t.size(), "tensor::from_host: ", values.size(),
                 " values for shape ", detail::shape_string(t.shape()), " (", t.size(), " elements)");
    traits::copy_from_host(values.data(), t.size(), t.data());
    return t;
  }

  /// New shape; keeps the allocation (and allocates nothing) when the size does not grow.
  void resize(std::initializer_list<index_t> shape) { resize_(shape.begin(), shape.end()); }
  void resize(const std::vector<index_t>& shape) { resize_(shape.begin(), shape.end()); }

  T* data() { return size_ ? traits::raw(buf_) : nullptr; }
  const T* data() const { return size_ ? traits::raw(buf_) : nullptr; }
  index_t size() const { return size_; }
  const std::vector<index_t>& shape() const { return shape_; }
  index_t dim(std::size_t i) const { return shape_.at(i); }
  index_t rank() const { return static_cast<index_t>(shape_.size()); }

  void fill(T v) { traits::fill(data(), size_, v); }

  /// The tensor as a matrix: first dimension rows, the product of the rest columns
  /// (so a [0, D] tensor is a 0 x D matrix).
  matrix_view<T> matrix() { return {data(), rows_(), cols_()}; }
  const_matrix_view<T> matrix() const { return {data(), rows_(), cols_()}; }
  const_matrix_view<T> cmatrix() const { return matrix(); }

  std::vector<T> to_host() const {
    std::vector<T> out;
    to_host(out);
    return out;
  }
  /// Into `out` (resized; no allocation once it has the capacity).
  void to_host(std::vector<T>& out) const {
    out.resize(static_cast<std::size_t>(size_));
    traits::copy_to_host(data(), size_, out.data());
  }

 private:
  template <class It>
  void resize_(It first, It last) {
    index_t n = 1;
    for (It d = first; d != last; ++d) {
      PROMOE_CHECK(*d >= 0, "tensor::resize: negative dimension in shape ",
                   detail::shape_string(std::vector<index_t>(first, last)));
      n *= *d;
    }
    shape_.assign(first, last);  // within capacity: no allocation
    size_ = n;
    if (static_cast<index_t>(buf_.size()) < n) buf_.resize(static_cast<std::size_t>(n));
  }

  index_t rows_() const { return shape_.empty() ? 1 : shape_[0]; }
  index_t cols_() const {
    index_t c = 1;
    for (std::size_t i = 1; i < shape_.size(); ++i) c *= shape_[i];
    return c;
  }

  typename traits::template buffer<T> buf_;
  std::vector<index_t> shape_;
  index_t size_ = 0;
};

/// Pointer to slice i along the first dimension (expert i of a batched [E, ...] tensor);
/// const or not, as the tensor is.
template <class Tensor>
auto slice(Tensor& t, index_t i) {
  return t.data() + i * (t.size() / t.dim(0));
}

/// A parameter as a state-dict entry: its PyTorch name, shape and pointers to the value and
/// gradient (backend memory). Batched expert weights give one entry per expert.
template <class T>
struct named_parameter {
  std::string name;
  std::vector<index_t> shape;
  T* value = nullptr;
  T* grad = nullptr;
  index_t size() const { return std::accumulate(shape.begin(), shape.end(), index_t{1}, std::multiplies<>{}); }
};

namespace detail {
/// Accepts any named_parameter; used to check for_each_parameter in concepts.
struct parameter_sink {
  template <class P>
  void operator()(P&&) const {}
};
}  // namespace detail

}  // namespace promoe
