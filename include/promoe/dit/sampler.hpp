// SPDX-License-Identifier: Apache-2.0
/// \file sampler.hpp
/// \brief Samplers for any dit::DiffusionModel: Euler for rectified flow, DDPM ancestral and
/// DDIM for ε-prediction DDPM. Deterministic: a seed fixes the initial and per-step noise.
///
/// Samplers (x: [N, C, H, W] on entry gives the sample shape, on return holds the samples;
/// y: [N] labels, passed unchanged to every model call):
///  - dit::euler_flow     : σ from 1 (x = ε) to 0 in `steps` uniform steps,
///                          x ← x + (σ_next − σ) v(x, 1000 σ). For rectified_flow models.
///  - dit::ddpm_ancestral : DDPM ancestral sampling (DiT's p_sample_loop) over the full chain
///                          or a respaced subset, ε-prediction, fixed small posterior variance
///                          β̃ = β (1 − ᾱ_prev) / (1 − ᾱ); no clipping by default.
///  - dit::ddim           : DDIM (DiT's ddim_sample_loop), `steps` uniformly spaced steps, eta.
///
/// Conventions: the model output's first C channels are the prediction (v or ε); further
/// channels (learn_sigma) are ignored, so a learned DDPM variance is not used. The model time
/// is 1000 σ (flow) or the original integer timestep (DDPM/DDIM, also when respaced, as
/// DiT's _WrappedModel maps it). Noise: streams::sampler_initial_noise() for x_T and
/// streams::sampler_step_noise(k) for the k-th step taken (see objective.hpp). Coefficients
/// are float64; each update is computed in float64 and rounded to the state's type: T, or
/// float32 for bf16 models (dit::detail::sampler_state), whose x is the state rounded.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <type_traits>
#include <vector>

#include "../backend/backend.hpp"
#include "../backend/ops.hpp"
#include "../backend/tensor.hpp"
#include "../core/bf16.hpp"
#include "../core/config.hpp"
#include "../core/error.hpp"
#include "../core/rng.hpp"
#include "objective.hpp"

