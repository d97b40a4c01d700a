// SPDX-License-Identifier: Apache-2.0
// The DiT block's core modules (nn::layer_norm, nn::modulate, nn::gated_residual,
// nn::attention): forward against naive float64 references at awkward sizes on every
// backend and scalar, central finite differences in float64 of every input and parameter
// gradient (backward must ADD into gradients: they are pre-filled with noise), and errors.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include <promoe/nn/attention.hpp>
#include <promoe/nn/layer_norm.hpp>
#include <promoe/nn/modulation.hpp>

#include "backends.hpp"

using namespace promoe;
using Catch::Contains;

namespace {

using hvec = std::vector<double>;

/// max |a - b| / max |b|: a norm-wise relative error.
template <class A>
double relative_error(const std::vector<A>& a, const hvec& b) {
  REQUIRE(a.size() == b.size());
  double diff = 0, scale = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    diff = std::max(diff, std::abs(static_cast<double>(a[i]) - b[i]));
    scale = std::max(scale, std::abs(b[i]));
  }
  return diff / std::max(scale, 1e-300);
}

template <class T>
hvec to_double(const std::vector<T>& v) {
  return hvec(v.begin(), v.end());
}

// ---------------------------------------------------------------------------
// float64 references, plain loops
// ---------------------------------------------------------------------------

hvec ref_layer_norm(const hvec& x, index_t n, index_t d, double eps = 1e-6) {
  hvec y(x.size());
  for (index_t r = 0; r < n; ++r) {
    double m = 0, v = 0;
    for (index_t j = 0; j < d; ++j) m += x[r * d + j];
    m /= static_cast<double>(d);
    for (index_t j = 0; j < d; ++j) v += (x[r * d + j] - m) * (x[r * d + j] - m);
    v /= static_cast<double>(d);
    for (index_t j = 0; j < d; ++j) y[r * d + j] = (x[r * d + j] - m) / std::sqrt(v + eps);
  }
  return y;
}

/// ada is [samples, ld] row-major; shift/scale are the columns [off, off + d) of it.
hvec ref_modulate(const hvec& x, const hvec& ada, index_t ld, index_t shift_off, index_t scale_off, index_t samples,
                  index_t tokens, index_t d) {
  hvec y(x.size());
  for (index_t s = 0; s < samples; ++s)
    for (index_t t = 0; t < tokens; ++t)
      for (index_t j = 0; j < d; ++j) {
        const index_t r = s * tokens + t;
        y[r * d + j] = x[r * d + j] * (1 + ada[s * ld + scale_off + j]) + ada[s * ld + shift_off + j];
      }
  return y;
}

hvec ref_gated(const hvec& x, const hvec& ada, index_t ld, index_t gate_off, const hvec& h, index_t samples,
               index_t tokens, index_t d) {
  hvec y(x.size());
  for (index_t s = 0; s < samples; ++s)
    for (index_t t = 0; t < tokens; ++t)
      for (index_t j = 0; j < d; ++j) {
        const index_t r = s * tokens + t;
        y[r * d + j] = x[r * d + j] + ada[s * ld + gate_off + j] * h[r * d + j];
      }
  return y;
}

/// y = x W^T + b with W [out, in].
hvec ref_linear(const hvec& x, index_t n, index_t in, const hvec& w, const hvec& b, index_t out) {
  hvec y(static_cast<std::size_t>(n * out));
  for (index_t r = 0; r < n; ++r)
    for (index_t o = 0; o < out; ++o) {
      double acc = b[o];
      for (index_t i = 0; i < in; ++i) acc += x[r * in + i] * w[o * in + i];
      y[r * out + o] = acc;
    }
  return y;
}

/// timm Attention: qkv -> [S, T, 3, heads, hd] -> softmax(q k^T / sqrt(hd)) v -> proj.
hvec ref_attention(const hvec& x, index_t samples, index_t tokens, index_t d, index_t heads, const hvec& wqkv,
                   const hvec& bqkv, const hvec& wproj, const hvec& bproj) {
  const index_t n = samples * tokens, hd = d / heads;
  const hvec qkv = ref_linear(x, n, d, wqkv, bqkv, 3 * d);
  const auto at = [&](index_t s, index_t t, index_t which, index_t h, index_t e) {
    return qkv[(s * tokens + t) * 3 * d + which * d + h * hd + e];
  };
  hvec o(static_cast<std::size_t>(n * d));
  hvec p(static_cast<std::size_t>(tokens));
  for (index_t s = 0; s < samples; ++s)
    for (index_t h = 0; h < heads; ++h)
      for (index_t t = 0; t < tokens; ++t) {
        double m = -1e300;
        for (index_t u = 0; u < tokens; ++u) {
          double acc = 0;
          for (index_t e = 0; e < hd; ++e) acc += at(s, t, 0, h, e) * at(s, u, 1, h, e);
          p[u] = acc / std::sqrt(static_cast<double>(hd));
          m = std::max(m, p[u]);
        }
        double z = 0;
        for (index_t u = 0; u < tokens; ++u) z += (p[u] = std::exp(p[u] - m));
        for (index_t e = 0; e < hd; ++e) {
          double acc = 0;
          for (index_t u = 0; u < tokens; ++u) acc += p[u] / z * at(s, u, 2, h, e);
          o[(s * tokens + t) * d + h * hd + e] = acc;
        }
      }
  return ref_linear(o, n, d, wproj, bproj, d);
}

