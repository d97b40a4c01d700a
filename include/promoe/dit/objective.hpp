// SPDX-License-Identifier: Apache-2.0
/// \file objective.hpp
/// \brief DiT training objectives (rectified flow, DDPM), the DDPM noise schedule, the
/// DiffusionModel contract every objective, sampler and guidance adaptor works with, and the
/// promoe::rng streams the diffusion code draws from.
///
/// Objectives (both regress the first C channels of the model output with a mean squared error):
///  - dit::rectified_flow : x_t = (1 - σ) x0 + σ ε, σ = sigmoid(n), n ~ N(0, 1) per sample
///                          (logit-normal), model time t = 1000 σ, target ε − x0 (velocity).
///                          Sample with dit::euler_flow (<promoe/dit/sampler.hpp>).
///  - dit::ddpm           : 1000 steps, linear betas 1e-4 → 0.02 (float64), t uniform in
///                          {0, ..., 999}, x_t = sqrt(ᾱ_t) x0 + sqrt(1 − ᾱ_t) ε, target ε
///                          (ε-prediction), model time t (the integer step). Sample with
///                          dit::ddpm_ancestral or dit::ddim.
///
/// Learned sigma: a model may return C_out = 2C channels (DiT's learn_sigma). Objectives and
/// samplers read only the first C channels; the loss gradient is zero on the other C. In
/// particular DDPM's learned variance (DiT's VLB term and LEARNED_RANGE sampling) is not
/// used: training is the plain ε-MSE and sampling uses the fixed small posterior variance.
///
/// Random numbers: every draw is promoe::rng::normal/uniform(seed, stream, i) with the
/// streams of dit::streams below, so a batch is a pure function of (x0, seed, step) and a
/// sample a pure function of (model, labels, seed), on every backend: the noise is drawn
/// inside the index functors from the counter-based generator.
#pragma once

#include <cmath>
#include <concepts>
#include <cstdint>
#include <span>
#include <type_traits>
#include <vector>

#include "../backend/backend.hpp"
#include "../backend/device_sum.hpp"
#include "../backend/tensor.hpp"
#include "../core/bf16.hpp"
#include "../core/config.hpp"
#include "../core/error.hpp"
#include "../core/rng.hpp"

