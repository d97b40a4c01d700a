// SPDX-License-Identifier: Apache-2.0
// What train_dit and sample_dit share: the run configuration (saved in checkpoints as JSON),
// the device (backend), the model for each MLP kind, loading a checkpoint's weights, and
// class-grid sampling.
#pragma once

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include <promoe/dit.hpp>
#include <promoe/io/checkpoint.hpp>
#include <promoe/io/png.hpp>
#include <promoe/optim/adamw.hpp>
#include <promoe/optim/ema.hpp>
#if defined(PROMOE_APP_THRUST)
#include <promoe/backend/thrust.hpp>
#endif

namespace app {

using namespace promoe;
using T = float;

/// The devices of this build: "cpu" (Eigen), and with the Thrust backend "thrust" (Thrust's
/// device system of the build: the GPU, or OpenMP threads where the build has no CUDA) and,
/// on a CUDA build, "cuda" (the same backend; the default there).
#if defined(PROMOE_APP_THRUST) && THRUST_DEVICE_SYSTEM == THRUST_DEVICE_SYSTEM_CUDA
inline constexpr const char* default_device = "cuda";
#else
inline constexpr const char* default_device = "cpu";
#endif

inline void check_device(const std::string& device) {
#if defined(PROMOE_APP_THRUST)
  constexpr bool thrust = true;
  constexpr bool cuda = THRUST_DEVICE_SYSTEM == THRUST_DEVICE_SYSTEM_CUDA;
#else
  constexpr bool thrust = false, cuda = false;
#endif
  PROMOE_CHECK(device == "cpu" || device == "thrust" || device == "cuda", "unknown --device '", device,
               "' (expected cpu, thrust or cuda)");
  PROMOE_CHECK(device != "thrust" || thrust,
               "--device thrust: this build has no Thrust backend (configure with -DPROMOE_THRUST_DEVICE_SYSTEM=OMP "
               "or CUDA)");
  PROMOE_CHECK(device != "cuda" || cuda,
               "--device cuda: this build has no CUDA backend (configure with -DPROMOE_THRUST_DEVICE_SYSTEM=CUDA on a "
               "machine with the CUDA toolkit)");
}

/// The MLP kinds of train_dit: a dense MLP, three baseline routers, ProMoE and its two
/// ablations (without the routing contrastive loss; without conditional routing, i.e. no
/// unconditional expert: null-label tokens are routed like the others).
inline constexpr const char* mlp_kinds[] = {"dense",  "top-k",         "expert-choice", "expert-race",
                                            "promoe", "promoe-no-rcl", "promoe-no-cond"};

/// Everything that defines a run's model and training; stored in the checkpoint.
struct run_config {
  std::string preset = "mini-28";
  std::string mlp = "promoe";      ///< one of mlp_kinds

  std::string objective = "flow";  ///< flow, ddpm
  index_t experts = 4;             ///< routed experts of the MoE blocks
  index_t batch = 64;
  double lr = 1e-3;
  index_t warmup = 200;
  double clip = 0.5;
  double ema_decay = 0.999;
  std::uint64_t seed = 0;
  std::string dtype = "float32";   ///< float32, bf16 (bf16 weights and activations, float32 master weights)

