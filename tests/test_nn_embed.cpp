// SPDX-License-Identifier: Apache-2.0
/// \file test_nn_embed.cpp
/// \brief DiT's embedders and final layer: patch_embed (and patchify), the 2-D sin-cos
/// pos_embed, timestep_embedder, label_embedder (and label dropout), final_layer (and
/// unpatchify). Forward passes against naive float64 loops, pos_embed against a literal
/// transcription of the reference numpy get_2d_sincos_pos_embed, central finite differences in
/// float64 for every parameter and input gradient, and the error messages.

#include <cmath>
#include <cstdint>
#include <set>
#include <span>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include <promoe/nn/final_layer.hpp>
#include <promoe/nn/label_embedder.hpp>
#include <promoe/nn/patch_embed.hpp>
#include <promoe/nn/position_embedding.hpp>
#include <promoe/nn/timestep_embedder.hpp>

#include "backends.hpp"

using Catch::Contains;
using promoe::index_t;
using promoe::matrix_view;
using promoe::const_matrix_view;
using promoe::tensor;
namespace nn = promoe::nn;

namespace {

template <class T>
std::vector<double> as_double(const std::vector<T>& v) {
  return {v.begin(), v.end()};
}

template <class T>
std::vector<T> as(const std::vector<double>& v) {
  return {v.begin(), v.end()};
}

/// Element-wise |actual - expected| <= tol * (1 + |expected|).
template <class T>
void check_close(const std::vector<T>& actual, const std::vector<double>& expected, double tol, const char* what) {
  REQUIRE(actual.size() == expected.size());
  double worst = 0;
  std::size_t at = 0;
  for (std::size_t i = 0; i < actual.size(); ++i) {
    const double e = std::abs(static_cast<double>(actual[i]) - expected[i]) / (1.0 + std::abs(expected[i]));
    if (e > worst) worst = e, at = i;
  }
  INFO(what << ": worst scaled error " << worst << " at " << at);
  CHECK(worst <= tol);
}

double silu(double x) { return x / (1.0 + std::exp(-x)); }

/// y [rows, out] = x [rows, in] W^T + b, W [out, in].
std::vector<double> naive_linear(const std::vector<double>& x, index_t rows, index_t in, const std::vector<double>& w,
                                 const std::vector<double>& b, index_t out) {
  std::vector<double> y(static_cast<std::size_t>(rows * out));
  for (index_t r = 0; r < rows; ++r)
    for (index_t o = 0; o < out; ++o) {
      double s = b[o];
      for (index_t i = 0; i < in; ++i) s += x[r * in + i] * w[o * in + i];
      y[r * out + o] = s;
    }
  return y;
}

/// Sets every parameter of `module` to uniform values in [-scale, scale) (seeded by name
/// order) and returns them on the host, in visiting order.
template <class T, class B, class Module>
std::vector<std::vector<double>> randomise(Module& m, const std::string& prefix, std::uint64_t seed,
                                           double scale = 0.5) {
  std::vector<std::vector<double>> values;
  m.for_each_parameter(prefix, [&](const promoe::named_parameter<T>& p) {
    const auto v = random_vector<T>(static_cast<std::size_t>(p.size()), seed++, scale);
    promoe::backend_traits<B>::copy_from_host(v.data(), p.size(), p.value);
    values.push_back(as_double(v));
  });
  return values;
}

/// The objective sum(w * y) and its central finite differences, for checking backward.
template <class B>
struct finite_difference {
  using traits = promoe::backend_traits<B>;

  static double get(const double* p) {
    double v;
    traits::copy_to_host(p, 1, &v);
    return v;
  }
  static void set(double* p, double v) { traits::copy_from_host(&v, 1, p); }

