// SPDX-License-Identifier: Apache-2.0
// The sample evaluator's pieces (promoe/eval): Gaussian statistics and the Fréchet distance
// against a float64 reference in plain loops (Denman-Beavers matrix square root) and known
// closed forms; improved precision / recall on hand-made point sets with known answers and
// against a brute-force reference; the feature classifier's gradients by central finite
// differences in float64, its loss, training on a tiny separable problem, its checkpoint;
// and the errors for bad shapes and files.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include <promoe/eval.hpp>
#include <promoe/io/npz.hpp>

#include "temp_dir.hpp"

using namespace promoe;
using Catch::Contains;
namespace fs = std::filesystem;

namespace {

using hvec = std::vector<double>;
using hmat = std::vector<hvec>;  // row-major, square or [n][d]

// ---------------------------------------------------------------------------
// float64 references, plain loops
// ---------------------------------------------------------------------------

hmat matmul(const hmat& a, const hmat& b) {
  const std::size_t n = a.size(), m = b[0].size(), k = b.size();
  hmat c(n, hvec(m, 0.0));
  for (std::size_t i = 0; i < n; ++i)
    for (std::size_t p = 0; p < k; ++p)
      for (std::size_t j = 0; j < m; ++j) c[i][j] += a[i][p] * b[p][j];
  return c;
}

hmat identity(std::size_t n) {
  hmat a(n, hvec(n, 0.0));
  for (std::size_t i = 0; i < n; ++i) a[i][i] = 1;
  return a;
}

/// Gauss-Jordan inverse with partial pivoting.
hmat inverse(hmat a) {
  const std::size_t n = a.size();
  hmat inv = identity(n);
  for (std::size_t c = 0; c < n; ++c) {
    std::size_t piv = c;
    for (std::size_t r = c + 1; r < n; ++r)
      if (std::abs(a[r][c]) > std::abs(a[piv][c])) piv = r;
    std::swap(a[c], a[piv]);
    std::swap(inv[c], inv[piv]);
    const double d = a[c][c];
    for (std::size_t j = 0; j < n; ++j) a[c][j] /= d, inv[c][j] /= d;
    for (std::size_t r = 0; r < n; ++r) {
      if (r == c) continue;
      const double f = a[r][c];
      for (std::size_t j = 0; j < n; ++j) a[r][j] -= f * a[c][j], inv[r][j] -= f * inv[c][j];
    }
  }
  return inv;
}

/// sqrt(A) for A with positive real eigenvalues (here S1 S2), by the Denman-Beavers iteration.
hmat sqrtm_denman_beavers(const hmat& a) {
  hmat y = a, z = identity(a.size());
  for (int it = 0; it < 100; ++it) {
    const hmat yi = inverse(y), zi = inverse(z);
    double change = 0;
    for (std::size_t i = 0; i < a.size(); ++i)
      for (std::size_t j = 0; j < a.size(); ++j) {
        const double ny = 0.5 * (y[i][j] + zi[i][j]);
        change = std::max(change, std::abs(ny - y[i][j]));
        y[i][j] = ny;
        z[i][j] = 0.5 * (z[i][j] + yi[i][j]);
      }
    if (change < 1e-15) break;
  }
  return y;
}

struct ref_stats {
  hvec mean;
  hmat cov;
};

ref_stats ref_fit(const hmat& x) {
  const std::size_t n = x.size(), d = x[0].size();
  ref_stats s{hvec(d, 0.0), hmat(d, hvec(d, 0.0))};
  for (const auto& row : x)
    for (std::size_t j = 0; j < d; ++j) s.mean[j] += row[j] / static_cast<double>(n);
  for (const auto& row : x)
    for (std::size_t i = 0; i < d; ++i)
      for (std::size_t j = 0; j < d; ++j) s.cov[i][j] += (row[i] - s.mean[i]) * (row[j] - s.mean[j]);
  for (auto& r : s.cov)
    for (double& v : r) v /= static_cast<double>(n - 1);
  return s;
}

/// |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrtm(S1 S2).
double ref_frechet(const ref_stats& a, const ref_stats& b) {
  double fd = 0;
  for (std::size_t i = 0; i < a.mean.size(); ++i) fd += (a.mean[i] - b.mean[i]) * (a.mean[i] - b.mean[i]);
  const hmat root = sqrtm_denman_beavers(matmul(a.cov, b.cov));
  for (std::size_t i = 0; i < a.mean.size(); ++i) fd += a.cov[i][i] + b.cov[i][i] - 2 * root[i][i];
  return fd;
}

eval::gaussian_stats to_stats(const ref_stats& r) {
  const auto d = static_cast<Eigen::Index>(r.mean.size());
  eval::gaussian_stats s;
  s.mean.resize(d);
  s.cov.resize(d, d);
  for (Eigen::Index i = 0; i < d; ++i) {
    s.mean(i) = r.mean[static_cast<std::size_t>(i)];
    for (Eigen::Index j = 0; j < d; ++j) s.cov(i, j) = r.cov[static_cast<std::size_t>(i)][static_cast<std::size_t>(j)];
  }
  s.count = 100;
  return s;
}

/// n samples of N(mu, A A^T) with A a random d x d matrix (plus `ridge` I, so it is well
/// conditioned), as rows.
hmat gaussian_samples(std::size_t n, std::size_t d, double shift, std::uint64_t seed) {
  rng gen(seed);
  const auto sa = gen.next_stream(), sz = gen.next_stream();
  hmat a(d, hvec(d));
  for (std::size_t i = 0; i < d; ++i)
    for (std::size_t j = 0; j < d; ++j) a[i][j] = 0.5 * gen.normal(sa, i * d + j) + (i == j ? 1.0 : 0.0);
  hmat x(n, hvec(d, shift));
  for (std::size_t r = 0; r < n; ++r)
    for (std::size_t i = 0; i < d; ++i)
      for (std::size_t j = 0; j < d; ++j) x[r][i] += a[i][j] * gen.normal(sz, r * d + j);
  return x;
}

std::vector<double> flatten(const hmat& x) {
  std::vector<double> out;
  for (const auto& r : x) out.insert(out.end(), r.begin(), r.end());
  return out;
}

/// A random symmetric positive definite matrix.
hmat random_spd(std::size_t d, std::uint64_t seed) {
  rng gen(seed);
  const auto s = gen.next_stream();
  hmat a(d, hvec(d));
  for (std::size_t i = 0; i < d; ++i)
    for (std::size_t j = 0; j < d; ++j) a[i][j] = gen.normal(s, i * d + j);
  hmat c = identity(d);
  for (std::size_t i = 0; i < d; ++i)
    for (std::size_t j = 0; j < d; ++j)
      for (std::size_t p = 0; p < d; ++p) c[i][j] += a[i][p] * a[j][p];
  return c;
}

using promoe_test::temp_dir;

eval::feature_matrix points(const std::vector<std::vector<double>>& rows) {
  eval::feature_matrix m(static_cast<Eigen::Index>(rows.size()), static_cast<Eigen::Index>(rows[0].size()));
  for (std::size_t i = 0; i < rows.size(); ++i)
    for (std::size_t j = 0; j < rows[i].size(); ++j)
      m(static_cast<Eigen::Index>(i), static_cast<Eigen::Index>(j)) = rows[i][j];
  return m;
}

/// Brute-force improved precision (recall: swap the arguments), sqrt distances in plain loops.
double ref_coverage(const hmat& refs, const hmat& queries, std::size_t k) {
  const auto dist = [](const hvec& a, const hvec& b) {
    double s = 0;
    for (std::size_t i = 0; i < a.size(); ++i) s += (a[i] - b[i]) * (a[i] - b[i]);
    return std::sqrt(s);
  };
  hvec radius(refs.size());
  for (std::size_t i = 0; i < refs.size(); ++i) {
    hvec d;
    for (std::size_t j = 0; j < refs.size(); ++j)
      if (j != i) d.push_back(dist(refs[i], refs[j]));
    std::sort(d.begin(), d.end());
    radius[i] = d[k - 1];
  }
  std::size_t in = 0;
  for (const auto& q : queries) {
    bool inside = false;
    for (std::size_t j = 0; j < refs.size() && !inside; ++j) inside = dist(q, refs[j]) <= radius[j];
    in += inside;
  }
  return static_cast<double>(in) / static_cast<double>(queries.size());
}

}  // namespace