// ---------------------------------------------------------------------------
// finite differences
// ---------------------------------------------------------------------------

template <class B>
double get(const double* p) {
  double v;
  backend_traits<B>::copy_to_host(p, 1, &v);
  return v;
}
template <class B>
void set(double* p, double v) {
  backend_traits<B>::copy_from_host(&v, 1, p);
}

/// Central differences of `loss` in the values base[idx[i]] (backend memory) against
/// analytic[i]; norm-wise relative error < 1e-6 (or both ~0).
template <class B>
void check_gradient(const std::string& what, const std::function<double()>& loss, double* base,
                    const std::vector<index_t>& idx, const hvec& analytic) {
  REQUIRE(idx.size() == analytic.size());
  const double eps = 1e-6;
  double diff = 0, scale = 0;
  for (std::size_t i = 0; i < idx.size(); ++i) {
    double* p = base + idx[i];
    const double v = get<B>(p);
    set<B>(p, v + eps);
    const double up = loss();
    set<B>(p, v - eps);
    const double down = loss();
    set<B>(p, v);
    const double numeric = (up - down) / (2 * eps);
    diff += (analytic[i] - numeric) * (analytic[i] - numeric);
    scale += numeric * numeric;
  }
  diff = std::sqrt(diff);
  scale = std::sqrt(scale);
  INFO(what << ": |analytic - numeric| = " << diff << ", |numeric| = " << scale);
  if (scale < 1e-9)
    CHECK(diff < 1e-9);
  else
    CHECK(diff / scale < 1e-6);
}

std::vector<index_t> iota(index_t n) {
  std::vector<index_t> v(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i) v[i] = i;
  return v;
}

/// Flat indices of the column block [off, off + d) of a [rows, ld] matrix.
std::vector<index_t> block_indices(index_t rows, index_t ld, index_t off, index_t d) {
  std::vector<index_t> v;
  for (index_t r = 0; r < rows; ++r)
    for (index_t j = 0; j < d; ++j) v.push_back(r * ld + off + j);
  return v;
}

/// analytic = after[idx] - before[idx] (backward adds onto the noise `before`).
hvec added(const hvec& after, const hvec& before, const std::vector<index_t>& idx) {
  hvec g;
  for (index_t i : idx) g.push_back(after[i] - before[i]);
  return g;
}

double dot(const hvec& w, const hvec& y) {
  double s = 0;
  for (std::size_t i = 0; i < y.size(); ++i) s += w[i] * y[i];
  return s;
}

/// A host vector of host values in T, read back as double.
template <class T>
hvec rounded(const hvec& v) {
  hvec out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = static_cast<double>(static_cast<T>(v[i]));
  return out;
}

template <class T>
std::vector<T> cast(const hvec& v) {
  return std::vector<T>(v.begin(), v.end());
}

/// Writes random values (uniform in [-scale, scale)) into the n values at p.
template <class B, class T>
hvec randomize(T* p, index_t n, std::uint64_t seed, double scale) {
  const auto v = rounded<T>(random_vector<double>(static_cast<std::size_t>(n), seed, scale));
  const auto t = cast<T>(v);
  backend_traits<B>::copy_from_host(t.data(), n, p);
  return v;
}

template <class T, class B>
hvec host_of(const T* p, index_t n) {
  std::vector<T> v(static_cast<std::size_t>(n));
  backend_traits<B>::copy_to_host(p, n, v.data());
  return to_double(v);
}

}  // namespace

// ===========================================================================
// layer_norm
// ===========================================================================

TEMPLATE_LIST_TEST_CASE("layer_norm matches the float64 reference", "[nn][layer_norm]", test_configs) {
  using B = typename TestType::backend;
  using T = typename TestType::scalar;
  const double tol = promoe_test::tolerance<T>();
  for (index_t n : {1, 5, 48})
    for (index_t d : {8, 12}) {
      CAPTURE(n, d);
      // an offset per row and a spread: mean and variance both matter
      hvec xh = random_vector<double>(static_cast<std::size_t>(n * d), 3 + n + d, 2.0);
      for (index_t r = 0; r < n; ++r)
        for (index_t j = 0; j < d; ++j) xh[r * d + j] = xh[r * d + j] * (1 + 0.1 * r) + 0.5 * r - 1;
      xh = rounded<T>(xh);
      auto x = to_device<B>(cast<T>(xh), {n, d});
      tensor<T, B> y({n, d});
      nn::layer_norm<T, B> ln(d);
      typename nn::layer_norm<T, B>::cache c;
      ln.forward(x.cmatrix(), y.matrix(), c);
      const hvec ref = ref_layer_norm(xh, n, d);
      CHECK(relative_error(y.to_host(), ref) < tol);
      CHECK(relative_error(c.xhat.to_host(), ref) < tol);

      // in place, and through strided views (the columns [1, 1 + d) of [n, d + 3] buffers)
      ln.forward(x.cmatrix(), x.matrix(), c);
      CHECK(relative_error(x.to_host(), ref) < tol);
      hvec wide(static_cast<std::size_t>(n * (d + 3)), 7.0);
      for (index_t r = 0; r < n; ++r)
        for (index_t j = 0; j < d; ++j) wide[r * (d + 3) + 1 + j] = xh[r * d + j];
      auto xw = to_device<B>(cast<T>(wide), {n, d + 3});
      tensor<T, B> yw({n, d + 3});
      yw.fill(T(5));
      ln.forward(xw.cmatrix().col_block(1, d), yw.matrix().col_block(2, d), c);
      const auto ywh = yw.to_host();
      hvec got;
      for (index_t r = 0; r < n; ++r) {
        CHECK(ywh[r * (d + 3)] == T(5));
        CHECK(ywh[r * (d + 3) + 1] == T(5));
        for (index_t j = 0; j < d; ++j) got.push_back(static_cast<double>(ywh[r * (d + 3) + 2 + j]));
      }
      CHECK(relative_error(got, ref) < tol);
    }
}