namespace promoe::dit {

// ---------------------------------------------------------------------------
// The model contract
// ---------------------------------------------------------------------------

/// A diffusion model for scalar T on backend B is callable as
///
///     model(x_t, t, y, out)
///
///  - x_t : const tensor<T, B>&            [N, C, H, W], the noised input
///  - t   : const std::vector<T>&          [N], model time (host): 1000 σ for rectified flow,
///                                         the integer DDPM step (0..999) for DDPM/DDIM
///  - y   : std::span<const std::int64_t>  [N], class labels (host); the null label for
///                                         unconditional samples
///  - out : tensor<T, B>&                  resized by the model to [N, C_out, H, W] with
///                                         C_out = C or 2C (learn_sigma)
///
/// The model is called as a non-const lvalue (it may keep workspaces). Any DiT forward is
/// one small lambda or struct away from this.
template <class M, class T, class B>
concept DiffusionModel = requires(M& model, const tensor<T, B>& x_t, const std::vector<compute_t<T>>& t,
                                  std::span<const std::int64_t> y, tensor<T, B>& out) {
  model(x_t, t, y, out);
};

namespace detail {

/// Fails to compile with one readable message when Model is not a DiffusionModel.
template <class Model, class T, class B>
constexpr void require_diffusion_model() {
  static_assert(DiffusionModel<std::remove_reference_t<Model>, T, B>,
                "promoe::dit: the model must be callable as model(const promoe::tensor<T, B>& x_t /*[N, C, H, "
                "W]*/, const std::vector<compute_t<T>>& t /*[N] model time*/, std::span<const std::int64_t> y /*[N] "
                "labels*/, promoe::tensor<T, B>& out /*resized to [N, C or 2C, H, W]*/) for the sampler's T and "
                "B (see promoe::dit::DiffusionModel)");
}

/// Checks a model output against its input: [N, C or 2C, H, W]. Returns C_out.
template <class T, class B>
index_t check_model_output(const char* who, const tensor<T, B>& x, const tensor<T, B>& out) {
  const bool ok = out.rank() == 4 && out.dim(0) == x.dim(0) && out.dim(2) == x.dim(2) && out.dim(3) == x.dim(3) &&
                  (out.dim(1) == x.dim(1) || out.dim(1) == 2 * x.dim(1));
  PROMOE_CHECK(ok, who, ": the model returned shape ", promoe::detail::shape_string(out.shape()), " for input ",
               promoe::detail::shape_string(x.shape()), "; expected [N, C, H, W] or [N, 2C, H, W] (learn_sigma)");
  return out.dim(1);
}

/// x must be [N, C, H, W].
template <class T, class B>
void check_image_batch(const char* who, const char* name, const tensor<T, B>& x) {
  PROMOE_CHECK(x.rank() == 4, who, ": ", name, " has shape ", promoe::detail::shape_string(x.shape()),
               "; expected [N, C, H, W]");
}

}  // namespace detail

// ---------------------------------------------------------------------------
// Random streams
// ---------------------------------------------------------------------------

/// The promoe::rng streams of the diffusion code. Stream numbers start at large tagged
/// offsets, so they never meet the small stream numbers that rng::next_stream() hands out
/// (parameter initialisation), even when a training run uses one seed for everything.
namespace streams {

/// Training: 4 streams per step, at objective_base + 4 step + k.
inline constexpr std::uint64_t objective_base = 0x4F424A0000000000ULL;  // "OBJ"
/// k = 0: per-sample time draw; value n is sample n's draw (rectified flow: n-th normal,
/// the logit of σ; DDPM: n-th uniform, t = floor(1000 u)).
constexpr std::uint64_t training_time(std::uint64_t step) { return objective_base + 4 * step; }
/// k = 1: the noise ε; value i is element i of the flat [N, C, H, W] tensor (row-major), so
/// sample n's noise does not depend on the batch size.
constexpr std::uint64_t training_noise(std::uint64_t step) { return objective_base + 4 * step + 1; }
/// k = 2, 3: reserved for the training loop (e.g. label dropout); the objectives never draw them.
constexpr std::uint64_t training_reserved(std::uint64_t step, std::uint64_t which) {
  return objective_base + 4 * step + 2 + (which & 1);
}

/// Sampling: sampler_base + 0 is the initial noise x_T (value i = element i of the flat
/// [N, C, H, W] tensor), sampler_base + 1 + k the fresh noise of sampling step k (k = 0 is
/// the first step taken, at the highest noise level; value i = element i).
inline constexpr std::uint64_t sampler_base = 0x53414D0000000000ULL;  // "SAM"
constexpr std::uint64_t sampler_initial_noise() { return sampler_base; }
constexpr std::uint64_t sampler_step_noise(std::uint64_t k) { return sampler_base + 1 + k; }

}  // namespace streams

// ---------------------------------------------------------------------------
// A training batch
// ---------------------------------------------------------------------------

/// What an objective draws for one training step: the model input, the model time, the
/// regression target, and the per-sample noise level for logging.
template <class T, class B>
struct training_batch {
  tensor<T, B> x_t;     ///< [N, C, H, W] noised input
  std::vector<compute_t<T>> t;  ///< [N] model time (host; float for bf16 models): flow 1000 σ; DDPM the integer step
  tensor<T, B> target;  ///< [N, C, H, W] flow: ε − x0; DDPM: ε
  std::vector<double> sigma;          ///< [N] flow: σ; DDPM: sqrt(1 − ᾱ_t) (the noise std)
  std::vector<std::int64_t> timestep;  ///< [N] DDPM: the step t; flow: empty

  /// Scratch of the objectives (per-sample coefficients, squared errors); reused across
  /// steps so the hot path does not allocate. Not for concurrent use.
  mutable tensor<double, B> scratch;
  std::vector<double> coef;  ///< [2N] host staging of the noising coefficients