// ---------------------------------------------------------------------------
// Fréchet distance
// ---------------------------------------------------------------------------

TEST_CASE("fit_gaussian matches the float64 mean and unbiased covariance", "[eval][frechet]") {
  const hmat x = gaussian_samples(300, 6, 0.5, 11);
  const auto flat = flatten(x);
  const auto s = eval::fit_gaussian(const_matrix_view<double>(flat.data(), 300, 6));
  const ref_stats r = ref_fit(x);
  CHECK(s.count == 300);
  REQUIRE(s.dim() == 6);
  for (int i = 0; i < 6; ++i) {
    CHECK(s.mean(i) == Approx(r.mean[i]).epsilon(1e-12).margin(1e-13));
    for (int j = 0; j < 6; ++j) CHECK(s.cov(i, j) == Approx(r.cov[i][j]).epsilon(1e-11).margin(1e-13));
  }
  // float input, accumulated in double
  const std::vector<float> f(flat.begin(), flat.end());
  const auto sf = eval::fit_gaussian(const_matrix_view<float>(f.data(), 300, 6));
  CHECK((sf.cov - s.cov).cwiseAbs().maxCoeff() < 1e-5);
}

TEST_CASE("frechet_distance agrees with a float64 Denman-Beavers reference", "[eval][frechet]") {
  for (const std::size_t d : {1u, 3u, 8u}) {
    const hmat x = gaussian_samples(200, d, 0.0, 3 + d), y = gaussian_samples(150, d, 0.7, 40 + d);
    const auto fx = flatten(x), fy = flatten(y);
    const auto sx = eval::fit_gaussian(const_matrix_view<double>(fx.data(), 200, static_cast<index_t>(d)));
    const auto sy = eval::fit_gaussian(const_matrix_view<double>(fy.data(), 150, static_cast<index_t>(d)));
    const double ref = ref_frechet(ref_fit(x), ref_fit(y));
    INFO("d = " << d << ", reference " << ref);
    CHECK(eval::frechet_distance(sx, sy) == Approx(ref).epsilon(1e-9));
    CHECK(eval::frechet_distance(sy, sx) == Approx(ref).epsilon(1e-9));  // symmetric
  }
  // covariances that do not commute, given directly
  const ref_stats a{{1, 2, 3, 4, 5}, random_spd(5, 7)}, b{{0, 2, 1, 4, 4}, random_spd(5, 8)};
  CHECK(eval::frechet_distance(to_stats(a), to_stats(b)) == Approx(ref_frechet(a, b)).epsilon(1e-10));
}