TEMPLATE_LIST_TEST_CASE("layer_norm: finite differences", "[nn][layer_norm][gradients]", test_backends) {
  using B = TestType;
  for (index_t n : {1, 7})
    for (index_t d : {8, 12}) {
      CAPTURE(n, d);
      auto x = to_device<B>(random_vector<double>(static_cast<std::size_t>(n * d), 11 + d, 1.5), {n, d});
      const hvec w = random_vector<double>(static_cast<std::size_t>(n * d), 12 + d);
      nn::layer_norm<double, B> ln(d);
      typename nn::layer_norm<double, B>::cache c;
      tensor<double, B> y({n, d});
      const std::function<double()> loss = [&] {
        typename nn::layer_norm<double, B>::cache cl;
        ln.forward(x.cmatrix(), y.matrix(), cl);
        return dot(w, y.to_host());
      };
      ln.forward(x.cmatrix(), y.matrix(), c);
      auto dy = to_device<B>(w, {n, d});
      tensor<double, B> dx({n, d});
      const hvec noise = randomize<B>(dx.data(), dx.size(), 99, 1.0);
      ln.backward(c, dy.cmatrix(), dx.matrix());
      check_gradient<B>("x", loss, x.data(), iota(n * d), added(dx.to_host(), noise, iota(n * d)));
    }
}

// ===========================================================================
// modulate, gated residual
// ===========================================================================

namespace {
struct block_sizes {
  index_t samples, tokens, dim;
};
std::vector<block_sizes> awkward_block_sizes() {
  std::vector<block_sizes> out;
  for (index_t s : {1, 3})
    for (index_t t : {1, 5, 16})
      for (index_t d : {8, 12}) out.push_back({s, t, d});
  return out;
}
}  // namespace

TEMPLATE_LIST_TEST_CASE("modulate and gated_residual match the float64 reference", "[nn][modulate]", test_configs) {
  using B = typename TestType::backend;
  using T = typename TestType::scalar;
  const double tol = promoe_test::tolerance<T>();
  for (const block_sizes& bs : awkward_block_sizes()) {
    const index_t samples = bs.samples, tokens = bs.tokens, d = bs.dim;
    CAPTURE(samples, tokens, d);
    const index_t n = samples * tokens, ld = 6 * d;
    // the adaLN output [S, 6D]: shift_mlp, scale_mlp, gate_mlp are blocks 3, 4, 5
    const hvec adah = rounded<T>(random_vector<double>(static_cast<std::size_t>(samples * ld), 21 + n + d, 0.8));
    const hvec xh = rounded<T>(random_vector<double>(static_cast<std::size_t>(n * d), 22 + n + d, 2.0));
    const hvec hh = rounded<T>(random_vector<double>(static_cast<std::size_t>(n * d), 23 + n + d, 2.0));
    auto ada = to_device<B>(cast<T>(adah), {samples, ld});
    auto x = to_device<B>(cast<T>(xh), {n, d});
    auto h = to_device<B>(cast<T>(hh), {n, d});
    const auto adam = ada.cmatrix();

    tensor<T, B> y({n, d});
    nn::modulate<T, B>::forward(x.cmatrix(), adam.col_block(3 * d, d), adam.col_block(4 * d, d), tokens, y.matrix());
    CHECK(relative_error(y.to_host(), ref_modulate(xh, adah, ld, 3 * d, 4 * d, samples, tokens, d)) < tol);

    nn::gated_residual<T, B>::forward(x.cmatrix(), adam.col_block(5 * d, d), h.cmatrix(), tokens, y.matrix());
    const hvec gref = ref_gated(xh, adah, ld, 5 * d, hh, samples, tokens, d);
    CHECK(relative_error(y.to_host(), gref) < tol);
    // in place on the residual stream
    nn::gated_residual<T, B>::forward(x.cmatrix(), adam.col_block(5 * d, d), h.cmatrix(), tokens, x.matrix());
    CHECK(relative_error(x.to_host(), gref) < tol);
  }
}