  /// Checks `analytic` (host) against the central differences of objective() in the n values
  /// at value_ptr (backend memory): norm-wise relative error < 1e-6.
  template <class Objective>
  static void check(const std::string& what, Objective&& objective, double* value_ptr,
                    const std::vector<double>& analytic) {
    const double eps = 1e-6;
    const auto n = static_cast<index_t>(analytic.size());
    std::vector<double> numeric(analytic.size());
    for (index_t i = 0; i < n; ++i) {
      const double v = get(value_ptr + i);
      set(value_ptr + i, v + eps);
      const double up = objective();
      set(value_ptr + i, v - eps);
      const double down = objective();
      set(value_ptr + i, v);
      numeric[i] = (up - down) / (2 * eps);
    }
    double diff = 0, scale = 0;
    for (index_t i = 0; i < n; ++i) {
      diff += (analytic[i] - numeric[i]) * (analytic[i] - numeric[i]);
      scale += numeric[i] * numeric[i];
    }
    diff = std::sqrt(diff);
    scale = std::sqrt(scale);
    INFO(what << ": |analytic - numeric| = " << diff << ", |numeric| = " << scale);
    REQUIRE(scale > 1e-8);  // a gradient that vanishes identically would test nothing
    CHECK(diff / scale < 1e-6);
  }
};

double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (std::size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

/// images [N, C, H, W] -> patches [N*T, C*p*p], columns (C, p, p): the Conv2d's view.
std::vector<double> naive_patchify(const std::vector<double>& x, const nn::patch_grid& g) {
  std::vector<double> out(static_cast<std::size_t>(g.rows() * g.patch_dim()));
  const index_t p = g.patch, gw = g.width / p, gh = g.height / p;
  for (index_t n = 0; n < g.batch; ++n)
    for (index_t gy = 0; gy < gh; ++gy)
      for (index_t gx = 0; gx < gw; ++gx)
        for (index_t c = 0; c < g.channels; ++c)
          for (index_t i = 0; i < p; ++i)
            for (index_t j = 0; j < p; ++j)
              out[(n * gh * gw + gy * gw + gx) * g.patch_dim() + (c * p + i) * p + j] =
                  x[((n * g.channels + c) * g.height + gy * p + i) * g.width + gx * p + j];
  return out;
}

/// tokens [N*T, p*p*C], columns (p, q, C) -> images [N, C, H, W]: the reference's
/// reshape(N, h, w, p, q, C), einsum('nhwpqc->nchpwq'), reshape(N, C, h*p, w*q).
std::vector<double> naive_unpatchify(const std::vector<double>& tok, const nn::patch_grid& g) {
  const index_t p = g.patch, h = g.height / p, w = g.width / p, C = g.channels;
  std::vector<double> img(static_cast<std::size_t>(g.batch * g.image_size()));
  for (index_t n = 0; n < g.batch; ++n)
    for (index_t hh = 0; hh < h; ++hh)
      for (index_t ww = 0; ww < w; ++ww)
        for (index_t pp = 0; pp < p; ++pp)
          for (index_t qq = 0; qq < p; ++qq)
            for (index_t c = 0; c < C; ++c) {
              const double v = tok[((((n * h + hh) * w + ww) * p + pp) * p + qq) * C + c];  // (n, h, w, p, q, c)
              img[((n * C + c) * h * p + hh * p + pp) * (w * p) + ww * p + qq] = v;         // (n, c, h*p+p, w*q+q)
            }
  return img;
}

}  // namespace

// ---------------------------------------------------------------------------
// patch_embed, patchify
// ---------------------------------------------------------------------------

TEMPLATE_LIST_TEST_CASE("patch_embed: forward against a float64 convolution", "[nn][patch_embed]", test_configs) {
  using B = typename TestType::backend;
  using T = typename TestType::scalar;
  struct hw {
    index_t h, w;
  };
  for (index_t batch : {1, 3})
    for (index_t C : {1, 3})
      for (index_t p : {1, 2})
        for (hw size : {hw{4, 4}, hw{6, 6}, hw{4, 6}})
          for (index_t D : {8, 12}) {
            CAPTURE(batch, C, p, size.h, size.w, D);
            nn::patch_embed<T, B> pe(C, D, p);
            promoe::rng gen(3);
            pe.init_xavier(gen);
            // the bias is zero after init; make it matter
            const auto bias = random_vector<T>(static_cast<std::size_t>(D), 11);
            promoe::backend_traits<B>::copy_from_host(bias.data(), D, pe.proj.bias.value.data());
            const auto g = pe.grid(batch, size.h, size.w);
            const auto xh = random_vector<T>(static_cast<std::size_t>(batch * C * size.h * size.w), 5);
            auto x = to_device<B>(xh, {batch, C * size.h * size.w});
            tensor<T, B> y({g.rows(), D});
            typename nn::patch_embed<T, B>::cache c;
            pe.forward(x.cmatrix(), size.h, size.w, y.matrix(), c);

            const auto w = as_double(pe.proj.weight.value.to_host());  // [D, C, p, p]
            const auto x64 = as_double(xh);
            std::vector<double> expect(static_cast<std::size_t>(g.rows() * D));
            const index_t gw = size.w / p, tokens = (size.h / p) * gw;
            for (index_t n = 0; n < batch; ++n)
              for (index_t t = 0; t < tokens; ++t)
                for (index_t d = 0; d < D; ++d) {
                  double s = bias[d];
                  for (index_t ch = 0; ch < C; ++ch)
                    for (index_t i = 0; i < p; ++i)
                      for (index_t j = 0; j < p; ++j)
                        s += w[((d * C + ch) * p + i) * p + j] *
                             x64[((n * C + ch) * size.h + (t / gw) * p + i) * size.w + (t % gw) * p + j];
                  expect[(n * tokens + t) * D + d] = s;
                }
            check_close(y.to_host(), expect, promoe_test::tolerance<T>(), "patch_embed y");
          }
}

TEMPLATE_LIST_TEST_CASE("patch_embed: names, shapes and Xavier initialisation", "[nn][patch_embed]", test_backends) {
  using B = TestType;
  nn::patch_embed<float, B> pe(3, 8, 2);
  promoe::rng gen(1);
  pe.init_xavier(gen);
  std::vector<std::string> names;
  std::vector<std::vector<index_t>> shapes;
  pe.for_each_parameter(nn::patch_embed<float, B>::default_prefix, [&](const promoe::named_parameter<float>& p) {
    names.push_back(p.name);
    shapes.push_back(p.shape);
    CHECK(p.grad != nullptr);
  });
  CHECK(names == std::vector<std::string>{"x_embedder.proj.weight", "x_embedder.proj.bias"});
  CHECK(shapes == std::vector<std::vector<index_t>>{{8, 3, 2, 2}, {8}});
  const auto w = pe.proj.weight.value.to_host();
  const double bound = std::sqrt(6.0 / (12 + 8));  // fan_in = C*p*p = 12, fan_out = D = 8
  double max_abs = 0;
  for (float v : w) max_abs = std::max(max_abs, std::abs(static_cast<double>(v)));
  CHECK(max_abs <= bound);
  CHECK(max_abs > 0.5 * bound);
  for (float v : pe.proj.bias.value.to_host()) CHECK(v == 0.0f);
}

TEMPLATE_LIST_TEST_CASE("patchify and unpatchify: naive loops, round trips and adjointness", "[nn][patchify]",
                        test_configs) {
  using B = typename TestType::backend;
  using T = typename TestType::scalar;
  struct hw {
    index_t h, w;
  };
  for (index_t batch : {1, 3})
    for (index_t C : {1, 3})
      for (index_t p : {1, 2})
        for (hw size : {hw{4, 4}, hw{6, 6}, hw{4, 6}}) {
          CAPTURE(batch, C, p, size.h, size.w);
          const nn::patch_grid g{batch, C, size.h, size.w, p};
          const auto img_h = random_vector<T>(static_cast<std::size_t>(batch * g.image_size()), 21);
          const auto tok_h = random_vector<T>(static_cast<std::size_t>(g.rows() * g.patch_dim()), 22);
          const auto img = to_device<B>(img_h, {batch, g.image_size()});
          const auto tok = to_device<B>(tok_h, {g.rows(), g.patch_dim()});

          // forward against the loops (exact: copies)
          tensor<T, B> patches({g.rows(), g.patch_dim()});
          nn::patchify<B, T>(img.cmatrix(), g, patches.matrix());
          check_close(patches.to_host(), naive_patchify(as_double(img_h), g), 0.0, "patchify");
          tensor<T, B> images({batch, g.image_size()});
          nn::unpatchify<B, T>(tok.cmatrix(), g, images.matrix());
          check_close(images.to_host(), naive_unpatchify(as_double(tok_h), g), 0.0, "unpatchify");

          // round trip: patchify(unpatchify(tok)) is tok with columns (p, q, C) -> (C, p, q)
          tensor<T, B> again({g.rows(), g.patch_dim()});
          nn::patchify<B, T>(images.cmatrix(), g, again.matrix());
          std::vector<double> permuted(tok_h.size());
          for (index_t r = 0; r < g.rows(); ++r)
            for (index_t c = 0; c < C; ++c)
              for (index_t ij = 0; ij < p * p; ++ij)
                permuted[r * g.patch_dim() + c * p * p + ij] = tok_h[r * g.patch_dim() + ij * C + c];
          check_close(again.to_host(), permuted, 0.0, "patchify(unpatchify(tok))");
          if (C == 1) check_close(again.to_host(), as_double(tok_h), 0.0, "C = 1: identity");
          // the backward of each is its inverse: every pixel sits in exactly one patch
          tensor<T, B> back_img({batch, g.image_size()});
          back_img.fill(T(0));
          nn::patchify_backward<B, T>(patches.cmatrix(), g, back_img.matrix());
          check_close(back_img.to_host(), as_double(img_h), 0.0, "patchify_backward(patchify(x))");
          tensor<T, B> back_tok({g.rows(), g.patch_dim()});
          back_tok.fill(T(0));
          nn::unpatchify_backward<B, T>(images.cmatrix(), g, back_tok.matrix());
          check_close(back_tok.to_host(), as_double(tok_h), 0.0, "unpatchify_backward(unpatchify(t))");

          // adjointness: <patchify(x), t> = <x, patchify_backward(t)>, likewise unpatchify;
          // backward adds into a non-zero gradient
          const auto pre_img = random_vector<T>(img_h.size(), 23);
          const auto pre_tok = random_vector<T>(tok_h.size(), 24);
          auto gi = to_device<B>(pre_img, {batch, g.image_size()});
          nn::patchify_backward<B, T>(tok.cmatrix(), g, gi.matrix());
          auto gt = to_device<B>(pre_tok, {g.rows(), g.patch_dim()});
          nn::unpatchify_backward<B, T>(img.cmatrix(), g, gt.matrix());
          auto gi_h = as_double(gi.to_host());
          auto gt_h = as_double(gt.to_host());
          for (std::size_t i = 0; i < gi_h.size(); ++i) gi_h[i] -= pre_img[i];
          for (std::size_t i = 0; i < gt_h.size(); ++i) gt_h[i] -= pre_tok[i];
          const double tol = promoe_test::tolerance<T>() * static_cast<double>(tok_h.size());
          CHECK(dot(as_double(patches.to_host()), as_double(tok_h)) ==
                Approx(dot(as_double(img_h), gi_h)).epsilon(tol).margin(tol));
          CHECK(dot(as_double(images.to_host()), as_double(img_h)) ==
                Approx(dot(as_double(tok_h), gt_h)).epsilon(tol).margin(tol));
        }
}

TEMPLATE_LIST_TEST_CASE("patch_embed: finite differences for x, weight and bias", "[nn][patch_embed][gradients]",
                        test_backends) {
  using B = TestType;
  struct shape {
    index_t batch, C, p, h, w, D;
  };
  for (shape s : {shape{1, 1, 1, 4, 4, 8}, shape{3, 3, 2, 6, 6, 12}, shape{2, 3, 2, 4, 6, 8}}) {
    CAPTURE(s.batch, s.C, s.p, s.h, s.w, s.D);
    nn::patch_embed<double, B> pe(s.C, s.D, s.p);
    randomise<double, B>(pe, "", 31);
    const auto g = pe.grid(s.batch, s.h, s.w);
    auto x = to_device<B>(random_vector<double>(static_cast<std::size_t>(s.batch * g.image_size()), 32),
                          {s.batch, g.image_size()});
    const auto w = random_vector<double>(static_cast<std::size_t>(g.rows() * s.D), 33);
    const auto dy = to_device<B>(w, {g.rows(), s.D});
    typename nn::patch_embed<double, B>::cache c;
    tensor<double, B> y({g.rows(), s.D});
    auto objective = [&] {
      typename nn::patch_embed<double, B>::cache k;
      pe.forward(x.cmatrix(), s.h, s.w, y.matrix(), k);
      return dot(y.to_host(), w);
    };
    pe.forward(x.cmatrix(), s.h, s.w, y.matrix(), c);
    pe.zero_grad();
    const auto pre = random_vector<double>(static_cast<std::size_t>(x.size()), 34);
    auto dx = to_device<B>(pre, {s.batch, g.image_size()});
    pe.backward(dy.cmatrix(), dx.matrix(), c);
    auto dx_h = dx.to_host();
    for (std::size_t i = 0; i < dx_h.size(); ++i) dx_h[i] -= pre[i];  // backward adds
    finite_difference<B>::check("x", objective, x.data(), dx_h);
    pe.for_each_parameter("x_embedder.", [&](const promoe::named_parameter<double>& p) {
      std::vector<double> grad(static_cast<std::size_t>(p.size()));
      promoe::backend_traits<B>::copy_to_host(p.grad, p.size(), grad.data());
      finite_difference<B>::check(p.name, objective, p.value, grad);
    });
    // without dx, the parameter gradients are the same
    std::vector<std::vector<double>> once;
    pe.for_each_parameter("", [&](const promoe::named_parameter<double>& p) {
      once.emplace_back(static_cast<std::size_t>(p.size()));
      promoe::backend_traits<B>::copy_to_host(p.grad, p.size(), once.back().data());
    });
    pe.zero_grad();
    pe.backward(dy.cmatrix(), matrix_view<double>{}, c);
    std::size_t i = 0;
    pe.for_each_parameter("", [&](const promoe::named_parameter<double>& p) {
      std::vector<double> grad(static_cast<std::size_t>(p.size()));
      promoe::backend_traits<B>::copy_to_host(p.grad, p.size(), grad.data());
      check_close(grad, once[i++], 1e-14, "parameter gradient without dx");
    });
  }
}

// ---------------------------------------------------------------------------
// pos_embed
// ---------------------------------------------------------------------------

namespace {

/// A line-by-line transcription of the reference numpy (MAE / DiT models.py):
///   grid_h = np.arange(grid_size); grid_w = np.arange(grid_size)
///   grid = np.meshgrid(grid_w, grid_h)   # here w goes first
///   grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])
///   emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])
///   emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])
///   emb = np.concatenate([emb_h, emb_w], axis=1)
/// with get_1d: omega = arange(D/2) / (D/2); omega = 1 / 10000**omega;
///   out = einsum('m,d->md', pos.reshape(-1), omega); concatenate([sin(out), cos(out)], axis=1).
std::vector<double> numpy_1d(index_t embed_dim, const std::vector<double>& pos) {
  std::vector<double> omega(static_cast<std::size_t>(embed_dim / 2));
  for (std::size_t k = 0; k < omega.size(); ++k) omega[k] = static_cast<double>(k) / (embed_dim / 2.0);
  for (double& o : omega) o = 1.0 / std::pow(10000.0, o);
  std::vector<double> emb(pos.size() * static_cast<std::size_t>(embed_dim));
  for (std::size_t m = 0; m < pos.size(); ++m)
    for (std::size_t d = 0; d < omega.size(); ++d) {
      emb[m * embed_dim + d] = std::sin(pos[m] * omega[d]);
      emb[m * embed_dim + omega.size() + d] = std::cos(pos[m] * omega[d]);
    }
  return emb;
}

std::vector<double> numpy_2d(index_t embed_dim, index_t grid_size) {
  // np.meshgrid(grid_w, grid_h) with indexing='xy': both [grid_h, grid_w];
  // X[i][j] = grid_w[j], Y[i][j] = grid_h[i]
  std::vector<double> grid0, grid1;  // flattened row-major (reshape(-1))
  for (index_t i = 0; i < grid_size; ++i)
    for (index_t j = 0; j < grid_size; ++j) {
      grid0.push_back(static_cast<double>(j));
      grid1.push_back(static_cast<double>(i));
    }
  const auto emb_h = numpy_1d(embed_dim / 2, grid0);
  const auto emb_w = numpy_1d(embed_dim / 2, grid1);
  std::vector<double> emb;
  const std::size_t half = static_cast<std::size_t>(embed_dim / 2);
  for (std::size_t m = 0; m < grid0.size(); ++m) {
    emb.insert(emb.end(), emb_h.begin() + m * half, emb_h.begin() + (m + 1) * half);
    emb.insert(emb.end(), emb_w.begin() + m * half, emb_w.begin() + (m + 1) * half);
  }
  return emb;
}

}  // namespace

TEST_CASE("pos_embed: the reference numpy get_2d_sincos_pos_embed, 2x2 and 3x3 grids, D = 8", "[nn][pos_embed]") {
  for (index_t g : {2, 3}) {
    CAPTURE(g);
    const auto ours = nn::sincos_2d_position_embedding(8, g);
    REQUIRE(ours.size() == static_cast<std::size_t>(g * g * 8));
    check_close(ours, numpy_2d(8, g), 1e-15, "pos_embed vs numpy transcription");
  }
  // The numbers themselves, D = 8: omega = [1, 10000^(-1/2)] = [1, 0.01]; token t = row * G + col;
  // channels [sin(col w0), sin(col w1), cos(col w0), cos(col w1), sin(row w0), sin(row w1),
  // cos(row w0), cos(row w1)]: the COLUMN first, sin before cos.
  const double s1 = 0.8414709848078965, s001 = 0.009999833334166664, c1 = 0.5403023058681398,
               c001 = 0.9999500004166653;
  const auto p = nn::sincos_2d_position_embedding(8, 2);
  const std::vector<double> t0{0, 0, 1, 1, 0, 0, 1, 1};
  const std::vector<double> t1{s1, s001, c1, c001, 0, 0, 1, 1};  // row 0, col 1
  const std::vector<double> t2{0, 0, 1, 1, s1, s001, c1, c001};  // row 1, col 0
  const std::vector<double> t3{s1, s001, c1, c001, s1, s001, c1, c001};
  for (int t = 0; t < 4; ++t) {
    const auto& e = t == 0 ? t0 : t == 1 ? t1 : t == 2 ? t2 : t3;
    check_close(std::vector<double>(p.begin() + t * 8, p.begin() + (t + 1) * 8), e, 1e-15, "pos_embed token");
  }
  // 3x3, token 5 = row 1, col 2
  const auto q = nn::sincos_2d_position_embedding(8, 3);
  const std::vector<double> t5{std::sin(2.0), std::sin(0.02), std::cos(2.0), std::cos(0.02), s1, s001, c1, c001};
  check_close(std::vector<double>(q.begin() + 5 * 8, q.begin() + 6 * 8), t5, 1e-15, "pos_embed 3x3 token 5");
  // non-square grids: rows and columns keep their roles
  const auto r = nn::sincos_2d_position_embedding(8, 2, 3);  // token 4 = row 1, col 1
  const std::vector<double> t4{s1, s001, c1, c001, s1, s001, c1, c001};
  check_close(std::vector<double>(r.begin() + 4 * 8, r.begin() + 5 * 8), t4, 1e-15, "pos_embed 2x3 token 4");
}

TEMPLATE_LIST_TEST_CASE("pos_embed: added to every image's tokens; a buffer without gradient", "[nn][pos_embed]",
                        test_configs) {
  using B = typename TestType::backend;
  using T = typename TestType::scalar;
  for (index_t D : {8, 12})
    for (index_t batch : {1, 3})
      for (index_t g : {2, 3}) {
        CAPTURE(D, batch, g);
        nn::position_embedding<T, B> pe(D, g);
        const index_t tokens = g * g;
        CHECK(pe.tokens() == tokens);
        const auto xh = random_vector<T>(static_cast<std::size_t>(batch * tokens * D), 41);
        auto x = to_device<B>(xh, {batch * tokens, D});
        pe.forward(x.matrix());
        const auto pos = nn::sincos_2d_position_embedding(D, g);
        std::vector<double> expect(xh.size());
        for (index_t r = 0; r < batch * tokens; ++r)
          for (index_t j = 0; j < D; ++j) expect[r * D + j] = xh[r * D + j] + pos[(r % tokens) * D + j];
        check_close(x.to_host(), expect, promoe_test::tolerance<T>(), "x + pos_embed");
        int count = 0;
        pe.for_each_buffer("", [&](const promoe::named_parameter<T>& p) {
          ++count;
          CHECK(p.name == "pos_embed");
          CHECK(p.shape == std::vector<index_t>{1, tokens, D});
          CHECK(p.grad == nullptr);
          std::vector<T> v(static_cast<std::size_t>(p.size()));
          promoe::backend_traits<B>::copy_to_host(p.value, p.size(), v.data());
          check_close(v, pos, promoe_test::tolerance<T>(), "pos_embed buffer");
        });
        CHECK(count == 1);
      }
}

// ---------------------------------------------------------------------------
// timestep_embedder
// ---------------------------------------------------------------------------

TEMPLATE_LIST_TEST_CASE("timestep embedding: cos first, 128 frequencies, t = 0, 1, 999.5", "[nn][timestep]",
                        test_configs) {
  using B = typename TestType::backend;
  using T = typename TestType::scalar;
  const std::vector<T> th{T(0), T(1), T(999.5)};
  const auto t = to_device<B>(th, {3});
  tensor<T, B> out({3, 256});
  nn::timestep_frequency_embedding<B>(t.data(), 3, out.matrix());
  const auto o = out.to_host();
  std::vector<double> expect(3 * 256);
  for (int r = 0; r < 3; ++r)
    for (int i = 0; i < 128; ++i) {
      const double f = std::exp(-std::log(10000.0) * i / 128.0);
      expect[r * 256 + i] = std::cos(static_cast<double>(th[r]) * f);
      expect[r * 256 + 128 + i] = std::sin(static_cast<double>(th[r]) * f);
    }
  check_close(o, expect, promoe_test::tolerance<T>(), "frequency embedding");
  // t = 0: cos = 1 in the first half, sin = 0 in the second
  for (int i = 0; i < 128; ++i) {
    CHECK(o[i] == T(1));
    CHECK(o[128 + i] == T(0));
  }
  // t = 1: column 0 is cos(1), column 128 is sin(1); the last frequency is 10000^(-127/128)
  CHECK(static_cast<double>(o[256]) == Approx(0.5403023058681398).epsilon(1e-7));
  CHECK(static_cast<double>(o[256 + 128]) == Approx(0.8414709848078965).epsilon(1e-7));
  CHECK(static_cast<double>(o[256 + 127]) == Approx(std::cos(std::pow(10000.0, -127.0 / 128.0))).epsilon(1e-7));
  // t = 999.5: angles in double, so even float outputs are the correctly rounded values
  CHECK(std::abs(static_cast<double>(o[512]) - std::cos(999.5)) <= (sizeof(T) == 4 ? 6e-8 : 1e-15));
  CHECK(std::abs(static_cast<double>(o[512 + 128]) - std::sin(999.5)) <= (sizeof(T) == 4 ? 6e-8 : 1e-15));
}

TEMPLATE_LIST_TEST_CASE("timestep_embedder: forward against float64, names, init", "[nn][timestep]", test_configs) {
  using B = typename TestType::backend;
  using T = typename TestType::scalar;
  for (index_t D : {8, 12})
    for (index_t n : {1, 3}) {
      CAPTURE(D, n);
      nn::timestep_embedder<T, B> te(D);
      const auto params = randomise<T, B>(te, "", 51, 0.2);
      const std::vector<T> th = n == 1 ? std::vector<T>{T(999.5)} : std::vector<T>{T(0), T(1), T(999.5)};
      const auto t = to_device<B>(th, {n});
      tensor<T, B> y({n, D});
      typename nn::timestep_embedder<T, B>::cache c;
      te.forward(t.data(), n, y.matrix(), c);
      std::vector<double> freq(static_cast<std::size_t>(n * 256));
      for (index_t r = 0; r < n; ++r)
        for (int i = 0; i < 128; ++i) {
          const double a = static_cast<double>(th[r]) * std::exp(-std::log(10000.0) * i / 128.0);
          freq[r * 256 + i] = std::cos(a);
          freq[r * 256 + 128 + i] = std::sin(a);
        }
      auto h = naive_linear(freq, n, 256, params[0], params[1], D);
      for (double& v : h) v = silu(v);
      const auto expect = naive_linear(h, n, D, params[2], params[3], D);
      check_close(y.to_host(), expect, promoe_test::tolerance<T>(), "t_embedder y");
    }
  nn::timestep_embedder<T, B> te(16);
  promoe::rng gen(7);
  te.init(gen);
  std::vector<std::string> names;
  te.for_each_parameter("t_embedder.", [&](const promoe::named_parameter<T>& p) {
    names.push_back(p.name);
    std::vector<T> v(static_cast<std::size_t>(p.size()));
    promoe::backend_traits<B>::copy_to_host(p.value, p.size(), v.data());
    if (p.shape.size() == 1) {
      for (T x : v) CHECK(x == T(0));
    } else {
      double ss = 0;
      for (T x : v) ss += static_cast<double>(x) * static_cast<double>(x);
      CHECK(std::sqrt(ss / static_cast<double>(v.size())) == Approx(0.02).epsilon(0.15));
    }
  });
  CHECK(names == std::vector<std::string>{"t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias",
                                          "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias"});
}

TEMPLATE_LIST_TEST_CASE("timestep_embedder: finite differences for the MLP parameters", "[nn][timestep][gradients]",
                        test_backends) {
  using B = TestType;
  for (index_t D : {8, 12}) {
    CAPTURE(D);
    nn::timestep_embedder<double, B> te(D);
    randomise<double, B>(te, "", 61, 0.3);
    const std::vector<double> th{0.0, 3.5, 250.0, 999.5};
    const auto n = static_cast<index_t>(th.size());
    const auto t = to_device<B>(th, {n});
    const auto w = random_vector<double>(static_cast<std::size_t>(n * D), 62);
    const auto dy = to_device<B>(w, {n, D});
    tensor<double, B> y({n, D});
    auto objective = [&] {
      typename nn::timestep_embedder<double, B>::cache k;
      te.forward(t.data(), n, y.matrix(), k);
      return dot(y.to_host(), w);
    };
    typename nn::timestep_embedder<double, B>::cache c;
    te.forward(t.data(), n, y.matrix(), c);
    te.zero_grad();
    te.backward(dy.cmatrix(), c);
    te.for_each_parameter("t_embedder.", [&](const promoe::named_parameter<double>& p) {
      std::vector<double> grad(static_cast<std::size_t>(p.size()));
      promoe::backend_traits<B>::copy_to_host(p.grad, p.size(), grad.data());
      finite_difference<B>::check(p.name, objective, p.value, grad);
    });
  }
}

// ---------------------------------------------------------------------------
// label_embedder, drop_labels
// ---------------------------------------------------------------------------

TEMPLATE_LIST_TEST_CASE("label_embedder: table rows, the null label, names and init", "[nn][labels]", test_configs) {
  using B = typename TestType::backend;
  using T = typename TestType::scalar;
  for (index_t D : {8, 12}) {
    CAPTURE(D);
    const index_t classes = 5;
    nn::label_embedder<T, B> le(classes, D);
    promoe::rng gen(9);
    le.init(gen);
    CHECK(le.null_label() == 5);
    const auto table = as_double(le.table.value.to_host());
    REQUIRE(table.size() == static_cast<std::size_t>((classes + 1) * D));
    double ss = 0;
    for (double v : table) ss += v * v;
    CHECK(std::sqrt(ss / static_cast<double>(table.size())) == Approx(0.02).epsilon(0.35));
    const std::vector<std::int64_t> labels{3, 5, 0, 3, 4};
    tensor<T, B> y({5, D});
    typename nn::label_embedder<T, B>::cache c;
    le.forward(labels, y.matrix(), c);
    std::vector<double> expect;
    for (auto l : labels) expect.insert(expect.end(), table.begin() + l * D, table.begin() + (l + 1) * D);
    check_close(y.to_host(), expect, 0.0, "label rows");
    std::vector<std::string> names;
    std::vector<std::vector<index_t>> shapes;
    le.for_each_parameter("y_embedder.", [&](const promoe::named_parameter<T>& p) {
      names.push_back(p.name);
      shapes.push_back(p.shape);
    });
    CHECK(names == std::vector<std::string>{"y_embedder.embedding_table.weight"});
    CHECK(shapes == std::vector<std::vector<index_t>>{{6, D}});
  }
}

TEMPLATE_LIST_TEST_CASE("label_embedder: finite differences for the table (repeated labels)",
                        "[nn][labels][gradients]", test_backends) {
  using B = TestType;
  const index_t classes = 4, D = 6;
  nn::label_embedder<double, B> le(classes, D);
  randomise<double, B>(le, "", 71);
  const std::vector<std::int64_t> labels{2, 4, 2, 0, 2, 4, 1};  // row 3 unused, 2 thrice, the null label twice
  const auto n = static_cast<index_t>(labels.size());
  const auto w = random_vector<double>(static_cast<std::size_t>(n * D), 72);
  const auto dy = to_device<B>(w, {n, D});
  tensor<double, B> y({n, D});
  auto objective = [&] {
    typename nn::label_embedder<double, B>::cache k;
    le.forward(labels, y.matrix(), k);
    return dot(y.to_host(), w);
  };
  typename nn::label_embedder<double, B>::cache c;
  le.forward(labels, y.matrix(), c);
  le.zero_grad();
  le.backward(dy.cmatrix(), c);
  const auto grad = le.table.grad.to_host();
  finite_difference<B>::check("embedding_table", objective, le.table.value.data(), grad);
  for (index_t j = 0; j < D; ++j) CHECK(grad[3 * D + j] == 0.0);
  // exact sums, added in sample order; a second backward accumulates
  le.backward(dy.cmatrix(), c);
  const auto twice = le.table.grad.to_host();
  for (index_t j = 0; j < D; ++j) {
    CHECK(grad[2 * D + j] == (w[0 * D + j] + w[2 * D + j]) + w[4 * D + j]);
    CHECK(twice[2 * D + j] == Approx(2 * grad[2 * D + j]).epsilon(1e-14));
  }
}

TEST_CASE("drop_labels: deterministic counter-based dropout and forced drops", "[nn][labels]") {
  const std::int64_t classes = 10;
  std::vector<std::int64_t> labels(4000);
  for (std::size_t i = 0; i < labels.size(); ++i) labels[i] = static_cast<std::int64_t>(i % 10);
  const promoe::rng gen(123);
  const auto a = nn::drop_labels(labels, classes, 0.1, gen, 7);
  const auto b = nn::drop_labels(labels, classes, 0.1, gen, 7);
  const auto other = nn::drop_labels(labels, classes, 0.1, gen, 8);
  CHECK(a == b);
  CHECK(a != other);
  std::size_t dropped = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const bool drop = promoe::rng::uniform(123, 7, i) < 0.1;
    CHECK(a[i] == (drop ? classes : labels[i]));
    dropped += a[i] == classes;
  }
  CHECK(dropped > 320);  // 400 expected, sd 19
  CHECK(dropped < 480);
  CHECK(nn::drop_labels(labels, classes, 0.0, gen, 1) == labels);
  for (auto l : nn::drop_labels(labels, classes, 1.0, gen, 1)) CHECK(l == classes);
  // the module form uses its own null label
  nn::label_embedder<float, promoe::backend::cpu> le(classes, 4);
  CHECK(le.drop_labels(labels, 0.1, gen, 7) == a);