  /// [1] the loss of the last loss_and_grad / queue_loss_and_grad, in device memory.
  mutable tensor<double, B> loss_value;
  mutable tensor<double, B> loss_partial;  ///< the loss sum's workspace

  /// Reads the last loss back from the device (a wait for it there); 0 before any.
  double loss() const {
    double v = 0;
    if (loss_value.size() == 1) backend_traits<B>::copy_to_host(loss_value.data(), 1, &v);
    return v;
  }
};

namespace detail {

/// x_t[i] = a_n x0[i] + b_n ε_i; target[i] = ε_i − x0[i] (velocity) or ε_i.
template <class T>
struct noise_batch_functor {
  const T* x0;         // [N, C, H, W]
  const double* coef;  // [N, 2]: (a_n, b_n)
  T* x_t;              // [N, C, H, W]
  T* target;           // [N, C, H, W]
  index_t per_sample;  // C H W
  std::uint64_t seed, stream;
  bool velocity;
  PROMOE_HOST_DEVICE void operator()(index_t i) const {
    const index_t n = i / per_sample;
    const double e = rng::normal(seed, stream, static_cast<std::uint64_t>(i));
    const double x = static_cast<double>(x0[i]);
    x_t[i] = static_cast<T>(coef[2 * n] * x + coef[2 * n + 1] * e);
    target[i] = static_cast<T>(velocity ? e - x : e);
  }
};

/// Over every element of out [N, C_out, H, W]: on the first C channels
/// d_out = 2 (out − target) / count and sq = (out − target)^2; zeros on the others.
template <class T>
struct mse_first_channels_functor {
  const T* out;     // [N, C_out, H, W]
  const T* target;  // [N, C, H, W]
  T* d_out;         // [N, C_out, H, W]
  double* sq;       // [N, C_out, H, W]
  index_t channels, out_channels, plane;  // C, C_out, H W
  double grad_scale;                      // 2 / (N C H W)
  PROMOE_HOST_DEVICE void operator()(index_t i) const {
    const index_t n = i / (out_channels * plane);
    const index_t c = (i / plane) % out_channels;
    const index_t p = i % plane;
    if (c < channels) {
      const double d = static_cast<double>(out[i]) - static_cast<double>(target[(n * channels + c) * plane + p]);
      sq[i] = d * d;
      d_out[i] = static_cast<T>(grad_scale * d);
    } else {
      sq[i] = 0.0;
      d_out[i] = T(0);
    }
  }
};

/// Fills batch.x_t / target from x0 and the host coefficients (a_n, b_n).
template <class T, class B>
void draw_noised(const tensor<T, B>& x0, const std::vector<double>& coef, std::uint64_t seed, std::uint64_t step,
                 bool velocity, training_batch<T, B>& batch) {
  const index_t n = x0.dim(0);
  batch.x_t.resize(x0.shape());
  batch.target.resize(x0.shape());
  batch.scratch.resize({n, 2});
  backend_traits<B>::copy_from_host(coef.data(), 2 * n, batch.scratch.data());
  if (x0.size() == 0) return;
  backend_traits<B>::parallel_for(
      x0.size(), noise_batch_functor<T>{x0.data(), batch.scratch.data(), batch.x_t.data(), batch.target.data(),
                                        x0.size() / n, seed, streams::training_noise(step), velocity});
}

/// batch.loss_value = (1 / (N C H W)) Σ over the first C channels of (out − target)^2, kept
/// on the device, and its gradient d_out.
template <class T, class B>
void mse_first_channels(const char* who, const tensor<T, B>& out, const training_batch<T, B>& batch,
                     tensor<T, B>& d_out) {
  const auto& target = batch.target;
  check_model_output(who, target, out);
  d_out.resize(out.shape());
  batch.loss_value.resize({1});
  const index_t count = target.size();
  if (count == 0) return backend_traits<B>::fill(batch.loss_value.data(), 1, 0.0);
  batch.scratch.resize({out.size()});
  const index_t plane = target.dim(2) * target.dim(3);
  backend_traits<B>::parallel_for(
      out.size(), mse_first_channels_functor<T>{out.data(), target.data(), d_out.data(), batch.scratch.data(),
                                                target.dim(1), out.dim(1), plane, 2.0 / static_cast<double>(count)});
  ops::sum_into<B>(static_cast<const double*>(batch.scratch.data()), out.size(), 1.0 / static_cast<double>(count),
                   batch.loss_value.data(), batch.loss_partial);
}

}  // namespace detail

// ---------------------------------------------------------------------------
// Rectified flow
// ---------------------------------------------------------------------------

/// Rectified flow with logit-normal σ (SD3 / the ProMoE reference):
///  - per sample n ~ N(0, 1) (streams::training_time), σ = sigmoid(n) = 1 / (1 + e^−n);
///  - ε ~ N(0, I) (streams::training_noise); x_t = (1 − σ) x0 + σ ε (float64, rounded to T);
///  - model time t = 1000 σ; target ε − x0;
///  - loss = mean over the N·C·H·W elements of the first C output channels of
///    (out − target)^2, i.e. the sum divided by N·C·H·W (learned-sigma channels excluded
///    from both the sum and the count).
struct rectified_flow {
  /// Model time per unit σ.
  static constexpr double time_scale = 1000.0;

