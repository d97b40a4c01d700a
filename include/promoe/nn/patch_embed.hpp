// SPDX-License-Identifier: Apache-2.0
/// \file patch_embed.hpp
/// \brief nn::patch_embed: DiT's `x_embedder`, a Conv2d(C, D, kernel = stride = p) computed as
/// patchify (NCHW images -> one row per p x p patch, flattened in (C, p, p) order) followed by
/// a linear map with the conv weight viewed as [D, C*p*p]. Also nn::patch_grid (the geometry
/// of a batch of images cut into patches), nn::patchify and its adjoint, which
/// final_layer.hpp's unpatchify shares.
#pragma once

#include <string>

#include "../backend/init.hpp"
#include "../backend/ops.hpp"
#include "../backend/tensor.hpp"
#include "../core/error.hpp"
#include "../core/rng.hpp"
#include "linear.hpp"
#include "parameter.hpp"

namespace promoe::nn {

/// A batch of `batch` NCHW images of `channels` x `height` x `width`, cut into `patch` x
/// `patch` patches: a grid_h() x grid_w() grid per image. Token t of image n is the patch at
/// grid row t / grid_w() and grid column t % grid_w() (row-major), and sits in token row
/// n * tokens() + t. Images are the rows of a matrix [batch, channels * height * width].
struct patch_grid {
  index_t batch = 0;
  index_t channels = 1;
  index_t height = 1;
  index_t width = 1;
  index_t patch = 1;

  index_t grid_h() const { return height / patch; }
  index_t grid_w() const { return width / patch; }
  /// Tokens per image.
  index_t tokens() const { return grid_h() * grid_w(); }
  /// Token rows of the batch.
  index_t rows() const { return batch * tokens(); }
  /// Values per token: channels * patch * patch.
  index_t patch_dim() const { return channels * patch * patch; }
  /// Values per image: channels * height * width.
  index_t image_size() const { return channels * height * width; }

  /// Throws promoe::error (message prefixed by `fn`) unless batch >= 0, the other sizes are
  /// positive and the patch size divides height and width.
  void check(const char* fn) const {
    PROMOE_CHECK(batch >= 0 && channels >= 1 && height >= 1 && width >= 1 && patch >= 1, fn,
                 ": image batch [", batch, ", ", channels, ", ", height, ", ", width, "] (N, C, H, W) with patch size ",
                 patch, ": N must be >= 0 and C, H, W and the patch size positive");
    PROMOE_CHECK(height % patch == 0 && width % patch == 0, fn, ": input size ", height, " x ", width,
                 " (H x W) is not divisible by the patch size ", patch);
  }
};

namespace detail {

/// Copies one token row between a patch row and its pixels in the images. Columns of the token
/// row are in (C, p, p) order (patch embedding) or, when channels_last, (p, p, C) order (the
/// final layer's output). to_images copies token -> pixels, otherwise pixels -> token;
/// accumulate adds instead of writing. Each pixel belongs to exactly one token (stride =
/// kernel), so concurrent rows never touch the same element.
template <class T>
struct patch_copy_functor {
  const T* src;  // to_images: tokens [N*T, C*p*p] (ld src_ld); else images [N, C*H*W] (ld src_ld)
  index_t src_ld;
  T* dst;  // to_images: images [N, C*H*W] (ld dst_ld); else tokens [N*T, C*p*p] (ld dst_ld)
  index_t dst_ld;
  index_t channels, height, width, patch, grid_w, tokens;
  bool channels_last, to_images, accumulate;

