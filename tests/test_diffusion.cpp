// SPDX-License-Identifier: Apache-2.0
/// \file test_diffusion.cpp
/// \brief Diffusion objectives, samplers and classifier-free guidance (dit/objective.hpp,
/// dit/sampler.hpp, dit/guidance.hpp): batches against float64 formulas recomputed from the
/// same Philox draws, the loss and its gradient against naive loops and finite differences,
/// the DDPM schedule and its respacing against DiT's numbers, and every sampler on Gaussian
/// data with closed-form exact models, where the answer is known.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>

#include <promoe/dit/guidance.hpp>
#include <promoe/dit/objective.hpp>
#include <promoe/dit/sampler.hpp>

#include "backends.hpp"

using promoe::index_t;
using promoe::rng;
using promoe::tensor;
namespace dit = promoe::dit;
namespace streams = promoe::dit::streams;

namespace {

// ---------------------------------------------------------------------------
// Naive float64 references
// ---------------------------------------------------------------------------

/// betas = linspace(1e-4, 0.02, 1000), ᾱ = cumprod(1 − β), written out plainly.
std::vector<double> reference_alphas_cumprod(index_t steps = 1000, double b0 = 1e-4, double b1 = 0.02) {
  std::vector<double> acp(static_cast<std::size_t>(steps));
  double prod = 1.0;
  for (index_t i = 0; i < steps; ++i) {
    const double beta = i == steps - 1 ? b1 : b0 + (b1 - b0) * static_cast<double>(i) / static_cast<double>(steps - 1);
    prod *= 1.0 - beta;
    acp[static_cast<std::size_t>(i)] = prod;
  }
  return acp;
}

double mean_of(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x;
  return s / static_cast<double>(v.size());
}

double std_of(const std::vector<double>& v) {
  const double m = mean_of(v);
  double s = 0;
  for (double x : v) s += (x - m) * (x - m);
  return std::sqrt(s / static_cast<double>(v.size() - 1));
}

template <class T>
std::vector<double> as_double(const std::vector<T>& v) {
  return std::vector<double>(v.begin(), v.end());
}

// ---------------------------------------------------------------------------
// Exact models for Gaussian (mixture) data
// ---------------------------------------------------------------------------
//
// Data: class k in {0, 1} has x0 ~ N(mu_k, s^2) per element, independently; the null label
// is the equal mixture of the two classes. With x = a x0 + b ε (flow: a = 1 − σ, b = σ;
// DDPM: a = sqrt(ᾱ), b = sqrt(1 − ᾱ)) and V = a^2 s^2 + b^2, one component gives
//   E[x0 | x] = mu + a s^2 (x − a mu) / V,   E[ε | x] = b (x − a mu) / V,
// and the mixture weighs the components by their posterior probability given x.

constexpr double mu0 = 0.5, mu1 = -0.5, data_std = 0.3;
constexpr std::int64_t null_label = 2;
constexpr double extra_channel_value = 777.0;  // written to learned-sigma channels: must be ignored

/// out[n, c, h, w]: the exact velocity (ε − x0) or ε prediction for sample n.
template <class T>
struct gaussian_model_functor {
  const T* x;            // [N, C, H, W]
  T* out;                // [N, C_out, H, W]
  const double* coef;    // [N, 3]: a, b, kind (0, 1: class; 2: mixture)
  index_t channels, out_channels, plane;
  double m0, m1, s2;
  bool velocity;
  PROMOE_HOST_DEVICE void operator()(index_t i) const {
    const index_t n = i / (out_channels * plane);
    const index_t c = (i / plane) % out_channels;
    const index_t p = i % plane;
    if (c >= channels) {
      out[i] = static_cast<T>(extra_channel_value);
      return;
    }
    const double xv = static_cast<double>(x[(n * channels + c) * plane + p]);
    const double a = coef[3 * n], b = coef[3 * n + 1], kind = coef[3 * n + 2];
    const double var = a * a * s2 + b * b;
    double w0 = kind == 0.0 ? 1.0 : 0.0;
    if (kind == 2.0) {
      const double d0 = xv - a * m0, d1 = xv - a * m1;
      // p(k | x) for equal weights and equal variances: a logistic of the log-likelihood ratio
      w0 = 1.0 / (1.0 + std::exp((d0 * d0 - d1 * d1) / (2.0 * var)));
    }
    double ex0 = 0, eeps = 0;
    const double ms[2] = {m0, m1};
    const double ws[2] = {w0, 1.0 - w0};
    for (int k = 0; k < 2; ++k) {
      const double d = xv - a * ms[k];
      ex0 += ws[k] * (ms[k] + a * s2 * d / var);
      eeps += ws[k] * (b * d / var);
    }
    out[i] = static_cast<T>(velocity ? eeps - ex0 : eeps);
  }
};

/// The exact model as a dit::DiffusionModel: flow (velocity, t = 1000 σ) or DDPM (ε, t the step).
template <class T, class B>
struct gaussian_model {
  bool velocity = true;
  bool learn_sigma = false;
  std::vector<double> acp = reference_alphas_cumprod();
  int calls = 0;
  std::vector<std::int64_t> last_labels;
  tensor<double, B> coef;