  /// The batch for training step `step` under `seed`; a pure function of (x0, seed, step).
  template <class T, class B>
  void sample(const tensor<T, B>& x0, std::uint64_t seed, std::uint64_t step, training_batch<T, B>& batch) const {
    detail::check_image_batch("rectified_flow::sample", "x0", x0);
    const index_t n = x0.dim(0);
    auto& coef = batch.coef;
    coef.resize(static_cast<std::size_t>(2 * n));
    batch.t.resize(static_cast<std::size_t>(n));
    batch.sigma.resize(static_cast<std::size_t>(n));
    batch.timestep.clear();
    for (index_t s = 0; s < n; ++s) {
      const double logit = rng::normal(seed, streams::training_time(step), static_cast<std::uint64_t>(s));
      const double sigma = 1.0 / (1.0 + std::exp(-logit));
      batch.sigma[s] = sigma;
      batch.t[s] = static_cast<compute_t<T>>(time_scale * sigma);
      coef[2 * s] = 1.0 - sigma;
      coef[2 * s + 1] = sigma;
    }
    detail::draw_noised(x0, coef, seed, step, /*velocity=*/true, batch);
  }
  template <class T, class B>
  training_batch<T, B> sample(const tensor<T, B>& x0, std::uint64_t seed, std::uint64_t step) const {
    training_batch<T, B> batch;
    sample(x0, seed, step, batch);
    return batch;
  }

  /// The loss of a model output out [N, C or 2C, H, W] on `batch`; d_out (resized to out's
  /// shape) receives d loss / d out, zero on the learned-sigma channels.
  template <class T, class B>
  T loss_and_grad(const tensor<T, B>& out, const training_batch<T, B>& batch, tensor<T, B>& d_out) const {
    detail::mse_first_channels("rectified_flow::loss_and_grad", out, batch, d_out);
    return static_cast<T>(batch.loss());
  }
  /// As loss_and_grad, but the loss stays on the device (batch.loss() reads it back): a
  /// training step need not wait for the device.
  template <class T, class B>
  void queue_loss_and_grad(const tensor<T, B>& out, const training_batch<T, B>& batch, tensor<T, B>& d_out) const {
    detail::mse_first_channels("rectified_flow::loss_and_grad", out, batch, d_out);
  }
};

// ---------------------------------------------------------------------------
// DDPM
// ---------------------------------------------------------------------------

/// A (possibly respaced) DDPM noise schedule in float64, as DiT's gaussian_diffusion /
/// respace.py build it: betas, ᾱ = cumprod(1 − β), and for each index the original timestep
/// the model sees.
struct ddpm_schedule {
  std::vector<double> betas;            ///< [S]
  std::vector<double> alphas_cumprod;   ///< [S]
  std::vector<std::int64_t> timesteps;  ///< [S] original step of each index (model time)

