// SPDX-License-Identifier: Apache-2.0
/// \file test_core.cpp
/// \brief Core pieces: promoe::error and PROMOE_CHECK, the Philox generator (known answers,
/// determinism, moments), tensor basics and every backend primitive (gemm, group_by_key,
/// parallel_for, fill, copy, sum, sum_into, first_non_finite) against naive float64 loops.

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <set>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include <catch2/catch.hpp>

#include <promoe/backend/device_sum.hpp>
#include <promoe/backend/ops.hpp>
#include <promoe/backend/small_gemm.hpp>
#include <promoe/backend/tensor.hpp>
#include <promoe/core/error.hpp>
#include <promoe/core/fast_math.hpp>
#include <promoe/core/rng.hpp>

#include "backends.hpp"

using promoe::index_t;
using promoe::transpose;

// ---------------------------------------------------------------------------
// promoe::error and PROMOE_CHECK
// ---------------------------------------------------------------------------

TEST_CASE("promoe::error is a std::runtime_error", "[core][error]") {
  STATIC_REQUIRE(std::is_base_of_v<std::runtime_error, promoe::error>);
  try {
    throw promoe::error("boom");
  } catch (const std::runtime_error& e) {
    CHECK(std::string(e.what()) == "boom");
  }
}

TEST_CASE("PROMOE_CHECK streams its values into the message", "[core][error]") {
  const index_t rows = 7, cols = 5;
  const double ratio = 2.5;
  REQUIRE_THROWS_AS([&] { PROMOE_CHECK(rows == cols, "x"); }(), promoe::error);
  try {
    PROMOE_CHECK(rows == cols, "f: x has shape [", rows, ", ", cols, "], ratio ", ratio, ", name ", std::string("gate"));
    FAIL("PROMOE_CHECK did not throw");
  } catch (const promoe::error& e) {
    CHECK(std::string(e.what()) == "f: x has shape [7, 5], ratio 2.5, name gate");
  }
  // A true condition neither throws nor evaluates the message.
  int evaluated = 0;
  auto count = [&] { return ++evaluated; };
  REQUIRE_NOTHROW([&] { PROMOE_CHECK(rows == 7, "never ", count()); }());
  CHECK(evaluated == 0);
  // A single statement (do/while(0)): usable as the body of an if without braces.
  bool else_taken = false;
  if (rows == 7)
    PROMOE_CHECK(true, "unused");
  else
    else_taken = true;
  CHECK_FALSE(else_taken);

  CHECK(promoe::detail::shape_string(std::vector<index_t>{3, 64}) == "[3, 64]");
  CHECK(promoe::detail::shape_string(std::vector<index_t>{}) == "[]");
  REQUIRE_THROWS_WITH(promoe::fail("a", 1, 'b', 2u), "a1b2");
}

// ---------------------------------------------------------------------------
// Philox4x32-10 and promoe::rng
// ---------------------------------------------------------------------------

namespace {

/// Random123's counter words c[0..3] and key words k[0..1] in promoe's packing.
promoe::philox4x32::block philox_words(std::uint32_t c0, std::uint32_t c1, std::uint32_t c2, std::uint32_t c3,
                                       std::uint32_t k0, std::uint32_t k1) {
  const std::uint64_t lo = std::uint64_t{c0} | (std::uint64_t{c1} << 32);
  const std::uint64_t hi = std::uint64_t{c2} | (std::uint64_t{c3} << 32);
  const std::uint64_t key = std::uint64_t{k0} | (std::uint64_t{k1} << 32);
  return promoe::philox4x32::generate(key, hi, lo);
}

}  // namespace

TEST_CASE("exp_fast: within 2 ulp of exp on [-87, 88], saturating outside, NaN stays NaN", "[core][math]") {
  // every 97th float in the range, plus the ends and zero
  double worst_ulp = 0;
  const auto check = [&](float x) {
    const double exact = std::exp(static_cast<double>(x));
    const float got = promoe::exp_fast(x);
    const double ulp = std::nextafter(static_cast<float>(exact), std::numeric_limits<float>::infinity()) -
                       static_cast<float>(exact);
    worst_ulp = std::max(worst_ulp, std::abs(static_cast<double>(got) - exact) / ulp);
  };
  for (float x = -87.0f; x < 88.0f; x = std::nextafter(x, 100.0f)) {
    check(x);
    for (int skip = 0; skip < 96 && x < 88.0f; ++skip) x = std::nextafter(x, 100.0f);
  }
  for (float x : {-87.0f, -1e-30f, 0.0f, 1e-30f, 1.0f, 88.0f}) check(x);
  CHECK(worst_ulp <= 2.0);
  CHECK(promoe::exp_fast(0.0f) == 1.0f);
  CHECK(promoe::exp_fast(-1000.0f) >= 0.0f);
  CHECK(promoe::exp_fast(-1000.0f) < 1e-37f);
  CHECK(std::isfinite(promoe::exp_fast(1000.0f)));
  CHECK(promoe::exp_fast(1000.0f) > 1e38f);
  CHECK(std::isnan(promoe::exp_fast(std::numeric_limits<float>::quiet_NaN())));
  // double goes to std::exp
  CHECK(promoe::fast_exp(0.5) == std::exp(0.5));
}

TEST_CASE("Philox4x32-10 matches the Random123 known-answer vectors", "[core][rng]") {
  struct kat {
    std::uint32_t ctr[4], key[2], out[4];
  };
  const kat vectors[] = {
      {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}},
      {{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu},
       {0xffffffffu, 0xffffffffu},
       {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}},
      {{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u},
       {0xa4093822u, 0x299f31d0u},
       {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}},
  };
  for (const auto& v : vectors) {
    const auto b = philox_words(v.ctr[0], v.ctr[1], v.ctr[2], v.ctr[3], v.key[0], v.key[1]);
    INFO("counter " << std::hex << v.ctr[0] << ' ' << v.ctr[1] << ' ' << v.ctr[2] << ' ' << v.ctr[3] << " key "
                    << v.key[0] << ' ' << v.key[1]);
    for (int w = 0; w < 4; ++w) {
      INFO("word " << w << ": got " << std::hex << b.v[w] << ", expected " << v.out[w]);
      CHECK(b.v[w] == v.out[w]);
    }
  }
}