  void operator()(const tensor<T, B>& x, const std::vector<T>& t, std::span<const std::int64_t> y, tensor<T, B>& out) {
    ++calls;
    last_labels.assign(y.begin(), y.end());
    const index_t n = x.dim(0);
    std::vector<double> c(static_cast<std::size_t>(3 * n));
    for (index_t s = 0; s < n; ++s) {
      double a, b;
      if (velocity) {
        const double sigma = static_cast<double>(t[s]) / 1000.0;
        a = 1.0 - sigma;
        b = sigma;
      } else {
        const double ab = acp.at(static_cast<std::size_t>(t[s]));
        a = std::sqrt(ab);
        b = std::sqrt(1.0 - ab);
      }
      c[3 * s] = a;
      c[3 * s + 1] = b;
      c[3 * s + 2] = static_cast<double>(y[s]);
    }
    coef = tensor<double, B>::from_host(c, {n, 3});
    const index_t c_out = learn_sigma ? 2 * x.dim(1) : x.dim(1);
    out.resize({n, c_out, x.dim(2), x.dim(3)});
    promoe::backend_traits<B>::parallel_for(
        out.size(), gaussian_model_functor<T>{x.data(), out.data(), coef.data(), x.dim(1), c_out, x.dim(2) * x.dim(3),
                                              mu0, mu1, data_std * data_std, velocity});
  }
};

/// A model whose output depends on the labels in a way that makes cond and uncond differ.
template <class T, class B>
struct label_echo_model {
  int calls = 0;
  std::vector<std::vector<std::int64_t>> labels_seen;
  void operator()(const tensor<T, B>& x, const std::vector<T>& t, std::span<const std::int64_t> y, tensor<T, B>& out) {
    ++calls;
    labels_seen.emplace_back(y.begin(), y.end());
    const auto xs = x.to_host();
    const index_t n = x.dim(0), per = x.size() / n;
    std::vector<T> o(static_cast<std::size_t>(2 * x.size()));  // learn_sigma: 2C channels
    for (index_t s = 0; s < n; ++s)
      for (index_t j = 0; j < 2 * per; ++j)
        o[s * 2 * per + j] = static_cast<T>(std::sin(0.37 * static_cast<double>(j) + static_cast<double>(y[s])) +
                                            0.01 * static_cast<double>(t[s]) +
                                            static_cast<double>(xs[s * per + j % per]));
    out = tensor<T, B>::from_host(o, {n, 2 * x.dim(1), x.dim(2), x.dim(3)});
  }
};

struct not_a_model {
  void operator()(int) {}
};

template <class T>
double tol_for() {
  return promoe_test::tolerance<T>();
}

}  // namespace

// ---------------------------------------------------------------------------
// The model contract
// ---------------------------------------------------------------------------

TEST_CASE("DiffusionModel accepts models and guided models, rejects other callables", "[dit][concept]") {
  using B = promoe::backend::cpu;
  STATIC_REQUIRE(dit::DiffusionModel<gaussian_model<float, B>, float, B>);
  STATIC_REQUIRE(dit::DiffusionModel<gaussian_model<double, B>, double, B>);
  STATIC_REQUIRE_FALSE(dit::DiffusionModel<gaussian_model<float, B>, double, B>);
  STATIC_REQUIRE_FALSE(dit::DiffusionModel<not_a_model, float, B>);
  STATIC_REQUIRE(dit::DiffusionModel<dit::guided_model<gaussian_model<float, B>&, float, B>, float, B>);
  STATIC_REQUIRE(dit::DiffusionModel<dit::guided_model<gaussian_model<float, B>, float, B>, float, B>);
}

// ---------------------------------------------------------------------------
// Schedules and spacing
// ---------------------------------------------------------------------------

TEST_CASE("DDPM linear schedule and DiT's timestep spacings", "[dit][schedule]") {
  const auto s = dit::ddpm_schedule::linear();
  const auto acp = reference_alphas_cumprod();
  REQUIRE(s.size() == 1000);
  CHECK(s.betas.front() == 1e-4);
  CHECK(s.betas.back() == 0.02);
  for (std::size_t i = 0; i < 1000; ++i) {
    CHECK(s.alphas_cumprod[i] == Approx(acp[i]).epsilon(1e-13));
    CHECK(s.timesteps[i] == static_cast<std::int64_t>(i));
  }
  CHECK(s.alpha_cumprod_prev(0) == 1.0);
  CHECK(s.alphas_cumprod.back() == Approx(4.035e-5).epsilon(1e-3));  // DiT's ᾱ_999

  // space_timesteps(1000, [N]) as DiT computes it (Python round: half to even).
  CHECK(dit::space_timesteps(1000, 7) == std::vector<std::int64_t>{0, 166, 333, 500, 666, 832, 999});
  const auto s250 = dit::space_timesteps(1000, 250);
  REQUIRE(s250.size() == 250);
  CHECK(s250[29] == 116);
  CHECK(s250.back() == 999);
  std::int64_t sum = 0;
  for (auto v : s250) sum += v;
  CHECK(sum == 124875);
  const auto s100 = dit::space_timesteps(1000, 100);
  CHECK(std::vector<std::int64_t>(s100.begin(), s100.begin() + 8) == std::vector<std::int64_t>{0, 10, 20, 30, 40, 50, 61, 71});
  CHECK(dit::space_timesteps(1000, 1) == std::vector<std::int64_t>{0});
  CHECK_THROWS_AS(dit::space_timesteps(1000, 0), promoe::error);
  CHECK_THROWS_AS(dit::space_timesteps(10, 11), promoe::error);

  const auto d100 = dit::ddim_timesteps(1000, 100);
  REQUIRE(d100.size() == 100);
  for (std::size_t j = 0; j < 100; ++j) CHECK(d100[j] == static_cast<std::int64_t>(10 * j));
  CHECK(dit::ddim_timesteps(1000, 3) == std::vector<std::int64_t>{0, 334, 668});
  CHECK_THROWS_AS(dit::ddim_timesteps(1000, 999), promoe::error);

  // Respacing keeps ᾱ at the kept steps and maps indices to the original timesteps.
  const auto r = s.respaced(s250);
  REQUIRE(r.size() == 250);
  for (std::size_t j = 0; j < 250; ++j) {
    CHECK(r.timesteps[j] == s250[j]);
    CHECK(r.alphas_cumprod[j] == s.alphas_cumprod[static_cast<std::size_t>(s250[j])]);
    const double prev = j ? s.alphas_cumprod[static_cast<std::size_t>(s250[j - 1])] : 1.0;
    CHECK((1.0 - r.betas[j]) * prev == Approx(r.alphas_cumprod[j]).epsilon(1e-14));
  }
  CHECK_THROWS_AS(s.respaced({5, 5}), promoe::error);
  CHECK_THROWS_AS(s.respaced({1000}), promoe::error);
  CHECK_THROWS_AS(s.respaced({}), promoe::error);
  CHECK_THROWS_AS(dit::ddpm_schedule::linear(0), promoe::error);
}

// ---------------------------------------------------------------------------
// Objectives: batches
// ---------------------------------------------------------------------------