TEMPLATE_LIST_TEST_CASE("layer_norm::forward_modulated / backward_modulated: LayerNorm and modulate in one pass",
                        "[nn][layer_norm][modulate]", test_configs) {
  using B = typename TestType::backend;
  using T = typename TestType::scalar;
  for (const block_sizes& bs : awkward_block_sizes()) {
    const index_t samples = bs.samples, tokens = bs.tokens, d = bs.dim;
    CAPTURE(samples, tokens, d);
    const index_t n = samples * tokens, ld = 6 * d;
    const hvec adah = rounded<T>(random_vector<double>(static_cast<std::size_t>(samples * ld), 31 + n + d, 0.8));
    const hvec xh = rounded<T>(random_vector<double>(static_cast<std::size_t>(n * d), 32 + n + d, 2.0));
    auto ada = to_device<B>(cast<T>(adah), {samples, ld});
    auto x = to_device<B>(cast<T>(xh), {n, d});
    const auto shift = ada.cmatrix().col_block(3 * d, d), scale = ada.cmatrix().col_block(4 * d, d);
    nn::layer_norm<T, B> ln(d);
    // the two-pass composition
    typename nn::layer_norm<T, B>::cache c2;
    tensor<T, B> y2({n, d});
    ln.forward(x.cmatrix(), y2.matrix(), c2);
    nn::modulate<T, B>::forward(y2.cmatrix(), shift, scale, tokens, y2.matrix());
    // fused: the same operations per element, so the same values to the bit; the same cache
    typename nn::layer_norm<T, B>::cache c1;
    tensor<T, B> y1({n, d});
    ln.forward_modulated(x.cmatrix(), shift, scale, tokens, y1.matrix(), c1);
    CHECK(y1.to_host() == y2.to_host());
    CHECK(c1.xhat.to_host() == c2.xhat.to_host());
    CHECK(c1.rstd.to_host() == c2.rstd.to_host());
    // backward: modulate's dx into LayerNorm's backward, or both at once (the same values up
    // to rounding: the compiler may contract dy * (1 + scale) into the next FMA)
    const hvec gh = rounded<T>(random_vector<double>(static_cast<std::size_t>(n * d), 33 + n + d, 1.0));
    auto dy = to_device<B>(cast<T>(gh), {n, d});
    tensor<T, B> dln({n, d}), dx2({n, d}), dx1({n, d});
    dln.fill(T(0)), dx2.fill(T(0.5)), dx1.fill(T(0.5));
    nn::modulate<T, B>::backward(c2.xhat.cmatrix(), scale, tokens, dy.cmatrix(), dln.matrix(), {}, {});
    ln.backward(c2, dln.cmatrix(), dx2.matrix());
    ln.backward_modulated(c1, scale, tokens, dy.cmatrix(), dx1.matrix());
    CHECK(relative_error(dx1.to_host(), to_double(dx2.to_host())) < promoe_test::tolerance<T>());
    // in place
    ln.forward_modulated(x.cmatrix(), shift, scale, tokens, x.matrix(), c1);
    CHECK(x.to_host() == y2.to_host());
  }
  // shapes: shift / scale rows must be the samples, columns D
  nn::layer_norm<T, B> ln(4);
  typename nn::layer_norm<T, B>::cache c;
  tensor<T, B> x({6, 4}), y({6, 4}), mod({2, 8}), bad({3, 8});
  x.fill(T(1)), mod.fill(T(0)), bad.fill(T(0));
  const auto ok = mod.cmatrix();
  CHECK_THROWS_WITH(ln.forward_modulated(x.cmatrix(), bad.cmatrix().col_block(0, 4), bad.cmatrix().col_block(4, 4), 3,
                                         y.matrix(), c),
                    Catch::Contains("shift is [3, 4], expected [2, 4]"));
  CHECK_THROWS_WITH(ln.forward_modulated(x.cmatrix(), ok.col_block(0, 4), ok.col_block(4, 3), 3, y.matrix(), c),
                    Catch::Contains("scale is [2, 3], expected [2, 4]"));
  CHECK_NOTHROW(ln.forward_modulated(x.cmatrix(), ok.col_block(0, 4), ok.col_block(4, 4), 3, y.matrix(), c));
  CHECK_THROWS_WITH(ln.backward_modulated(c, bad.cmatrix().col_block(4, 4), 3, y.cmatrix(), x.matrix()),
                    Catch::Contains("scale is [3, 4], expected [2, 4]"));
}

