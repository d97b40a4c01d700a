// SPDX-License-Identifier: Apache-2.0
/// \file test_allocations.cpp
/// \brief The hot path does not allocate: after a first step has sized the caches, a training
/// step of every MoE layer kind and of a whole DiT (forward, loss, backward, clipping, AdamW,
/// EMA) makes no heap allocation on the cpu backend, by promoe or by the GEMM (whose packing
/// buffers the threads keep). Counted by interposing malloc and replacing operator new
/// (heap_counter.cpp, linked into this test's own executable).

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include <catch2/catch.hpp>
#if defined(_OPENMP)
#include <omp.h>
#endif

#include <promoe/dit.hpp>
#include <promoe/optim/adamw.hpp>
#include <promoe/optim/clip.hpp>
#include <promoe/optim/ema.hpp>
#include <promoe/promoe.hpp>
#if defined(PROMOE_TEST_THRUST)
#include <promoe/backend/thrust.hpp>
#endif

#include "heap_counter.hpp"

using namespace promoe;
using B = backend::cpu;
using T = float;

namespace {

/// Heap allocations (malloc family and operator new, any thread) made while f() runs.
template <class F>
std::int64_t allocations_in(F&& f) {
  const std::int64_t before = heap::allocations();
  f();
  return heap::allocations() - before;
}

template <class Bk = B>
tensor<T, Bk> random_tensor(std::vector<index_t> shape, std::uint64_t stream) {
  tensor<T, Bk> t(std::move(shape));
  std::vector<T> h(static_cast<std::size_t>(t.size()));
  for (std::size_t i = 0; i < h.size(); ++i) h[i] = static_cast<T>(rng::normal(5, stream, i));
  return tensor<T, Bk>::from_host(h, t.shape());
}

/// A training step of a layer: forward, backward; the first call sizes the caches. Later
/// steps change which samples carry the null label (as classifier-free-guidance dropout
/// does), so a conditional router sees more labelled tokens than in the first step.
template <class Layer>
void check_layer_step(Layer& layer, index_t samples, index_t tokens_per_sample) {
  using Bk = typename Layer::backend_type;
  const index_t n = samples * tokens_per_sample, d = layer.dim();
  const auto x = random_tensor<Bk>({n, d}, 1), dy = random_tensor<Bk>({n, d}, 2);
  tensor<T, Bk> y({n, d}), dx({n, d});
  std::vector<std::int64_t> labels(static_cast<std::size_t>(samples));
  for (index_t s = 0; s < samples; ++s) labels[static_cast<std::size_t>(s)] = s % 3 == 2 ? 10 : s % 10;
  typename Layer::cache c;
  auto step = [&] {
    layer.forward(x.cmatrix(), labels, y.matrix(), c);
    layer.backward(dy.cmatrix(), c, dx.matrix());
    layer.zero_grad();
  };
  step();
  REQUIRE(heap::available());  // glibc: every allocation is seen
  CHECK(allocations_in(step) == 0);
  const auto mixes = {+[](index_t s) -> std::int64_t { return s % 10; },            // all labelled
                      +[](index_t) -> std::int64_t { return 10; },                  // all null
                      +[](index_t s) -> std::int64_t { return s % 2 ? 10 : s; }};  // every other one
  for (const auto& mix : mixes) {
    for (index_t s = 0; s < samples; ++s) labels[static_cast<std::size_t>(s)] = mix(s);
    CHECK(allocations_in(step) == 0);
  }
  layer.infer(x.cmatrix(), labels, y.matrix());  // sizes infer's workspace
  CHECK(allocations_in([&] { layer.infer(x.cmatrix(), labels, y.matrix()); }) == 0);
}

/// A small ProMoE layer (conditional prototypical router, unconditional and shared experts,
/// RCL) on backend Bk.
template <class Bk>
void check_promoe_step() {
  typename promoe_layer<Bk, T>::config cfg;
  cfg.dim = 24, cfg.routed_experts = 4, cfg.expert_hidden = 40, cfg.unconditional_experts = 1;
  cfg.shared_experts = 1;
  cfg.router.null_label = 10;
  promoe_layer<Bk, T> layer(cfg, rng{3});
  check_layer_step(layer, 6, 16);
}

/// A linear top-2 router with load balance and z-loss, SwiGLU experts, on backend Bk.
template <class Bk>
void check_top2_step() {
  using layer_t = moe_layer<router::top_k, expert::swiglu, losses<loss::load_balance, loss::z_loss>, Bk, T>;
  typename layer_t::config cfg;
  cfg.dim = 24, cfg.routed_experts = 5, cfg.expert_hidden = 32, cfg.shared_experts = 1;
  cfg.router = {.k = 2, .score = score_fn::softmax, .renormalize = true};
  layer_t layer(cfg, rng{4});
  check_layer_step(layer, 4, 16);
}

}  // namespace