namespace promoe::dit {

/// How a respaced DDPM chain picks its steps.
enum class timestep_spacing {
  even,         ///< DiT's default ("250"): dit::space_timesteps, rounded even spacing
  ddim_stride,  ///< DiT's "ddimN": range(0, num_steps, stride), dit::ddim_timesteps
};

struct euler_options {
  index_t steps = 250;    ///< number of Euler steps (model calls), >= 1
  std::uint64_t seed = 0;
};

struct ddpm_sampler_options {
  index_t steps = 1000;  ///< steps of the chain; diffusion.num_steps = the full chain, fewer respaces it
  timestep_spacing spacing = timestep_spacing::even;
  std::uint64_t seed = 0;
  bool clip_denoised = false;  ///< clamp the predicted x0 to [-1, 1] (DiT samples with false)
  ddpm::options diffusion{};   ///< the training schedule (DiT: linear, 1000 steps)
};

struct ddim_options {
  index_t steps = 50;  ///< steps of the respaced chain
  double eta = 0.0;    ///< 0: deterministic DDIM; 1: DDPM-like noise
  timestep_spacing spacing = timestep_spacing::even;
  std::uint64_t seed = 0;
  bool clip_denoised = false;
  ddpm::options diffusion{};
};

namespace detail {

/// x[i] = ε_i from (seed, stream).
template <class T>
struct normal_fill_functor {
  T* x;
  std::uint64_t seed, stream;
  PROMOE_HOST_DEVICE void operator()(index_t i) const {
    x[i] = static_cast<T>(rng::normal(seed, stream, static_cast<std::uint64_t>(i)));
  }
};

/// Maps element i of x [N, C, H, W] to the same (n, c, h, w) of out [N, C_out, H, W].
struct channel_map {
  index_t channels, out_channels, plane;  // C, C_out, H W
  PROMOE_HOST_DEVICE index_t operator()(index_t i) const {
    const index_t per = channels * plane;
    return (i / per) * out_channels * plane + i % per;
  }
};

/// x ← x + dt v (x the sampler's state S, v the model's output V).
template <class S, class V>
struct euler_step_functor {
  S* x;        // [N, C, H, W]
  const V* v;  // [N, C_out, H, W]
  channel_map map;
  double dt;
  PROMOE_HOST_DEVICE void operator()(index_t i) const {
    x[i] = static_cast<S>(static_cast<double>(x[i]) + dt * static_cast<double>(v[map(i)]));
  }
};

/// Per-step scalars of the ε-prediction updates.
struct eps_step_params {
  double recip;    // sqrt(1 / ᾱ)
  double recipm1;  // sqrt(1 / ᾱ − 1)
  double c_x0;     // DDPM: posterior coefficient of x0; DDIM: sqrt(ᾱ_prev)
  double c_xt;     // DDPM: posterior coefficient of x_t; DDIM: 0
  double c_eps;    // DDPM: 0; DDIM: sqrt(1 − ᾱ_prev − σ^2)
  double noise;    // std of the fresh noise (0 at the last step)
  bool clip;       // clamp the predicted x0 to [-1, 1]
  bool ddim;       // re-derive ε from the (possibly clipped) x0, as DiT's ddim_sample
};

/// x0 = recip x − recipm1 ε (clipped if asked); x ← c_x0 x0 + c_xt x + c_eps ε' + noise z.
template <class S, class V>
struct eps_step_functor {
  S* x;          // [N, C, H, W] the sampler's state
  const V* eps;  // [N, C_out, H, W] the model's output
  channel_map map;
  eps_step_params p;
  std::uint64_t seed, stream;
  PROMOE_HOST_DEVICE void operator()(index_t i) const {
    const double xt = static_cast<double>(x[i]);
    double e = static_cast<double>(eps[map(i)]);
    double x0 = p.recip * xt - p.recipm1 * e;
    if (p.clip) x0 = x0 < -1.0 ? -1.0 : (x0 > 1.0 ? 1.0 : x0);
    if (p.ddim) e = (p.recip * xt - x0) / p.recipm1;
    double next = p.c_x0 * x0 + p.c_xt * xt + p.c_eps * e;
    if (p.noise != 0.0) next += p.noise * rng::normal(seed, stream, static_cast<std::uint64_t>(i));
    x[i] = static_cast<S>(next);
  }
};

/// The running x of a sampler: x itself, or for bf16 models a float32 copy that is rounded into
/// x for each model call. (In bf16 a step's update, dt v with dt = 1/250, is below half a
/// bf16 step of x and would be rounded away.) It starts at x_T = ε from
/// streams::sampler_initial_noise().
template <class T, class B>
class sampler_state {
 public:
  using value_type = compute_t<T>;
  static constexpr bool separate = !std::is_same_v<value_type, T>;

  sampler_state(tensor<T, B>& x, std::uint64_t seed) : x_(x) {
    if constexpr (separate) state_.resize(x.shape());
    backend_traits<B>::parallel_for(size(),
                                    normal_fill_functor<value_type>{data(), seed, streams::sampler_initial_noise()});
  }
  value_type* data() {
    if constexpr (separate)
      return state_.data();
    else
      return x_.data();
  }
  index_t size() const { return x_.size(); }
  /// x = the state (rounded): before each model call and at the end.
  void publish() {
    if constexpr (separate) ops::convert<B>(state_.data(), state_.size(), x_.data());
  }

