// SPDX-License-Identifier: Apache-2.0
// promoe-parity: runs one MoE block (--model moe) or a whole DiT (--model dit) forward and
// backward from files, so a port from PyTorch (or promoe itself) can be checked tensor by
// tensor.
//
//   promoe-parity --model moe|dit --config config.json --weights weights.safetensors
//                 --inputs inputs.safetensors --out actual.safetensors [--repeat N]
//
// --repeat N: after the results are written, one untimed warm-up and N timed runs of the
// forward + backward on the same inputs (no file reading or writing); prints median_ms=<ms>.
//
// config.json uses the reference models' hyper-parameter names (see README). The inputs'
// floating dtype (F32 or F64) decides the computation's. Outputs are the gradients of
// sum(output * grad_output) + aux_loss:
//   moe: inputs hidden_states [B, S, D], labels [B] int64, grad_output [B, S, D];
//        outputs output, aux_loss (0-dim), grad.hidden_states, grad.<name>.
//   dit: inputs x [B, C, H, W], t [B], y [B] int64 (used as given), grad_output;
//        outputs output, aux_loss, grad.x, grad.<name> for every trainable parameter.
#include <algorithm>
#include <charconv>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <optional>
#include <iostream>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include <promoe/dit/model.hpp>
#include <promoe/io/safetensors.hpp>
#include <promoe/promoe.hpp>

using namespace promoe;
using json = nlohmann::json;