  nlohmann::json to_json() const {
    nlohmann::json j = {{"preset", preset}, {"mlp", mlp},     {"objective", objective}, {"experts", experts},
                        {"batch", batch},   {"lr", lr},       {"warmup", warmup},       {"clip", clip},
                        {"ema_decay", ema_decay}, {"seed", seed}};
    if (dtype != "float32") j["dtype"] = dtype;  // float32 configs stay as runs before bf16 wrote them
    return j;
  }
  static run_config from_json(const std::string& text, const std::string& where) {
    run_config c;
    try {
      const auto j = nlohmann::json::parse(text);
      c.preset = j.at("preset"), c.mlp = j.at("mlp"), c.objective = j.at("objective");
      c.experts = j.at("experts"), c.batch = j.at("batch"), c.lr = j.at("lr"), c.warmup = j.at("warmup");
      c.clip = j.at("clip"), c.ema_decay = j.at("ema_decay"), c.seed = j.at("seed");
      c.dtype = j.value("dtype", "float32");
    } catch (const nlohmann::json::exception& e) {
      fail(where, ": the checkpoint's config is not a train_dit config (", e.what(), ")");
    }
    return c;
  }
  void validate() const {
    std::string known;
    for (const char* k : mlp_kinds) known += (known.empty() ? "" : ", ") + std::string(k);
    PROMOE_CHECK(std::find(std::begin(mlp_kinds), std::end(mlp_kinds), mlp) != std::end(mlp_kinds),
                 "unknown MLP kind '", mlp, "' (expected one of ", known, ")");
    PROMOE_CHECK(objective == "flow" || objective == "ddpm", "unknown objective '", objective,
                 "' (expected flow or ddpm)");
    PROMOE_CHECK(dtype == "float32" || dtype == "bf16", "unknown --dtype '", dtype, "' (expected float32 or bf16)");
    PROMOE_CHECK(experts >= 1, "--experts must be >= 1, got ", experts);
    PROMOE_CHECK(batch >= 1, "--batch must be >= 1, got ", batch);
    PROMOE_CHECK(lr > 0 && std::isfinite(lr), "--lr must be positive, got ", lr);
    dit::preset(preset).validate();
  }
};

// The MoE layer of each kind (GELU-tanh MLP experts) on backend B, scalar S (float; bf16 for
// bf16 training).
template <class B, class S = T>
using promoe_moe = promoe_layer<B, S>;
template <class B, class S = T>
using top_k_moe = moe_layer<router::top_k, expert::mlp<act::gelu_tanh>, losses<loss::load_balance>, B, S>;
template <class B, class S = T>
using expert_choice_moe = moe_layer<router::expert_choice, expert::mlp<act::gelu_tanh>, losses<>, B, S>;
template <class B, class S = T>
using expert_race_moe = moe_layer<router::expert_race, expert::mlp<act::gelu_tanh>, losses<>, B, S>;

/// The MoE config of a kind, sized as the papers compare them: ProMoE's experts are 2D wide
/// with a shared expert (activated parameters = the dense MLP's); the baselines' are full width.
/// The ablations change only what their names say.
template <class B, class S>
typename promoe_moe<B, S>::config moe_config(const run_config& r, const dit::dit_config& d, promoe_moe<B, S>*) {
  typename promoe_moe<B, S>::config c;
  c.routed_experts = r.experts, c.expert_hidden = 2 * d.hidden_size;
  c.unconditional_experts = r.mlp == "promoe-no-cond" ? 0 : 1;
  c.shared_experts = 1;
  c.router.inner = {1, score_fn::identity, false, 1.0};
  c.router.null_label = d.num_classes;
  c.loss = {{r.mlp == "promoe-no-rcl" ? 0.0 : 1.0, 0.07, true}};
  return c;
}
template <class B, class S>
typename top_k_moe<B, S>::config moe_config(const run_config& r, const dit::dit_config& d, top_k_moe<B, S>*) {
  typename top_k_moe<B, S>::config c;
  c.routed_experts = r.experts, c.expert_hidden = d.mlp_hidden();
  c.router = {1, score_fn::softmax, false};
  c.loss = {{0.01}};
  c.names = param_naming::dit_moe();
  return c;
}
template <class B, class S>
typename expert_choice_moe<B, S>::config moe_config(const run_config& r, const dit::dit_config& d,
                                                    expert_choice_moe<B, S>*) {
  typename expert_choice_moe<B, S>::config c;
  c.routed_experts = r.experts, c.expert_hidden = d.mlp_hidden();
  c.router = {1.0, true, score_fn::softmax};
  return c;
}
template <class B, class S>
typename expert_race_moe<B, S>::config moe_config(const run_config& r, const dit::dit_config& d,
                                                  expert_race_moe<B, S>*) {
  typename expert_race_moe<B, S>::config c;
  c.routed_experts = r.experts, c.expert_hidden = d.mlp_hidden();
  c.router.k = 1;
  return c;
}

/// Calls f.template operator()<Model>() with the model type of the run's MLP kind on backend B
/// with scalar S.
template <class B, class S = T, class F>
decltype(auto) with_model_type(const run_config& r, F&& f) {
  if (r.mlp == "dense") return f.template operator()<dit::dit_model<B, S>>();
  if (r.mlp == "top-k") return f.template operator()<dit::dit_model<B, S, top_k_moe<B, S>>>();
  if (r.mlp == "expert-choice") return f.template operator()<dit::dit_model<B, S, expert_choice_moe<B, S>>>();
  if (r.mlp == "expert-race") return f.template operator()<dit::dit_model<B, S, expert_race_moe<B, S>>>();
  return f.template operator()<dit::dit_model<B, S, promoe_moe<B, S>>>();  // promoe and its ablations
}

/// The same on the device's backend (checked with check_device).
template <class S = T, class F>
decltype(auto) with_model_type(const run_config& r, const std::string& device, F&& f) {
  check_device(device);
#if defined(PROMOE_APP_THRUST)
  if (device != "cpu") return with_model_type<backend::thrust, S>(r, std::forward<F>(f));
#endif
  return with_model_type<backend::cpu, S>(r, std::forward<F>(f));
}

template <class Model>
typename Model::moe_config model_moe_config(const run_config& r, const dit::dit_config& d) {
  if constexpr (Model::has_moe) return moe_config(r, d, static_cast<typename Model::moe_type*>(nullptr));
  else return {};
}

template <class Model>
std::vector<named_parameter<typename Model::scalar>> model_tensors(Model& m) {
  auto all = m.parameters();
  for (auto& b : m.buffers()) all.push_back(b);
  return all;
}

/// Images of the model's output space ([-1, 1]) as bytes.
inline std::vector<std::uint8_t> to_bytes(const std::vector<T>& x) {
  std::vector<std::uint8_t> out(x.size());
  for (std::size_t i = 0; i < x.size(); ++i)
    out[i] = static_cast<std::uint8_t>(std::clamp(std::lround((x[i] + 1.0) * 127.5), 0L, 255L));
  return out;
}

/// Samples one image per label with guidance; returns [N, C, H, W] values in the data range.
template <class Model>
std::vector<T> sample(Model& model, const run_config& r, std::span<const std::int64_t> labels, double cfg_scale,
                      index_t steps, std::uint64_t seed) {
  using B = typename Model::backend_type;
  using S = typename Model::scalar;
  const auto& d = model.cfg();
  dit::inference_model<Model> net(model);
  auto guided = dit::classifier_free_guidance<S, B>(net, cfg_scale, d.num_classes);
  tensor<S, B> x({static_cast<index_t>(labels.size()), d.in_channels, d.input_size, d.input_size});
  if (r.objective == "flow")
    dit::euler_flow(guided, x, labels, {.steps = steps, .seed = seed});
  else
    dit::ddim(guided, x, labels, {.steps = steps, .seed = seed});
  const auto values = x.to_host();
  return std::vector<T>(values.begin(), values.end());
}

/// NCHW floats -> NHWC bytes.
inline std::vector<std::uint8_t> nhwc_bytes(const std::vector<T>& nchw, index_t n, index_t c, index_t h, index_t w) {
  const auto bytes = to_bytes(nchw);
  std::vector<std::uint8_t> out(bytes.size());
  for (index_t i = 0; i < n; ++i)
    for (index_t ch = 0; ch < c; ++ch)
      for (index_t y = 0; y < h; ++y)
        for (index_t x = 0; x < w; ++x) out[((i * h + y) * w + x) * c + ch] = bytes[((i * c + ch) * h + y) * w + x];
  return out;
}

}  // namespace app