  index_t size() const { return static_cast<index_t>(betas.size()); }
  /// ᾱ of the previous index (1 before the first).
  double alpha_cumprod_prev(index_t k) const { return k == 0 ? 1.0 : alphas_cumprod[static_cast<std::size_t>(k - 1)]; }

  /// np.linspace(beta_start, beta_end, num_steps) in float64 (start + i·step, the last set
  /// to beta_end exactly) and ᾱ = np.cumprod(1 − β).
  static ddpm_schedule linear(index_t num_steps = 1000, double beta_start = 1e-4, double beta_end = 0.02) {
    PROMOE_CHECK(num_steps >= 1, "ddpm_schedule::linear: num_steps is ", num_steps, "; expected >= 1");
    PROMOE_CHECK(beta_start > 0 && beta_end < 1 && beta_start <= beta_end, "ddpm_schedule::linear: betas ",
                 beta_start, " -> ", beta_end, "; expected 0 < beta_start <= beta_end < 1");
    ddpm_schedule s;
    const auto count = static_cast<std::size_t>(num_steps);
    s.betas.resize(count);
    s.alphas_cumprod.resize(count);
    s.timesteps.resize(count);
    const double delta = num_steps > 1 ? (beta_end - beta_start) / static_cast<double>(num_steps - 1) : 0.0;
    double acp = 1.0;
    for (std::size_t i = 0; i < count; ++i) {
      s.betas[i] = (num_steps > 1 && i + 1 == count) ? beta_end : static_cast<double>(i) * delta + beta_start;
      acp *= 1.0 - s.betas[i];
      s.alphas_cumprod[i] = acp;
      s.timesteps[i] = static_cast<std::int64_t>(i);
    }
    return s;
  }

  /// The schedule restricted to the indices `use` (strictly increasing, in [0, size)), as
  /// DiT's SpacedDiffusion: β'_j = 1 − ᾱ_{use_j} / ᾱ_{use_{j−1}}, so ᾱ' is ᾱ at the kept steps.
  ddpm_schedule respaced(const std::vector<std::int64_t>& use) const {
    PROMOE_CHECK(!use.empty(), "ddpm_schedule::respaced: no timesteps to keep");
    ddpm_schedule s;
    double last = 1.0;
    std::int64_t prev = -1;
    for (std::int64_t k : use) {
      PROMOE_CHECK(k > prev && k < size(), "ddpm_schedule::respaced: timesteps must be strictly increasing in [0, ",
                   size(), "); got ", k, " after ", prev);
      prev = k;
      const double acp = alphas_cumprod[static_cast<std::size_t>(k)];
      s.betas.push_back(1.0 - acp / last);
      s.alphas_cumprod.push_back(acp);
      s.timesteps.push_back(timesteps[static_cast<std::size_t>(k)]);
      last = acp;
    }
    return s;
  }
};

/// DiT's space_timesteps(num_steps, [count]) (the "250" form): `count` indices of
/// [0, num_steps) spread evenly, index_j = round(j (num_steps − 1) / (count − 1)) with
/// Python's round (half to even); count == 1 keeps index 0 only.
inline std::vector<std::int64_t> space_timesteps(index_t num_steps, index_t count) {
  PROMOE_CHECK(count >= 1 && count <= num_steps, "space_timesteps: cannot take ", count, " steps out of ", num_steps);
  const double stride = count > 1 ? static_cast<double>(num_steps - 1) / static_cast<double>(count - 1) : 1.0;
  std::vector<std::int64_t> out;
  double cur = 0.0;
  for (index_t j = 0; j < count; ++j) {
    out.push_back(static_cast<std::int64_t>(std::nearbyint(cur)));  // default rounding: half to even
    cur += stride;
  }
  return out;
}

/// DiT's "ddimN" spacing: range(0, num_steps, stride) for the smallest stride in
/// [1, num_steps) that gives exactly `count` steps (error when none does; e.g. 100 of 1000
/// gives 0, 10, ..., 990).
inline std::vector<std::int64_t> ddim_timesteps(index_t num_steps, index_t count) {
  for (index_t stride = 1; stride < num_steps; ++stride) {
    if ((num_steps + stride - 1) / stride == count) {
      std::vector<std::int64_t> out;
      for (index_t k = 0; k < num_steps; k += stride) out.push_back(static_cast<std::int64_t>(k));
      return out;
    }
  }
  fail("ddim_timesteps: cannot create exactly ", count, " steps with an integer stride out of ", num_steps);
}

/// DDPM with ε-prediction (DiT's defaults: linear schedule, 1000 steps):
///  - per sample u ~ U[0, 1) (streams::training_time), t = floor(num_steps · u) in
///    {0, ..., num_steps − 1};
///  - ε ~ N(0, I) (streams::training_noise); x_t = sqrt(ᾱ_t) x0 + sqrt(1 − ᾱ_t) ε (float64
///    coefficients, rounded to T); model time = t; target ε;
///  - loss = mean over the N·C·H·W elements of the first C output channels of (out − ε)^2.
///    The learned-sigma channels (if any) get no loss and a zero gradient: no VLB term.
class ddpm {
 public:
  struct options {
    index_t num_steps = 1000;
    double beta_start = 1e-4;
    double beta_end = 0.02;
  };