TEST_CASE("frechet_distance closed forms", "[eval][frechet]") {
  SECTION("identical distributions give 0") {
    const hmat x = gaussian_samples(100, 7, 1.0, 5);
    const auto fx = flatten(x);
    const auto s = eval::fit_gaussian(const_matrix_view<double>(fx.data(), 100, 7));
    const double fd = eval::frechet_distance(s, s);
    CHECK(fd >= 0.0);
    CHECK(fd < 1e-10 * s.cov.trace());
  }
  SECTION("N(0, I) vs N(mu, I) gives |mu|^2") {
    eval::gaussian_stats a, b;
    a.mean = Eigen::VectorXd::Zero(4);
    b.mean = Eigen::VectorXd{{1.0, -2.0, 0.5, 3.0}};
    a.cov = b.cov = Eigen::MatrixXd::Identity(4, 4);
    CHECK(eval::frechet_distance(a, b) == Approx(1 + 4 + 0.25 + 9).epsilon(1e-13));
  }
  SECTION("diagonal covariances give sum (sqrt a - sqrt b)^2 plus the mean term") {
    eval::gaussian_stats a, b;
    const Eigen::VectorXd da{{1.0, 4.0, 9.0, 0.25, 2.0}}, db{{4.0, 4.0, 1.0, 1.0, 8.0}};
    a.mean = Eigen::VectorXd::Zero(5);
    b.mean = Eigen::VectorXd::Constant(5, 0.5);
    a.cov = da.asDiagonal();
    b.cov = db.asDiagonal();
    double want = 5 * 0.25;
    for (int i = 0; i < 5; ++i) want += std::pow(std::sqrt(da(i)) - std::sqrt(db(i)), 2);
    CHECK(eval::frechet_distance(a, b) == Approx(want).epsilon(1e-12));
  }
  SECTION("a singular covariance (rank-deficient features) is fine") {
    eval::gaussian_stats a, b;
    a.mean = b.mean = Eigen::VectorXd::Zero(3);
    a.cov = Eigen::Vector3d(1.0, 0.0, 4.0).asDiagonal();
    b.cov = Eigen::Vector3d(1.0, 9.0, 1.0).asDiagonal();
    CHECK(eval::frechet_distance(a, b) == Approx(0 + 9 + 1).epsilon(1e-12));
  }
}