  // forced drops, as the reference token_drop(labels, force_drop_ids): 1 drops, 0 keeps
  const std::vector<std::int64_t> few{3, 7, 10, 0};
  const std::vector<std::int64_t> force{1, 0, 0, 1};
  CHECK(nn::drop_labels(few, classes, force) == std::vector<std::int64_t>{10, 7, 10, 10});
  CHECK(le.drop_labels(few, force) == std::vector<std::int64_t>{10, 7, 10, 10});
  const std::vector<std::int64_t> bad_force{1, 2, 0, 0};
  REQUIRE_THROWS_WITH(nn::drop_labels(few, classes, bad_force), Contains("force_drop_ids[1] = 2"));
  REQUIRE_THROWS_WITH(nn::drop_labels(few, classes, std::span<const std::int64_t>(force).first(3)),
                      Contains("force_drop_ids has 3 entries"));
  REQUIRE_THROWS_WITH(nn::drop_labels(few, classes, 1.5, gen, 0), Contains("probability") && Contains("1.5"));
  const std::vector<std::int64_t> out_of_range{3, 11};
  REQUIRE_THROWS_WITH(nn::drop_labels(out_of_range, classes, 0.1, gen, 0), Contains("labels[1] = 11"));
}

// ---------------------------------------------------------------------------
// final_layer
// ---------------------------------------------------------------------------