  PROMOE_HOST_DEVICE void operator()(index_t r) const {
    const index_t n = r / tokens, t = r % tokens;
    const index_t y0 = (t / grid_w) * patch, x0 = (t % grid_w) * patch;
    const index_t image_ld = to_images ? dst_ld : src_ld, token_ld = to_images ? src_ld : dst_ld;
    const index_t image_base = n * image_ld, token_base = r * token_ld;
    for (index_t c = 0; c < channels; ++c)
      for (index_t i = 0; i < patch; ++i)
        for (index_t j = 0; j < patch; ++j) {
          const index_t pixel = image_base + (c * height + y0 + i) * width + x0 + j;
          const index_t col = channels_last ? (i * patch + j) * channels + c : (c * patch + i) * patch + j;
          const index_t from = to_images ? token_base + col : pixel;
          const index_t to = to_images ? pixel : token_base + col;
          dst[to] = accumulate ? T(dst[to] + src[from]) : src[from];
        }
  }
};

inline void check_patch_views(const char* fn, const patch_grid& g, index_t image_rows, index_t image_cols,
                       index_t token_rows, index_t token_cols, const char* image_name, const char* token_name) {
  g.check(fn);
  PROMOE_CHECK(image_rows == g.batch && image_cols == g.image_size(), fn, ": ", image_name, " is [", image_rows,
               ", ", image_cols, "], expected [", g.batch, ", ", g.image_size(), "] (N images of C*H*W = ",
               g.channels, "*", g.height, "*", g.width, ")");
  PROMOE_CHECK(token_rows == g.rows() && token_cols == g.patch_dim(), fn, ": ", token_name, " is [", token_rows,
               ", ", token_cols, "], expected [", g.rows(), ", ", g.patch_dim(), "] (N*T = ", g.batch, "*",
               g.tokens(), " token rows of C*p*p = ", g.channels, "*", g.patch, "*", g.patch, ")");
}

template <class B, class T>
void run_patch_copy(const T* src, index_t src_ld, T* dst, index_t dst_ld, const patch_grid& g, bool channels_last,
                    bool to_images, bool accumulate) {
  backend_traits<B>::parallel_for(
      g.rows(), patch_copy_functor<T>{src, src_ld, dst, dst_ld, g.channels, g.height, g.width, g.patch, g.grid_w(),
                                      g.tokens(), channels_last, to_images, accumulate});
}

}  // namespace detail

/// patches [N*T, C*p*p] = the p x p patches of images [N, C*H*W], columns in (C, p, p) order
/// (the order of a Conv2d weight [D, C, p, p] flattened).
template <class B, class T>
void patchify(const_matrix_view<T> images, const patch_grid& g, matrix_view<T> patches) {
  detail::check_patch_views("patchify", g, images.rows, images.cols, patches.rows, patches.cols, "images",
                                  "patches");
  detail::run_patch_copy<B>(images.data, images.ld, patches.data, patches.ld, g, false, false, false);
}

/// The adjoint of patchify: dimages [N, C*H*W] += the patch rows dpatches [N*T, C*p*p] put
/// back at their pixels.
template <class B, class T>
void patchify_backward(const_matrix_view<T> dpatches, const patch_grid& g, matrix_view<T> dimages) {
  detail::check_patch_views("patchify_backward", g, dimages.rows, dimages.cols, dpatches.rows, dpatches.cols,
                                  "dimages", "dpatches");
  detail::run_patch_copy<B>(dpatches.data, dpatches.ld, dimages.data, dimages.ld, g, false, true, true);
}

/// DiT's x_embedder: y [N*T, D] = patchify(x) W^T + b, W the Conv2d weight [D, C, p, p]
/// viewed as [D, C*p*p].
template <class T, class B>
class patch_embed {
 public:
  using backend_type = B;
  using value_type = T;
  /// The prefix of this module in the reference DiT state dict.
  static constexpr const char* default_prefix = "x_embedder.";

  /// What backward needs, and its scratch; owned by the caller, reused across calls.
  struct cache {
    patch_grid grid;        ///< geometry of the last forward
    tensor<T, B> patches;   ///< [N*T, C*p*p] the patchified input
    tensor<T, B> dpatches;  ///< [N*T, C*p*p] backward scratch
    tensor<T, B> ones;      ///< at least N*T ones (bias gradient)
  };

  patch_embed() = default;
  patch_embed(index_t in_channels, index_t dim, index_t patch_size)
      : channels_(in_channels), dim_(dim), patch_(patch_size) {
    PROMOE_CHECK(in_channels >= 1 && dim >= 1 && patch_size >= 1,
                 "nn::patch_embed: in_channels, dim and patch_size must be positive, got ", in_channels, ", ", dim,
                 ", ", patch_size);
    proj = linear<T, B>(in_channels * patch_size * patch_size, dim, true);
    // Same values as [D, C*p*p]; the state-dict shape is the Conv2d's.
    proj.weight.resize({dim, in_channels, patch_size, patch_size});
  }