TEST_CASE("fit_gaussian and frechet_distance reject bad input", "[eval][frechet][errors]") {
  const std::vector<double> one{1, 2, 3};
  CHECK_THROWS_WITH(eval::fit_gaussian(const_matrix_view<double>(one.data(), 1, 3), "sample features"),
                    Contains("sample features need at least 2 rows"));
  std::vector<double> bad{1, 2, 3, NAN, 5, 6};
  CHECK_THROWS_WITH(eval::fit_gaussian(const_matrix_view<double>(bad.data(), 2, 3)), Contains("[1, 0] is not finite"));
  eval::gaussian_stats a, b;
  a.mean = Eigen::VectorXd::Zero(3);
  a.cov = Eigen::MatrixXd::Identity(3, 3);
  b.mean = Eigen::VectorXd::Zero(4);
  b.cov = Eigen::MatrixXd::Identity(4, 4);
  CHECK_THROWS_WITH(eval::frechet_distance(a, b), Contains("dimensions 3") && Contains("and 4"));
}

// ---------------------------------------------------------------------------
// precision and recall
// ---------------------------------------------------------------------------

TEST_CASE("precision and recall on hand-made 1-D sets (k = 1)", "[eval][pr]") {
  // real 0 2 4 6 8: every 1-NN radius is 2.
  const auto real = points({{0}, {2}, {4}, {6}, {8}});
  // fake 1 3 9 10 30 50: radii 2 2 1 1 20 20. Inside the real balls: 1, 3, 9, 10 (on the
  // boundary of 8's ball): precision 4/6. Real points inside fake balls: 0 (1's), 2, 4 (3's),
  // 8 (9's, boundary); not 6 (3 away from 3 and 9, 24 from 30): recall 4/5.
  const auto fake = points({{1}, {3}, {9}, {10}, {30}, {50}});
  const auto r2 = eval::knn_squared_radii(real, 1);
  CHECK(r2 == std::vector<double>{4, 4, 4, 4, 4});
  CHECK(eval::knn_squared_radii(fake, 1) == std::vector<double>{4, 4, 1, 1, 400, 400});
  const auto pr = eval::precision_recall(real, fake, 1);
  CHECK(pr.precision == Approx(4.0 / 6.0));
  CHECK(pr.recall == Approx(4.0 / 5.0));
  // the roles swap
  const auto rp = eval::precision_recall(fake, real, 1);
  CHECK(rp.precision == pr.recall);
  CHECK(rp.recall == pr.precision);
  // k = 2: the ends' 2nd neighbour is 4 away, the others' 2 away
  CHECK(eval::knn_squared_radii(real, 2) == std::vector<double>{16, 4, 4, 4, 16});
}