  ddpm() : ddpm(options{}) {}
  explicit ddpm(const options& o) : opt_(o), schedule_(ddpm_schedule::linear(o.num_steps, o.beta_start, o.beta_end)) {}

  const options& opts() const { return opt_; }
  const ddpm_schedule& schedule() const { return schedule_; }
  index_t num_steps() const { return schedule_.size(); }

  template <class T, class B>
  void sample(const tensor<T, B>& x0, std::uint64_t seed, std::uint64_t step, training_batch<T, B>& batch) const {
    detail::check_image_batch("ddpm::sample", "x0", x0);
    const index_t n = x0.dim(0);
    const index_t steps = num_steps();
    auto& coef = batch.coef;
    coef.resize(static_cast<std::size_t>(2 * n));
    batch.t.resize(static_cast<std::size_t>(n));
    batch.sigma.resize(static_cast<std::size_t>(n));
    batch.timestep.resize(static_cast<std::size_t>(n));
    for (index_t s = 0; s < n; ++s) {
      const double u = rng::uniform(seed, streams::training_time(step), static_cast<std::uint64_t>(s));
      index_t ts = static_cast<index_t>(std::floor(u * static_cast<double>(steps)));
      if (ts > steps - 1) ts = steps - 1;
      const double acp = schedule_.alphas_cumprod[static_cast<std::size_t>(ts)];
      batch.timestep[s] = ts;
      batch.t[s] = static_cast<compute_t<T>>(ts);
      batch.sigma[s] = std::sqrt(1.0 - acp);
      coef[2 * s] = std::sqrt(acp);
      coef[2 * s + 1] = std::sqrt(1.0 - acp);
    }
    detail::draw_noised(x0, coef, seed, step, /*velocity=*/false, batch);
  }
  template <class T, class B>
  training_batch<T, B> sample(const tensor<T, B>& x0, std::uint64_t seed, std::uint64_t step) const {
    training_batch<T, B> batch;
    sample(x0, seed, step, batch);
    return batch;
  }

  template <class T, class B>
  T loss_and_grad(const tensor<T, B>& out, const training_batch<T, B>& batch, tensor<T, B>& d_out) const {
    detail::mse_first_channels("ddpm::loss_and_grad", out, batch, d_out);
    return static_cast<T>(batch.loss());
  }
  /// As loss_and_grad, but the loss stays on the device (batch.loss() reads it back): a
  /// training step need not wait for the device.
  template <class T, class B>
  void queue_loss_and_grad(const tensor<T, B>& out, const training_batch<T, B>& batch, tensor<T, B>& d_out) const {
    detail::mse_first_channels("ddpm::loss_and_grad", out, batch, d_out);
  }

 private:
  options opt_;
  ddpm_schedule schedule_;
};

}  // namespace promoe::dit