TEST_CASE("allocations: a training step of each MoE layer kind allocates nothing once sized", "[alloc]") {
  SECTION("ProMoE (conditional prototypical router, unconditional and shared experts, RCL)") {
    check_promoe_step<B>();
  }
  SECTION("ProMoE-S sizes: GEMM packing buffers beyond Eigen's stack limit") {
    promoe_layer<B, T>::config cfg;
    cfg.dim = 384, cfg.routed_experts = 12, cfg.expert_hidden = 768, cfg.unconditional_experts = 1;
    cfg.shared_experts = 1;
    cfg.router.null_label = 10;
    promoe_layer<B, T> layer(cfg, rng{8});
    check_layer_step(layer, 4, 128);
  }
  SECTION("linear top-2 router with load balance and z-loss, SwiGLU experts") { check_top2_step<B>(); }
  SECTION("expert choice") {
    using layer_t = moe_layer<router::expert_choice, expert::mlp<act::gelu_tanh>, losses<>, B, T>;
    layer_t::config cfg;
    cfg.dim = 24, cfg.routed_experts = 4, cfg.expert_hidden = 32;
    layer_t layer(cfg, rng{5});
    check_layer_step(layer, 4, 16);
  }
  SECTION("expert race") {
    using layer_t = moe_layer<router::expert_race, expert::mlp<act::gelu_tanh>, losses<>, B, T>;
    layer_t::config cfg;
    cfg.dim = 24, cfg.routed_experts = 4, cfg.expert_hidden = 32;
    cfg.router.k = 1;
    layer_t layer(cfg, rng{6});
    check_layer_step(layer, 4, 16);
  }
}

TEST_CASE("allocations: GEMMs of changing shapes allocate nothing once the threads' buffers exist",
          "[alloc][gemm]") {
  // Routing changes the row counts of the experts' GEMMs from step to step (and with them
  // which ones are small enough for Eigen's kernel beside OpenBLAS): the buffers must not
  // depend on the shapes a first step happened to bring.
  const index_t most = 300;
  const auto a = random_tensor({most, most}, 11), b = random_tensor({most, most}, 12);
  tensor<T, B> c({most, most});
  for (const matmul_precision precision : {matmul_precision::highest, matmul_precision::bf16}) {
    CAPTURE(to_string(precision));
    matmul_precision_scope scope(precision);
    auto gemm = [&](index_t m, index_t n, index_t k, transpose ta, transpose tb) {
      backend_traits<B>::gemm(ta, tb, m, n, k, T(1), a.data(), most, b.data(), most, T(0), c.data(), most);
    };
    gemm(2, 3, 4, transpose::no, transpose::no);  // the first GEMM makes the buffers
    REQUIRE(heap::available());
    const std::int64_t made = allocations_in([&] {
      for (std::uint64_t i = 0; i < 300; ++i) {
        const auto dim = [&](std::uint64_t stream) { return 1 + static_cast<index_t>(rng::uniform(9, stream, i) * most); };
        gemm(dim(1) % most + 1, dim(2) % most + 1, dim(3) % most + 1, i % 2 ? transpose::yes : transpose::no,
             i % 3 ? transpose::no : transpose::yes);
      }
    });
    CHECK(made == 0);
  }
}