TEMPLATE_LIST_TEST_CASE("modulate and gated_residual: finite differences", "[nn][modulate][gradients]",
                        test_backends) {
  using B = TestType;
  for (const block_sizes bs : {block_sizes{1, 1, 8}, block_sizes{3, 5, 12}, block_sizes{2, 16, 8}}) {
    const index_t samples = bs.samples, tokens = bs.tokens, d = bs.dim;
    CAPTURE(samples, tokens, d);
    const index_t n = samples * tokens, ld = 6 * d;
    auto ada = to_device<B>(random_vector<double>(static_cast<std::size_t>(samples * ld), 31 + n, 0.8), {samples, ld});
    auto x = to_device<B>(random_vector<double>(static_cast<std::size_t>(n * d), 32 + n, 1.5), {n, d});
    auto h = to_device<B>(random_vector<double>(static_cast<std::size_t>(n * d), 33 + n, 1.5), {n, d});
    const hvec w = random_vector<double>(static_cast<std::size_t>(n * d), 34 + n);
    auto dy = to_device<B>(w, {n, d});
    tensor<double, B> y({n, d});
    const auto shift = [&] { return ada.cmatrix().col_block(0, d); };
    const auto scale = [&] { return ada.cmatrix().col_block(d, d); };
    const auto gate = [&] { return ada.cmatrix().col_block(2 * d, d); };

    {  // modulate
      const std::function<double()> loss = [&] {
        nn::modulate<double, B>::forward(x.cmatrix(), shift(), scale(), tokens, y.matrix());
        return dot(w, y.to_host());
      };
      tensor<double, B> dx({n, d}), dada({samples, ld});
      const hvec nx = randomize<B>(dx.data(), dx.size(), 41, 1.0);
      const hvec na = randomize<B>(dada.data(), dada.size(), 42, 1.0);
      nn::modulate<double, B>::backward(x.cmatrix(), scale(), tokens, dy.cmatrix(), dx.matrix(),
                                        dada.matrix().col_block(0, d), dada.matrix().col_block(d, d));
      const hvec dah = dada.to_host();
      check_gradient<B>("x", loss, x.data(), iota(n * d), added(dx.to_host(), nx, iota(n * d)));
      check_gradient<B>("shift", loss, ada.data(), block_indices(samples, ld, 0, d),
                        added(dah, na, block_indices(samples, ld, 0, d)));
      check_gradient<B>("scale", loss, ada.data(), block_indices(samples, ld, d, d),
                        added(dah, na, block_indices(samples, ld, d, d)));
      // nothing outside the two blocks was touched
      for (index_t i : block_indices(samples, ld, 2 * d, 4 * d)) CHECK(dah[i] == na[i]);
      // empty gradient views are skipped
      nn::modulate<double, B>::backward(x.cmatrix(), scale(), tokens, dy.cmatrix(), {}, {},
                                        dada.matrix().col_block(d, d));
      const hvec dah2 = dada.to_host();
      for (index_t i : block_indices(samples, ld, 0, d)) CHECK(dah2[i] == dah[i]);
    }
    {  // gated_residual
      const std::function<double()> loss = [&] {
        nn::gated_residual<double, B>::forward(x.cmatrix(), gate(), h.cmatrix(), tokens, y.matrix());
        return dot(w, y.to_host());
      };
      tensor<double, B> dx({n, d}), dh({n, d}), dada({samples, ld});
      const hvec nx = randomize<B>(dx.data(), dx.size(), 51, 1.0);
      const hvec nh = randomize<B>(dh.data(), dh.size(), 52, 1.0);
      const hvec na = randomize<B>(dada.data(), dada.size(), 53, 1.0);
      nn::gated_residual<double, B>::backward(gate(), h.cmatrix(), tokens, dy.cmatrix(), dx.matrix(), dh.matrix(),
                                              dada.matrix().col_block(2 * d, d));
      const hvec dah = dada.to_host();
      check_gradient<B>("x", loss, x.data(), iota(n * d), added(dx.to_host(), nx, iota(n * d)));
      check_gradient<B>("h", loss, h.data(), iota(n * d), added(dh.to_host(), nh, iota(n * d)));
      check_gradient<B>("gate", loss, ada.data(), block_indices(samples, ld, 2 * d, d),
                        added(dah, na, block_indices(samples, ld, 2 * d, d)));
      for (index_t i : block_indices(samples, ld, 0, 2 * d)) CHECK(dah[i] == na[i]);
      for (index_t i : block_indices(samples, ld, 3 * d, 3 * d)) CHECK(dah[i] == na[i]);
    }
  }
}

// ===========================================================================
// attention
// ===========================================================================

namespace {

/// Xavier weights and random (non-zero) biases, so every parameter matters.
template <class T, class B>
void init_attention(nn::attention<T, B>& a, std::uint64_t seed) {
  rng gen(seed);
  a.init(gen);
  randomize<B>(a.qkv.bias.value.data(), a.qkv.bias.value.size(), seed + 1, 0.3);
  randomize<B>(a.proj.bias.value.data(), a.proj.bias.value.size(), seed + 2, 0.3);
}

struct attention_sizes {
  index_t samples, tokens, dim, heads;
};

}  // namespace