namespace {

struct arguments {
  std::string model, config, weights, inputs, out;
  int repeat = 0;  ///< timed forward + backward runs (0: none)
};

[[noreturn]] void usage(const std::string& problem) {
  std::fprintf(stderr,
               "promoe-parity: %s\n"
               "usage: promoe-parity --model moe|dit --config config.json --weights weights.safetensors\n"
               "                     --inputs inputs.safetensors --out actual.safetensors [--repeat N]\n",
               problem.c_str());
  std::exit(2);
}

arguments parse_arguments(int argc, char** argv) {
  arguments a;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--repeat") {
      if (i + 1 >= argc) usage("missing value after --repeat");
      const std::string value = argv[++i];
      const auto [end, ec] = std::from_chars(value.data(), value.data() + value.size(), a.repeat);
      if (value.empty() || ec != std::errc{} || end != value.data() + value.size() || a.repeat < 1)
        usage("--repeat must be an integer >= 1, got '" + value + "'");
      continue;
    }
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
  if (a.model != "moe" && a.model != "dit") usage("unknown --model '" + a.model + "' (expected moe or dit)");
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

json read_json(const std::string& path) {
  std::ifstream in(path);
  PROMOE_CHECK(in, path, ": cannot open");
  json j;
  try {
    in >> j;
  } catch (const json::exception& e) {
    fail(path, ": not valid JSON (", e.what(), ")");
  }
  PROMOE_CHECK(j.is_object(), path, ": expected a JSON object");
  return j;
}

void report_unknown_keys(const json& j, const std::set<std::string>& known, const std::string& where) {
  for (const auto& [key, value] : j.items())
    if (!known.count(key)) std::fprintf(stderr, "promoe-parity: %s: ignoring unknown key '%s'\n", where.c_str(), key.c_str());
}

/// The MoE block's keys from object j (the whole config.json, or its "moe" entry).
moe_config read_moe_config(const json& j, const std::string& path) {
  moe_config c;
  const std::set<std::string> known{"hidden_size", "num_routed_experts", "top_k", "moe_intermediate_size",
                                    "shared_expert_intermediate_size", "use_shared_expert", "use_uncond_expert",
                                    "null_label", "router", "router_weight_mode", "norm_topk_prob",
                                    "routing_contrastive_lam", "routing_contrastive_temperature",
                                    "use_top_k_for_routing_contrastive", "load_balance_loss_coef", "training",
                                    "dtype"};  // dtype: informational, the inputs' dtype decides
  report_unknown_keys(j, known, path);
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

/// Copies every named tensor (parameters, then buffers) from the weights file; the file must
/// hold exactly these names, with these shapes.
template <class T>
void load_weights(const std::vector<named_parameter<T>>& tensors, const std::string& path) {
  const auto weights = io::safetensors_file::read(path);
  std::set<std::string> unused;
  for (const auto& name : weights.names()) unused.insert(name);
  for (const auto& p : tensors) {
    const auto v = weights.values<T>(p.name, p.shape);
    std::copy(v.begin(), v.end(), p.value);
    unused.erase(p.name);
  }
  PROMOE_CHECK(unused.empty(), path, ": holds ", unused.size(), " tensor(s) the model does not have, e.g. '",
               unused.empty() ? "" : *unused.begin(), "'");
}

template <class T>
std::vector<named_parameter<T>> concat(std::vector<named_parameter<T>> a, const std::vector<named_parameter<T>>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

/// output, aux_loss, grad.<input> and grad.<name> of every parameter, written atomically.
template <class T>
void write_results(const std::string& path, std::vector<std::int64_t> out_shape, const std::vector<T>& output, T aux,
                   const std::string& input_name, std::vector<std::int64_t> input_shape, const std::vector<T>& dinput,
                   const std::vector<named_parameter<T>>& params) {
  io::safetensors_writer out;
  out.add<T>("output", std::move(out_shape), output);
  out.add<T>("aux_loss", {}, std::vector<T>{aux});
  out.add<T>("grad." + input_name, std::move(input_shape), dinput);
  for (const auto& p : params) out.add<T>("grad." + p.name, p.shape, std::vector<T>(p.grad, p.grad + p.size()));
  out.write(path);
}

/// --repeat: one untimed warm-up call of f, then `repeat` timed calls; prints the median.
template <class F>
void time_repeats(int repeat, F&& f) {
  if (repeat < 1) return;
  f();
  std::vector<double> ms;
  for (int r = 0; r < repeat; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(ms.begin(), ms.end());
  const std::size_t h = ms.size() / 2;
  std::printf("median_ms=%.4f\n", ms.size() % 2 ? ms[h] : 0.5 * (ms[h - 1] + ms[h]));
  std::fflush(stdout);
}

template <class Layer>
void run_moe(const moe_config& m, const arguments& args, const io::safetensors_file& inputs) {
  using T = typename Layer::scalar;
  Layer layer(make_config(m, static_cast<Layer*>(nullptr)), rng{0});
  load_weights(concat(layer.parameters(), layer.buffers()), args.weights);

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
  write_results<T>(args.out, {b, s, d}, y.to_host(), aux, "hidden_states", {b, s, d}, dx.to_host(),
                   layer.parameters());

  tensor<T, backend::cpu> y_rep({b * s, d}), dx_rep({b * s, d});  // gradients keep accumulating
  time_repeats(args.repeat, [&] {
    layer.forward(x.cmatrix(), labels, y_rep.matrix(), cache);
    layer.backward(dy.cmatrix(), cache, dx_rep.matrix());
  });
}

/// The DiT's keys; the MoE block's keys are in its "moe" entry (null: a dense DiT).
struct dit_json {
  dit::dit_config cfg;
  bool training = true;
  std::optional<moe_config> moe;
};

dit_json read_dit_config(const std::string& path) {
  const json j = read_json(path);
  report_unknown_keys(j, {"input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "mlp_ratio",
                          "num_classes", "learn_sigma", "interleave", "training", "moe", "dtype"},
                      path);
  dit_json d;
  auto& c = d.cfg;
  read_key(j, "input_size", c.input_size, path);
  read_key(j, "patch_size", c.patch_size, path);
  read_key(j, "in_channels", c.in_channels, path);
  read_key(j, "hidden_size", c.hidden_size, path);
  read_key(j, "depth", c.depth, path);
  read_key(j, "num_heads", c.num_heads, path);
  read_key(j, "mlp_ratio", c.mlp_ratio, path);
  read_key(j, "num_classes", c.num_classes, path);
  read_key(j, "learn_sigma", c.learn_sigma, path);
  read_key(j, "interleave", c.interleave, path);
  read_key(j, "training", d.training, path);
  c.validate();
  if (j.contains("moe") && !j.at("moe").is_null()) {
    PROMOE_CHECK(j.at("moe").is_object(), path, ": key 'moe' must be an object or null");
    moe_config m = read_moe_config(j.at("moe"), path + " (moe)");
    m.hidden_size = c.hidden_size;
    m.training = d.training;
    if (m.null_label < 0) m.null_label = c.num_classes;
    d.moe = m;
  }
  return d;
}

template <class Model>
void run_dit(const dit_json& d, const arguments& args, const io::safetensors_file& inputs) {
  using T = typename Model::scalar;
  typename Model::moe_config mc{};
  if constexpr (Model::has_moe) mc = make_config(*d.moe, static_cast<typename Model::moe_type*>(nullptr));
  Model model(d.cfg, mc, rng{0});
  load_weights(concat(model.parameters(), model.buffers()), args.weights);

  const auto& cfg = d.cfg;
  const auto& xe = inputs.at("x");
  PROMOE_CHECK(xe.shape.size() == 4, args.inputs, ": x has shape ", detail::shape_string(xe.shape),
               ", expected [B, C, H, W]");
  const index_t b = xe.shape[0];
  const std::vector<std::int64_t> image{b, cfg.in_channels, cfg.input_size, cfg.input_size};
  const std::vector<std::int64_t> out_image{b, cfg.out_channels(), cfg.input_size, cfg.input_size};
  const auto x = tensor<T, backend::cpu>::from_host(inputs.values<T>("x", image), {b, cfg.image_size()});
  const auto t = inputs.values<T>("t", {b});
  const auto y = inputs.values<std::int64_t>("y", {b});
  const auto dout = tensor<T, backend::cpu>::from_host(inputs.values<T>("grad_output", out_image), {b, cfg.output_size()});

  typename Model::cache cache;
  model.zero_grad();
  tensor<T, backend::cpu> out({b, cfg.output_size()}), dx({b, cfg.image_size()});
  dx.fill(T(0));
  model.forward(x.cmatrix(), t, y, out.matrix(), cache);
  const T aux = model.aux_loss(cache);
  model.backward(dout.cmatrix(), cache, dx.matrix());
  write_results<T>(args.out, out_image, out.to_host(), aux, "x", image, dx.to_host(), model.parameters());

  time_repeats(args.repeat, [&] {  // out is overwritten, dx and the gradients keep accumulating
    model.forward(x.cmatrix(), t, y, out.matrix(), cache);
    model.backward(dout.cmatrix(), cache, dx.matrix());
  });
}

template <class T>
void run_dit_typed(const dit_json& d, const arguments& args, const io::safetensors_file& inputs) {
  if (!d.moe) return run_dit<dit::dit_model<backend::cpu, T>>(d, args, inputs);
  if (d.moe->router == "prototypical") return run_dit<dit::dit_model<backend::cpu, T, promoe_block<T>>>(d, args, inputs);
  run_dit<dit::dit_model<backend::cpu, T, linear_block<T>>>(d, args, inputs);
}

}  // namespace

/// F32 or F64: the dtype of the named input decides the computation's.
bool is_f64(const io::safetensors_file& inputs, const std::string& name, const std::string& path) {
  const auto type = inputs.at(name).type;
  PROMOE_CHECK(type == io::dtype::f64 || type == io::dtype::f32, path, ": ", name, " must be F32 or F64");
  return type == io::dtype::f64;
}

int main(int argc, char** argv) {
  const arguments args = parse_arguments(argc, argv);
  try {
    const auto inputs = io::safetensors_file::read(args.inputs);
    if (args.model == "dit") {
      const dit_json d = read_dit_config(args.config);
      is_f64(inputs, "x", args.inputs) ? run_dit_typed<double>(d, args, inputs) : run_dit_typed<float>(d, args, inputs);
      return 0;
    }
    const moe_config m = read_moe_config(read_json(args.config), args.config);
    const bool f64 = is_f64(inputs, "hidden_states", args.inputs);
    if (m.router == "prototypical") {
      f64 ? run_moe<promoe_block<double>>(m, args, inputs) : run_moe<promoe_block<float>>(m, args, inputs);
    } else {
      f64 ? run_moe<linear_block<double>>(m, args, inputs) : run_moe<linear_block<float>>(m, args, inputs);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "promoe-parity: %s\n", e.what());
    return 1;
  }
  return 0;
}