TEST_CASE("rng is a pure function of (seed, stream, index)", "[core][rng]") {
  using promoe::rng;
  for (std::uint64_t i : {std::uint64_t{0}, std::uint64_t{1}, std::uint64_t{12345}, ~std::uint64_t{0}}) {
    CHECK(rng::uniform(7, 3, i) == rng::uniform(7, 3, i));
    CHECK(rng::normal(7, 3, i) == rng::normal(7, 3, i));
  }
  // Members agree with the static functions under the object's seed.
  rng gen(42);
  CHECK(gen.seed() == 42);
  CHECK(gen.uniform(5, 9) == rng::uniform(42, 5, 9));
  CHECK(gen.normal(5, 9) == rng::normal(42, 5, 9));
  // Streams are handed out in order and can be rewound.
  CHECK(gen.streams_used() == 0);
  CHECK(gen.next_stream() == 0);
  CHECK(gen.next_stream() == 1);
  CHECK(gen.streams_used() == 2);
  gen.set_streams_used(10);
  CHECK(gen.next_stream() == 10);

  // Different streams, seeds and indices give different numbers (no collisions in 1000 draws).
  int same_stream = 0, same_seed = 0;
  std::set<double> seen;
  for (std::uint64_t i = 0; i < 1000; ++i) {
    same_stream += rng::uniform(1, 0, i) == rng::uniform(1, 1, i);
    same_seed += rng::uniform(1, 0, i) == rng::uniform(2, 0, i);
    seen.insert(rng::uniform(1, 0, i));
  }
  CHECK(same_stream == 0);
  CHECK(same_seed == 0);
  CHECK(seen.size() == 1000);
}

TEST_CASE("rng::uniform is uniform on [0, 1) and rng::normal standard normal", "[core][rng]") {
  using promoe::rng;
  const int n = 100000;
  double su = 0, suu = 0, sn = 0, snn = 0;
  double umin = 1, umax = 0;
  int non_finite = 0;
  for (int i = 0; i < n; ++i) {
    const double u = rng::uniform(2024, 3, static_cast<std::uint64_t>(i));
    umin = std::min(umin, u);
    umax = std::max(umax, u);
    su += u;
    suu += (u - 0.5) * (u - 0.5);
    const double z = rng::normal(2024, 4, static_cast<std::uint64_t>(i));
    non_finite += !std::isfinite(z);
    sn += z;
    snn += z * z;
  }
  CHECK(umin >= 0.0);
  CHECK(umax < 1.0);
  CHECK(non_finite == 0);
  // Five standard errors of each estimator.
  const double mean_u = su / n, var_u = suu / n;
  CHECK(std::abs(mean_u - 0.5) < 5 * std::sqrt(1.0 / 12.0 / n));
  CHECK(std::abs(var_u - 1.0 / 12.0) < 5 * std::sqrt((1.0 / 80.0 - 1.0 / 144.0) / n));
  const double mean_z = sn / n, var_z = snn / n;
  CHECK(std::abs(mean_z) < 5 * std::sqrt(1.0 / n));
  CHECK(std::abs(var_z - 1.0) < 5 * std::sqrt(2.0 / n));
  // A few quantiles of the uniform: 10 bins with 10000 +- 5 sqrt(9000) each.
  std::vector<int> bins(10, 0);
  for (int i = 0; i < n; ++i) ++bins[static_cast<std::size_t>(rng::uniform(99, 0, static_cast<std::uint64_t>(i)) * 10)];
  for (int b : bins) CHECK(std::abs(b - n / 10) < 5 * std::sqrt(n * 0.1 * 0.9));
}

TEST_CASE("random_vector helper is reproducible and scaled", "[core][rng]") {
  const auto a = random_vector<double>(50, 3, 2.0), b = random_vector<double>(50, 3, 2.0);
  const auto c = random_vector<double>(50, 4, 2.0);
  CHECK(a == b);
  CHECK(a != c);
  for (double v : a) CHECK((v >= -2.0 && v < 2.0));
}

// ---------------------------------------------------------------------------
// tensor basics
// ---------------------------------------------------------------------------

TEMPLATE_LIST_TEST_CASE("tensor: shape, host round trip, matrix view", "[core][tensor]", test_configs) {
  using B = typename TestType::backend;
  using T = typename TestType::scalar;
  const auto values = random_vector<T>(12, 1);
  auto t = to_device<B>(values, {3, 4});
  CHECK(t.size() == 12);
  CHECK(t.rank() == 2);
  CHECK(t.dim(0) == 3);
  CHECK(t.dim(1) == 4);
  CHECK(t.shape() == std::vector<index_t>{3, 4});
  CHECK(t.to_host() == values);
  auto m = t.matrix();
  CHECK(m.rows == 3);
  CHECK(m.cols == 4);
  CHECK(m.ld == 4);
  CHECK(m.data == t.data());

  // Rank 3: the trailing dimensions flatten into columns.
  promoe::tensor<T, B> t3({2, 3, 5});
  CHECK(t3.matrix().rows == 2);
  CHECK(t3.matrix().cols == 15);

  // fill, and resize that shrinks keeps values in place.
  t.fill(T(2.5));
  CHECK(t.to_host() == std::vector<T>(12, T(2.5)));
  t.resize({2, 4});
  CHECK(t.size() == 8);
  CHECK(t.to_host() == std::vector<T>(8, T(2.5)));

  // Empty tensors: no data pointer; a [0, D] tensor is a 0 x D matrix.
  promoe::tensor<T, B> e({0, 6});
  CHECK(e.size() == 0);
  CHECK(e.data() == nullptr);
  CHECK(e.to_host().empty());
  CHECK(e.matrix().rows == 0);
  CHECK(e.matrix().cols == 6);
  CHECK(e.matrix().empty());
}

// ---------------------------------------------------------------------------
// Backend primitives
// ---------------------------------------------------------------------------

