// SPDX-License-Identifier: Apache-2.0
/// \file position_embedding.hpp
/// \brief DiT's fixed 2-D sin-cos position embedding `pos_embed` [1, T, D] (MAE / DiT
/// get_2d_sincos_pos_embed) and nn::position_embedding, which adds it to the patch tokens.
///
/// For token t = row * grid_w + col of the patch grid and D divisible by 4, with
/// w_k = 10000^(-k / (D/4)), k = 0 .. D/4 - 1:
///   pos[t, 0     .. D/4)  = sin(col * w_k)      pos[t, D/4  .. D/2)  = cos(col * w_k)
///   pos[t, D/2   .. 3D/4) = sin(row * w_k)      pos[t, 3D/4 .. D)    = cos(row * w_k)
/// i.e. the first half encodes the token's COLUMN and the second its ROW, each half sin first.
/// (The reference builds grid = meshgrid(grid_w, grid_h), so grid[0], which feeds the first
/// half, holds the column index.) Computed in float64, then rounded to T once.
#pragma once

#include <cmath>
#include <string>
#include <vector>

#include "../backend/backend.hpp"
#include "../backend/tensor.hpp"
#include "../core/error.hpp"

namespace promoe::nn {

/// The 2-D sin-cos embedding of a grid_h x grid_w patch grid: host values [grid_h * grid_w, dim]
/// (row-major; token t = row * grid_w + col), float64. dim must be a positive multiple of 4.
inline std::vector<double> sincos_2d_position_embedding(index_t dim, index_t grid_h, index_t grid_w) {
  PROMOE_CHECK(dim >= 4 && dim % 4 == 0, "sincos_2d_position_embedding: embedding dimension D = ", dim,
               " must be a positive multiple of 4 (D/2 channels per axis, each half sin then cos)");
  PROMOE_CHECK(grid_h >= 1 && grid_w >= 1, "sincos_2d_position_embedding: grid ", grid_h, " x ", grid_w,
               " must have positive sizes");
  const index_t quarter = dim / 4;
  // omega_k = 1 / 10000^(k / (D/4)), as numpy: omega = arange(D/4) / (D/4); 1. / 10000**omega
  std::vector<double> omega(static_cast<std::size_t>(quarter));
  for (index_t k = 0; k < quarter; ++k)
    omega[k] = 1.0 / std::pow(10000.0, static_cast<double>(k) / static_cast<double>(quarter));
  std::vector<double> pos(static_cast<std::size_t>(grid_h * grid_w * dim));
  for (index_t row = 0; row < grid_h; ++row)
    for (index_t col = 0; col < grid_w; ++col) {
      double* p = pos.data() + (row * grid_w + col) * dim;
      for (index_t k = 0; k < quarter; ++k) {
        const double a_col = static_cast<double>(col) * omega[k];
        const double a_row = static_cast<double>(row) * omega[k];
        p[k] = std::sin(a_col);
        p[quarter + k] = std::cos(a_col);
        p[2 * quarter + k] = std::sin(a_row);
        p[3 * quarter + k] = std::cos(a_row);
      }
    }
  return pos;
}

/// The square-grid form of the reference: get_2d_sincos_pos_embed(dim, grid_size).
inline std::vector<double> sincos_2d_position_embedding(index_t dim, index_t grid_size) {
  return sincos_2d_position_embedding(dim, grid_size, grid_size);
}

namespace detail {
/// x[r, :] += pos[r % tokens, :] for one token row.
template <class T>
struct add_position_embedding_functor {
  T* x;  // [N*T, D], leading dimension ld
  index_t ld;
  const T* pos;  // [T, D]
  index_t tokens, dim;
  PROMOE_HOST_DEVICE void operator()(index_t r) const {
    T* row = x + r * ld;
    const T* p = pos + (r % tokens) * dim;
    for (index_t j = 0; j < dim; ++j) row[j] += p[j];
  }
};
}  // namespace detail

/// The fixed position embedding of DiT: a buffer `pos_embed` [1, T, D] (in the state dict,
/// never trained, so it has no gradient and backward is the identity).
template <class T, class B>
class position_embedding {
 public:
  using backend_type = B;
  using value_type = T;

  position_embedding() = default;
  /// The embedding of a grid_h x grid_w patch grid (T = grid_h * grid_w tokens).
  position_embedding(index_t dim, index_t grid_h, index_t grid_w) : dim_(dim), grid_h_(grid_h), grid_w_(grid_w) {
    const auto host = sincos_2d_position_embedding(dim, grid_h, grid_w);
    std::vector<T> values(host.begin(), host.end());
    value = tensor<T, B>::from_host(values, {1, grid_h * grid_w, dim});
  }
  /// A square grid_size x grid_size grid, as DiT.
  position_embedding(index_t dim, index_t grid_size) : position_embedding(dim, grid_size, grid_size) {}

  index_t dim() const { return dim_; }
  index_t grid_h() const { return grid_h_; }
  index_t grid_w() const { return grid_w_; }
  index_t tokens() const { return grid_h_ * grid_w_; }

  /// x [N*T, D] += pos_embed: token row n*T + t gets row t (in place; the gradient passes
  /// through unchanged, so there is no backward).
  void forward(matrix_view<T> x) const {
    PROMOE_CHECK(x.cols == dim_ && tokens() > 0 && x.rows % tokens() == 0, "nn::position_embedding: x is [", x.rows,
                 ", ", x.cols, "], expected [N*T, ", dim_, "] with T = ", tokens(), " tokens per image (",
                 grid_h_, " x ", grid_w_, " grid)");
    backend_traits<B>::parallel_for(
        x.rows, detail::add_position_embedding_functor<T>{x.data, x.ld, value.data(), tokens(), dim_});
  }

  /// f(named_parameter) for the buffer `prefix`pos_embed [1, T, D], with grad == nullptr
  /// (DiT's prefix is "").
  template <class F>
  void for_each_buffer(const std::string& prefix, F&& f) {
    f(named_parameter<T>{prefix + "pos_embed", value.shape(), value.data(), nullptr});
  }

  tensor<T, B> value;  ///< [1, T, D]

 private:
  index_t dim_ = 0, grid_h_ = 0, grid_w_ = 0;
};

}  // namespace promoe::nn
