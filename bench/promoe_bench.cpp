// SPDX-License-Identifier: Apache-2.0
// promoe_bench: promoe's MoE layers, DiT training steps and DiT sampling (float32) on the CPU
// backend, or with --device thrust / cuda on the Thrust backend (scripts/gpu-check.sh), timed
// the way bench/torch_bench.py times the PyTorch references; the case names are the same, so
// the two result files join by name (scripts/bench.sh does).
//
//   promoe_bench [--device cpu|thrust|cuda] [--tokens 1024,4096,16384] [--reps 5]
//                [--cases moe,experts,dit,dit-bf16,sample] [--dit-presets mini-28,mini-32] [--json FILE]
//
// Every timing is one untimed warm-up call, then --reps timed calls; the median in ms (on a
// GPU each call ends with a device synchronisation, so its time is the device's).
//  - moe.{promoe_s,top2_e8}.t{N}.{fwd,fwdbwd}: one MoE layer's training forward (with cache),
//    and forward + backward. GEMM FLOPs are counted as torch_bench counts them, from the rows
//    the layer's dispatch plan routed; right after each case a dense GEMM problem of equal
//    FLOPs ([R, D] x [D, H] and back, through the same ops::gemm path) is timed: the ratio of
//    the two rates says how close the layer gets to the machine's GEMM rate.
//  - experts.e{E}.t{N}.{grouped,one_by_one} (--cases experts): one bank of E GELU experts
//    (D 384, width 1536) forward + backward on N rows split unevenly over the experts: all
//    experts at once (forward_grouped / backward_grouped: one grouped GEMM per stage, the
//    path of backends whose tasks run one after another) and expert by expert (one task per
//    expert: side by side on the CPU, one after another on a GPU). One row per path.
//  - dit.<preset>.{dense,promoe}.train_step (--dit-presets): batch 64, rectified flow, forward, loss,
//    backward, gradient clipping 0.5, AdamW (lr 1e-3). With the heap counters
//    (heap_counter.hpp): the peak heap during a step, against parameters + gradients + AdamW
//    state + the activations a forward leaves in the model's cache, and the allocations a step
//    makes after the warm-up.
//  - dit.<preset>.{dense,promoe}.bf16.train_step (--cases dit-bf16): the same step of bf16
//    models (bf16 weights, activations and gradients, float32 master weights in AdamW).
//  - sample.mini-28.{dense,promoe}: 64 images, 10 Euler steps, classifier-free guidance 2.
#include <algorithm>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include <nlohmann/json.hpp>

#include <promoe/io/atomic_file.hpp>
#include <promoe/optim/clip.hpp>
#include <promoe/promoe.hpp>

#include "dit_app.hpp"  // examples/: the DiT's MoE configs and class-conditional sampling
#include "heap_counter.hpp"

namespace {

using namespace promoe;
using T = float;
template <class B>
using mat = tensor<T, B>;
using json = nlohmann::ordered_json;

// The workload constants of bench/torch_bench.py.
constexpr index_t tokens_per_sample = 256;
constexpr index_t num_classes = 10;  // the null label is num_classes
constexpr double null_fraction = 0.1;
constexpr index_t dit_batch = 64;
constexpr index_t sample_steps = 10;
constexpr double cfg_scale = 2.0;
constexpr double dit_lr = 1e-3, dit_clip = 0.5;
constexpr std::uint64_t seed = 0;

// ------------------------------------------------------------------------------- timing
/// Waits for the device's queued work (set by main to the backend's synchronize).
void (*device_sync)() = [] {};

struct measurement {
  double median_ms = 0;
  std::int64_t allocations = 0;  ///< most allocation calls in one timed call
  std::int64_t peak_bytes = 0;   ///< highest live heap during a timed call
  std::int64_t start_bytes = 0;  ///< live heap at the start of that call
};

/// One untimed warm-up call of f, then `reps` timed calls: the median wall time (ms), and
/// from the heap counters the most allocations and the highest peak of one timed call.
template <class F>
measurement measure(int reps, F&& f) {
  using clk = std::chrono::steady_clock;
  std::vector<double> ms;
  ms.reserve(static_cast<std::size_t>(reps));
  f();
  device_sync();
  measurement m;
  for (int r = 0; r < reps; ++r) {
    heap::reset_peak();
    const std::int64_t start = heap::live_bytes(), allocs = heap::allocations();
    const auto t0 = clk::now();
    f();
    device_sync();
    const auto t1 = clk::now();
    m.allocations = std::max(m.allocations, heap::allocations() - allocs);
    if (heap::peak_bytes() >= m.peak_bytes) m.peak_bytes = heap::peak_bytes(), m.start_bytes = start;
    ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
  }
  std::sort(ms.begin(), ms.end());
  const std::size_t h = ms.size() / 2;
  m.median_ms = ms.size() % 2 ? ms[h] : 0.5 * (ms[h - 1] + ms[h]);
  return m;
}

// ------------------------------------------------------------------------------- results
/// One row of the report; the derived rates are computed when it is written.
struct case_result {
  std::string name;
  double median_ms = 0;
  std::optional<double> flops;   ///< GEMM FLOPs of one call
  std::optional<double> images;  ///< images per call
  std::optional<double> dense_ms, dense_flops;
  json extra = json::object();  ///< further keys (allocations, memory)