TEMPLATE_LIST_TEST_CASE("rectified_flow batch matches the float64 formulas on the same draws", "[dit][objective]",
                        test_configs) {
  using B = typename TestType::backend;
  using T = typename TestType::scalar;
  const index_t N = 7, C = 3, H = 5, W = 3, per = C * H * W;
  const auto x0h = random_vector<T>(static_cast<std::size_t>(N * per), 3);
  const auto x0 = to_device<B>(x0h, {N, C, H, W});
  const std::uint64_t seed = 11, step = 5;
  const auto batch = dit::rectified_flow{}.sample(x0, seed, step);
  REQUIRE(batch.x_t.shape() == x0.shape());
  REQUIRE(batch.target.shape() == x0.shape());
  REQUIRE(batch.t.size() == static_cast<std::size_t>(N));
  CHECK(batch.timestep.empty());
  const auto xt = batch.x_t.to_host();
  const auto tg = batch.target.to_host();
  for (index_t n = 0; n < N; ++n) {
    const double logit = rng::normal(seed, streams::training_time(step), static_cast<std::uint64_t>(n));
    const double sigma = 1.0 / (1.0 + std::exp(-logit));
    CHECK(batch.sigma[n] == Approx(sigma).epsilon(1e-15));
    CHECK(batch.t[n] == static_cast<T>(1000.0 * sigma));
    for (index_t j = 0; j < per; ++j) {
      const index_t i = n * per + j;
      const double e = rng::normal(seed, streams::training_noise(step), static_cast<std::uint64_t>(i));
      const double x = static_cast<double>(x0h[i]);
      CHECK(static_cast<double>(xt[i]) == Approx((1.0 - sigma) * x + sigma * e).epsilon(tol_for<T>()).margin(tol_for<T>()));
      CHECK(static_cast<double>(tg[i]) == Approx(e - x).epsilon(tol_for<T>()).margin(tol_for<T>()));
    }
  }
}

TEMPLATE_LIST_TEST_CASE("ddpm batch matches the float64 formulas on the same draws", "[dit][objective]", test_configs) {
  using B = typename TestType::backend;
  using T = typename TestType::scalar;
  const index_t N = 19, C = 2, H = 3, W = 1, per = C * H * W;
  const auto x0h = random_vector<T>(static_cast<std::size_t>(N * per), 4);
  const auto x0 = to_device<B>(x0h, {N, C, H, W});
  const std::uint64_t seed = 5, step = 123;
  const dit::ddpm objective;
  const auto batch = objective.sample(x0, seed, step);
  const auto acp = reference_alphas_cumprod();
  const auto xt = batch.x_t.to_host();
  const auto tg = batch.target.to_host();
  REQUIRE(batch.timestep.size() == static_cast<std::size_t>(N));
  for (index_t n = 0; n < N; ++n) {
    const double u = rng::uniform(seed, streams::training_time(step), static_cast<std::uint64_t>(n));
    const auto ts = static_cast<std::int64_t>(std::floor(1000.0 * u));
    CHECK(batch.timestep[n] == ts);
    CHECK(batch.t[n] == static_cast<T>(ts));
    const double ab = acp[static_cast<std::size_t>(ts)];
    CHECK(batch.sigma[n] == Approx(std::sqrt(1.0 - ab)).epsilon(1e-12));
    for (index_t j = 0; j < per; ++j) {
      const index_t i = n * per + j;
      const double e = rng::normal(seed, streams::training_noise(step), static_cast<std::uint64_t>(i));
      const double x = static_cast<double>(x0h[i]);
      CHECK(static_cast<double>(xt[i]) ==
            Approx(std::sqrt(ab) * x + std::sqrt(1.0 - ab) * e).epsilon(tol_for<T>()).margin(tol_for<T>()));
      CHECK(static_cast<double>(tg[i]) == Approx(e).epsilon(tol_for<T>()).margin(tol_for<T>()));
    }
  }
}

TEMPLATE_LIST_TEST_CASE("objective batches are deterministic in (seed, step) and identical across backends",
                        "[dit][objective][determinism]", test_configs) {
  using B = typename TestType::backend;
  using T = typename TestType::scalar;
  const index_t N = 6, C = 2, H = 4, W = 4;
  const auto x0h = random_vector<T>(static_cast<std::size_t>(N * C * H * W), 8);
  const auto x0 = to_device<B>(x0h, {N, C, H, W});
  const auto x0_cpu = to_device<promoe::backend::cpu>(x0h, {N, C, H, W});
  auto check = [&](const auto& objective) {
    const auto a = objective.sample(x0, 1, 2);
    dit::training_batch<T, B> b;
    objective.sample(x0, 1, 2, b);
    objective.sample(x0, 1, 2, b);  // reuse of a batch's buffers
    CHECK(a.x_t.to_host() == b.x_t.to_host());
    CHECK(a.target.to_host() == b.target.to_host());
    CHECK(a.t == b.t);
    const auto other_step = objective.sample(x0, 1, 3);
    const auto other_seed = objective.sample(x0, 2, 2);
    CHECK(a.x_t.to_host() != other_step.x_t.to_host());
    CHECK(a.t != other_step.t);
    CHECK(a.x_t.to_host() != other_seed.x_t.to_host());
    CHECK(a.t != other_seed.t);
    // Same numbers as the cpu backend, bit for bit (the same functor on the same draws).
    const auto ref = objective.sample(x0_cpu, 1, 2);
    CHECK(a.x_t.to_host() == ref.x_t.to_host());
    CHECK(a.target.to_host() == ref.target.to_host());
    CHECK(a.t == ref.t);
    // A sample's draws do not depend on the batch size: the first 2 of 6 samples as a batch of 2.
    const std::vector<T> head(x0h.begin(), x0h.begin() + 2 * C * H * W);
    const auto small = objective.sample(to_device<B>(head, {2, C, H, W}), 1, 2);
    const auto full = a.x_t.to_host();
    CHECK(small.x_t.to_host() == std::vector<T>(full.begin(), full.begin() + 2 * C * H * W));
    CHECK(small.t == std::vector<T>(a.t.begin(), a.t.begin() + 2));
  };
  check(dit::rectified_flow{});
  check(dit::ddpm{});
}