  index_t in_channels() const { return channels_; }
  index_t dim() const { return dim_; }
  index_t patch_size() const { return patch_; }
  /// Inputs of the linear map: C * p * p.
  index_t patch_dim() const { return channels_ * patch_ * patch_; }

  /// The patch grid of `batch` images of height x width (checked: p must divide both).
  patch_grid grid(index_t batch, index_t height, index_t width) const {
    patch_grid g{batch, channels_, height, width, patch_};
    g.check("nn::patch_embed");
    return g;
  }
  /// Tokens per image of height x width (checked).
  index_t num_tokens(index_t height, index_t width) const { return grid(0, height, width).tokens(); }

  /// Xavier-uniform on the flattened weight [D, C*p*p], zero bias (DiT's initialize_weights).
  void init_xavier(rng& gen) { proj.init_xavier(gen); }

  /// y [N*T, D] = patchify(x) W^T + b for x [N, C*H*W] (one contiguous NCHW image per row;
  /// N = x.rows), token rows image-major, patches row-major within an image.
  void forward(const_matrix_view<T> x, index_t height, index_t width, matrix_view<T> y, cache& c) const {
    const patch_grid g = grid(x.rows, height, width);
    PROMOE_CHECK(x.cols == g.image_size(), "nn::patch_embed: x is [", x.rows, ", ", x.cols, "], expected [", x.rows,
                 ", ", g.image_size(), "] (C*H*W = ", channels_, "*", height, "*", width, ")");
    PROMOE_CHECK(y.rows == g.rows() && y.cols == dim_, "nn::patch_embed: y is [", y.rows, ", ", y.cols,
                 "], expected [", g.rows(), ", ", dim_, "] (N*T = ", g.batch, "*", g.tokens(), " tokens of D = ",
                 dim_, ")");
    c.grid = g;
    c.patches.resize({g.rows(), patch_dim()});
    patchify<B, T>(x, g, c.patches.matrix());
    proj.forward(c.patches.cmatrix(), y);
  }

  /// Accumulates the weight and bias gradients of dy [N*T, D]; dx [N, C*H*W] += the input
  /// gradient unless dx is empty (dx.data == nullptr).
  void backward(const_matrix_view<T> dy, matrix_view<T> dx, cache& c) {
    const patch_grid& g = c.grid;
    PROMOE_CHECK(dy.rows == g.rows() && dy.cols == dim_, "nn::patch_embed::backward: dy is [", dy.rows, ", ",
                 dy.cols, "], expected [", g.rows(), ", ", dim_, "] (the forward's y)");
    if (dx.data)
      PROMOE_CHECK(dx.rows == g.batch && dx.cols == g.image_size(), "nn::patch_embed::backward: dx is [", dx.rows,
                   ", ", dx.cols, "], expected [", g.batch, ", ", g.image_size(), "] (the forward's x)");
    if (g.rows() == 0) return;
    if (c.ones.size() < g.rows()) {
      c.ones.resize({g.rows()});
      c.ones.fill(T(1));
    }
    matrix_view<T> dpatches{};
    if (dx.data) {
      c.dpatches.resize({g.rows(), patch_dim()});
      c.dpatches.fill(T(0));
      dpatches = c.dpatches.matrix();
    }
    proj.backward(c.patches.cmatrix(), dy, dpatches, c.ones.data());
    if (dx.data) patchify_backward<B, T>(c.dpatches.cmatrix(), g, dx);
  }

  void zero_grad() { proj.zero_grad(); }

  /// f(named_parameter) for `prefix`proj.weight [D, C, p, p] and `prefix`proj.bias [D]
  /// (prefix "x_embedder." in DiT).
  template <class F>
  void for_each_parameter(const std::string& prefix, F&& f) {
    proj.for_each_parameter(prefix + "proj.", f);
  }

  /// The Conv2d as a linear map: weight [D, C, p, p] (a [D, C*p*p] matrix), bias [D].
  linear<T, B> proj;

 private:
  index_t channels_ = 0, dim_ = 0, patch_ = 1;
};

}  // namespace promoe::nn