  static json or_null(const std::optional<double>& v) { return v ? json(*v) : json(nullptr); }
  std::optional<double> gflops() const { return flops ? std::optional(*flops / median_ms * 1e-6) : std::nullopt; }
  std::optional<double> images_per_s() const {
    return images ? std::optional(*images / median_ms * 1e3) : std::nullopt;
  }
  std::optional<double> dense_gflops() const {
    return dense_ms ? std::optional(*dense_flops / *dense_ms * 1e-6) : std::nullopt;
  }
  std::optional<double> ratio_vs_dense() const {
    return gflops() && dense_gflops() ? std::optional(*gflops() / *dense_gflops()) : std::nullopt;
  }

  json to_json() const {
    json j = {{"name", name},
              {"median_ms", median_ms},
              {"flops", or_null(flops)},
              {"gflops", or_null(gflops())},
              {"images_per_s", or_null(images_per_s())},
              {"dense_ms", or_null(dense_ms)},
              {"dense_gflops", or_null(dense_gflops())},
              {"ratio_vs_dense", or_null(ratio_vs_dense())}};
    j.update(extra);
    return j;
  }
};

std::string fmt(const std::optional<double>& v, const char* spec) {
  if (!v) return "-";
  char buf[32];
  std::snprintf(buf, sizeof buf, spec, *v);
  return buf;
}

double mib(std::int64_t bytes) { return static_cast<double>(bytes) / (1024.0 * 1024.0); }

/// Collects the rows and prints each as it comes.
class report {
 public:
  explicit report(int reps) : reps_(reps) {}
  int reps() const { return reps_; }

  static void print_header() {
    std::printf("%-34s %10s %9s %9s %10s %9s %7s\n", "case", "ms", "GFLOP/s", "images/s", "dense ms", "vs dense",
                "allocs");
  }

  void add(case_result r) {
    const json allocs = r.extra.contains("allocs_per_step") ? r.extra["allocs_per_step"]
                                                            : r.extra.value("allocs_per_call", json(nullptr));
    std::printf("%-34s %10.2f %9s %9s %10s %9s %7s\n", r.name.c_str(), r.median_ms, fmt(r.gflops(), "%.1f").c_str(),
                fmt(r.images_per_s(), "%.1f").c_str(), fmt(r.dense_ms, "%.2f").c_str(),
                fmt(r.ratio_vs_dense(), "%.2fx").c_str(), allocs.is_null() ? "-" : allocs.dump().c_str());
    if (r.extra.contains("router_ms"))
      std::printf("  router + dispatch + combine: %.2f ms, %.1f%% of the layer\n", r.extra["router_ms"].get<double>(),
                  100.0 * r.extra["router_share"].get<double>());
    if (r.extra.contains("step_peak_bytes")) {
      const auto& e = r.extra;
      std::printf("  heap: peak %.1f MiB during the step (%.1f MiB at its start); expected %.1f MiB = parameters "
                  "%.1f + gradients %.1f + AdamW %.1f + activations %.1f; peak / expected %.2f\n",
                  mib(e["step_peak_bytes"]), mib(e["step_start_bytes"]), mib(e["expected_bytes"]),
                  mib(e["param_bytes"]), mib(e["grad_bytes"]), mib(e["adamw_bytes"]), mib(e["activation_bytes"]),
                  e["peak_vs_expected"].get<double>());
    }
    std::fflush(stdout);
    rows_.push_back(std::move(r));
  }

  json cases_json() const {
    json cases = json::array();
    for (const auto& r : rows_) cases.push_back(r.to_json());
    return cases;
  }