TEST_CASE("logit-normal sigma and uniform DDPM timesteps over many samples", "[dit][objective][statistics]") {
  using B = promoe::backend::cpu;
  const index_t N = 20000;
  tensor<double, B> xz({N, 1, 1, 1});
  xz.fill(0.0);
  const auto batch = dit::rectified_flow{}.sample(xz, 77, 0);
  std::vector<double> logits(static_cast<std::size_t>(N));
  for (index_t n = 0; n < N; ++n) {
    const double s = batch.sigma[n];
    REQUIRE(s > 0.0);
    REQUIRE(s < 1.0);
    logits[n] = std::log(s / (1.0 - s));
  }
  // Standard errors: mean 1/sqrt(N) = 0.0071; variance sqrt(2/N) = 0.01. Allow 4 of them.
  const double m = mean_of(logits), sd = std_of(logits);
  CHECK(std::abs(m) < 4.0 / std::sqrt(static_cast<double>(N)));
  CHECK(std::abs(sd * sd - 1.0) < 4.0 * std::sqrt(2.0 / static_cast<double>(N)));
  CHECK(std::abs(mean_of(batch.sigma) - 0.5) < 0.01);

  const auto db = dit::ddpm{}.sample(xz, 77, 0);
  std::vector<int> hits(1000, 0);
  double tm = 0;
  for (index_t n = 0; n < N; ++n) {
    REQUIRE(db.timestep[n] >= 0);
    REQUIRE(db.timestep[n] <= 999);
    ++hits[static_cast<std::size_t>(db.timestep[n])];
    tm += static_cast<double>(db.timestep[n]);
  }
  tm /= static_cast<double>(N);
  CHECK(std::abs(tm - 499.5) < 4.0 * 288.7 / std::sqrt(static_cast<double>(N)));
  CHECK(std::count(hits.begin(), hits.end(), 0) == 0);  // 20 expected per step; P(any empty) ~ 2e-6
}

// ---------------------------------------------------------------------------
// Objectives: loss and gradient
// ---------------------------------------------------------------------------

TEMPLATE_LIST_TEST_CASE("loss_and_grad: MSE over the first C channels, against a naive loop and finite differences",
                        "[dit][objective][gradient]", test_configs) {
  using B = typename TestType::backend;
  using T = typename TestType::scalar;
  const index_t N = 3, C = 3, H = 2, W = 5, plane = H * W;
  const auto x0 = to_device<B>(random_vector<T>(static_cast<std::size_t>(N * C * plane), 21), {N, C, H, W});
  for (const bool flow : {true, false}) {
    for (const index_t c_out : {C, 2 * C}) {
      INFO((flow ? "rectified_flow" : "ddpm") << ", C_out = " << c_out);
      const dit::rectified_flow rf;
      const dit::ddpm dd;
      const auto batch = flow ? rf.sample(x0, 3, 9) : dd.sample(x0, 3, 9);
      auto loss_of = [&](const tensor<T, B>& out, tensor<T, B>& d) {
        return flow ? rf.loss_and_grad(out, batch, d) : dd.loss_and_grad(out, batch, d);
      };
      const auto outh = random_vector<T>(static_cast<std::size_t>(N * c_out * plane), 22, 2.0);
      const auto out = to_device<B>(outh, {N, c_out, H, W});
      tensor<T, B> d_out;
      const T loss = loss_of(out, d_out);
      REQUIRE(d_out.shape() == out.shape());

      // Naive: mean over N C H W of (out - target)^2 on the first C channels.
      const auto tg = batch.target.to_host();
      const double count = static_cast<double>(N * C * plane);
      double ref = 0;
      std::vector<double> ref_grad(outh.size(), 0.0);
      for (index_t n = 0; n < N; ++n)
        for (index_t c = 0; c < C; ++c)
          for (index_t p = 0; p < plane; ++p) {
            const index_t io = (n * c_out + c) * plane + p;
            const double d = static_cast<double>(outh[io]) - static_cast<double>(tg[(n * C + c) * plane + p]);
            ref += d * d;
            ref_grad[io] = 2.0 * d / count;
          }
      ref /= count;
      CHECK(static_cast<double>(loss) == Approx(ref).epsilon(tol_for<T>()));
      CHECK(batch.loss() == Approx(ref).epsilon(1e-12));  // the device copy: float64, not rounded to T
      // queued: the same gradient, the loss left in the batch (it was overwritten meanwhile)
      tensor<T, B> d_queued;
      tensor<T, B> other(out.shape());
      other.fill(T(0));
      loss_of(other, d_queued);
      if (flow) rf.queue_loss_and_grad(out, batch, d_queued);
      else dd.queue_loss_and_grad(out, batch, d_queued);
      CHECK(static_cast<T>(batch.loss()) == loss);
      CHECK(d_queued.to_host() == d_out.to_host());
      const auto g = d_out.to_host();
      for (std::size_t i = 0; i < g.size(); ++i)
        CHECK(static_cast<double>(g[i]) == Approx(ref_grad[i]).epsilon(tol_for<T>()).margin(tol_for<T>() * 1e-2));
      for (index_t n = 0; n < N; ++n)  // learned-sigma channels: no gradient
        for (index_t c = C; c < c_out; ++c)
          for (index_t p = 0; p < plane; ++p) CHECK(g[(n * c_out + c) * plane + p] == T(0));

      // Central differences of the library's own loss (exact for a quadratic up to rounding).
      const double h = sizeof(T) == sizeof(double) ? 1e-4 : 1e-2;
      const double fd_tol = sizeof(T) == sizeof(double) ? 1e-9 : 2e-5;
      tensor<T, B> scratch;
      for (std::size_t i = 0; i < outh.size(); i += 7) {
        auto plus = outh, minus = outh;
        plus[i] = static_cast<T>(static_cast<double>(plus[i]) + h);
        minus[i] = static_cast<T>(static_cast<double>(minus[i]) - h);
        const double step = static_cast<double>(plus[i]) - static_cast<double>(minus[i]);
        const double lp = static_cast<double>(loss_of(to_device<B>(plus, out.shape()), scratch));
        const double lm = static_cast<double>(loss_of(to_device<B>(minus, out.shape()), scratch));
        CHECK((lp - lm) / step == Approx(static_cast<double>(g[i])).margin(fd_tol));
      }
    }
  }
}