TEST_CASE("precision and recall on a hand-made 2-D set (k = 3)", "[eval][pr]") {
  // real: the corners of a 2x2 square and its centre. 3rd-NN squared radii: corners 4, centre 2.
  const auto real = points({{0, 0}, {0, 2}, {2, 0}, {2, 2}, {1, 1}});
  CHECK(eval::knn_squared_radii(real, 3) == std::vector<double>{4, 4, 4, 4, 2});
  // fake: (3,0) in (1 from (2,0)); (5,5) out; (1,1) in; (-2,0) in (on (0,0)'s boundary);
  // (1,4) out (5 from (0,2) and (2,2), 9 from the centre): precision 3/5.
  // Fake 3rd-NN squared radii: 25 32 10 25 20; every real point is within 25 of (3,0): recall 1.
  const auto fake = points({{3, 0}, {5, 5}, {1, 1}, {-2, 0}, {1, 4}});
  CHECK(eval::knn_squared_radii(fake, 3) == std::vector<double>{25, 32, 10, 25, 20});
  const auto pr = eval::precision_recall(real, fake);  // k = 3 by default
  CHECK(pr.precision == Approx(3.0 / 5.0));
  CHECK(pr.recall == 1.0);
  // identical sets: everything is covered
  const auto same = eval::precision_recall(real, real);
  CHECK(same.precision == 1.0);
  CHECK(same.recall == 1.0);
  // duplicates count as neighbours (radius 0), the point itself does not
  const auto dup = points({{0, 0}, {0, 0}, {5, 5}});
  CHECK(eval::knn_squared_radii(dup, 1) == std::vector<double>{0, 0, 50});
}

TEST_CASE("precision and recall agree with a brute-force reference on random features", "[eval][pr]") {
  // More queries than a block, so several blocks (and threads) take part.
  const hmat real = gaussian_samples(300, 6, 0.0, 21), fake = gaussian_samples(170, 6, 0.8, 22);
  const auto fr = flatten(real), ff = flatten(fake);
  const std::vector<float> fr32(fr.begin(), fr.end()), ff32(ff.begin(), ff.end());
  for (const index_t k : {1, 3, 5}) {
    const auto pr = eval::precision_recall(const_matrix_view<double>(fr.data(), 300, 6),
                                           const_matrix_view<double>(ff.data(), 170, 6), k);
    INFO("k = " << k);
    CHECK(pr.precision == ref_coverage(real, fake, static_cast<std::size_t>(k)));
    CHECK(pr.recall == ref_coverage(fake, real, static_cast<std::size_t>(k)));
    CHECK(pr.precision > 0.0);
    CHECK(pr.precision < 1.0);
  }
  const auto pr32 = eval::precision_recall(const_matrix_view<float>(fr32.data(), 300, 6),
                                           const_matrix_view<float>(ff32.data(), 170, 6));
  CHECK(pr32.precision == Approx(ref_coverage(real, fake, 3)).margin(2.0 / 170));
}

TEST_CASE("precision and recall reject bad input", "[eval][pr][errors]") {
  const auto three = points({{0, 0}, {1, 0}, {0, 1}});
  const auto four = points({{0, 0}, {1, 0}, {0, 1}, {1, 1}});
  CHECK_THROWS_WITH(eval::precision_recall(three, four, 3), Contains("both sets need more than 3 points"));
  CHECK_THROWS_WITH(eval::knn_squared_radii(three, 0), Contains("k must be >= 1"));
  CHECK_THROWS_WITH(eval::precision_recall(four, points({{0}, {1}, {2}, {3}, {4}}), 1),
                    Contains("real features have 2 columns, fake features 1"));
  auto nan = four;
  nan(2, 1) = NAN;
  CHECK_THROWS_WITH(eval::precision_recall(nan, four, 1), Contains("real features hold NaN or Inf"));
  CHECK_THROWS_WITH(eval::manifold_coverage(four, {1, 1}, four), Contains("2 radii for 4 reference points"));
}

// ---------------------------------------------------------------------------
// feature_net
// ---------------------------------------------------------------------------

namespace {

eval::feature_net_config small_config() {
  eval::feature_net_config c;
  c.input = {2, 3, 1};
  c.hidden1 = 5;
  c.hidden2 = 4;
  c.classes = 3;
  return c;
}

std::vector<double> random_inputs(index_t n, index_t d, std::uint64_t seed) {
  rng gen(seed);
  const auto s = gen.next_stream();
  std::vector<double> x(static_cast<std::size_t>(n * d));
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = 2 * gen.uniform(s, i) - 1;
  return x;
}

}  // namespace