namespace {

/// The final layer in float64: LayerNorm (no affine, eps 1e-6, biased variance), shift/scale
/// = Linear(SiLU(c)) split, modulate, Linear.
std::vector<double> naive_final_layer(const std::vector<double>& x, const std::vector<double>& c, index_t n,
                                      index_t tokens, index_t D, const std::vector<std::vector<double>>& params,
                                      index_t out) {
  std::vector<double> act(c.size());
  for (std::size_t i = 0; i < c.size(); ++i) act[i] = silu(c[i]);
  const auto mod = naive_linear(act, n, D, params[0], params[1], 2 * D);
  std::vector<double> xm(x.size());
  for (index_t r = 0; r < n * tokens; ++r) {
    double mean = 0, var = 0;
    for (index_t j = 0; j < D; ++j) mean += x[r * D + j];
    mean /= static_cast<double>(D);
    for (index_t j = 0; j < D; ++j) var += (x[r * D + j] - mean) * (x[r * D + j] - mean);
    var /= static_cast<double>(D);
    const index_t s = r / tokens;
    for (index_t j = 0; j < D; ++j) {
      const double xhat = (x[r * D + j] - mean) / std::sqrt(var + 1e-6);
      xm[r * D + j] = xhat * (1 + mod[s * 2 * D + D + j]) + mod[s * 2 * D + j];
    }
  }
  return naive_linear(xm, n * tokens, D, params[2], params[3], out);
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("final_layer: forward against float64, names, zero init", "[nn][final_layer]",
                        test_configs) {
  using B = typename TestType::backend;
  using T = typename TestType::scalar;
  for (index_t n : {1, 3})
    for (index_t D : {8, 12})
      for (index_t p : {1, 2})
        for (index_t C : {1, 3}) {
          const index_t tokens = 4;
          CAPTURE(n, D, p, C);
          nn::final_layer<T, B> fl(D, p, C);
          const auto params = randomise<T, B>(fl, "", 81);
          const auto xh = random_vector<T>(static_cast<std::size_t>(n * tokens * D), 82, 2.0);
          const auto ch = random_vector<T>(static_cast<std::size_t>(n * D), 83, 2.0);
          const auto x = to_device<B>(xh, {n * tokens, D});
          const auto c = to_device<B>(ch, {n, D});
          tensor<T, B> y({n * tokens, p * p * C});
          typename nn::final_layer<T, B>::cache k;
          fl.forward(x.cmatrix(), c.cmatrix(), y.matrix(), k);
          const auto expect = naive_final_layer(as_double(xh), as_double(ch), n, tokens, D, params, p * p * C);
          check_close(y.to_host(), expect, 10 * promoe_test::tolerance<T>(), "final_layer y");
        }
  nn::final_layer<T, B> fl(8, 2, 4);
  randomise<T, B>(fl, "", 84);
  fl.init_zero();
  std::vector<std::string> names;
  std::vector<std::vector<index_t>> shapes;
  fl.for_each_parameter("final_layer.", [&](const promoe::named_parameter<T>& p) {
    names.push_back(p.name);
    shapes.push_back(p.shape);
    std::vector<T> v(static_cast<std::size_t>(p.size()));
    promoe::backend_traits<B>::copy_to_host(p.value, p.size(), v.data());
    for (T x : v) CHECK(x == T(0));
  });
  CHECK(names == std::vector<std::string>{"final_layer.adaLN_modulation.1.weight",
                                          "final_layer.adaLN_modulation.1.bias", "final_layer.linear.weight",
                                          "final_layer.linear.bias"});
  CHECK(shapes == std::vector<std::vector<index_t>>{{16, 8}, {16}, {16, 8}, {16}});
}

TEMPLATE_LIST_TEST_CASE("final_layer: finite differences for x, c and every parameter",
                        "[nn][final_layer][gradients]", test_backends) {
  using B = TestType;
  struct shape {
    index_t n, tokens, D, p, C;
  };
  for (shape s : {shape{1, 4, 8, 1, 1}, shape{3, 4, 12, 2, 3}, shape{2, 9, 8, 2, 1}}) {
    CAPTURE(s.n, s.tokens, s.D, s.p, s.C);
    const index_t rows = s.n * s.tokens, out = s.p * s.p * s.C;
    nn::final_layer<double, B> fl(s.D, s.p, s.C);
    randomise<double, B>(fl, "", 91);
    auto x = to_device<B>(random_vector<double>(static_cast<std::size_t>(rows * s.D), 92, 2.0), {rows, s.D});
    auto c = to_device<B>(random_vector<double>(static_cast<std::size_t>(s.n * s.D), 93, 2.0), {s.n, s.D});
    const auto w = random_vector<double>(static_cast<std::size_t>(rows * out), 94);
    const auto dy = to_device<B>(w, {rows, out});
    tensor<double, B> y({rows, out});
    auto objective = [&] {
      typename nn::final_layer<double, B>::cache k;
      fl.forward(x.cmatrix(), c.cmatrix(), y.matrix(), k);
      return dot(y.to_host(), w);
    };
    typename nn::final_layer<double, B>::cache k;
    fl.forward(x.cmatrix(), c.cmatrix(), y.matrix(), k);
    fl.zero_grad();
    const auto pre_x = random_vector<double>(static_cast<std::size_t>(x.size()), 95);
    const auto pre_c = random_vector<double>(static_cast<std::size_t>(c.size()), 96);
    auto dx = to_device<B>(pre_x, {rows, s.D});
    auto dc = to_device<B>(pre_c, {s.n, s.D});
    fl.backward(c.cmatrix(), dy.cmatrix(), dx.matrix(), dc.matrix(), k);
    auto dx_h = dx.to_host();
    auto dc_h = dc.to_host();
    for (std::size_t i = 0; i < dx_h.size(); ++i) dx_h[i] -= pre_x[i];  // backward adds
    for (std::size_t i = 0; i < dc_h.size(); ++i) dc_h[i] -= pre_c[i];
    finite_difference<B>::check("x", objective, x.data(), dx_h);
    finite_difference<B>::check("c", objective, c.data(), dc_h);
    std::vector<std::vector<double>> grads;
    fl.for_each_parameter("final_layer.", [&](const promoe::named_parameter<double>& p) {
      std::vector<double> grad(static_cast<std::size_t>(p.size()));
      promoe::backend_traits<B>::copy_to_host(p.grad, p.size(), grad.data());
      finite_difference<B>::check(p.name, objective, p.value, grad);
      grads.push_back(grad);
    });
    // skipping dx and dc leaves the parameter gradients unchanged
    fl.zero_grad();
    fl.backward(c.cmatrix(), dy.cmatrix(), matrix_view<double>{}, matrix_view<double>{}, k);
    std::size_t i = 0;
    fl.for_each_parameter("", [&](const promoe::named_parameter<double>& p) {
      std::vector<double> grad(static_cast<std::size_t>(p.size()));
      promoe::backend_traits<B>::copy_to_host(p.grad, p.size(), grad.data());
      check_close(grad, grads[i++], 1e-14, "parameter gradient without dx, dc");
    });
  }
}

// ---------------------------------------------------------------------------
// errors
// ---------------------------------------------------------------------------

TEMPLATE_LIST_TEST_CASE("errors: patch size, pos_embed dimension, labels, shapes", "[nn][errors]", test_backends) {
  using B = TestType;
  using T = float;
  SECTION("H or W not divisible by the patch size") {
    nn::patch_embed<T, B> pe(3, 8, 2);
    const auto x = to_device<B>(std::vector<T>(2 * 3 * 5 * 6, T(0)), {2, 3 * 5 * 6});
    tensor<T, B> y({2 * 6, 8});
    typename nn::patch_embed<T, B>::cache c;
    REQUIRE_THROWS_AS(pe.forward(x.cmatrix(), 5, 6, y.matrix(), c), promoe::error);
    REQUIRE_THROWS_WITH(pe.forward(x.cmatrix(), 5, 6, y.matrix(), c),
                        Contains("input size 5 x 6") && Contains("patch size 2"));
    REQUIRE_THROWS_WITH(pe.num_tokens(8, 7), Contains("input size 8 x 7") && Contains("patch size 2"));
    const nn::patch_grid g{1, 1, 6, 3, 2};
    tensor<T, B> img({1, 18}), tok({6, 4});
    REQUIRE_THROWS_WITH((nn::unpatchify<B, T>(tok.cmatrix(), g, img.matrix())),
                        Contains("unpatchify") && Contains("input size 6 x 3") && Contains("patch size 2"));
  }
  SECTION("x with the wrong number of values") {
    nn::patch_embed<T, B> pe(3, 8, 2);
    const auto x = to_device<B>(std::vector<T>(2 * 16, T(0)), {2, 16});
    tensor<T, B> y({8, 8});
    typename nn::patch_embed<T, B>::cache c;
    REQUIRE_THROWS_WITH(pe.forward(x.cmatrix(), 4, 4, y.matrix(), c),
                        Contains("x is [2, 16]") && Contains("expected [2, 48]"));
  }
  SECTION("pos_embed: D not divisible by 4") {
    REQUIRE_THROWS_AS((nn::position_embedding<T, B>(6, 2)), promoe::error);
    REQUIRE_THROWS_WITH((nn::position_embedding<T, B>(6, 2)), Contains("D = 6") && Contains("multiple of 4"));
    REQUIRE_THROWS_WITH(nn::sincos_2d_position_embedding(10, 3), Contains("D = 10"));
    nn::position_embedding<T, B> pe(8, 2);
    tensor<T, B> x({6, 8});
    REQUIRE_THROWS_WITH(pe.forward(x.matrix()), Contains("x is [6, 8]") && Contains("T = 4"));
  }
  SECTION("label out of range") {
    nn::label_embedder<T, B> le(10, 8);
    tensor<T, B> y({3, 8});
    typename nn::label_embedder<T, B>::cache c;
    const std::vector<std::int64_t> too_big{1, 10, 11};
    REQUIRE_THROWS_AS(le.forward(too_big, y.matrix(), c), promoe::error);
    REQUIRE_THROWS_WITH(le.forward(too_big, y.matrix(), c), Contains("labels[2] = 11") && Contains("[0, 10]"));
    const std::vector<std::int64_t> negative{-1, 0, 3};
    REQUIRE_THROWS_WITH(le.forward(negative, y.matrix(), c), Contains("labels[0] = -1"));
    const std::vector<std::int64_t> ok{1, 2};
    REQUIRE_THROWS_WITH(le.forward(ok, y.matrix(), c), Contains("y is [3, 8]") && Contains("expected [2, 8]"));
  }
  SECTION("final layer and timestep shapes") {
    nn::final_layer<T, B> fl(8, 2, 4);
    tensor<T, B> x({10, 8}), c({3, 8}), y({10, 16});
    typename nn::final_layer<T, B>::cache k;
    REQUIRE_THROWS_WITH(fl.forward(x.cmatrix(), c.cmatrix(), y.matrix(), k),
                        Contains("x is [10, 8]") && Contains("N = 3"));
    nn::timestep_embedder<T, B> te(8);
    tensor<T, B> t({3}), yt({2, 8});
    typename nn::timestep_embedder<T, B>::cache kt;
    REQUIRE_THROWS_WITH(te.forward(t.data(), 3, yt.matrix(), kt), Contains("y is [2, 8]") && Contains("[3, 8]"));
  }
}