TEMPLATE_LIST_TEST_CASE("objectives reject bad shapes", "[dit][objective][errors]", test_configs) {
  using B = typename TestType::backend;
  using T = typename TestType::scalar;
  const dit::rectified_flow rf;
  const dit::ddpm dd;
  const tensor<T, B> rank3({2, 3, 4});
  CHECK_THROWS_AS(rf.sample(rank3, 0, 0), promoe::error);
  CHECK_THROWS_AS(dd.sample(rank3, 0, 0), promoe::error);
  tensor<T, B> x0({2, 3, 4, 4});
  x0.fill(T(0));
  const auto batch = rf.sample(x0, 0, 0);
  tensor<T, B> d;
  for (const auto& shape : std::vector<std::vector<index_t>>{{2, 4, 4, 4}, {2, 3, 4, 5}, {1, 3, 4, 4}, {2, 48}, {2, 7, 4, 4}}) {
    INFO("out shape " << promoe::detail::shape_string(shape));
    tensor<T, B> out(shape);
    out.fill(T(0));
    CHECK_THROWS_AS(rf.loss_and_grad(out, batch, d), promoe::error);
    CHECK_THROWS_AS(dd.loss_and_grad(out, batch, d), promoe::error);
  }
  tensor<T, B> ok({2, 6, 4, 4});
  ok.fill(T(0));
  CHECK_NOTHROW(rf.loss_and_grad(ok, batch, d));
}

// ---------------------------------------------------------------------------
// Samplers on Gaussian data: the answer is known
// ---------------------------------------------------------------------------
//
// Every sampler runs on 4096 elements of class 0 (x0 ~ N(0.5, 0.3^2)) with the exact model,
// and is checked three ways:
//  1. element by element against a naive float64 re-implementation of the sampler (DiT's
//     formulas written out, the exact model inline, the same documented noise streams);
//  2. the sample mean and std against what the discretised sampler must produce: with a
//     model that is affine in x, every step is affine, x ← A_j x + c_j + n_j z, so the final
//     distribution is Gaussian with std sqrt(Π A_j^2 + Σ n_j^2 Π_{later} A^2), computed here
//     in float64 from the same reference steps; within 4 standard errors (4096 samples);
//  3. that this predicted std is within the sampler's discretisation bias of the data std
//     (0.3): Euler 200 steps −1.0%, DDIM 100 steps −4.3% (DDIM is Euler in
//     (x / sqrt(ᾱ), sqrt(1/ᾱ − 1)), coarse where the noise level meets s = 0.3), DDIM eta 1
//     over 100 steps −9.4% and DDPM 1000 / 250 steps −1.2% / −4.3% (the fixed small
//     variance β̃ ignores the uncertainty of x0, which a small data std makes felt). For
//     Gaussian data the probability-flow ODE maps ε_i to mu + s ε_i exactly, so the
//     deterministic samplers must also approach that map as their step count grows.

namespace {

constexpr index_t sN = 4, sC = 1, sH = 32, sW = 32;  // 4096 elements
constexpr std::size_t s_count = static_cast<std::size_t>(sN * sC * sH * sW);

/// The exact velocity E[ε − x0 | x] and ε-prediction E[ε | x] for x = a x0 + b ε, x0 ~ N(mu0, s^2).
double exact_velocity(double x, double sigma) {
  const double a = 1.0 - sigma, b = sigma, s2 = data_std * data_std, v = a * a * s2 + b * b;
  return b * (x - a * mu0) / v - (mu0 + a * s2 * (x - a * mu0) / v);
}
double exact_eps(double x, double ab) {
  const double a = std::sqrt(ab), b = std::sqrt(1.0 - ab), v = a * a * data_std * data_std + b * b;
  return b * (x - a * mu0) / v;
}

/// A float64 reference sampler: x_T = ε, then x ← step(x, j, z_j) for j = 0..size−1.
struct reference_sampler {
  virtual ~reference_sampler() = default;
  virtual std::size_t size() const = 0;
  virtual double step(double x, std::size_t j, double z) const = 0;