TEMPLATE_LIST_TEST_CASE("attention matches the float64 reference at awkward sizes", "[nn][attention]", test_configs) {
  using B = typename TestType::backend;
  using T = typename TestType::scalar;
  const double tol = promoe_test::tolerance<T>();
  for (index_t samples : {1, 3})
    for (index_t tokens : {1, 5, 16})
      for (index_t d : {8, 12})
        for (index_t heads : {1, 2, 4}) {
          CAPTURE(samples, tokens, d, heads);
          const index_t n = samples * tokens;
          nn::attention<T, B> attn(d, heads);
          REQUIRE(attn.head_dim() == d / heads);
          init_attention(attn, 5 + d + heads);
          // scaled so that the softmax is far from uniform
          const hvec xh = rounded<T>(random_vector<double>(static_cast<std::size_t>(n * d), 61 + n + d, 2.5));
          auto x = to_device<B>(cast<T>(xh), {n, d});
          tensor<T, B> y({n, d});
          typename nn::attention<T, B>::cache c;
          attn.forward(x.cmatrix(), tokens, y.matrix(), c);
          const hvec ref = ref_attention(
              xh, samples, tokens, d, heads, to_double(attn.qkv.weight.value.to_host()),
              to_double(attn.qkv.bias.value.to_host()), to_double(attn.proj.weight.value.to_host()),
              to_double(attn.proj.bias.value.to_host()));
          CHECK(relative_error(y.to_host(), ref) < tol);
          CHECK(c.qkv.shape() == std::vector<index_t>{n, 3 * d});
          CHECK(c.probs.shape() == std::vector<index_t>{samples, heads, tokens, tokens});
          CHECK(c.out.shape() == std::vector<index_t>{n, d});
          // probabilities: rows sum to one
          const auto p = c.probs.to_host();
          for (index_t r = 0; r < samples * heads * tokens; ++r) {
            double s = 0;
            for (index_t u = 0; u < tokens; ++u) s += static_cast<double>(p[r * tokens + u]);
            CHECK(std::abs(s - 1) < 10 * tol);
          }
          // the cache is reused (a second, smaller call, then the first again)
          if (samples > 1) {
            tensor<T, B> y1({tokens, d});
            attn.forward(x.cmatrix().row_block(0, tokens), tokens, y1.matrix(), c);
            const auto y1h = y1.to_host();
            CHECK(relative_error(y1h, hvec(ref.begin(), ref.begin() + tokens * d)) < tol);
            attn.forward(x.cmatrix(), tokens, y.matrix(), c);
            CHECK(relative_error(y.to_host(), ref) < tol);
          }
        }
}

TEST_CASE("attention: xavier init, zero biases, parameter names", "[nn][attention]") {
  nn::attention<double, backend::cpu> attn(12, 4);
  rng gen(3);
  attn.init(gen);
  std::vector<std::string> names;
  std::vector<std::vector<index_t>> shapes;
  attn.for_each_parameter("blocks.0.attn.", [&](const named_parameter<double>& p) {
    names.push_back(p.name);
    shapes.push_back(p.shape);
  });
  CHECK(names == std::vector<std::string>{"blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias",
                                          "blocks.0.attn.proj.weight", "blocks.0.attn.proj.bias"});
  CHECK(shapes == std::vector<std::vector<index_t>>{{36, 12}, {36}, {12, 12}, {12}});
  const auto wq = attn.qkv.weight.value.to_host();
  const double bound = std::sqrt(6.0 / (12 + 36));
  double mx = 0;
  for (double v : wq) mx = std::max(mx, std::abs(v));
  CHECK(mx <= bound);
  CHECK(mx > 0.5 * bound);
  for (double v : attn.qkv.bias.value.to_host()) CHECK(v == 0.0);
  for (double v : attn.proj.bias.value.to_host()) CHECK(v == 0.0);
}

TEMPLATE_LIST_TEST_CASE("attention: finite differences", "[nn][attention][gradients]", test_backends) {
  using B = TestType;
  for (const attention_sizes as : {attention_sizes{1, 1, 8, 1}, attention_sizes{3, 5, 12, 4},
                                   attention_sizes{2, 16, 8, 2}, attention_sizes{1, 5, 12, 2}}) {
    const index_t samples = as.samples, tokens = as.tokens, d = as.dim, heads = as.heads;
    CAPTURE(samples, tokens, d, heads);
    const index_t n = samples * tokens;
    nn::attention<double, B> attn(d, heads);
    init_attention(attn, 70 + d);
    auto x = to_device<B>(random_vector<double>(static_cast<std::size_t>(n * d), 71 + n, 1.5), {n, d});
    const hvec w = random_vector<double>(static_cast<std::size_t>(n * d), 72 + n);
    auto dy = to_device<B>(w, {n, d});
    tensor<double, B> y({n, d});
    const std::function<double()> loss = [&] {
      typename nn::attention<double, B>::cache cl;
      attn.forward(x.cmatrix(), tokens, y.matrix(), cl);
      return dot(w, y.to_host());
    };

    typename nn::attention<double, B>::cache c;
    attn.forward(x.cmatrix(), tokens, y.matrix(), c);
    tensor<double, B> dx({n, d});
    const hvec nx = randomize<B>(dx.data(), dx.size(), 81, 1.0);
    std::vector<named_parameter<double>> params;
    std::vector<hvec> noise;
    attn.for_each_parameter("", [&](const named_parameter<double>& p) {
      params.push_back(p);
      noise.push_back(randomize<B>(p.grad, p.size(), 82 + params.size(), 1.0));
    });
    REQUIRE(params.size() == 4);
    attn.backward(c, x.cmatrix(), dy.cmatrix(), dx.matrix());

    check_gradient<B>("x", loss, x.data(), iota(n * d), added(dx.to_host(), nx, iota(n * d)));
    std::vector<hvec> grads;
    for (std::size_t i = 0; i < params.size(); ++i) {
      const auto& p = params[i];
      grads.push_back(added(host_of<double, B>(p.grad, p.size()), noise[i], iota(p.size())));
      check_gradient<B>(p.name, loss, p.value, iota(p.size()), grads.back());
    }

    // an empty dx skips the input gradient; parameter gradients accumulate again
    attn.zero_grad();
    attn.backward(c, x.cmatrix(), dy.cmatrix(), {});
    for (std::size_t i = 0; i < params.size(); ++i) {
      const hvec g = host_of<double, B>(params[i].grad, params[i].size());
      INFO(params[i].name);
      CHECK(relative_error(g, grads[i]) < 1e-12);
    }
  }
}