namespace {

/// Trains a small ProMoE-DiT with scalar S on backend Bk and counts the allocations of later
/// steps (float: also under bf16 matmul precision).
template <class Bk, class S = T>
void check_dit_step() {
  using moe = promoe_layer<Bk, S>;
  using model_t = dit::dit_model<Bk, S, moe>;
  dit::dit_config d;
  d.input_size = 8, d.patch_size = 2, d.in_channels = 1, d.hidden_size = 96, d.depth = 2, d.num_heads = 2;
  d.num_classes = 10, d.learn_sigma = false;
  typename moe::config mc;
  mc.routed_experts = 3, mc.expert_hidden = 192, mc.unconditional_experts = 1, mc.shared_experts = 1;
  mc.router.null_label = d.num_classes;
  model_t model(d, mc, rng{7});
  const auto params = model.parameters();
  optim::adamw<S, Bk> adamw(params, {.lr = 1e-3});
  optim::ema<S, Bk> ema(params, 0.99);
  dit::rectified_flow flow;
  dit::training_batch<S, Bk> batch;
  typename model_t::cache cache;
  const index_t n = 6;
  const auto x0f = random_tensor<Bk>({n, d.in_channels, d.input_size, d.input_size}, 3).to_host();
  const auto x0 = tensor<S, Bk>::from_host(std::vector<S>(x0f.begin(), x0f.end()), {n, d.in_channels, 8, 8});
  std::vector<std::int64_t> labels{0, 1, 2, 3, 4, 5};
  std::vector<std::int64_t> dropped{0, 10, 2, 10, 4, 5};  // the first step: two of six dropped
  tensor<S, Bk> out({n, d.out_channels(), d.input_size, d.input_size}), dout;
  optim::grad_norm_workspace<Bk> clip_workspace;
  std::uint64_t step = 0;
  double logged = 0;
  auto train_step = [&] {
    if (step > 0) model.drop_labels(labels, rng{1}, step, dropped);
    flow.sample(x0, 1, step, batch);
    model.forward(batch.x_t.matrix(), batch.t, dropped, out.matrix(), cache);
    // as train_dit: nothing read back inside the step, then the values it logs
    flow.queue_loss_and_grad(out, batch, dout);
    model.zero_grad();
    model.backward(dout.matrix(), cache);
    optim::queue_clip_grad_norm<S, Bk>(params, 1.0, clip_workspace);
    adamw.step(1e-3);
    ema.update();
    logged += batch.loss() + static_cast<double>(model.aux_loss(cache)) + clip_workspace.read_record().last_norm;
    // the host-side clip too (measuring only)
    optim::clip_grad_norm<S, Bk>(params, std::numeric_limits<double>::infinity(), clip_workspace);
    ++step;
  };
  train_step();
  REQUIRE(heap::available());
  // Label dropout (probability 0.1) keeps more samples labelled than the first step did.
  std::int64_t later = 0;
  for (int i = 0; i < 8; ++i) later += allocations_in(train_step);
  CHECK(later == 0);
  CHECK(std::isfinite(logged));
  if constexpr (!std::is_same_v<S, float>) return;
  // bf16 GEMMs round their operands into per-thread buffers: sized by one step, then reused.
  matmul_precision_scope bf16(matmul_precision::bf16);
  train_step();
  std::int64_t bf16_later = 0;
  for (int i = 0; i < 3; ++i) bf16_later += allocations_in(train_step);
  CHECK(bf16_later == 0);
}

}  // namespace

TEST_CASE("allocations: a whole DiT training step allocates nothing once sized", "[alloc][dit]") {
  SECTION("float32") { check_dit_step<B>(); }
  // bf16 training: the bf16 GEMMs' widened panels, AdamW's master weights, the float EMA.
  SECTION("bf16") { check_dit_step<B, bf16>(); }
}

#if defined(PROMOE_TEST_THRUST)
// The Thrust backend on the build's host device system: its buffers, dispatch (sorts and
// scans) and reductions, whose temporary storage a GPU would otherwise cudaMalloc per call.
TEST_CASE("allocations: the thrust backend's MoE and DiT steps allocate nothing once sized", "[alloc][thrust]") {
  using Th = backend::thrust;
#if THRUST_DEVICE_SYSTEM == THRUST_DEVICE_SYSTEM_OMP && defined(_OPENMP)
  // libgomp allocates a team for every parallel region of a one-thread team (Thrust's OMP
  // loops open one per call); that is the host emulation's, not the backend's.
  if (omp_get_max_threads() == 1) {
    WARN("one OpenMP thread: Thrust's OMP system allocates per region; skipped");
    return;
  }
#endif
  SECTION("ProMoE layer") { check_promoe_step<Th>(); }
  SECTION("linear top-2 router with load balance and z-loss") { check_top2_step<Th>(); }
  SECTION("DiT training step") { check_dit_step<Th>(); }
}
#endif