 private:
  int reps_;
  std::vector<case_result> rows_;
};

// ------------------------------------------------------------------------------- inputs
/// n values ~ N(0, 1), a function of the stream.
/// Into v (resized; no allocation once it has the capacity, so a timed step counts only promoe's).
/// Split over the threads, as torch.randn is (each value is a function of its index).
void fill_normal(std::vector<T>& v, index_t n, std::uint64_t stream) {
  v.resize(static_cast<std::size_t>(n));
  T* out = v.data();
  backend_traits<backend::cpu>::parallel_for(
      n, [=](index_t i) { out[i] = static_cast<T>(rng::normal(seed, stream, static_cast<std::uint64_t>(i))); });
}
std::vector<T> normal_values(index_t n, std::uint64_t stream) {
  std::vector<T> v;
  fill_normal(v, n, stream);
  return v;
}

/// [rows, cols] ~ N(0, 1) in backend B's memory, a function of the stream.
template <class B>
mat<B> random_matrix(index_t rows, index_t cols, std::uint64_t stream) {
  return mat<B>::from_host(normal_values(rows * cols, stream), {rows, cols});
}

/// Labels uniform in 0..num_classes-1 (torch_bench's null_labelled: then max(1, round(0.1 B))
/// distinct samples get the null label; round half to even, as Python rounds).
std::vector<std::int64_t> moe_labels(index_t samples, std::uint64_t stream) {
  std::vector<std::int64_t> labels(static_cast<std::size_t>(samples));
  for (index_t b = 0; b < samples; ++b)
    labels[b] = std::min<std::int64_t>(num_classes - 1, static_cast<std::int64_t>(rng::uniform(seed, stream, b) * num_classes));
  const index_t nulls = std::min<index_t>(samples, std::max<index_t>(1, std::llrint(null_fraction * samples)));
  std::vector<index_t> order(static_cast<std::size_t>(samples));
  for (index_t b = 0; b < samples; ++b) order[b] = b;
  for (index_t i = 0; i < nulls; ++i) {  // partial Fisher-Yates: the first `nulls` of a random permutation
    const index_t j = i + static_cast<index_t>(rng::uniform(seed, stream + 1, i) * static_cast<double>(samples - i));
    std::swap(order[i], order[std::min(j, samples - 1)]);
    labels[order[i]] = num_classes;
  }
  return labels;
}

// ------------------------------------------------------------------------------- MoE layers
template <class B>
using promoe_s_layer = app::promoe_moe<B>;  // promoe_layer<B, float>
template <class B>
using top2_layer = moe_layer<router::top_k, expert::mlp<act::gelu_tanh>, losses<loss::load_balance>, B, T>;

/// ProMoE-S: the ProMoE block of a DiT-S (D 384) as examples/dit_app.hpp configures it, with
/// 12 routed experts: width 2D = 768, one unconditional and one shared expert (width 768),
/// top-1 cosine router with identity score, routing contrastive loss (weight 1).
template <class B>
typename promoe_s_layer<B>::config promoe_s_config() {
  app::run_config r;
  r.experts = 12;
  dit::dit_config d = dit::preset("S");
  d.num_classes = num_classes;
  auto c = app::moe_config(r, d, static_cast<promoe_s_layer<B>*>(nullptr));
  c.dim = d.hidden_size;  // the DiT sets it per model; shared_hidden 0: the routed width
  return c;
}

/// Top-2 of 8 GELU-tanh experts of width 1536, softmax, renormalised gates, load balance 0.01.
template <class B>
typename top2_layer<B>::config top2_e8_config() {
  typename top2_layer<B>::config c;
  c.dim = 384, c.routed_experts = 8, c.expert_hidden = 1536;
  c.router = {.k = 2, .score = score_fn::softmax, .renormalize = true};
  c.loss = {{.weight = 0.01}};
  return c;
}

/// GEMM FLOPs of one forward, counted as torch_bench's moe_fwd_flops: 4 D I per row of the
/// routed and unconditional experts (the plan's rows), 4 D I_shared per token and shared
/// expert, and 2 D E per token the router scores (tokens with a slot on a routed expert).
template <class Layer>
double moe_fwd_flops(const Layer& layer, const typename Layer::cache& c) {
  const auto& cfg = layer.cfg();
  const auto& plan = c.plan;
  const double d = static_cast<double>(cfg.dim);
  const double shared_hidden = static_cast<double>(cfg.shared_hidden ? cfg.shared_hidden : cfg.expert_hidden);
  const auto slots = plan.slot_expert.to_host();
  index_t scored = 0;
  for (index_t t = 0; t < plan.tokens; ++t)
    scored += std::any_of(slots.begin() + t * plan.slots_per_token, slots.begin() + (t + 1) * plan.slots_per_token,
                          [&](std::int32_t e) { return e >= 0 && e < cfg.routed_experts; });
  return 4.0 * d * static_cast<double>(cfg.expert_hidden) * static_cast<double>(plan.rows()) +
         4.0 * d * shared_hidden * static_cast<double>(c.tokens * cfg.shared_experts) +
         2.0 * d * static_cast<double>(cfg.routed_experts) * static_cast<double>(scored);
}

/// The dense stand-in: X [R, D] through W1 [H, D] and W2 [D, H] (2 GEMMs, 4 R D H FLOPs) with
/// R chosen so the FLOPs match `fwd_flops`; with backward also dW2, dH, dW1, dX (6 GEMMs,
/// 3x). Returns {median ms, FLOPs}.
template <class B>
std::pair<double, double> dense_gemms(double fwd_flops, index_t d, index_t h, bool backward, int reps) {
  const index_t rows = std::max<index_t>(1, std::llround(fwd_flops / (4.0 * static_cast<double>(d * h))));
  mat<B> x = random_matrix<B>(rows, d, 1), w1 = random_matrix<B>(h, d, 2), w2 = random_matrix<B>(d, h, 3),
         dy = random_matrix<B>(rows, d, 4);
  mat<B> hid({rows, h}), y({rows, d}), dh({rows, h}), dx({rows, d}), gw1({h, d}), gw2({d, h});
  gw1.fill(T(0)), gw2.fill(T(0));
  auto fwd = [&] {
    ops::gemm<B, T>(x.cmatrix(), transpose::no, w1.cmatrix(), transpose::yes, hid.matrix());
    ops::gemm<B, T>(hid.cmatrix(), transpose::no, w2.cmatrix(), transpose::yes, y.matrix());
  };
  auto fwdbwd = [&] {
    fwd();
    ops::gemm<B, T>(dy.cmatrix(), transpose::yes, hid.cmatrix(), transpose::no, gw2.matrix(), T(1), T(1));
    ops::gemm<B, T>(dy.cmatrix(), transpose::no, w2.cmatrix(), transpose::no, dh.matrix());
    ops::gemm<B, T>(dh.cmatrix(), transpose::yes, x.cmatrix(), transpose::no, gw1.matrix(), T(1), T(1));
    ops::gemm<B, T>(dh.cmatrix(), transpose::no, w1.cmatrix(), transpose::no, dx.matrix());
  };
  const double ms = backward ? measure(reps, fwdbwd).median_ms : measure(reps, fwd).median_ms;
  return {ms, (backward ? 12.0 : 4.0) * static_cast<double>(rows * d * h)};
}

/// moe.<layer>.t<n>.fwd and .fwdbwd, each followed by its dense stand-in.
template <class Layer>
void moe_cases(const std::string& layer_name, const typename Layer::config& cfg, index_t n, report& out) {
  using B = typename Layer::backend_type;
  Layer layer(cfg, rng{seed});
  typename Layer::cache cache;
  const index_t d = cfg.dim;
  const mat<B> x = random_matrix<B>(n, d, 10), dy = random_matrix<B>(n, d, 11);
  mat<B> y({n, d}), dx({n, d});
  const auto labels = moe_labels(n / tokens_per_sample, 12);
  auto forward = [&] { layer.forward(x.cmatrix(), labels, y.matrix(), cache); };
  forward();
  const double fwd_flops = moe_fwd_flops(layer, cache);
  layer.backward(dy.cmatrix(), cache, dx.matrix());  // sizes the backward buffers of `cache`
  // Router overhead: the layer's routing work alone, on the buffers of a real step: the
  // router's scores and selection, the gather into expert order and the gated combine; with
  // backward also the combine's backward, the scatter of dx and the router's backward.
  const route_input<T> in{x.cmatrix(), labels, tokens_per_sample, true};
  auto route_forward = [&] {
    layer.router().forward(in, cache.router, cache.plan);
    routing::gather<B>(cache.plan, x.cmatrix(), cache.xp.matrix());
    routing::combine<B>(cache.plan, cache.yp.cmatrix(), y.matrix(), false);
  };
  auto route_backward = [&] {
    routing::combine_backward<B>(cache.plan, dy.cmatrix(), cache.yp.cmatrix(), cache.dyp.matrix(), cache.dgate.data());
    routing::scatter_rows<B>(cache.plan, cache.dxp.cmatrix(), dx.matrix(), false);
    layer.router().backward(in, cache.router, cache.plan, cache.dgate.data(), dx.matrix());
  };
  const double route_fwd_ms = measure(out.reps(), route_forward).median_ms;
  const double route_fwdbwd_ms = measure(out.reps(), [&] {
    route_forward();
    route_backward();
  }).median_ms;
  for (const bool backward : {false, true}) {
    const measurement m = measure(out.reps(), [&] {
      forward();
      if (backward) layer.backward(dy.cmatrix(), cache, dx.matrix());
    });
    const auto [dense_ms, dense_flops] = dense_gemms<B>(fwd_flops, d, cfg.expert_hidden, backward, out.reps());
    case_result r;
    r.name = "moe." + layer_name + ".t" + std::to_string(n) + (backward ? ".fwdbwd" : ".fwd");
    r.median_ms = m.median_ms;
    r.flops = (backward ? 3.0 : 1.0) * fwd_flops;
    r.dense_ms = dense_ms, r.dense_flops = dense_flops;
    const double route_ms = backward ? route_fwdbwd_ms : route_fwd_ms;
    r.extra = {{"tokens", n},
               {"expert_rows", cache.plan.rows()},
               {"allocs_per_call", m.allocations},
               {"router_ms", route_ms},
               {"router_share", route_ms / m.median_ms}};
    out.add(std::move(r));
  }
}

// ------------------------------------------------------------------------------- expert banks
/// experts.e<E>.t<n>.{grouped,one_by_one}: the bank's forward + backward both ways on the same
/// rows; expert e gets a share of the rows proportional to e + 1 (uneven, as routing makes them).
template <class B>
void expert_bank_cases(index_t experts, index_t n, report& out) {
  using bank_t = typename expert::mlp<act::gelu_tanh>::template bank<T, B>;
  constexpr index_t d = 384, h = 1536;
  const index_t cw = expert::mlp<act::gelu_tanh>::cache_width(h), sw = expert::mlp<act::gelu_tanh>::scratch_width(h);
  rng gen{seed};
  bank_t bank(experts, d, h);
  bank.init(gen);
  std::vector<index_t> offsets(static_cast<std::size_t>(experts + 1), 0);
  const double weight_sum = static_cast<double>(experts * (experts + 1)) / 2.0;
  for (index_t e = 0; e < experts; ++e)
    offsets[e + 1] = e + 1 == experts ? n : static_cast<index_t>(std::llround(static_cast<double>(n) *
                                                                               (static_cast<double>((e + 1) * (e + 2)) / 2.0) / weight_sum));
  const auto device_offsets = tensor<index_t, B>::from_host(offsets, {experts + 1});
  const expert::expert_rows groups{offsets, device_offsets.data()};
  const mat<B> x = random_matrix<B>(n, d, 20), dy = random_matrix<B>(n, d, 21);
  mat<B> act({n, cw}), y({n, d}), dx({n, d}), scratch({n, sw}), ones({n});
  ones.fill(T(1));
  const auto grouped = [&] {
    bank.forward_grouped(groups, x.cmatrix(), act.matrix(), y.matrix());
    bank.backward_grouped(groups, x.cmatrix(), act.cmatrix(), dy.cmatrix(), dx.matrix(), scratch.matrix(), ones.data());
  };
  const auto one_by_one = [&] {
    const auto rows_of = [&](auto m, index_t e) { return m.row_block(offsets[e], offsets[e + 1] - offsets[e]); };
    backend_traits<B>::parallel_tasks(experts, [&](index_t e) {
      bank.forward(e, rows_of(x.cmatrix(), e), rows_of(act.matrix(), e), rows_of(y.matrix(), e), false);
    });
    backend_traits<B>::parallel_tasks(experts, [&](index_t e) {
      bank.backward(e, rows_of(x.cmatrix(), e), rows_of(act.cmatrix(), e), rows_of(dy.cmatrix(), e),
                    rows_of(dx.matrix(), e), false, matrix_view<T>{scratch.data() + offsets[e] * sw, offsets[e + 1] - offsets[e], sw},
                    ones.data());
    });
  };
  const double flops = 12.0 * static_cast<double>(n * d * h);  // 2 GEMMs forward, 4 backward
  for (const bool all_at_once : {true, false}) {
    const measurement m = all_at_once ? measure(out.reps(), grouped) : measure(out.reps(), one_by_one);
    case_result r;
    r.name = "experts.e" + std::to_string(experts) + ".t" + std::to_string(n) + (all_at_once ? ".grouped" : ".one_by_one");
    r.median_ms = m.median_ms;
    r.flops = flops;
    r.extra = {{"experts", experts}, {"rows", n}, {"allocs_per_call", m.allocations}};
    out.add(std::move(r));
  }
}

// ------------------------------------------------------------------------------- DiT
app::run_config dit_run(const std::string& preset, const std::string& mlp) {
  app::run_config r;
  r.preset = preset, r.mlp = mlp, r.objective = "flow", r.batch = dit_batch, r.lr = dit_lr, r.clip = dit_clip;
  r.seed = seed;
  r.validate();
  return r;
}

template <class Model>
Model make_model(const app::run_config& r) {
  const auto d = dit::preset(r.preset);
  return Model(d, app::model_moe_config<Model>(r, d), rng{r.seed});
}

/// dit.<preset>.<mlp>.train_step: as torch_bench's, one training step of batch 64 (new
/// x0 ~ N(0, 1), labels and 10 % label dropout each step; the library's rectified flow draws
/// t logit-normal where torch_bench draws it uniform, which does not change the work). bf16
/// models (dit.<preset>.<mlp>.bf16.train_step): bf16 weights, activations and gradients,
/// AdamW with float32 master weights.
template <class Model>
case_result dit_train_case(const app::run_config& r, int reps) {
  using B = typename Model::backend_type;
  using TM = typename Model::scalar;
  const auto d = dit::preset(r.preset);
  Model model = make_model<Model>(r);
  const auto params = model.parameters();
  optim::adamw<TM, B> adamw(params, {.lr = r.lr, .weight_decay = 0.0});
  optim::grad_norm_workspace<B> clip_workspace;
  dit::rectified_flow flow;
  dit::training_batch<TM, B> batch;
  typename Model::cache cache;
  const index_t n = r.batch;
  tensor<TM, B> x0({n, d.in_channels, d.input_size, d.input_size}),
      out({n, d.out_channels(), d.input_size, d.input_size}), dout;
  std::vector<T> pixels;
  std::vector<TM> pixels_m(std::is_same_v<TM, T> ? 0 : static_cast<std::size_t>(x0.size()));  // bf16 copies
  std::vector<std::int64_t> labels(static_cast<std::size_t>(n)), dropped;
  std::uint64_t step = 0;
  constexpr std::uint64_t data_stream = 1000, label_stream = 1ull << 40;

  auto train_step = [&] {
    ++step;
    fill_normal(pixels, x0.size(), data_stream + 2 * step);
    if constexpr (std::is_same_v<TM, T>) {
      backend_traits<B>::copy_from_host(pixels.data(), x0.size(), x0.data());
    } else {
      std::copy(pixels.begin(), pixels.end(), pixels_m.begin());
      backend_traits<B>::copy_from_host(pixels_m.data(), x0.size(), x0.data());
    }
    for (index_t i = 0; i < n; ++i)
      labels[i] = static_cast<std::int64_t>(rng::uniform(seed, data_stream + 2 * step + 1, i) * num_classes);
    model.drop_labels(labels, rng{seed}, label_stream + step, dropped);
    flow.sample(x0, seed, step, batch);
    model.forward(batch.x_t.matrix(), batch.t, dropped, out.matrix(), cache);
    flow.queue_loss_and_grad(out, batch, dout);  // as train_dit: no value read back in the step
    model.zero_grad();
    model.backward(dout.matrix(), cache);
    optim::queue_clip_grad_norm<TM, B>(params, r.clip, clip_workspace);
    adamw.step(r.lr);
  };
  const measurement m = measure(reps, train_step);

  // What a forward leaves in a fresh cache (warm: nothing else allocates by now).
  std::int64_t activation_bytes = 0;
  {
    typename Model::cache fresh;
    const std::int64_t before = heap::live_bytes();
    model.forward(batch.x_t.matrix(), batch.t, dropped, out.matrix(), fresh);
    activation_bytes = heap::live_bytes() - before;
  }
  std::int64_t param_bytes = 0, adamw_bytes = 0;
  constexpr std::int64_t adamw_tensors = optim::adamw<TM, B>::keeps_master ? 3 : 2;  // (master,) m, v
  for (const auto& p : params)
    if (p.grad) {
      param_bytes += p.size() * static_cast<std::int64_t>(sizeof(TM));
      adamw_bytes +=
          adamw_tensors * p.size() * static_cast<std::int64_t>(sizeof(typename optim::adamw<TM, B>::state_type));
    }
  const std::int64_t expected = 2 * param_bytes + adamw_bytes + activation_bytes;  // values, grads, AdamW state

  case_result res;
  res.name = "dit." + r.preset + "." + r.mlp + (std::is_same_v<TM, bf16> ? ".bf16" : "") + ".train_step";
  res.median_ms = m.median_ms;
  res.images = static_cast<double>(n);
  if (heap::available()) {
    res.extra = {{"step_peak_bytes", m.peak_bytes},
                 {"step_start_bytes", m.start_bytes},
                 {"expected_bytes", expected},
                 {"param_bytes", param_bytes},
                 {"grad_bytes", param_bytes},
                 {"adamw_bytes", adamw_bytes},
                 {"activation_bytes", activation_bytes},
                 {"peak_vs_expected", static_cast<double>(m.peak_bytes) / static_cast<double>(expected)},
                 {"allocs_per_step", m.allocations}};
  }
  return res;
}

/// sample.<preset>.<mlp>: 64 images (random labels), 10 Euler steps, guidance 2 (app::sample:
/// the conditional batch, then the null-label batch, as two model calls).
template <class Model>
case_result sample_case(const app::run_config& r, int reps) {
  Model model = make_model<Model>(r);
  std::vector<std::int64_t> labels(static_cast<std::size_t>(dit_batch));
  for (index_t i = 0; i < dit_batch; ++i) labels[i] = static_cast<std::int64_t>(rng::uniform(seed, 77, i) * num_classes);
  std::uint64_t call = 0;
  const measurement m = measure(reps, [&] { app::sample(model, r, labels, cfg_scale, sample_steps, ++call); });
  case_result res;
  res.name = "sample." + r.preset + "." + r.mlp;
  res.median_ms = m.median_ms;
  res.images = static_cast<double>(dit_batch);
  if (heap::available()) res.extra = {{"allocs_per_call", m.allocations}};
  return res;
}

// ------------------------------------------------------------------------------- families
const std::vector<std::string> sample_presets{"mini-28"}, dit_mlps{"dense", "promoe"};

template <class Model>
void dit_train_case_of(const app::run_config& r, report& out) {
  out.add(dit_train_case<Model>(r, out.reps()));
}

template <class B>
void run_family(const std::string& family, const std::vector<index_t>& token_counts,
                const std::vector<std::string>& dit_presets, report& out) {
  if (family == "moe") {
    for (const index_t n : token_counts) {
      moe_cases<promoe_s_layer<B>>("promoe_s", promoe_s_config<B>(), n, out);
      moe_cases<top2_layer<B>>("top2_e8", top2_e8_config<B>(), n, out);
    }
    return;
  }
  if (family == "experts") {
    for (const index_t n : token_counts)
      for (const index_t e : {8, 32}) expert_bank_cases<B>(e, n, out);
    return;
  }
  if (family == "dit-bf16") {
    for (const auto& preset : dit_presets) {
      dit_train_case_of<dit::dit_model<B, bf16>>(dit_run(preset, "dense"), out);
      dit_train_case_of<dit::dit_model<B, bf16, app::promoe_moe<B, bf16>>>(dit_run(preset, "promoe"), out);
    }
    return;
  }
  const bool train = family == "dit";
  for (const auto& preset : train ? dit_presets : sample_presets)
    for (const auto& mlp : dit_mlps) {
      const auto r = dit_run(preset, mlp);
      app::with_model_type<B>(r, [&]<class Model>() {
        out.add(train ? dit_train_case<Model>(r, out.reps()) : sample_case<Model>(r, out.reps()));
      });
    }
}

// ------------------------------------------------------------------------------- CLI
constexpr const char* usage_text =
    "usage: promoe_bench [--device D] [--tokens N[,N...]] [--reps R] [--cases moe,dit,sample]\n"
    "                    [--dit-presets P[,P...]] [--json FILE]\n"
    "  --device       cpu (default on CPU builds), thrust (the Thrust backend on the build's device\n"
    "                 system), cuda (the same, CUDA builds; their default)\n"
    "  --tokens       MoE layer token counts, multiples of 256 (default 1024,4096,16384)\n"
    "  --reps         timed calls per case after 1 warm-up (default 5)\n"
    "  --cases        case families to run (default moe,dit,sample; also dit-bf16: the training\n"
    "                 steps of bf16 models; experts: an expert bank grouped against one by one)\n"
    "  --dit-presets  DiT presets of the training-step cases (default mini-28,mini-32; also S, B, ...)\n"
    "  --json         also write the results to FILE (atomically: a temporary file, then renamed)\n";

[[noreturn]] void usage_error(const std::string& msg) {
  std::fprintf(stderr, "promoe_bench: %s\n%s", msg.c_str(), usage_text);
  std::exit(2);
}

/// A whole-string integer in 1..max, or usage_error.
long parse_positive(std::string_view s, const std::string& what, long max) {
  long v = 0;
  const auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (s.empty() || ec != std::errc{} || p != s.data() + s.size() || v < 1 || v > max)
    usage_error("bad " + what + " '" + std::string(s) + "' (expected an integer in 1.." + std::to_string(max) + ")");
  return v;
}

/// Comma-separated items; an empty item is an error.
std::vector<std::string_view> split(std::string_view s, const char* flag) {
  std::vector<std::string_view> items;
  for (std::size_t pos = 0;;) {
    const std::size_t comma = std::min(s.find(',', pos), s.size());
    if (comma == pos) usage_error(std::string("empty item in ") + flag + " '" + std::string(s) + "'");
    items.push_back(s.substr(pos, comma - pos));
    if (comma == s.size()) return items;
    pos = comma + 1;
  }
}

struct options {
  std::vector<index_t> tokens{1024, 4096, 16384};
  int reps = 5;
  std::vector<std::string> cases{"moe", "dit", "sample"};
  std::vector<std::string> dit_presets{"mini-28", "mini-32"};
  std::string device = app::default_device;
  std::string json_path;
};

options parse_options(int argc, char** argv) {
  options o;
  for (int a = 1; a < argc; ++a) {
    const std::string_view arg = argv[a];
    if (arg == "--help" || arg == "-h") {
      std::printf("%s", usage_text);
      std::exit(0);
    }
    if (arg != "--tokens" && arg != "--reps" && arg != "--cases" && arg != "--json" && arg != "--device" &&
        arg != "--dit-presets")
      usage_error("unknown argument '" + std::string(arg) + "'");
    if (a + 1 >= argc) usage_error(std::string(arg) + " needs a value");
    const std::string_view val = argv[++a];
    if (arg == "--device") {
      o.device = val;
      try {
        app::check_device(o.device);
      } catch (const std::exception& e) {
        usage_error(e.what());
      }
    } else if (arg == "--dit-presets") {
      o.dit_presets.clear();
      for (const auto item : split(val, "--dit-presets")) {
        try {
          dit::preset(std::string(item));
        } catch (const std::exception& e) {
          usage_error(e.what());
        }
        o.dit_presets.emplace_back(item);
      }
    } else if (arg == "--reps") {
      o.reps = static_cast<int>(parse_positive(val, "--reps", 100000));
    } else if (arg == "--json") {
      o.json_path = val;
      const auto dir = std::filesystem::path(o.json_path).parent_path();
      if (o.json_path.empty()) usage_error("--json needs a file name");
      if (!dir.empty() && !std::filesystem::is_directory(dir))  // say so before the run, not after it
        usage_error("--json '" + o.json_path + "': no such folder");
    } else if (arg == "--tokens") {
      o.tokens.clear();
      for (const auto item : split(val, "--tokens")) {
        const index_t n = parse_positive(item, "token count", 1L << 24);
        if (n % tokens_per_sample) usage_error("token count " + std::to_string(n) + " is not a multiple of 256");
        o.tokens.push_back(n);
      }
    } else {
      o.cases.clear();
      for (const auto item : split(val, "--cases")) {
        if (item != "moe" && item != "experts" && item != "dit" && item != "dit-bf16" && item != "sample")
          usage_error("unknown case family '" + std::string(item) + "' (choose from moe,experts,dit,dit-bf16,sample)");
        o.cases.emplace_back(item);
      }
    }
  }
  return o;
}

std::string compiler() {
#if defined(__clang__)
  return std::string("Clang ") + __clang_version__;
#elif defined(__GNUC__)
  return std::string("GCC ") + __VERSION__;
#else
  return "unknown";
#endif
}

/// Writes the results file atomically (a temporary file, then renamed).
void write_json(const std::string& path, const json& j) {
  const std::string text = j.dump(1) + "\n";
  io::write_file_atomically(path, "promoe_bench", std::as_bytes(std::span(text.data(), text.size())));
}

/// Runs the case families on backend B.
template <class B>
void run_all(const options& o, report& out) {
  device_sync = [] { backend_traits<B>::synchronize(); };
  for (const auto& family : o.cases) run_family<B>(family, o.tokens, o.dit_presets, out);
}

}  // namespace

