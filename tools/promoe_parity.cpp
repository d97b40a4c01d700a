// SPDX-License-Identifier: Apache-2.0
// promoe-parity: runs one MoE block forward and backward from files, so a port from PyTorch
// (or promoe itself) can be checked tensor by tensor.
//
//   promoe-parity --model moe --config config.json --weights weights.safetensors
//                 --inputs inputs.safetensors --out actual.safetensors
//
// config.json uses the reference model's hyper-parameter names (see README). Inputs:
// hidden_states [B, S, D] (F32 or F64: the computation runs in that type), labels [B]
// int64, grad_output [B, S, D]. Output: output, aux_loss (0-dim), grad.hidden_states and
// grad.<name> for every parameter: the gradients of sum(output * grad_output) + aux_loss.
#include <cstdio>
#include <fstream>
#include <iostream>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include <promoe/io/safetensors.hpp>
#include <promoe/promoe.hpp>

using namespace promoe;
using json = nlohmann::json;

namespace {

struct arguments {
  std::string model, config, weights, inputs, out;
};

[[noreturn]] void usage(const std::string& problem) {
  std::fprintf(stderr,
               "promoe-parity: %s\n"
               "usage: promoe-parity --model moe --config config.json --weights weights.safetensors\n"
               "                     --inputs inputs.safetensors --out actual.safetensors\n",
               problem.c_str());
  std::exit(2);
}

arguments parse_arguments(int argc, char** argv) {
  arguments a;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    std::string* target = flag == "--model"     ? &a.model
                          : flag == "--config"  ? &a.config
                          : flag == "--weights" ? &a.weights
                          : flag == "--inputs"  ? &a.inputs
                          : flag == "--out"     ? &a.out
                                                : nullptr;
    if (!target) usage("unknown argument '" + flag + "'");
    if (i + 1 >= argc) usage("missing value after " + flag);
    *target = argv[++i];
  }
  for (auto [value, name] : {std::pair{&a.model, "--model"}, {&a.config, "--config"}, {&a.weights, "--weights"},
                             {&a.inputs, "--inputs"}, {&a.out, "--out"}})
    if (value->empty()) usage(std::string("missing ") + name);
  if (a.model != "moe") usage("unknown --model '" + a.model + "' (expected moe)");
  return a;
}

/// The MoE block's hyper-parameters, with the reference model's names.
struct moe_config {
  index_t hidden_size = 0, num_routed_experts = 0, top_k = 1, moe_intermediate_size = 0;
  index_t shared_expert_intermediate_size = 0;
  bool use_shared_expert = false, use_uncond_expert = false;
  std::int64_t null_label = -1;
  std::string router = "prototypical", router_weight_mode;
  bool norm_topk_prob = false;
  double routing_contrastive_lam = 1.0, routing_contrastive_temperature = 0.07;
  bool use_top_k_for_routing_contrastive = true;
  double load_balance_loss_coef = 0.01;
  bool training = true;
};

template <class V>
void read_key(const json& j, const char* key, V& out, const std::string& file) {
  if (!j.contains(key)) return;
  try {
    out = j.at(key).get<V>();
  } catch (const json::exception&) {
    fail(file, ": key '", key, "' has the wrong type (", j.at(key).type_name(), ")");
  }
}

moe_config read_config(const std::string& path) {
  std::ifstream in(path);
  PROMOE_CHECK(in, path, ": cannot open");
  json j;
  try {
    in >> j;
  } catch (const json::exception& e) {
    fail(path, ": not valid JSON (", e.what(), ")");
  }
  PROMOE_CHECK(j.is_object(), path, ": expected a JSON object");
  moe_config c;
  const std::set<std::string> known{"hidden_size", "num_routed_experts", "top_k", "moe_intermediate_size",
                                    "shared_expert_intermediate_size", "use_shared_expert", "use_uncond_expert",
                                    "null_label", "router", "router_weight_mode", "norm_topk_prob",
                                    "routing_contrastive_lam", "routing_contrastive_temperature",
                                    "use_top_k_for_routing_contrastive", "load_balance_loss_coef", "training",
                                    "dtype"};  // dtype: informational, the inputs' dtype decides
  for (const auto& [key, value] : j.items())
    if (!known.count(key)) std::fprintf(stderr, "promoe-parity: %s: ignoring unknown key '%s'\n", path.c_str(), key.c_str());
  read_key(j, "hidden_size", c.hidden_size, path);
  read_key(j, "num_routed_experts", c.num_routed_experts, path);
  read_key(j, "top_k", c.top_k, path);
  read_key(j, "moe_intermediate_size", c.moe_intermediate_size, path);
  read_key(j, "shared_expert_intermediate_size", c.shared_expert_intermediate_size, path);
  read_key(j, "use_shared_expert", c.use_shared_expert, path);
  read_key(j, "use_uncond_expert", c.use_uncond_expert, path);
  read_key(j, "null_label", c.null_label, path);
  read_key(j, "router", c.router, path);
  read_key(j, "router_weight_mode", c.router_weight_mode, path);
  read_key(j, "norm_topk_prob", c.norm_topk_prob, path);
  read_key(j, "routing_contrastive_lam", c.routing_contrastive_lam, path);
  read_key(j, "routing_contrastive_temperature", c.routing_contrastive_temperature, path);
  read_key(j, "use_top_k_for_routing_contrastive", c.use_top_k_for_routing_contrastive, path);
  read_key(j, "load_balance_loss_coef", c.load_balance_loss_coef, path);
  read_key(j, "training", c.training, path);
  PROMOE_CHECK(c.router == "prototypical" || c.router == "linear", path, ": router '", c.router,
               "' is not supported (expected prototypical or linear)");
  if (c.router_weight_mode.empty()) c.router_weight_mode = c.router == "linear" ? "softmax" : "identity";
  return c;
}