 private:
  tensor<T, B>& x_;
  tensor<value_type, B> state_;
};

template <class T, class B>
void check_sampler_args(const char* who, const tensor<T, B>& x, std::span<const std::int64_t> y, index_t steps) {
  check_image_batch(who, "x", x);
  PROMOE_CHECK(static_cast<index_t>(y.size()) == x.dim(0), who, ": ", y.size(), " labels for ", x.dim(0),
               " samples");
  PROMOE_CHECK(steps >= 1, who, ": steps is ", steps, "; expected >= 1");
}

/// Calls the model and checks its output; returns C_out.
template <class Model, class T, class B>
index_t call_model(const char* who, Model& model, const tensor<T, B>& x, const std::vector<compute_t<T>>& t,
                   std::span<const std::int64_t> y, tensor<T, B>& out) {
  model(x, t, y, out);
  return check_model_output(who, x, out);
}

inline ddpm_schedule sampling_schedule(const char* who, const ddpm::options& diffusion, index_t steps,
                                       timestep_spacing spacing) {
  const ddpm_schedule full = ddpm_schedule::linear(diffusion.num_steps, diffusion.beta_start, diffusion.beta_end);
  PROMOE_CHECK(steps >= 1 && steps <= full.size(), who, ": steps is ", steps, "; expected 1..", full.size());
  if (steps == full.size()) return full;
  return full.respaced(spacing == timestep_spacing::even ? space_timesteps(full.size(), steps)
                                                         : ddim_timesteps(full.size(), steps));
}

/// The reverse loop shared by DDPM and DDIM: k = S−1 down to 0; params(k) gives the update.
template <class Model, class T, class B, class Params>
void eps_sampling_loop(const char* who, Model& model, tensor<T, B>& x, std::span<const std::int64_t> y,
                       const ddpm_schedule& s, std::uint64_t seed, Params params) {
  const index_t n = x.dim(0);
  tensor<T, B> out;
  std::vector<compute_t<T>> t(static_cast<std::size_t>(n));
  sampler_state<T, B> state(x, seed);
  using S = typename sampler_state<T, B>::value_type;
  for (index_t j = 0; j < s.size(); ++j) {
    const index_t k = s.size() - 1 - j;
    std::fill(t.begin(), t.end(), static_cast<compute_t<T>>(s.timesteps[static_cast<std::size_t>(k)]));
    state.publish();
    const index_t c_out = call_model(who, model, x, t, y, out);
    backend_traits<B>::parallel_for(
        state.size(), eps_step_functor<S, T>{state.data(), out.data(), channel_map{x.dim(1), c_out, x.dim(2) * x.dim(3)},
                                             params(k), seed, streams::sampler_step_noise(static_cast<std::uint64_t>(j))});
  }
  state.publish();
}

}  // namespace detail

/// Euler sampling of a rectified-flow model: σ_k = 1 − k / steps, x_0 = ε
/// (streams::sampler_initial_noise), then for k = 0..steps−1
/// x ← x + (σ_{k+1} − σ_k) v(x, t = 1000 σ_k), v the first C output channels.
/// \param x [N, C, H, W]: its shape sets the sample shape; on return the samples.
template <class Model, class T, class B>
void euler_flow(Model&& model, tensor<T, B>& x, std::span<const std::int64_t> y, const euler_options& o = {}) {
  detail::require_diffusion_model<Model, T, B>();
  constexpr const char* who = "euler_flow";
  detail::check_sampler_args(who, x, y, o.steps);
  const index_t n = x.dim(0);
  tensor<T, B> out;
  std::vector<compute_t<T>> t(static_cast<std::size_t>(n));
  detail::sampler_state<T, B> state(x, o.seed);
  using S = typename detail::sampler_state<T, B>::value_type;
  const double steps = static_cast<double>(o.steps);
  for (index_t k = 0; k < o.steps; ++k) {
    const double sigma = static_cast<double>(o.steps - k) / steps;
    const double sigma_next = static_cast<double>(o.steps - k - 1) / steps;
    std::fill(t.begin(), t.end(), static_cast<compute_t<T>>(rectified_flow::time_scale * sigma));
    state.publish();
    const index_t c_out = detail::call_model(who, model, x, t, y, out);
    backend_traits<B>::parallel_for(
        state.size(), detail::euler_step_functor<S, T>{state.data(), out.data(),
                                                       detail::channel_map{x.dim(1), c_out, x.dim(2) * x.dim(3)},
                                                       sigma_next - sigma});
  }
  state.publish();
}

/// DDPM ancestral sampling (DiT's p_sample_loop with FIXED_SMALL variance): x_T = ε, then
/// for each index k of the (respaced) chain from the last to the first:
///   x0 = sqrt(1/ᾱ_k) x − sqrt(1/ᾱ_k − 1) ε_θ(x, t_k)   (clamped to [-1, 1] if clip_denoised)
///   x  ← β_k sqrt(ᾱ_prev)/(1 − ᾱ_k) x0 + (1 − ᾱ_prev) sqrt(1 − β_k)/(1 − ᾱ_k) x + sqrt(β̃_k) z,
/// with β̃_k = β_k (1 − ᾱ_prev)/(1 − ᾱ_k) and no noise at k = 0. A learned variance in the
/// extra output channels is ignored.
template <class Model, class T, class B>
void ddpm_ancestral(Model&& model, tensor<T, B>& x, std::span<const std::int64_t> y,
                    const ddpm_sampler_options& o = {}) {
  detail::require_diffusion_model<Model, T, B>();
  constexpr const char* who = "ddpm_ancestral";
  detail::check_sampler_args(who, x, y, o.steps);
  const ddpm_schedule s = detail::sampling_schedule(who, o.diffusion, o.steps, o.spacing);
  const bool clip = o.clip_denoised;
  struct params {
    const ddpm_schedule* s;
    bool clip;
    detail::eps_step_params operator()(index_t k) const {
      const double acp = s->alphas_cumprod[static_cast<std::size_t>(k)];
      const double acp_prev = s->alpha_cumprod_prev(k);
      const double beta = s->betas[static_cast<std::size_t>(k)];
      const double variance = beta * (1.0 - acp_prev) / (1.0 - acp);
      detail::eps_step_params p{};
      p.recip = std::sqrt(1.0 / acp);
      p.recipm1 = std::sqrt(1.0 / acp - 1.0);
      p.c_x0 = beta * std::sqrt(acp_prev) / (1.0 - acp);
      p.c_xt = (1.0 - acp_prev) * std::sqrt(1.0 - beta) / (1.0 - acp);
      p.c_eps = 0.0;
      p.noise = k > 0 ? std::exp(0.5 * std::log(variance)) : 0.0;
      p.clip = clip;
      p.ddim = false;
      return p;
    }
  };
  detail::eps_sampling_loop(who, model, x, y, s, o.seed, params{&s, clip});
}

/// DDIM sampling (DiT's ddim_sample_loop) over `steps` uniformly spaced steps:
///   x0 = sqrt(1/ᾱ) x − sqrt(1/ᾱ − 1) ε_θ (clamped if clip_denoised), ε' = (sqrt(1/ᾱ) x − x0) / sqrt(1/ᾱ − 1),
///   σ = eta sqrt((1 − ᾱ_prev)/(1 − ᾱ)) sqrt(1 − ᾱ/ᾱ_prev),
///   x ← sqrt(ᾱ_prev) x0 + sqrt(1 − ᾱ_prev − σ^2) ε' + σ z (no noise at the last step).
template <class Model, class T, class B>
void ddim(Model&& model, tensor<T, B>& x, std::span<const std::int64_t> y, const ddim_options& o = {}) {
  detail::require_diffusion_model<Model, T, B>();
  constexpr const char* who = "ddim";
  detail::check_sampler_args(who, x, y, o.steps);
  PROMOE_CHECK(std::isfinite(o.eta) && o.eta >= 0.0, who, ": eta is ", o.eta, "; expected a finite value >= 0");
  const ddpm_schedule s = detail::sampling_schedule(who, o.diffusion, o.steps, o.spacing);
  struct params {
    const ddpm_schedule* s;
    double eta;
    bool clip;
    detail::eps_step_params operator()(index_t k) const {
      const double acp = s->alphas_cumprod[static_cast<std::size_t>(k)];
      const double acp_prev = s->alpha_cumprod_prev(k);
      const double sigma = eta * std::sqrt((1.0 - acp_prev) / (1.0 - acp)) * std::sqrt(1.0 - acp / acp_prev);
      detail::eps_step_params p{};
      p.recip = std::sqrt(1.0 / acp);
      p.recipm1 = std::sqrt(1.0 / acp - 1.0);
      p.c_x0 = std::sqrt(acp_prev);
      p.c_xt = 0.0;
      p.c_eps = std::sqrt(std::max(0.0, 1.0 - acp_prev - sigma * sigma));
      p.noise = k > 0 ? sigma : 0.0;
      p.clip = clip;
      p.ddim = true;
      return p;
    }
  };
  detail::eps_sampling_loop(who, model, x, y, s, o.seed, params{&s, o.eta, o.clip_denoised});
}

}  // namespace promoe::dit