int main(int argc, char** argv) {
  const options o = parse_options(argc, argv);
#if defined(_OPENMP)
  const int threads = omp_get_max_threads();
#else
  const int threads = 1;
#endif
  // The host GEMM's kernel for blocks above OpenBLAS's small-matrix size (smaller ones: Eigen).
  std::string gemm = "Eigen";
  try {
    if (promoe::detail::chosen_host_gemm_kernel() == promoe::detail::host_gemm_kernel::openblas)
      gemm = "OpenBLAS (" + promoe::detail::openblas_core_name() + ")";
  } catch (const std::exception& e) {
    std::fprintf(stderr, "promoe_bench: %s\n", e.what());
    return 2;
  }
  const bool on_cpu = o.device == "cpu";
#if defined(PROMOE_APP_THRUST) && THRUST_DEVICE_SYSTEM == THRUST_DEVICE_SYSTEM_CUDA
  if (!on_cpu) gemm = "cuBLAS";
#endif
  std::printf("promoe_bench: %s backend, float32, GEMM via %s, %d OpenMP thread(s), %s; median of %d after 1 "
              "warm-up; heap counting %s\n",
              on_cpu ? "cpu" : "thrust", gemm.c_str(), threads, compiler().c_str(), o.reps,
              heap::available() ? "on (malloc + operator new; host memory only)" : "off");
  report out(o.reps);
  report::print_header();
  try {
#if defined(PROMOE_APP_THRUST)
    if (!on_cpu) run_all<backend::thrust>(o, out);
    else
#endif
      run_all<backend::cpu>(o, out);
    if (!o.json_path.empty())
      write_json(o.json_path, {{"tool", "promoe_bench"},
                               {"device", o.device},
                               {"threads", threads},
                               {"gemm", gemm},
                               {"compiler", compiler()},
                               {"reps", o.reps},
                               {"heap_counting", heap::available()},
                               {"cases", out.cases_json()}});
  } catch (const std::exception& e) {
    std::fprintf(stderr, "promoe_bench: %s\n", e.what());
    return 1;
  }
  return 0;
}