TEMPLATE_LIST_TEST_CASE("attention at DiT sizes: forward against float64, backward by finite differences",
                        "[nn][attention][gradients]", test_backends) {
  using B = TestType;
  // mini-28's and mini-32's heads (49 tokens x 24 dims, 64 x 32): whole SIMD tiles and tails
  // of the host kernels.
  for (const attention_sizes as : {attention_sizes{2, 49, 96, 4}, attention_sizes{2, 64, 128, 4}}) {
    const index_t samples = as.samples, tokens = as.tokens, d = as.dim, heads = as.heads, n = samples * tokens;
    CAPTURE(samples, tokens, d, heads);
    nn::attention<double, B> attn(d, heads);
    init_attention(attn, 90 + d);
    auto x = to_device<B>(random_vector<double>(static_cast<std::size_t>(n * d), 91 + d, 2.0), {n, d});
    const hvec w = random_vector<double>(static_cast<std::size_t>(n * d), 92 + d);
    auto dy = to_device<B>(w, {n, d});
    tensor<double, B> y({n, d});
    typename nn::attention<double, B>::cache c;
    attn.forward(x.cmatrix(), tokens, y.matrix(), c);
    const hvec ref = ref_attention(x.to_host(), samples, tokens, d, heads, attn.qkv.weight.value.to_host(),
                                   attn.qkv.bias.value.to_host(), attn.proj.weight.value.to_host(),
                                   attn.proj.bias.value.to_host());
    CHECK(relative_error(y.to_host(), ref) < 1e-12);

    const std::function<double()> loss = [&] {
      typename nn::attention<double, B>::cache cl;
      attn.forward(x.cmatrix(), tokens, y.matrix(), cl);
      return dot(w, y.to_host());
    };
    attn.zero_grad();
    tensor<double, B> dx({n, d});
    dx.fill(0.0);
    attn.backward(c, x.cmatrix(), dy.cmatrix(), dx.matrix());
    // 29 indices spread over each tensor (every row of x's first sample is reached).
    const auto spread = [](index_t size) {
      std::vector<index_t> idx;
      for (index_t i = 0; i < 29; ++i) idx.push_back((i * 7919 + 13) % size);
      return idx;
    };
    const auto pick = [](const hvec& g, const std::vector<index_t>& idx) {
      hvec out;
      for (index_t i : idx) out.push_back(g[i]);
      return out;
    };
    check_gradient<B>("x", loss, x.data(), spread(n * d), pick(dx.to_host(), spread(n * d)));
    attn.for_each_parameter("", [&](const named_parameter<double>& p) {
      const auto idx = spread(p.size());
      check_gradient<B>(p.name, loss, p.value, idx, pick(host_of<double, B>(p.grad, p.size()), idx));
    });
  }
}

// ===========================================================================
// errors
// ===========================================================================