namespace {

/// Host image of a row-major matrix with padded leading dimension; padding holds `pad`.
template <class T>
std::vector<T> padded_matrix(index_t rows, index_t cols, index_t ld, std::uint64_t seed, T pad) {
  std::vector<T> m(static_cast<std::size_t>(std::max<index_t>(rows * ld, 1)), pad);
  const auto v = random_vector<T>(static_cast<std::size_t>(rows * cols), seed);
  for (index_t r = 0; r < rows; ++r)
    for (index_t c = 0; c < cols; ++c) m[r * ld + c] = v[r * cols + c];
  return m;
}

/// Runs one gemm on backend B and compares it (and C's padding) with a float64 loop. With
/// `bf16` the GEMM runs under matmul_precision::bf16 and the loop multiplies the operands
/// rounded to bf16; the return value is then the error against the loop on unrounded
/// operands (which a GEMM that did not round would meet). bf16 tensors (T = bf16) must come
/// within half a bf16 step of the exact result (float accumulation, C rounded once; a bf16
/// accumulator would drift by many steps).
template <class B, class T>
double check_gemm(transpose ta, transpose tb, index_t m, index_t n, index_t k, double alpha, double beta,
                  std::uint64_t seed, bool bf16 = false) {
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const bool at = ta == transpose::yes, bt = tb == transpose::yes;
  const index_t ar = at ? k : m, ac = at ? m : k, br = bt ? n : k, bc = bt ? k : n;
  const index_t lda = ac + 2, ldb = bc + 3, ldc = n + 1;
  // NaN in the padding of A and B: any read outside the matrix poisons C.
  const auto ha = padded_matrix<T>(ar, ac, lda, seed, nan);
  const auto hb = padded_matrix<T>(br, bc, ldb, seed + 1, nan);
  const T c_pad = T(12345);
  auto hc = padded_matrix<T>(m, n, ldc, seed + 2, c_pad);
  if (beta == 0)  // beta = 0 must overwrite, even NaN
    for (index_t i = 0; i < m; ++i)
      for (index_t j = 0; j < n; ++j) hc[i * ldc + j] = nan;

  auto da = to_device<B>(ha, {static_cast<index_t>(ha.size())});
  auto db = to_device<B>(hb, {static_cast<index_t>(hb.size())});
  auto dc = to_device<B>(hc, {static_cast<index_t>(hc.size())});
  {
    promoe::matmul_precision_scope precision(bf16 ? promoe::matmul_precision::bf16 : promoe::matmul_precision::highest);
    promoe::backend_traits<B>::gemm(ta, tb, m, n, k, T(alpha), da.data(), lda, db.data(), ldb, T(beta), dc.data(),
                                    ldc);
  }
  const auto got = dc.to_host();
  // float64 GEMMs never round (matmul_precision is about float32 GEMMs).
  const bool rounds = bf16 && std::is_same_v<T, float>;
  const auto operand = [&](T v) {
    return rounds ? static_cast<double>(promoe::round_to_bf16(static_cast<float>(v))) : static_cast<double>(v);
  };

  double worst = 0, worst_unrounded = 0, worst_bf16_steps = 0;
  bool pad_ok = true;
  for (index_t i = 0; i < m; ++i) {
    for (index_t j = 0; j < n; ++j) {
      double acc = 0, acc_unrounded = 0, mag = 0;
      for (index_t p = 0; p < k; ++p) {
        const T av = at ? ha[p * lda + i] : ha[i * lda + p];
        const T bv = bt ? hb[j * ldb + p] : hb[p * ldb + j];
        acc += operand(av) * operand(bv);
        acc_unrounded += static_cast<double>(av) * static_cast<double>(bv);
        mag += std::abs(static_cast<double>(av) * static_cast<double>(bv));
      }
      const double c0 = beta == 0 ? 0.0 : static_cast<double>(hc[i * ldc + j]);
      const double scale = std::max(1.0, std::abs(alpha) * mag + std::abs(beta * c0));
      const double g = static_cast<double>(got[i * ldc + j]);
      const auto error = [&](double sum) {
        return std::isfinite(g) ? std::abs(g - (alpha * sum + beta * c0)) / scale : std::numeric_limits<double>::infinity();
      };
      worst = std::max(worst, error(acc));
      worst_unrounded = std::max(worst_unrounded, error(acc_unrounded));
      if constexpr (std::is_same_v<T, promoe::bf16>) {
        const double want = alpha * acc + beta * c0;  // half a bf16 step: <= 2^-8 |want| (+ float rounding)
        worst_bf16_steps = std::max(worst_bf16_steps, std::abs(g - want) / (std::ldexp(std::abs(want), -8) + 1e-6 * scale));
      }
    }
    for (index_t j = n; j < ldc; ++j) pad_ok = pad_ok && got[i * ldc + j] == c_pad;
  }
  INFO(promoe::backend_traits<B>::name << " gemm ta=" << at << " tb=" << bt << " m=" << m << " n=" << n << " k=" << k
                                       << " alpha=" << alpha << " beta=" << beta << " bf16=" << bf16);
  if constexpr (std::is_same_v<T, promoe::bf16>) {
    CHECK(worst_bf16_steps <= 1.0);
  } else {
    CHECK(worst <= promoe_test::tolerance<T>());
  }
  CHECK(pad_ok);
  return worst_unrounded;
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("gemm: all transposes, padded leading dimensions, beta 0/1/other", "[core][backend][gemm]",
                        test_configs) {
  using B = typename TestType::backend;
  using T = typename TestType::scalar;
  const index_t sizes[] = {1, 3, 7, 19};
  std::uint64_t seed = 100;
  for (transpose ta : {transpose::no, transpose::yes})
    for (transpose tb : {transpose::no, transpose::yes})
      for (index_t m : sizes)
        for (index_t n : sizes)
          for (index_t k : sizes)
            for (double beta : {0.0, 1.0, -0.75}) check_gemm<B, T>(ta, tb, m, n, k, 1.25, beta, seed++);
}

TEMPLATE_LIST_TEST_CASE("gemm: shapes beyond one cache block, split over threads by rows or by columns",
                        "[core][backend][gemm]", test_configs) {
  using B = typename TestType::backend;
  using T = typename TestType::scalar;
  // (m, n, k): several row and depth blocks of the packed kernel; few rows and many columns
  // (the threads split C by columns); many rows and few columns; one of each odd size; long
  // GEMVs (split over the threads by columns, or by rows).
  const index_t shapes[][3] = {{301, 257, 700}, {5, 1500, 333}, {1200, 40, 650}, {97, 2, 2100},
                               {1, 1500, 400},  {1300, 1, 300}, {1, 37, 5000}};
  std::uint64_t seed = 5000;
  for (transpose ta : {transpose::no, transpose::yes})
    for (transpose tb : {transpose::no, transpose::yes})
      for (const auto& s : shapes)
        for (double beta : {0.0, -0.5}) check_gemm<B, T>(ta, tb, s[0], s[1], s[2], 0.75, beta, seed++);
}

TEMPLATE_LIST_TEST_CASE("gemm under matmul_precision::bf16: float operands rounded to bf16, float accumulation",
                        "[core][backend][gemm][bf16]", test_configs) {
  using B = typename TestType::backend;
  using T = typename TestType::scalar;
  // (m, n, k): small ones (and matrix-vector products), and shapes split over threads and
  // above the size where the host GEMM hands blocks to OpenBLAS.
  const index_t shapes[][3] = {{7, 19, 3}, {1, 33, 20}, {25, 1, 40}, {301, 257, 700}, {5, 1500, 333}};
  std::uint64_t seed = 9000;
  double least_unrounded = std::numeric_limits<double>::infinity();
  for (transpose ta : {transpose::no, transpose::yes})
    for (transpose tb : {transpose::no, transpose::yes})
      for (const auto& s : shapes)
        for (double beta : {0.0, 0.5})
          least_unrounded = std::min(least_unrounded, check_gemm<B, T>(ta, tb, s[0], s[1], s[2], 1.25, beta, seed++, true));
  if constexpr (std::is_same_v<T, float>) {
    CHECK(least_unrounded > 1e-4);  // every product really was rounded: bf16 keeps 8 bits
  } else {
    CHECK(least_unrounded <= promoe_test::tolerance<T>());  // float64 GEMMs never round
  }
}

TEMPLATE_LIST_TEST_CASE("gemm on bf16 tensors: float32 accumulation, C rounded once", "[core][backend][gemm][bf16]",
                        test_backends) {
  using B = TestType;
  // Small shapes and matrix-vector products, and shapes with several row, column and depth
  // panels of the host's bf16 GEMM (256 x 1024 x 256), split over threads.
  const index_t shapes[][3] = {{7, 19, 3}, {1, 33, 20}, {25, 1, 40}, {301, 257, 700}, {5, 1500, 333}, {1, 1100, 300}};
  std::uint64_t seed = 9500;
  for (transpose ta : {transpose::no, transpose::yes})
    for (transpose tb : {transpose::no, transpose::yes})
      for (const auto& s : shapes)
        for (double beta : {0.0, 1.0, -0.75}) check_gemm<B, promoe::bf16>(ta, tb, s[0], s[1], s[2], 1.25, beta, seed++);
}

TEST_CASE("bf16: conversions round to nearest even and match round_to_bf16; limits", "[core][bf16]") {
  using promoe::bf16;
  const float step = std::ldexp(1.0f, -7);
  CHECK(float(bf16(1.0f + step / 2)) == 1.0f);                   // tie: to even
  CHECK(float(bf16(1.0f + 3 * step / 2)) == 1.0f + 2 * step);    // tie: to even
  CHECK(float(bf16(1.0f + step / 2 + std::ldexp(1.0f, -20))) == 1.0f + step);
  CHECK(float(bf16(3)) == 3.0f);
  CHECK(float(bf16(-2.5)) == -2.5f);                             // from double
  CHECK(float(bf16(1000.5)) == 1000.0f);                         // 8 significant bits
  CHECK(std::isnan(float(bf16(std::numeric_limits<float>::quiet_NaN()))));
  CHECK(float(bf16(std::numeric_limits<float>::max())) == std::numeric_limits<float>::infinity());
  CHECK(bf16(1.0f).bits == 0x3f80);
  CHECK(bf16::from_bits(0x3f80) == 1.0f);
  CHECK(float(std::numeric_limits<bf16>::max()) == 0x1.fep127f);
  CHECK(float(std::numeric_limits<bf16>::lowest()) == -0x1.fep127f);
  CHECK(float(std::numeric_limits<bf16>::epsilon()) == step);
  CHECK(float(std::numeric_limits<bf16>::infinity()) == std::numeric_limits<float>::infinity());
  CHECK(std::isnan(float(std::numeric_limits<bf16>::quiet_NaN())));
  // Arithmetic is float arithmetic; compound assignment rounds once.
  bf16 x(1.0f);
  x += step / 4;
  CHECK(float(x) == 1.0f);
  const float sum = bf16(1.5f) + bf16(0.25f);
  CHECK(sum == 1.75f);
  CHECK(std::is_same_v<promoe::compute_t<bf16>, float>);
  CHECK(std::is_same_v<promoe::compute_t<double>, double>);
  for (float v : random_vector<float>(10000, 78, 1000.0)) {
    const bf16 h(v);
    CHECK(float(h) == promoe::round_to_bf16(v));
    CHECK(float(bf16(float(h))) == float(h));  // bf16 values convert back exactly
  }
}

TEST_CASE("round_to_bf16: nearest bf16, ties to even; NaN, infinities and overflow", "[core][bf16]") {
  using promoe::round_to_bf16;
  const float one = 1.0f, step = std::ldexp(1.0f, -7);  // bf16's spacing in [1, 2)
  CHECK(round_to_bf16(one) == one);
  CHECK(round_to_bf16(one + step / 2) == one);                      // tie: to the even 1.0
  CHECK(round_to_bf16(one + 3 * step / 2) == one + 2 * step);       // tie: to the even 1 + 2 step
  CHECK(round_to_bf16(one + step / 2 + std::ldexp(1.0f, -20)) == one + step);
  CHECK(round_to_bf16(-one - step / 4) == -one);
  CHECK(round_to_bf16(std::numeric_limits<float>::infinity()) == std::numeric_limits<float>::infinity());
  CHECK(round_to_bf16(-std::numeric_limits<float>::infinity()) == -std::numeric_limits<float>::infinity());
  CHECK(std::isnan(round_to_bf16(std::numeric_limits<float>::quiet_NaN())));
  CHECK(std::isnan(round_to_bf16(std::numeric_limits<float>::signaling_NaN())));
  CHECK(round_to_bf16(std::numeric_limits<float>::max()) == std::numeric_limits<float>::infinity());
  CHECK(round_to_bf16(0.0f) == 0.0f);
  const auto v = random_vector<float>(10000, 77, 1000.0);
  for (float x : v) {
    const float r = round_to_bf16(x);
    CHECK((std::bit_cast<std::uint32_t>(r) & 0xffffu) == 0u);  // a bf16 value
    CHECK(std::abs(r - x) <= std::ldexp(std::abs(x), -8));     // within half a bf16 step
  }
}

TEST_CASE("matmul precision: names, and a scope restores the previous setting", "[core][bf16]") {
  using promoe::matmul_precision;
  CHECK(promoe::parse_matmul_precision("bf16") == matmul_precision::bf16);
  CHECK(promoe::parse_matmul_precision("highest") == matmul_precision::highest);
  REQUIRE_THROWS_WITH(promoe::parse_matmul_precision("fp8"), Catch::Contains("'fp8'") && Catch::Contains("bf16"));
  REQUIRE(promoe::get_matmul_precision() == matmul_precision::highest);
  {
    promoe::matmul_precision_scope scope(matmul_precision::bf16);
    CHECK(promoe::get_matmul_precision() == matmul_precision::bf16);
  }
  CHECK(promoe::get_matmul_precision() == matmul_precision::highest);
}

TEST_CASE("gemm: the host kernel is OpenBLAS's where it has one for the CPU, else Eigen's; PROMOE_GEMM decides",
          "[core][backend][gemm]") {
  using promoe::detail::host_gemm_kernel;
  using promoe::detail::pick_host_gemm_kernel;
  CHECK(pick_host_gemm_kernel("", "cooperlake") == host_gemm_kernel::openblas);
  CHECK(pick_host_gemm_kernel("", "haswell") == host_gemm_kernel::openblas);
  CHECK(pick_host_gemm_kernel("", "prescott") == host_gemm_kernel::eigen);  // Debian's fallback kernel
  CHECK(pick_host_gemm_kernel("", "unknown") == host_gemm_kernel::eigen);
  CHECK(pick_host_gemm_kernel("", "") == host_gemm_kernel::eigen);  // built without OpenBLAS
  CHECK(pick_host_gemm_kernel("eigen", "skylakex") == host_gemm_kernel::eigen);
  CHECK(pick_host_gemm_kernel("openblas", "prescott") == host_gemm_kernel::openblas);
  REQUIRE_THROWS_WITH(pick_host_gemm_kernel("mkl", "zen"),
                      Catch::Contains("PROMOE_GEMM=mkl") && Catch::Contains("expected eigen or openblas"));
  REQUIRE_THROWS_WITH(pick_host_gemm_kernel("openblas", ""), Catch::Contains("built without OpenBLAS"));
}

TEMPLATE_LIST_TEST_CASE("gemm_strided_batched: every product of the batch, strides beyond the matrices",
                        "[core][backend][gemm]", test_configs) {
  using B = typename TestType::backend;
  using T = typename TestType::scalar;
  const index_t m = 5, n = 7, k = 6, batch = 4;
  std::uint64_t seed = 7000;
  for (transpose ta : {transpose::no, transpose::yes})
    for (transpose tb : {transpose::no, transpose::yes}) {
      const bool at = ta == transpose::yes, bt = tb == transpose::yes;
      const index_t lda = (at ? m : k) + 1, ldb = (bt ? k : n) + 2, ldc = n + 3;
      // strides leave gaps between the batch's matrices (and C's gaps must survive)
      const index_t sa = (at ? k : m) * lda + 5, sb = (bt ? n : k) * ldb + 3, sc = m * ldc + 4;
      const auto ha = random_vector<T>(static_cast<std::size_t>(batch * sa), seed++);
      const auto hb = random_vector<T>(static_cast<std::size_t>(batch * sb), seed++);
      const auto hc = random_vector<T>(static_cast<std::size_t>(batch * sc), seed++);
      auto da = to_device<B>(ha, {batch * sa});
      auto db = to_device<B>(hb, {batch * sb});
      auto dc = to_device<B>(hc, {batch * sc});
      const double alpha = 0.5, beta = -1.5;
      promoe::ops::gemm_strided_batched<B, T>(ta, tb, m, n, k, T(alpha), da.data(), lda, sa, db.data(), ldb, sb, T(beta),
                                              dc.data(), ldc, sc, batch);
      const auto got = dc.to_host();
      auto want = std::vector<double>(hc.begin(), hc.end());
      for (index_t i = 0; i < batch; ++i)
        for (index_t r = 0; r < m; ++r)
          for (index_t j = 0; j < n; ++j) {
            double acc = 0;
            for (index_t p = 0; p < k; ++p)
              acc += static_cast<double>(ha[i * sa + (at ? p * lda + r : r * lda + p)]) *
                     static_cast<double>(hb[i * sb + (bt ? j * ldb + p : p * ldb + j)]);
            double& w = want[i * sc + r * ldc + j];
            w = alpha * acc + beta * w;
          }
      double diff = 0, scale = 0;
      for (std::size_t i = 0; i < want.size(); ++i) {
        diff = std::max(diff, std::abs(static_cast<double>(got[i]) - want[i]));
        scale = std::max(scale, std::abs(want[i]));
      }
      INFO(promoe::backend_traits<B>::name << " ta=" << at << " tb=" << bt);
      CHECK(diff / scale < promoe_test::tolerance<T>());
    }
}

namespace {

struct grouped_shape {
  index_t m, n, k;
  transpose ta, tb;
  double alpha, beta;
};

/// One ops::gemm_grouped call over `shapes` (each operand in its own padded region of one
/// buffer per operand, leading dimensions padded by `pad`) against float64 loops; C's padding
/// must survive. Returns nothing; checks within `tol` of the largest result.
template <class B, class T>
void check_gemm_grouped(const std::vector<grouped_shape>& shapes, index_t pad, std::uint64_t seed, double tol) {
  index_t size_a = 0, size_b = 0, size_c = 0;
  struct layout {
    index_t lda, ldb, ldc, oa, ob, oc;
  };
  std::vector<layout> at;
  const auto padded = [&](index_t v) { return pad == 0 ? v : (v + pad) / pad * pad; };
  for (const grouped_shape& s : shapes) {
    const bool ta = s.ta == transpose::yes, tb = s.tb == transpose::yes;
    layout l{padded((ta ? s.m : s.k) + 1), padded((tb ? s.k : s.n) + 2), padded(s.n + 3), size_a, size_b, size_c};
    size_a += padded((ta ? s.k : s.m) * l.lda + 2);
    size_b += padded((tb ? s.n : s.k) * l.ldb + 2);
    size_c += padded(s.m * l.ldc + 2);
    at.push_back(l);
  }
  const auto ha = random_vector<T>(static_cast<std::size_t>(size_a), seed);
  const auto hb = random_vector<T>(static_cast<std::size_t>(size_b), seed + 1);
  const auto hc = random_vector<T>(static_cast<std::size_t>(size_c), seed + 2);
  auto da = to_device<B>(ha, {size_a});
  auto db = to_device<B>(hb, {size_b});
  auto dc = to_device<B>(hc, {size_c});
  std::vector<promoe::gemm_problem<T>> problems;
  for (std::size_t i = 0; i < shapes.size(); ++i) {
    const grouped_shape& s = shapes[i];
    const layout& l = at[i];
    problems.push_back({s.ta, s.tb, s.m, s.n, s.k, T(s.alpha), da.data() + l.oa, l.lda, db.data() + l.ob, l.ldb,
                        T(s.beta), dc.data() + l.oc, l.ldc});
  }
  promoe::ops::gemm_grouped<B, T>(problems);
  const auto got = dc.to_host();
  std::vector<double> want(hc.size());
  for (std::size_t i = 0; i < hc.size(); ++i) want[i] = static_cast<double>(hc[i]);  // the padding must survive
  for (std::size_t i = 0; i < shapes.size(); ++i) {
    const grouped_shape& s = shapes[i];
    const layout& l = at[i];
    const bool ta = s.ta == transpose::yes, tb = s.tb == transpose::yes;
    for (index_t r = 0; r < s.m; ++r)
      for (index_t j = 0; j < s.n; ++j) {
        double acc = 0;
        for (index_t p = 0; p < s.k; ++p)
          acc += static_cast<double>(ha[l.oa + (ta ? p * l.lda + r : r * l.lda + p)]) *
                 static_cast<double>(hb[l.ob + (tb ? j * l.ldb + p : p * l.ldb + j)]);
        double& w = want[l.oc + r * l.ldc + j];
        w = s.alpha * acc + s.beta * w;
      }
  }
  double diff = 0, scale = 0;
  for (std::size_t i = 0; i < want.size(); ++i) {
    diff = std::max(diff, std::abs(static_cast<double>(got[i]) - want[i]));
    scale = std::max(scale, std::abs(want[i]));
  }
  INFO(promoe::backend_traits<B>::name << ": " << shapes.size() << " problems, leading dimensions padded to " << pad);
  CHECK(diff / scale < tol);
}

#if defined(PROMOE_TEST_THRUST)
using grouped_gemm_configs =
    std::tuple<config<promoe::backend::cpu, double>, config<promoe::backend::cpu, float>,
               config<promoe::backend::cpu, promoe::bf16>, config<promoe::backend::thrust, double>,
               config<promoe::backend::thrust, float>, config<promoe::backend::thrust, promoe::bf16>>;
#else
using grouped_gemm_configs = std::tuple<config<promoe::backend::cpu, double>, config<promoe::backend::cpu, float>,
                                        config<promoe::backend::cpu, promoe::bf16>>;
#endif

}  // namespace

TEMPLATE_LIST_TEST_CASE("gemm_grouped: every problem with its own sizes, transposes and scales; empty ones skipped",
                        "[core][backend][gemm]", grouped_gemm_configs) {
  using B = typename TestType::backend;
  using T = typename TestType::scalar;
  // bf16: C rounded once (half a step, 2^-9 relative) on sums of bf16 products
  const double tol = std::is_same_v<T, promoe::bf16> ? 1e-2 : promoe_test::tolerance<T>();
  // experts' shapes: rows differ per problem, one has no rows, one has no inner size (C *= beta)
  const std::vector<grouped_shape> awkward = {{5, 7, 6, transpose::no, transpose::yes, 1.0, 0.0},
                                              {0, 7, 6, transpose::no, transpose::yes, 1.0, 0.0},
                                              {9, 3, 4, transpose::yes, transpose::no, 0.5, 1.0},
                                              {1, 6, 11, transpose::no, transpose::no, 1.0, 1.0},
                                              {4, 5, 0, transpose::yes, transpose::yes, 1.0, -0.5},
                                              {3, 0, 2, transpose::no, transpose::no, 1.0, 1.0},
                                              {13, 8, 3, transpose::yes, transpose::yes, -1.25, 0.25}};
  check_gemm_grouped<B, T>(awkward, 0, 7100, tol);
  // many problems with 16-byte aligned operands (on a GPU: one cuBLAS grouped call whose
  // pointer arrays take several writing launches), twice in a row without a wait between
  std::vector<grouped_shape> many;
  for (index_t i = 0; i < 40; ++i)
    many.push_back({8 + 3 * (i % 5), 16, 8 * (1 + i % 3), i % 2 ? transpose::yes : transpose::no,
                    i % 3 ? transpose::no : transpose::yes, 1.0, i % 2 ? 1.0 : 0.0});
  check_gemm_grouped<B, T>(many, 8, 7200, tol);
  check_gemm_grouped<B, T>(many, 8, 7300, tol);
}

TEMPLATE_TEST_CASE("small_gemm: op(A) B overwrites C, every tile and tail width, padded leading dimensions",
                   "[core][gemm]", float, double) {
  using T = TestType;
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const T c_pad = T(12345);
  std::uint64_t seed = 9000;
  // Row counts around the 4-row tile; column counts around one and two SIMD packets (4, 8,
  // 16 lanes) and attention's sizes (49 and 64 tokens, head dims 24 and 32).
  for (transpose ta : {transpose::no, transpose::yes})
    for (index_t m : {1, 3, 4, 5, 9, 49, 64})
      for (index_t n : {1, 3, 4, 5, 8, 15, 16, 17, 24, 31, 32, 33, 49, 64, 70})
        for (index_t k : {1, 7, 24, 64}) {
          const bool at = ta == transpose::yes;
          const index_t lda = (at ? m : k) + 3, ldb = n + 2, ldc = n + 1;
          // NaN in the padding of A and B and in C: any read outside op(A), B or of C's old
          // values poisons the result.
          const auto a = padded_matrix<T>(at ? k : m, at ? m : k, lda, seed++, nan);
          const auto b = padded_matrix<T>(k, n, ldb, seed++, nan);
          std::vector<T> c(static_cast<std::size_t>(m * ldc), c_pad);
          for (index_t i = 0; i < m; ++i)
            for (index_t j = 0; j < n; ++j) c[i * ldc + j] = nan;
          const double alpha = -0.625;
          if (at) {
            promoe::detail::small_gemm<T, transpose::yes>(m, n, k, T(alpha), a.data(), lda, b.data(), ldb, c.data(), ldc);
          } else {
            promoe::detail::small_gemm<T, transpose::no>(m, n, k, T(alpha), a.data(), lda, b.data(), ldb, c.data(), ldc);
          }
          double worst = 0;
          bool pad_ok = true;
          for (index_t i = 0; i < m; ++i) {
            for (index_t j = 0; j < n; ++j) {
              double acc = 0, mag = 0;
              for (index_t p = 0; p < k; ++p) {
                const double prod = static_cast<double>(at ? a[p * lda + i] : a[i * lda + p]) *
                                    static_cast<double>(b[p * ldb + j]);
                acc += prod;
                mag += std::abs(prod);
              }
              const double g = static_cast<double>(c[i * ldc + j]);
              const double err = std::isfinite(g) ? std::abs(g - alpha * acc) / std::max(1.0, mag)
                                                  : std::numeric_limits<double>::infinity();
              worst = std::max(worst, err);
            }
            for (index_t j = n; j < ldc; ++j) pad_ok = pad_ok && c[i * ldc + j] == c_pad;
          }
          INFO("ta=" << at << " m=" << m << " n=" << n << " k=" << k);
          CHECK(worst <= promoe_test::tolerance<T>());
          CHECK(pad_ok);
        }
}

TEMPLATE_LIST_TEST_CASE("gemm: k = 0, alpha = 0 and empty outputs", "[core][backend][gemm]", test_configs) {
  using B = typename TestType::backend;
  using T = typename TestType::scalar;
  for (transpose ta : {transpose::no, transpose::yes})
    for (transpose tb : {transpose::no, transpose::yes}) {
      // k = 0: C = beta C (beta = 0 zeroes, NaN included)
      for (double beta : {0.0, 1.0, 0.5}) check_gemm<B, T>(ta, tb, 5, 3, 0, 1.0, beta, 7);
      // alpha = 0 with a NaN-free A and B: C = beta C
      for (double beta : {0.0, 2.0}) check_gemm<B, T>(ta, tb, 4, 6, 3, 0.0, beta, 8);
    }
  // m = 0 or n = 0: nothing is touched (null pointers allowed).
  std::vector<T> c{T(1), T(2)};
  auto dc = to_device<B>(c, {2});
  const T* none = nullptr;
  promoe::backend_traits<B>::gemm(transpose::no, transpose::no, 0, 2, 3, T(1), none, 3, none, 2, T(0),
                                  static_cast<T*>(nullptr), 2);
  promoe::backend_traits<B>::gemm(transpose::no, transpose::no, 1, 0, 3, T(1), none, 3, none, 2, T(0), dc.data(), 2);
  CHECK(dc.to_host() == c);
}

TEMPLATE_LIST_TEST_CASE("ops::gemm on views checks shapes and honours views' leading dimensions",
                        "[core][backend][gemm]", test_configs) {
  using B = typename TestType::backend;
  using T = typename TestType::scalar;
  // A 3x4 block (columns 1..4) of a 3x6 matrix times a 4x2 matrix.
  const auto ha = random_vector<T>(18, 11), hb = random_vector<T>(8, 12);
  auto a = to_device<B>(ha, {3, 6});
  auto b = to_device<B>(hb, {4, 2});
  promoe::tensor<T, B> c({3, 2});
  promoe::ops::gemm<B, T>(a.cmatrix().col_block(1, 4), transpose::no, b.cmatrix(), transpose::no, c.matrix());
  const auto hc = c.to_host();
  for (index_t i = 0; i < 3; ++i)
    for (index_t j = 0; j < 2; ++j) {
      double ref = 0;
      for (index_t p = 0; p < 4; ++p) ref += double(ha[i * 6 + 1 + p]) * double(hb[p * 2 + j]);
      CHECK(double(hc[i * 2 + j]) == Approx(ref).epsilon(promoe_test::tolerance<T>()).margin(promoe_test::tolerance<T>()));
    }
  auto mismatched = [&] { promoe::ops::gemm<B, T>(a.cmatrix(), transpose::no, b.cmatrix(), transpose::no, c.matrix()); };
  REQUIRE_THROWS_AS(mismatched(), promoe::error);
  REQUIRE_THROWS_WITH(mismatched(), Catch::Contains("3x6 times 4x2"));
}

namespace {

struct grouping {
  std::vector<index_t> order, offsets;
};

template <class B>
grouping run_group_by_key(const std::vector<std::int32_t>& keys, index_t num_keys) {
  const auto n = static_cast<index_t>(keys.size());
  auto dk = to_device<B>(keys, {n});
  promoe::tensor<index_t, B> order({n}), offsets({num_keys + 1});
  order.fill(-7);
  promoe::backend_traits<B>::group_by_key(dk.data(), n, num_keys, order.data(), offsets.data());
  grouping g{order.to_host(), offsets.to_host()};
  // Only the kept entries are specified.
  g.order.resize(static_cast<std::size_t>(g.offsets.back()));
  return g;
}

grouping naive_group(const std::vector<std::int32_t>& keys, index_t num_keys) {
  grouping g;
  g.offsets.push_back(0);
  for (index_t e = 0; e < num_keys; ++e) {
    for (std::size_t i = 0; i < keys.size(); ++i)
      if (keys[i] == e) g.order.push_back(static_cast<index_t>(i));
    g.offsets.push_back(static_cast<index_t>(g.order.size()));
  }
  return g;
}

/// Keys in [-2, num_keys): about one in six negative (dropped).
std::vector<std::int32_t> random_keys(std::size_t n, index_t num_keys, std::uint64_t seed) {
  std::vector<std::int32_t> keys(n);
  for (std::size_t i = 0; i < n; ++i) {
    const double u = promoe::rng::uniform(seed, 1, i);
    keys[i] = u < 1.0 / 6 ? -1 - static_cast<std::int32_t>(i % 2)
                          : static_cast<std::int32_t>(promoe::rng::uniform(seed, 2, i) * static_cast<double>(num_keys));
  }
  return keys;
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("group_by_key: stable, negative keys dropped, offsets", "[core][backend][group]",
                        test_backends) {
  using B = TestType;
  SECTION("hand-made keys") {
    const std::vector<std::int32_t> keys{2, -1, 0, 2, 3, 0, -5, 2, 0};
    const auto g = run_group_by_key<B>(keys, 5);  // key 1 and key 4 empty
    CHECK(g.offsets == std::vector<index_t>{0, 3, 3, 6, 7, 7});
    CHECK(g.order == std::vector<index_t>{2, 5, 8, 0, 3, 7, 4});
  }
  SECTION("all negative") {
    const auto g = run_group_by_key<B>({-1, -1, -3}, 3);
    CHECK(g.offsets == std::vector<index_t>{0, 0, 0, 0});
    CHECK(g.order.empty());
  }
  SECTION("all one key") {
    const auto g = run_group_by_key<B>({1, 1, 1, 1}, 3);
    CHECK(g.offsets == std::vector<index_t>{0, 0, 4, 4});
    CHECK(g.order == std::vector<index_t>{0, 1, 2, 3});
  }
  SECTION("random keys") {
    for (std::size_t n : {std::size_t{0}, std::size_t{1}, std::size_t{733}})
      for (index_t num_keys : {index_t{1}, index_t{5}, index_t{64}}) {
        const auto keys = random_keys(n, num_keys, 31 + n + static_cast<std::size_t>(num_keys));
        const auto got = run_group_by_key<B>(keys, num_keys);
        const auto want = naive_group(keys, num_keys);
        INFO("n = " << n << ", keys = " << num_keys);
        CHECK(got.offsets == want.offsets);
        CHECK(got.order == want.order);
      }
  }
}

#if defined(PROMOE_TEST_THRUST)
TEST_CASE("group_by_key: cpu and thrust agree exactly", "[core][backend][group]") {
  for (std::size_t n : {std::size_t{0}, std::size_t{1}, std::size_t{733}, std::size_t{5000}})
    for (index_t num_keys : {index_t{1}, index_t{8}, index_t{200}}) {
      const auto keys = random_keys(n, num_keys, 77 + n);
      const auto c = run_group_by_key<promoe::backend::cpu>(keys, num_keys);
      const auto t = run_group_by_key<promoe::backend::thrust>(keys, num_keys);
      INFO("n = " << n << ", keys = " << num_keys);
      CHECK(c.offsets == t.offsets);
      CHECK(c.order == t.order);
    }
}
#endif

namespace {
template <class T>
struct write_index_functor {
  T* out;
  PROMOE_HOST_DEVICE void operator()(index_t i) const { out[i] += T(2 * i + 1); }
};
}  // namespace

TEMPLATE_LIST_TEST_CASE("parallel_for visits every index once", "[core][backend]", test_configs) {
  using B = typename TestType::backend;
  using T = typename TestType::scalar;
  for (index_t n : {index_t{0}, index_t{1}, index_t{33}, index_t{127}, index_t{128}, index_t{129}, index_t{1000}}) {
    promoe::tensor<T, B> t({n});
    t.fill(T(0));
    promoe::backend_traits<B>::parallel_for(n, write_index_functor<T>{t.data()});
    const auto h = t.to_host();
    bool ok = true;
    for (index_t i = 0; i < n; ++i) ok = ok && h[i] == T(2 * i + 1);
    INFO("n = " << n);
    CHECK(ok);
  }
}

TEMPLATE_LIST_TEST_CASE("fill, copy, copy_to_host, copy_from_host", "[core][backend]", test_configs) {
  using B = typename TestType::backend;
  using T = typename TestType::scalar;
  using traits = promoe::backend_traits<B>;
  const auto values = random_vector<T>(257, 5);
  promoe::tensor<T, B> a({257}), b({257});
  traits::fill(a.data(), 257, T(-3));
  CHECK(a.to_host() == std::vector<T>(257, T(-3)));
  traits::fill(a.data(), 100, T(4));  // a prefix only
  auto h = a.to_host();
  CHECK(std::count(h.begin(), h.end(), T(4)) == 100);
  CHECK(h[100] == T(-3));
  traits::copy_from_host(values.data(), 257, a.data());
  traits::copy(a.data(), 257, b.data());
  std::vector<T> back(257);
  traits::copy_to_host(b.data(), 257, back.data());
  CHECK(back == values);
  // n = 0 touches nothing, null pointers included.
  traits::copy(static_cast<const T*>(nullptr), 0, static_cast<T*>(nullptr));
  traits::copy_to_host(static_cast<const T*>(nullptr), 0, static_cast<T*>(nullptr));
  traits::copy_from_host(static_cast<const T*>(nullptr), 0, static_cast<T*>(nullptr));
  traits::fill(static_cast<T*>(nullptr), 0, T(1));
  // ops::copy between views with different leading dimensions.
  auto src = to_device<B>(values, {257});
  promoe::tensor<T, B> wide({4, 9});
  wide.fill(T(0));
  promoe::ops::copy<B>(promoe::const_matrix_view<T>{src.data(), 4, 5, 7},
                       promoe::matrix_view<T>{wide.data(), 4, 5, 9});
  const auto w = wide.to_host();
  bool ok = true;
  for (index_t r = 0; r < 4; ++r)
    for (index_t c = 0; c < 9; ++c) ok = ok && w[r * 9 + c] == (c < 5 ? values[r * 7 + c] : T(0));
  CHECK(ok);
}

TEMPLATE_LIST_TEST_CASE("sum accumulates in double", "[core][backend]", test_configs) {
  using B = typename TestType::backend;
  using T = typename TestType::scalar;
  using traits = promoe::backend_traits<B>;
  for (std::size_t n : {std::size_t{0}, std::size_t{1}, std::size_t{1000}, std::size_t{100000}}) {
    const auto values = random_vector<T>(n, 9 + n, 3.0);
    auto t = to_device<B>(values, {static_cast<index_t>(n)});
    double ref = 0, mag = 0;
    for (T v : values) {
      ref += static_cast<double>(v);
      mag += std::abs(static_cast<double>(v));
    }
    const T got = traits::sum(t.data(), static_cast<index_t>(n));
    STATIC_REQUIRE(std::is_same_v<decltype(traits::sum(t.data(), index_t{})), T>);
    INFO("n = " << n);
    // float: only the final rounding to float; double: rounding of a double sum.
    CHECK(std::abs(static_cast<double>(got) - ref) <=
          (sizeof(T) == 4 ? 1e-7 * std::abs(ref) + 1e-30 : 1e-14 * mag + 1e-300));
  }
  // Large cancellation that a float accumulator would lose: 1e8 + 1 + ... - 1e8.
  std::vector<T> v(1001, T(1));
  v.front() = T(1e8);
  v.back() = T(-1e8);
  auto t = to_device<B>(v, {1001});
  CHECK(traits::sum(t.data(), 1001) == T(999));
}

TEMPLATE_LIST_TEST_CASE("ops::sum_into: a scaled double sum left in device memory, chunked and deterministic",
                        "[core][backend]", test_configs) {
  using B = typename TestType::backend;
  using T = typename TestType::scalar;
  promoe::tensor<double, B> partial, out({2});
  promoe::tensor<float, B> out_f({1});
  // around the chunk size (1024) and several chunks
  for (std::size_t n : {std::size_t{0}, std::size_t{1}, std::size_t{1023}, std::size_t{1024}, std::size_t{1025},
                        std::size_t{5000}}) {
    INFO("n = " << n);
    const auto values = random_vector<T>(n, 19 + n, 3.0);
    auto t = to_device<B>(values, {static_cast<index_t>(n)});
    // reference: the chunks of 1024 in index order, then the chunks in order
    double want = 0, mag = 0;
    for (std::size_t first = 0; first < n; first += 1024) {
      double chunk = 0;
      for (std::size_t i = first; i < std::min(n, first + 1024); ++i) chunk += static_cast<double>(values[i]);
      want += chunk;
    }
    for (T v : values) mag += std::abs(static_cast<double>(v));
    out.fill(-1.0);
    promoe::ops::sum_into<B>(t.data(), static_cast<index_t>(n), 0.25, out.data() + 1, partial);
    const auto got = out.to_host();
    CHECK(got[0] == -1.0);  // only its own element is written
    CHECK(got[1] == 0.25 * want);
    double naive = 0;
    for (T v : values) naive += static_cast<double>(v);
    CHECK(std::abs(got[1] - 0.25 * naive) <= 1e-14 * mag);
    // into a float: the double sum rounded once
    promoe::ops::sum_into<B>(t.data(), static_cast<index_t>(n), 0.25, out_f.data(), partial);
    CHECK(out_f.to_host()[0] == static_cast<float>(0.25 * want));
  }
}

TEMPLATE_LIST_TEST_CASE("first_non_finite finds the first NaN or Inf", "[core][backend]", test_configs) {
  using B = typename TestType::backend;
  using T = typename TestType::scalar;
  using traits = promoe::backend_traits<B>;
  const T nan = std::numeric_limits<T>::quiet_NaN(), inf = std::numeric_limits<T>::infinity();
  auto first = [](std::vector<T> v) {
    auto t = to_device<B>(v, {static_cast<index_t>(v.size())});
    return traits::first_non_finite(t.data(), static_cast<index_t>(v.size()));
  };
  std::vector<T> clean = random_vector<T>(500, 3);
  clean[10] = std::numeric_limits<T>::max();
  clean[11] = std::numeric_limits<T>::denorm_min();
  CHECK(first(clean) == -1);
  CHECK(first({}) == -1);
  auto v = clean;
  v[377] = nan;
  CHECK(first(v) == 377);
  v[123] = inf;
  CHECK(first(v) == 123);
  v[0] = -inf;
  CHECK(first(v) == 0);
  v = clean;
  v[499] = -nan;
  CHECK(first(v) == 499);
  CHECK(traits::first_non_finite(static_cast<const T*>(nullptr), 0) == -1);
}

TEMPLATE_LIST_TEST_CASE("Backend concept holds", "[core][backend]", test_backends) {
  STATIC_REQUIRE(promoe::Backend<TestType>);
  STATIC_REQUIRE(std::string_view(promoe::backend_traits<TestType>::name).size() > 0);
}