  /// The samples of every ref_stride-th element (the references are slow next to the library).
  std::vector<double> run(std::uint64_t seed) const {
    std::vector<double> out;
    for (std::size_t i = 0; i < s_count; i += ref_stride) {
      double x = rng::normal(seed, streams::sampler_initial_noise(), i);
      for (std::size_t j = 0; j < size(); ++j) x = step(x, j, rng::normal(seed, streams::sampler_step_noise(j), i));
      out.push_back(x);
    }
    return out;
  }
  /// Mean and std of the samples when x_T ~ N(0, 1): every step is affine in (x, z).
  std::pair<double, double> predicted() const {
    double m = 0.0, v = 1.0;
    for (std::size_t j = 0; j < size(); ++j) {
      const double c = step(0.0, j, 0.0), a = step(1.0, j, 0.0) - c, n = step(0.0, j, 1.0) - c;
      m = a * m + c;
      v = a * a * v + n * n;
    }
    return {m, std::sqrt(v)};
  }
  static constexpr std::size_t ref_stride = 3;
};

struct reference_euler final : reference_sampler {
  std::size_t steps;
  explicit reference_euler(std::size_t n) : steps(n) {}
  std::size_t size() const override { return steps; }
  double step(double x, std::size_t k, double) const override {
    const double sigma = 1.0 - static_cast<double>(k) / static_cast<double>(steps);
    return x - 1.0 / static_cast<double>(steps) * exact_velocity(x, sigma);
  }
};

/// DiT's SpacedDiffusion quantities for the kept original timesteps `use`.
struct reference_chain : reference_sampler {
  std::vector<double> acp, acp_prev, betas;
  explicit reference_chain(const std::vector<std::int64_t>& use) {
    const auto full = reference_alphas_cumprod();
    double last = 1.0;
    for (auto t : use) {
      const double ab = full[static_cast<std::size_t>(t)];
      acp.push_back(ab);
      acp_prev.push_back(last);
      betas.push_back(1.0 - ab / last);
      last = ab;
    }
  }
  std::size_t size() const override { return acp.size(); }
};

/// DiT's p_sample (FIXED_SMALL, clip_denoised false) with the exact ε.
struct reference_ddpm final : reference_chain {
  std::vector<double> log_var;  // posterior_log_variance_clipped
  explicit reference_ddpm(const std::vector<std::int64_t>& use) : reference_chain(use) {
    const auto S = size();
    std::vector<double> post_var(S);
    for (std::size_t k = 0; k < S; ++k) post_var[k] = betas[k] * (1.0 - acp_prev[k]) / (1.0 - acp[k]);
    for (std::size_t k = 0; k < S; ++k) log_var.push_back(std::log(k == 0 ? post_var[std::min<std::size_t>(1, S - 1)] : post_var[k]));
  }
  double step(double x, std::size_t j, double z) const override {
    const std::size_t k = size() - 1 - j;
    const double ab = acp[k], abp = acp_prev[k], beta = betas[k];
    const double eps = exact_eps(x, ab);
    const double x0 = std::sqrt(1.0 / ab) * x - std::sqrt(1.0 / ab - 1.0) * eps;
    const double coef1 = beta * std::sqrt(abp) / (1.0 - ab);
    const double coef2 = (1.0 - abp) * std::sqrt(1.0 - beta) / (1.0 - ab);
    return coef1 * x0 + coef2 * x + (k != 0 ? 1.0 : 0.0) * std::exp(0.5 * log_var[k]) * z;
  }
};

/// DiT's ddim_sample with the exact ε.
struct reference_ddim final : reference_chain {
  double eta;
  reference_ddim(const std::vector<std::int64_t>& use, double e) : reference_chain(use), eta(e) {}
  double step(double x, std::size_t j, double z) const override {
    const std::size_t k = size() - 1 - j;
    const double ab = acp[k], abp = acp_prev[k];
    double eps = exact_eps(x, ab);
    const double x0 = std::sqrt(1.0 / ab) * x - std::sqrt(1.0 / ab - 1.0) * eps;
    eps = (std::sqrt(1.0 / ab) * x - x0) / std::sqrt(1.0 / ab - 1.0);
    const double sigma = eta * std::sqrt((1.0 - abp) / (1.0 - ab)) * std::sqrt(1.0 - ab / abp);
    const double mean = x0 * std::sqrt(abp) + std::sqrt(1.0 - abp - sigma * sigma) * eps;
    return mean + (k != 0 ? 1.0 : 0.0) * sigma * z;
  }
};

/// max_j |got[j · ref_stride] − want[j]|.
template <class T>
double max_abs_diff(const std::vector<T>& got, const std::vector<double>& want) {
  constexpr std::size_t stride = reference_sampler::ref_stride;
  REQUIRE(want.size() == (got.size() + stride - 1) / stride);
  double worst = 0;
  for (std::size_t j = 0; j < want.size(); ++j)
    worst = std::max(worst, std::abs(static_cast<double>(got[j * stride]) - want[j]));
  return worst;
}

/// Element-by-element agreement with a float64 reference: 1e-9 (double), 2e-4 (float: the
/// state is rounded to float at every step).
template <class T>
double sampler_tolerance() {
  return sizeof(T) == sizeof(double) ? 1e-9 : 2e-4;
}

/// Checks 1-3 above for samples xs drawn with `seed`; `bias` bounds |predicted std / s − 1|.
template <class T>
void check_sampler(const std::vector<T>& xs, const reference_sampler& ref, std::uint64_t seed, double bias) {
  CHECK(max_abs_diff(xs, ref.run(seed)) < sampler_tolerance<T>());
  const auto [pm, ps] = ref.predicted();
  const auto v = as_double(xs);
  const double m = mean_of(v), sd = std_of(v), n = static_cast<double>(v.size());
  INFO("sample mean " << m << ", std " << sd << "; the discretised sampler's mean " << pm << ", std " << ps
                      << "; the data's " << mu0 << ", " << data_std);
  CHECK(std::abs(m - pm) < 4.0 * ps / std::sqrt(n));
  CHECK(std::abs(sd - ps) < 4.0 * ps / std::sqrt(2.0 * n));
  CHECK(std::abs(pm - mu0) < 2e-3);  // DDIM 100 steps: 0.49909
  CHECK(std::abs(ps / data_std - 1.0) < bias);
}

/// max_i |x_i − (mu + s ε_i)|: distance to the exact flow map.
template <class T>
double max_flow_map_error(const std::vector<T>& xs, std::uint64_t seed) {
  double worst = 0;
  for (std::size_t i = 0; i < xs.size(); ++i) {
    const double e = rng::normal(seed, streams::sampler_initial_noise(), i);
    worst = std::max(worst, std::abs(static_cast<double>(xs[i]) - (mu0 + data_std * e)));
  }
  return worst;
}

std::vector<std::int64_t> all_steps() { return dit::space_timesteps(1000, 1000); }

}  // namespace

TEMPLATE_LIST_TEST_CASE("euler_flow with the exact velocity reproduces Gaussian data", "[dit][sampler]", test_configs) {
  using B = typename TestType::backend;
  using T = typename TestType::scalar;
  const std::vector<std::int64_t> y(sN, 0);
  gaussian_model<T, B> model;
  model.velocity = true;
  model.learn_sigma = true;  // the extra channels (777) must be ignored
  tensor<T, B> x({sN, sC, sH, sW});
  dit::euler_flow(model, x, y, {.steps = 200, .seed = 42});
  CHECK(model.calls == 200);
  const auto xs = x.to_host();
  check_sampler(xs, reference_euler(200), 42, 0.011);
  // First-order convergence to the exact flow map mu + s ε.
  const double err200 = max_flow_map_error(xs, 42);
  gaussian_model<T, B> plain;  // C_out = C
  tensor<T, B> x2({sN, sC, sH, sW});
  dit::euler_flow(plain, x2, y, {.steps = 400, .seed = 42});
  const double err400 = max_flow_map_error(x2.to_host(), 42);
  INFO("max |x - (mu + s eps)|: 200 steps " << err200 << ", 400 steps " << err400);
  CHECK(err200 < 0.02);
  CHECK(err400 / err200 == Approx(0.5).margin(0.05));

  // Deterministic: same seed, same samples (also with C_out = C); another seed differs.
  dit::euler_flow(plain, x2, y, {.steps = 200, .seed = 42});
  CHECK(x2.to_host() == xs);
  dit::euler_flow(plain, x2, y, {.steps = 200, .seed = 43});
  CHECK(x2.to_host() != xs);
  CHECK(max_abs_diff(x2.to_host(), reference_euler(200).run(43)) < sampler_tolerance<T>());
}