TEST_CASE("nn core modules: errors name the tensor, its shape and what was expected", "[nn][errors]") {
  using B = backend::cpu;
  using T = double;
  using attention_t = nn::attention<T, B>;
  using layer_norm_t = nn::layer_norm<T, B>;
  using modulate_t = nn::modulate<T, B>;
  using gated_t = nn::gated_residual<T, B>;

  SECTION("attention") {
    REQUIRE_THROWS_AS((attention_t(12, 5)), promoe::error);
    REQUIRE_THROWS_WITH((attention_t(12, 5)), Contains("dim 12 is not divisible by heads 5"));
    REQUIRE_THROWS_WITH((attention_t(0, 1)), Contains("must be positive"));
    nn::attention<T, B> attn(8, 2);
    typename nn::attention<T, B>::cache c;
    tensor<T, B> x({10, 8}), y({10, 8}), bad({10, 7});
    x.fill(T(0.1));
    REQUIRE_THROWS_WITH(attn.forward(bad.cmatrix(), 5, y.matrix(), c),
                        Contains("nn::attention::forward: x is [10, 7]") && Contains("8]"));
    REQUIRE_THROWS_WITH(attn.forward(x.cmatrix(), 3, y.matrix(), c),
                        Contains("x is [10, 8]") && Contains("samples * 3"));
    REQUIRE_THROWS_WITH(attn.forward(x.cmatrix(), 0, y.matrix(), c), Contains("tokens per sample must be positive"));
    REQUIRE_THROWS_WITH(attn.forward(x.cmatrix(), 5, bad.matrix(), c),
                        Contains("y is [10, 7], expected [10, 8]"));
    REQUIRE_THROWS_WITH(attn.backward(c, x.cmatrix(), y.cmatrix(), {}), Contains("run forward first"));
    attn.forward(x.cmatrix(), 5, y.matrix(), c);
    REQUIRE_THROWS_WITH(attn.backward(c, x.cmatrix(), bad.cmatrix(), {}),
                        Contains("dy is [10, 7], expected [10, 8]"));
    REQUIRE_THROWS_WITH(attn.backward(c, x.cmatrix().row_block(0, 5), y.cmatrix(), {}),
                        Contains("x is [5, 8], expected [10, 8]"));
    REQUIRE_THROWS_WITH(attn.backward(c, x.cmatrix(), y.cmatrix(), bad.matrix()),
                        Contains("dx is [10, 7], expected [10, 8]"));
    REQUIRE_NOTHROW(attn.backward(c, x.cmatrix(), y.cmatrix(), y.matrix()));
  }
  SECTION("layer_norm") {
    nn::layer_norm<T, B> ln(8);
    typename nn::layer_norm<T, B>::cache c;
    tensor<T, B> x({4, 8}), y({4, 8}), bad({4, 6}), short_({3, 8});
    x.fill(T(1));
    REQUIRE_THROWS_WITH(layer_norm_t(0), Contains("dim must be positive"));
    REQUIRE_THROWS_WITH(ln.forward(bad.cmatrix(), y.matrix(), c),
                        Contains("nn::layer_norm: x is [4, 6], expected [n, 8]"));
    REQUIRE_THROWS_WITH(ln.forward(x.cmatrix(), short_.matrix(), c), Contains("y is [3, 8], expected [4, 8]"));
    REQUIRE_THROWS_WITH(ln.backward(c, y.cmatrix(), y.matrix()), Contains("run forward first"));
    ln.forward(x.cmatrix(), y.matrix(), c);
    REQUIRE_THROWS_WITH(ln.backward(c, short_.cmatrix(), y.matrix()), Contains("dy is [3, 8], expected [4, 8]"));
    REQUIRE_THROWS_WITH(ln.backward(c, y.cmatrix(), bad.matrix()), Contains("dx is [4, 6], expected [4, 8]"));
  }
  SECTION("modulate and gated_residual") {
    tensor<T, B> x({6, 4}), y({6, 4}), ada({2, 24}), bad({6, 5});
    const auto a = ada.cmatrix();
    REQUIRE_THROWS_WITH(modulate_t::forward(x.cmatrix(), a.col_block(0, 4), a.col_block(4, 4), 2, y.matrix()),
                        Contains("nn::modulate::forward: x is [6, 4]") && Contains("[2, 4] with 2 tokens") &&
                            Contains("expected x [4, 4]"));
    REQUIRE_THROWS_WITH(modulate_t::forward(x.cmatrix(), a.col_block(0, 4), a.col_block(4, 3), 3, y.matrix()),
                        Contains("scale is [2, 3], expected [2, 4]"));
    REQUIRE_THROWS_WITH(modulate_t::forward(x.cmatrix(), a.col_block(0, 4), a.col_block(4, 4), 3, bad.matrix()),
                        Contains("y is [6, 5], expected [6, 4]"));
    REQUIRE_THROWS_WITH(modulate_t::forward(x.cmatrix(), a.col_block(0, 4), a.col_block(4, 4), 0, y.matrix()),
                        Contains("tokens per sample must be positive"));
    REQUIRE_THROWS_WITH(modulate_t::backward(x.cmatrix(), a.col_block(4, 4), 3, y.cmatrix(), bad.matrix(), {}, {}),
                        Contains("nn::modulate::backward: dx is [6, 5], expected [6, 4]"));
    REQUIRE_THROWS_WITH(
        modulate_t::backward(x.cmatrix(), a.col_block(4, 4), 3, y.cmatrix(), {}, ada.matrix(), {}),
        Contains("dshift is [2, 24], expected [2, 4]"));
    REQUIRE_THROWS_WITH(
        gated_t::forward(x.cmatrix(), a.col_block(8, 4), bad.cmatrix(), 3, y.matrix()),
        Contains("nn::gated_residual::forward: h is [6, 5] but gate is [2, 4]"));
    REQUIRE_THROWS_WITH(
        gated_t::forward(bad.cmatrix(), a.col_block(8, 4), x.cmatrix(), 3, y.matrix()),
        Contains("x is [6, 5], expected [6, 4]"));
    REQUIRE_THROWS_WITH(gated_t::backward(a.col_block(8, 4), x.cmatrix(), 3, y.cmatrix(), {}, {},
                                                           ada.matrix()),
                        Contains("dgate is [2, 24], expected [2, 4]"));
  }
}