/// The block of `router: prototypical` (ProMoE) and of `router: linear` (DiT-MoE baseline).
template <class T>
using promoe_block = moe_layer<router::promoe, expert::mlp<act::gelu_tanh>, losses<loss::routing_contrastive>,
                               backend::cpu, T>;
template <class T>
using linear_block =
    moe_layer<router::top_k, expert::mlp<act::gelu_tanh>, losses<loss::load_balance>, backend::cpu, T, expert::swiglu>;

template <class Layer>
typename Layer::config layer_config(const moe_config& m) {
  typename Layer::config cfg;
  cfg.dim = m.hidden_size;
  cfg.routed_experts = m.num_routed_experts;
  cfg.expert_hidden = m.moe_intermediate_size;
  return cfg;
}

template <class T>
typename promoe_block<T>::config make_config(const moe_config& m, promoe_block<T>*) {
  auto cfg = layer_config<promoe_block<T>>(m);
  cfg.unconditional_experts = m.use_uncond_expert ? 1 : 0;
  cfg.shared_experts = m.use_shared_expert ? 1 : 0;
  cfg.shared_hidden = m.shared_expert_intermediate_size;
  cfg.router.inner = {m.top_k, parse_score_fn(m.router_weight_mode), m.norm_topk_prob, 1.0};
  // Without an unconditional expert the labels only need to be valid; any bound works.
  cfg.router.null_label = m.null_label >= 0 ? m.null_label : std::numeric_limits<std::int64_t>::max();
  cfg.loss = {{m.training ? m.routing_contrastive_lam : 0.0, m.routing_contrastive_temperature,
               m.use_top_k_for_routing_contrastive}};
  cfg.names = param_naming::promoe();
  return cfg;
}

template <class T>
typename linear_block<T>::config make_config(const moe_config& m, linear_block<T>*) {
  auto cfg = layer_config<linear_block<T>>(m);
  cfg.shared_experts = m.shared_expert_intermediate_size > 0 ? 1 : 0;
  cfg.shared_hidden = m.shared_expert_intermediate_size;
  cfg.router = {m.top_k, parse_score_fn(m.router_weight_mode), m.norm_topk_prob};
  cfg.loss = {{m.training ? m.load_balance_loss_coef : 0.0}};
  cfg.names = param_naming::dit_moe();
  return cfg;
}

template <class Layer>
void run(const moe_config& m, const arguments& args, const io::safetensors_file& inputs) {
  using T = typename Layer::scalar;
  Layer layer(make_config(m, static_cast<Layer*>(nullptr)), rng{0});

  // Weights: every parameter must be in the file with its shape; nothing else may be.
  const auto weights = io::safetensors_file::read(args.weights);
  std::set<std::string> unused;
  for (const auto& name : weights.names()) unused.insert(name);
  for (auto& p : layer.parameters()) {
    const auto v = weights.values<T>(p.name, p.shape);
    std::copy(v.begin(), v.end(), p.value);
    unused.erase(p.name);
  }
  PROMOE_CHECK(unused.empty(), args.weights, ": holds ", unused.size(), " tensor(s) the model does not have, e.g. '",
               unused.empty() ? "" : *unused.begin(), "'");

  const auto& hs = inputs.at("hidden_states");
  PROMOE_CHECK(hs.shape.size() == 3 && hs.shape[2] == m.hidden_size, args.inputs, ": hidden_states has shape ",
               detail::shape_string(hs.shape), ", expected [B, S, ", m.hidden_size, "]");
  const index_t b = hs.shape[0], s = hs.shape[1], d = hs.shape[2];
  const auto x = tensor<T, backend::cpu>::from_host(inputs.values<T>("hidden_states"), {b * s, d});
  const auto labels = inputs.values<std::int64_t>("labels", {b});
  const auto dy = tensor<T, backend::cpu>::from_host(inputs.values<T>("grad_output", {b, s, d}), {b * s, d});

  typename Layer::cache cache;
  layer.zero_grad();
  const auto y = layer.forward(x, labels, cache);
  const T aux = layer.aux_loss(cache);
  const auto dx = layer.backward(dy, cache);
  if (!m.training) {  // inference routing: the cache-free path must give the same output
    const auto yi = layer.infer(x, labels).to_host();
    const auto yt = y.to_host();
    for (std::size_t i = 0; i < yi.size(); ++i)
      PROMOE_CHECK(yi[i] == yt[i], "promoe-parity: inference output differs from the training forward at ", i);
  }

  io::safetensors_writer out;
  out.add<T>("output", {b, s, d}, y.to_host());
  out.add<T>("aux_loss", {}, std::vector<T>{aux});
  out.add<T>("grad.hidden_states", {b, s, d}, dx.to_host());
  for (auto& p : layer.parameters())
    out.add<T>("grad." + p.name, p.shape, std::vector<T>(p.grad, p.grad + p.size()));
  out.write(args.out);
}

}  // namespace

int main(int argc, char** argv) {
  const arguments args = parse_arguments(argc, argv);
  try {
    const moe_config m = read_config(args.config);
    const auto inputs = io::safetensors_file::read(args.inputs);
    const bool f64 = inputs.at("hidden_states").type == io::dtype::f64;
    PROMOE_CHECK(f64 || inputs.at("hidden_states").type == io::dtype::f32, args.inputs,
                 ": hidden_states must be F32 or F64");
    if (m.router == "prototypical") {
      f64 ? run<promoe_block<double>>(m, args, inputs) : run<promoe_block<float>>(m, args, inputs);
    } else {
      f64 ? run<linear_block<double>>(m, args, inputs) : run<linear_block<float>>(m, args, inputs);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "promoe-parity: %s\n", e.what());
    return 1;
  }
  return 0;
}