TEMPLATE_LIST_TEST_CASE("ddim with the exact epsilon reproduces Gaussian data", "[dit][sampler]", test_configs) {
  using B = typename TestType::backend;
  using T = typename TestType::scalar;
  const std::vector<std::int64_t> y(sN, 0);
  gaussian_model<T, B> model;
  model.velocity = false;
  model.learn_sigma = true;
  tensor<T, B> x({sN, sC, sH, sW});
  dit::ddim(model, x, y, {.steps = 100, .eta = 0.0, .seed = 7});
  CHECK(model.calls == 100);
  const auto xs = x.to_host();
  check_sampler(xs, reference_ddim(dit::space_timesteps(1000, 100), 0.0), 7, 0.05);

  tensor<T, B> x2({sN, sC, sH, sW});
  dit::ddim(model, x2, y, {.steps = 100, .eta = 0.0, .seed = 7});
  CHECK(x2.to_host() == xs);
  dit::ddim(model, x2, y, {.steps = 100, .eta = 0.0, .seed = 8});
  CHECK(x2.to_host() != xs);
  // The "ddim100" stride spacing (0, 10, ..., 990).
  dit::ddim(model, x2, y, {.steps = 100, .spacing = dit::timestep_spacing::ddim_stride, .seed = 7});
  CHECK(max_abs_diff(x2.to_host(), reference_ddim(dit::ddim_timesteps(1000, 100), 0.0).run(7)) <
        sampler_tolerance<T>());
  // More steps: closer to the exact flow map.
  dit::ddim(model, x2, y, {.steps = 500, .seed = 7});
  const double err100 = max_flow_map_error(xs, 7), err500 = max_flow_map_error(x2.to_host(), 7);
  INFO("max |x - (mu + s eps)|: 100 steps " << err100 << ", 500 steps " << err500);
  CHECK(err500 < 0.5 * err100);
  // eta = 1: stochastic, with the step noise of the documented streams.
  dit::ddim(model, x2, y, {.steps = 100, .eta = 1.0, .seed = 9});
  check_sampler(x2.to_host(), reference_ddim(dit::space_timesteps(1000, 100), 1.0), 9, 0.1);
}

TEMPLATE_LIST_TEST_CASE("ddpm_ancestral with the exact epsilon reproduces Gaussian data", "[dit][sampler]", test_configs) {
  using B = typename TestType::backend;
  using T = typename TestType::scalar;
  const std::vector<std::int64_t> y(sN, 0);
  gaussian_model<T, B> model;
  model.velocity = false;
  model.learn_sigma = true;
  tensor<T, B> x({sN, sC, sH, sW});
  dit::ddpm_ancestral(model, x, y, {.seed = 3});
  CHECK(model.calls == 1000);
  check_sampler(x.to_host(), reference_ddpm(all_steps()), 3, 0.015);

  // Deterministic (on a short chain, to keep the test fast).
  tensor<T, B> x2({sN, sC, sH, sW}), x3({sN, sC, sH, sW});
  dit::ddpm_ancestral(model, x2, y, {.steps = 50, .seed = 3});
  dit::ddpm_ancestral(model, x3, y, {.steps = 50, .seed = 3});
  CHECK(x2.to_host() == x3.to_host());
  dit::ddpm_ancestral(model, x3, y, {.steps = 50, .seed = 4});
  CHECK(x2.to_host() != x3.to_host());
  // Respaced to 250 steps (DiT's default sampling chain); the model sees original timesteps.
  model.calls = 0;
  dit::ddpm_ancestral(model, x2, y, {.steps = 250, .seed = 5});
  CHECK(model.calls == 250);
  CHECK(model.last_labels == y);
  const auto unclipped = x2.to_host();
  check_sampler(unclipped, reference_ddpm(dit::space_timesteps(1000, 250)), 5, 0.05);
  // clip_denoised clamps the predicted x0 to [-1, 1]; the last step returns it, so the samples
  // are in range (unclipped, the upper tail of N(0.5, 0.3^2) passes 1).
  CHECK(*std::max_element(unclipped.begin(), unclipped.end()) > T(1));
  dit::ddpm_ancestral(model, x2, y, {.steps = 250, .seed = 5, .clip_denoised = true});
  const auto clipped = x2.to_host();
  CHECK(*std::max_element(clipped.begin(), clipped.end()) == T(1));
  CHECK(*std::min_element(clipped.begin(), clipped.end()) >= T(-1));
}

TEMPLATE_LIST_TEST_CASE("samplers check their arguments and the model output", "[dit][sampler][errors]", test_configs) {
  using B = typename TestType::backend;
  using T = typename TestType::scalar;
  gaussian_model<T, B> model;
  tensor<T, B> x({2, 1, 4, 4});
  const std::vector<std::int64_t> y2(2, 0), y3(3, 0);
  CHECK_THROWS_AS(dit::euler_flow(model, x, y3), promoe::error);
  CHECK_THROWS_AS(dit::euler_flow(model, x, y2, {.steps = 0}), promoe::error);
  CHECK_THROWS_AS(dit::ddim(model, x, y2, {.steps = 1001}), promoe::error);
  CHECK_THROWS_AS(dit::ddim(model, x, y2, {.eta = -1.0}), promoe::error);
  CHECK_THROWS_AS(dit::ddim(model, x, y2, {.steps = 999, .spacing = dit::timestep_spacing::ddim_stride}),
                  promoe::error);
  CHECK_THROWS_AS(dit::ddpm_ancestral(model, x, y2, {.steps = 0}), promoe::error);
  tensor<T, B> rank3({2, 16, 1});
  CHECK_THROWS_AS(dit::euler_flow(model, rank3, y2), promoe::error);
  auto bad_model = [](const tensor<T, B>& in, const std::vector<T>&, std::span<const std::int64_t>, tensor<T, B>& out) {
    out.resize({in.dim(0), 3 * in.dim(1), in.dim(2), in.dim(3)});  // neither C nor 2C channels
    out.fill(T(0));
  };
  CHECK_THROWS_AS(dit::euler_flow(bad_model, x, y2, {.steps = 2}), promoe::error);
  CHECK_THROWS_AS(dit::ddpm_ancestral(bad_model, x, y2, {.steps = 2}), promoe::error);
}