TEST_CASE("feature_net: parameters, forward shapes and the cross-entropy", "[eval][feature_net]") {
  eval::feature_net<double> net(small_config(), rng{3});
  std::vector<std::string> names;
  for (const auto& p : net.parameters()) names.push_back(p.name + detail::shape_string(p.shape));
  CHECK(names == std::vector<std::string>{"fc1.weight[5, 6]", "fc1.bias[5]", "fc2.weight[4, 5]", "fc2.bias[4]",
                                          "fc3.weight[3, 4]", "fc3.bias[3]"});
  CHECK(eval::feature_net_config{}.in_features() == 784);

  const index_t n = 4;
  const auto x = random_inputs(n, 6, 9);
  eval::feature_net<double>::cache c;
  net.forward(const_matrix_view<double>(x.data(), n, 6), c);
  CHECK(c.features().rows == n);
  CHECK(c.features().cols == 4);
  CHECK(c.logits.shape() == std::vector<index_t>{n, 3});

  // the loss against log-softmax by hand
  const std::vector<std::int64_t> labels{0, 2, 1, 2};
  eval::cross_entropy_workspace<double, backend::cpu> ws;
  tensor<double, backend::cpu> dz({n, 3});
  const double loss = eval::softmax_cross_entropy<double, backend::cpu>(c.logits.cmatrix(), labels, dz.matrix(), ws);
  const auto z = c.logits.to_host();
  const auto g = dz.to_host();
  double want = 0;
  for (index_t r = 0; r < n; ++r) {
    double s = 0;
    for (index_t j = 0; j < 3; ++j) s += std::exp(z[r * 3 + j]);
    want -= std::log(std::exp(z[r * 3 + labels[r]]) / s) / static_cast<double>(n);
    for (index_t j = 0; j < 3; ++j)
      CHECK(g[r * 3 + j] == Approx((std::exp(z[r * 3 + j]) / s - (j == labels[r])) / n).epsilon(1e-12));
  }
  CHECK(loss == Approx(want).epsilon(1e-13));
}

TEST_CASE("feature_net: gradients by central finite differences (float64)", "[eval][feature_net]") {
  eval::feature_net<double> net(small_config(), rng{5});
  const index_t n = 5;
  const auto x = random_inputs(n, 6, 17);
  const std::vector<std::int64_t> labels{2, 0, 1, 1, 0};
  eval::feature_net<double>::cache c;
  eval::cross_entropy_workspace<double, backend::cpu> ws;
  tensor<double, backend::cpu> dz({n, 3});
  const auto loss_of = [&] {
    net.forward(const_matrix_view<double>(x.data(), n, 6), c);
    return eval::softmax_cross_entropy<double, backend::cpu>(c.logits.cmatrix(), labels, matrix_view<double>{}, ws);
  };
  // analytic gradient (backward must accumulate: start from noise and subtract it)
  auto params = net.parameters();
  std::vector<std::vector<double>> noise;
  for (auto& p : params) {
    noise.emplace_back(static_cast<std::size_t>(p.size()));
    for (index_t i = 0; i < p.size(); ++i) p.grad[i] = noise.back()[i] = 0.01 * static_cast<double>(i % 7);
  }
  net.forward(const_matrix_view<double>(x.data(), n, 6), c);
  eval::softmax_cross_entropy<double, backend::cpu>(c.logits.cmatrix(), labels, dz.matrix(), ws);
  net.backward(dz.cmatrix(), c);
  double worst = 0;
  for (std::size_t k = 0; k < params.size(); ++k) {
    auto& p = params[k];
    for (index_t i = 0; i < p.size(); ++i) {
      const double saved = p.value[i], h = 1e-6;
      p.value[i] = saved + h;
      const double up = loss_of();
      p.value[i] = saved - h;
      const double down = loss_of();
      p.value[i] = saved;
      const double numeric = (up - down) / (2 * h);
      const double analytic = p.grad[i] - noise[k][static_cast<std::size_t>(i)];
      worst = std::max(worst, std::abs(numeric - analytic) / std::max(1e-3, std::abs(numeric)));
      INFO(p.name << "[" << i << "]: numeric " << numeric << ", analytic " << analytic);
      REQUIRE(std::abs(numeric - analytic) <= 1e-7 * std::max(1.0, std::abs(numeric)));
    }
  }
  CHECK(worst < 1e-6);
  // zero_grad clears
  net.zero_grad();
  for (const auto& p : net.parameters())
    for (index_t i = 0; i < p.size(); ++i) REQUIRE(p.grad[i] == 0.0);
}