// ---------------------------------------------------------------------------
// Classifier-free guidance
// ---------------------------------------------------------------------------

TEMPLATE_LIST_TEST_CASE("classifier-free guidance: formula, separate null pass, exact at scale 1", "[dit][guidance]",
                        test_configs) {
  using B = typename TestType::backend;
  using T = typename TestType::scalar;
  const index_t N = 3, C = 2, H = 2, W = 3;
  const auto x = to_device<B>(random_vector<T>(static_cast<std::size_t>(N * C * H * W), 31), {N, C, H, W});
  const std::vector<T> t{T(10), T(500), T(999)};
  const std::vector<std::int64_t> y{0, 1, 0};

  label_echo_model<T, B> plain;
  tensor<T, B> cond, uncond;
  plain(x, t, y, cond);
  const std::vector<std::int64_t> nulls(N, null_label);
  plain(x, t, nulls, uncond);

  SECTION("scale 1 returns the conditional output bit for bit, with one model call") {
    label_echo_model<T, B> inner;
    auto guided = dit::classifier_free_guidance<T, B>(inner, 1.0, null_label);
    tensor<T, B> out;
    guided(x, t, y, out);
    CHECK(inner.calls == 1);
    CHECK(out.shape() == cond.shape());
    CHECK(out.to_host() == cond.to_host());
  }
  SECTION("scale s > 1: uncond + s (cond - uncond) on all channels, null pass with all-null labels") {
    for (const double s : {1.5, 4.0}) {
      label_echo_model<T, B> inner;
      auto guided = dit::classifier_free_guidance<T, B>(inner, s, null_label);
      CHECK(guided.scale() == s);
      CHECK(guided.null_label() == null_label);
      tensor<T, B> out;
      guided(x, t, y, out);
      guided(x, t, y, out);  // the workspaces are reused
      REQUIRE(inner.calls == 4);
      CHECK(inner.labels_seen[0] == y);
      CHECK(inner.labels_seen[1] == nulls);
      REQUIRE(out.shape() == cond.shape());  // 2C channels: all guided
      const auto c = cond.to_host(), u = uncond.to_host(), o = out.to_host();
      for (std::size_t i = 0; i < o.size(); ++i) {
        const double expect = static_cast<double>(u[i]) + s * (static_cast<double>(c[i]) - static_cast<double>(u[i]));
        CHECK(static_cast<double>(o[i]) == Approx(expect).epsilon(10 * tol_for<T>()).margin(10 * tol_for<T>()));
      }
    }
  }
  SECTION("a guided model owns an rvalue model") {
    auto guided = dit::classifier_free_guidance<T, B>(label_echo_model<T, B>{}, 2.0, null_label);
    tensor<T, B> out;
    guided(x, t, y, out);
    CHECK(guided.model().calls == 2);
  }
  SECTION("scales below 1 or not finite are errors") {
    label_echo_model<T, B> inner;
    for (const double s : {0.999, 0.0, -2.0, std::numeric_limits<double>::infinity(),
                           std::numeric_limits<double>::quiet_NaN()}) {
      INFO("scale " << s);
      CHECK_THROWS_AS((dit::classifier_free_guidance<T, B>(inner, s, null_label)), promoe::error);
    }
  }
}

TEMPLATE_LIST_TEST_CASE("guided sampling on a two-class Gaussian toy", "[dit][guidance][sampler]", test_configs) {
  using B = typename TestType::backend;
  using T = typename TestType::scalar;
  // Two samples per class; the null class is their mixture.
  const std::vector<std::int64_t> y{0, 1, 0, 1};
  const index_t per = sC * sH * sW;
  gaussian_model<T, B> model;
  model.velocity = true;
  tensor<T, B> plain({sN, sC, sH, sW}), guided_x({sN, sC, sH, sW});
  dit::euler_flow(model, plain, y, {.steps = 100, .seed = 9});

  // Scale 1: the guided sampler is the conditional sampler, bit for bit.
  model.calls = 0;
  auto g1 = dit::classifier_free_guidance<T, B>(model, 1.0, null_label);
  dit::euler_flow(g1, guided_x, y, {.steps = 100, .seed = 9});
  CHECK(model.calls == 100);
  CHECK(guided_x.to_host() == plain.to_host());

  // Per-class means of the conditional samples: mu0, mu1.
  auto class_means = [&](const std::vector<T>& xs) {
    std::vector<double> m(2, 0.0);
    for (index_t n = 0; n < sN; ++n)
      for (index_t j = 0; j < per; ++j) m[static_cast<std::size_t>(y[n])] += static_cast<double>(xs[n * per + j]);
    for (auto& v : m) v /= static_cast<double>(2 * per);
    return m;
  };
  const auto mc = class_means(plain.to_host());
  CHECK(std::abs(mc[0] - mu0) < 0.02);
  CHECK(std::abs(mc[1] - mu1) < 0.02);

  // Scale 3: two model calls per step, the second all-null; guidance pushes the classes apart.
  model.calls = 0;
  auto g3 = dit::classifier_free_guidance<T, B>(model, 3.0, null_label);
  dit::euler_flow(g3, guided_x, y, {.steps = 100, .seed = 9});
  CHECK(model.calls == 200);
  CHECK(model.last_labels == std::vector<std::int64_t>(sN, null_label));
  const auto mg = class_means(guided_x.to_host());
  CHECK(mg[0] > mc[0] + 0.05);
  CHECK(mg[1] < mc[1] - 0.05);
}