TEST_CASE("feature_net: training separates a tiny synthetic problem", "[eval][feature_net]") {
  // 3 classes of 2x3 "images": a bright pixel at a class-specific place plus noise.
  eval::image_set train;
  train.shape = {2, 3, 1};
  train.n = 240;
  rng gen(1);
  const auto s = gen.next_stream();
  for (index_t i = 0; i < train.n; ++i) {
    const std::int64_t y = i % 3;
    train.labels.push_back(y);
    for (index_t j = 0; j < 6; ++j)
      train.pixels.push_back(static_cast<float>((j == 2 * y ? 0.8 : -0.5) + 0.3 * gen.normal(s, i * 6 + j)));
  }
  eval::feature_net<float> net(small_config(), rng{2});
  eval::feature_net_training opt;
  opt.epochs = 20;
  opt.batch = 32;
  opt.lr = 1e-2;
  opt.warmup_steps = 10;
  std::vector<double> epoch_loss;
  index_t calls = 0;
  eval::train_feature_net(net, train, opt, [&](const eval::training_progress& p) {
    ++calls;
    if (p.end_of_epoch) epoch_loss.push_back(p.loss);
  });
  CHECK(calls == 20 * 8);
  REQUIRE(epoch_loss.size() == 20);
  CHECK(epoch_loss.back() < 0.5 * epoch_loss.front());
  const auto e = eval::embed(net, train, 50);
  CHECK(e.n == 240);
  CHECK(e.dim == 4);
  CHECK(eval::accuracy(e.predictions, train.labels) > 0.95);
}

TEST_CASE("feature_net: checkpoint round trip and a refused other architecture", "[eval][feature_net][io]") {
  temp_dir dir("ckpt");
  eval::feature_net<float> a(small_config(), rng{1}), b(small_config(), rng{2});
  const std::string path = dir.file("net.safetensors");
  eval::save_feature_net(path, a, {{"test_accuracy", "0.5"}});
  const auto info = eval::load_feature_net(path, b);
  CHECK(info.extra.at("test_accuracy") == "0.5");
  const auto pa = a.parameters(), pb = b.parameters();
  for (std::size_t k = 0; k < pa.size(); ++k)
    for (index_t i = 0; i < pa[k].size(); ++i) REQUIRE(pa[k].value[i] == pb[k].value[i]);

  auto other_cfg = small_config();
  other_cfg.hidden2 = 7;
  eval::feature_net<float> other(other_cfg, rng{1});
  CHECK_THROWS_WITH(eval::load_feature_net(path, other), Contains(path));
  // an unrelated file
  io::write_samples_npz(dir.file("x.npz"), std::vector<std::uint8_t>(6, 0), 1, 2, 3, 1, std::vector<std::int64_t>{0});
  CHECK_THROWS_WITH(eval::load_feature_net(dir.file("x.npz"), b), Contains(dir.file("x.npz")));
  CHECK_THROWS_WITH(eval::load_feature_net(dir.file("missing.safetensors"), b), Contains("missing.safetensors"));
}

// ---------------------------------------------------------------------------
// images and shapes
// ---------------------------------------------------------------------------

TEST_CASE("read_samples_npz: values, labels and clear shape errors", "[eval][images][errors]") {
  temp_dir dir("npz");
  const eval::image_shape fm{28, 28, 1};
  {
    std::vector<std::uint8_t> px(2 * 784, 0);
    px[0] = 255;
    px[784] = 51;
    io::write_samples_npz(dir.file("ok.npz"), px, 2, 28, 28, 1, std::vector<std::int64_t>{3, 9});
    const auto s = eval::read_samples_npz(dir.file("ok.npz"), fm, 10);
    CHECK(s.n == 2);
    CHECK(s.pixels.size() == 2 * 784);
    CHECK(s.pixels[0] == 1.0f);
    CHECK(s.pixels[1] == -1.0f);
    CHECK(s.pixels[784] == Approx(51 / 127.5 - 1));
    CHECK(s.labels == std::vector<std::int64_t>{3, 9});
    CHECK_THROWS_WITH(eval::read_samples_npz(dir.file("ok.npz"), fm, 5),
                      Contains("ok.npz: 'labels': label 9 of image 1 is outside 0..4"));
  }
  {  // RGB 32x32 samples (mini-32) for a 28x28x1 classifier
    io::write_samples_npz(dir.file("rgb.npz"), std::vector<std::uint8_t>(2 * 32 * 32 * 3), 2, 32, 32, 3, {});
    CHECK_THROWS_WITH(eval::read_samples_npz(dir.file("rgb.npz"), fm),
                      Contains("rgb.npz: 'arr_0' has shape [2, 32, 32, 3], expected images [N, 28, 28, 1]"));
  }
  {  // no labels: fine, has_labels() false
    io::write_samples_npz(dir.file("nolabels.npz"), std::vector<std::uint8_t>(784), 1, 28, 28, 1, {});
    CHECK_FALSE(eval::read_samples_npz(dir.file("nolabels.npz"), fm).has_labels());
  }
  {  // float images and mismatched labels
    io::npz_writer w;
    w.add<float>("arr_0", {1, 28, 28, 1}, std::vector<float>(784));
    w.write(dir.file("float.npz"));
    CHECK_THROWS_WITH(eval::read_samples_npz(dir.file("float.npz"), fm),
                      Contains("float.npz: 'arr_0' has dtype '<f4', expected uint8"));
    io::npz_writer v;
    v.add<std::uint8_t>("arr_0", {2, 28, 28}, std::vector<std::uint8_t>(2 * 784));
    v.add<std::int64_t>("labels", {3}, std::vector<std::int64_t>{0, 1, 2});
    v.write(dir.file("labels.npz"));
    CHECK_THROWS_WITH(eval::read_samples_npz(dir.file("labels.npz"), fm),
                      Contains("labels.npz: 'labels' has shape [3], expected [2]"));
    io::npz_writer u;
    u.add<std::uint8_t>("images", {1, 28, 28, 1}, std::vector<std::uint8_t>(784));
    u.write(dir.file("noarr.npz"));
    CHECK_THROWS_WITH(eval::read_samples_npz(dir.file("noarr.npz"), fm), Contains("no array 'arr_0'"));
  }
  CHECK_THROWS_WITH(eval::read_samples_npz(dir.file("absent.npz"), fm), Contains("absent.npz: no such file"));
}

TEST_CASE("feature_net and embed reject inputs of the wrong shape", "[eval][feature_net][errors]") {
  eval::feature_net<float> net(small_config(), rng{1});
  eval::feature_net<float>::cache c;
  const std::vector<float> x(10);
  CHECK_THROWS_WITH(net.forward(const_matrix_view<float>(x.data(), 2, 5), c),
                    Contains("feature_net: input [2, 5], expected [N, 6] (2x3x1 images"));
  eval::image_set s;
  s.n = 1;
  s.shape = {28, 28, 1};
  s.pixels.assign(784, 0.0f);
  CHECK_THROWS_WITH(eval::embed(net, s), Contains("images of shape [28, 28, 1], the classifier expects [2, 3, 1]"));
  io::labelled_images set;
  set.N = 1, set.H = 32, set.W = 32, set.C = 3;
  set.pixels.assign(32 * 32 * 3, 0);
  set.labels = {0};
  CHECK_THROWS_WITH(eval::from_labelled_images(set, {28, 28, 1}, "the reference set"),
                    Contains("the reference set: images of shape [32, 32, 3], expected [28, 28, 1]"));
}
