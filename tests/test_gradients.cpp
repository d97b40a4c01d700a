// SPDX-License-Identifier: Apache-2.0
// Central finite differences in float64 against the layer's backward: every parameter
// tensor and the input, for every score function, with renormalisation, and for each loss.
#include <catch2/catch.hpp>

#include <promoe/promoe.hpp>

#include "backends.hpp"
#include "layer_helpers.hpp"

using namespace promoe;

namespace {

/// The objective alpha * sum(w * y) + aux_loss, and its analytic gradients from backward().
template <class Layer>
struct objective {
  using B = typename Layer::backend_type;
  using traits = backend_traits<B>;
  Layer& layer;
  tensor<double, B>& x;
  const std::vector<double>& w;  // [tokens, D] host
  double alpha;
  std::span<const std::int64_t> labels;

  double value() {
    typename Layer::cache c;
    const auto y = layer.forward(x, labels, c).to_host();
    double s = 0;
    for (std::size_t i = 0; i < y.size(); ++i) s += alpha * w[i] * y[i];
    return s + layer.aux_loss(c);
  }

  static double get(const double* p) {
    double v;
    traits::copy_to_host(p, 1, &v);
    return v;
  }
  static void set(double* p, double v) { traits::copy_from_host(&v, 1, p); }

  /// Norm-wise relative error of the analytic gradient `grad` of the n values at `value_ptr`.
  double check(const std::string& what, double* value_ptr, const double* grad_ptr, index_t n) {
    const double eps = 1e-6;
    std::vector<double> analytic(static_cast<std::size_t>(n)), numeric(static_cast<std::size_t>(n));
    traits::copy_to_host(grad_ptr, n, analytic.data());
    for (index_t i = 0; i < n; ++i) {
      const double v = get(value_ptr + i);
      set(value_ptr + i, v + eps);
      const double up = value();
      set(value_ptr + i, v - eps);
      const double down = value();
      set(value_ptr + i, v);
      numeric[i] = (up - down) / (2 * eps);
    }
    double diff = 0, scale = 0;
    for (index_t i = 0; i < n; ++i) {
      diff += (analytic[i] - numeric[i]) * (analytic[i] - numeric[i]);
      scale += numeric[i] * numeric[i];
    }
    diff = std::sqrt(diff);
    scale = std::sqrt(scale);
    INFO(what << ": |analytic - numeric| = " << diff << ", |numeric| = " << scale);
    if (scale < 1e-9) {  // an expert that got no token: both must be zero
      CHECK(diff < 1e-9);
      return 0.0;
    }
    CHECK(diff / scale < 1e-6);
    return diff / scale;
  }
};

/// Forward + backward once, then finite differences over every parameter and x.
template <class Layer>
void check_layer_gradients(Layer& layer, index_t n, std::uint64_t seed, double alpha,
                           std::span<const std::int64_t> labels = {}) {
  using B = typename Layer::backend_type;
  const index_t d = layer.dim();
  auto x = to_device<B>(random_vector<double>(static_cast<std::size_t>(n * d), seed, 1.5), {n, d});
  const auto w = random_vector<double>(static_cast<std::size_t>(n * d), seed + 1, 1.0);
  std::vector<double> dy_host(w.size());
  for (std::size_t i = 0; i < w.size(); ++i) dy_host[i] = alpha * w[i];
  auto dy = to_device<B>(dy_host, {n, d});

  typename Layer::cache c;
  layer.forward(x, labels, c);
  // Finite differences are meaningful only away from routing switches.
  const auto plan_before = c.plan.slot_expert.to_host();
  layer.zero_grad();
  const auto dx = layer.backward(dy, c);

  objective<Layer> obj{layer, x, w, alpha, labels};
  for (auto& p : layer.parameters()) obj.check(p.name, p.value, p.grad, p.size());
  // dx is a tensor of the backend; the objective perturbs x in place.
  obj.check("x", x.data(), dx.data(), x.size());

  typename Layer::cache after;
  layer.forward(x, labels, after);
  REQUIRE(after.plan.slot_expert.to_host() == plan_before);
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("finite differences: top-k router, every score function, both losses", "[gradients]",
                        test_backends) {
  using B = TestType;
  using layer_t = moe_layer<router::top_k, expert::mlp<act::gelu_tanh>, losses<loss::load_balance, loss::z_loss>, B,
                            double>;
  struct loss_weights {
    double load_balance, z;
  };
  for (score_fn fn : {score_fn::softmax, score_fn::sigmoid, score_fn::identity})
    for (bool renorm : {false, true})
      for (loss_weights lw : {loss_weights{0.5, 0.0}, loss_weights{0.0, 0.3}})
        for (double alpha : {1.0, 0.0}) {  // alpha 0: the auxiliary losses alone
          if (renorm && fn == score_fn::identity) continue;
          CAPTURE(fn, renorm, lw.load_balance, lw.z, alpha);
          typename layer_t::config cfg;
          cfg.dim = 6;
          cfg.routed_experts = 5;
          cfg.expert_hidden = 8;
          cfg.shared_experts = 1;
          cfg.shared_hidden = 5;
          cfg.router = {2, fn, renorm};
          cfg.loss = {{lw.load_balance}, {lw.z}};
          layer_t layer(cfg, rng{42});
          check_layer_gradients(layer, 7, 5, alpha);
        }
}

TEMPLATE_LIST_TEST_CASE("finite differences: SwiGLU shared experts, k = 1 and k = E", "[gradients]", test_backends) {
  using B = TestType;
  using layer_t = moe_layer<router::top_k, expert::mlp<act::gelu_tanh>, losses<loss::load_balance>, B, double,
                            expert::swiglu>;
  for (index_t k : {1, 4}) {
    CAPTURE(k);
    typename layer_t::config cfg;
    cfg.dim = 5;
    cfg.routed_experts = 4;
    cfg.expert_hidden = 6;
    cfg.shared_experts = 2;
    cfg.shared_hidden = 7;
    cfg.router = {k, score_fn::softmax, false};
    cfg.names = param_naming::dit_moe();
    layer_t layer(cfg, rng{9});
    check_layer_gradients(layer, 9, 17, 1.0);
  }
}

TEST_CASE("backward accumulates parameter gradients across calls", "[gradients]") {
  using layer_t = moe_layer<router::top_k, expert::mlp<act::gelu_tanh>, losses<>, backend::cpu, double>;
  typename layer_t::config cfg;
  cfg.dim = 4;
  cfg.routed_experts = 3;
  cfg.expert_hidden = 5;
  cfg.router.k = 2;
  layer_t layer(cfg, rng{1});
  auto x = to_device<backend::cpu>(random_vector<double>(40, 3), {10, 4});
  auto dy = to_device<backend::cpu>(random_vector<double>(40, 4), {10, 4});
  typename layer_t::cache c;
  layer.forward(x, {}, c);
  layer.zero_grad();
  layer.backward(dy, c);
  std::vector<std::vector<double>> once;
  for (auto& p : layer.parameters()) once.emplace_back(p.grad, p.grad + p.size());
  layer.backward(dy, c);
  std::size_t i = 0;
  for (auto& p : layer.parameters()) {
    for (index_t j = 0; j < p.size(); ++j) REQUIRE(p.grad[j] == Approx(2 * once[i][j]).epsilon(1e-12).margin(1e-300));
    ++i;
  }
}

TEMPLATE_LIST_TEST_CASE("finite differences: prototypical router, every score function, with the contrastive loss",
                        "[gradients][promoe]", test_backends) {
  using B = TestType;
  using layer_t = moe_layer<router::prototypical, expert::mlp<act::gelu_tanh>, losses<loss::routing_contrastive>, B,
                            double>;
  for (score_fn fn : {score_fn::identity, score_fn::softmax, score_fn::sigmoid})
    for (index_t k : {1, 2})
      for (bool top_k_counting : {true, false})
        for (double alpha : {1.0, 0.0}) {
          CAPTURE(fn, k, top_k_counting, alpha);
          typename layer_t::config cfg;
          cfg.dim = 6;
          cfg.routed_experts = 4;
          cfg.expert_hidden = 7;
          cfg.shared_experts = 1;
          cfg.router = {k, fn, fn != score_fn::identity && k == 2, 1.5};
          cfg.loss = {{0.7, 0.5, top_k_counting}};
          layer_t layer(cfg, rng{21});
          // prototypes of N(0, 0.02) would make every cosine tiny: spread them for a real test
          for (auto& p : layer.parameters())
            if (p.name == "cluster_centers") {
              const auto v = random_vector<double>(static_cast<std::size_t>(p.size()), 77, 1.0);
              backend_traits<B>::copy_from_host(v.data(), p.size(), p.value);
            }
          check_layer_gradients(layer, 12, 31, alpha);
        }
}

TEMPLATE_LIST_TEST_CASE("finite differences: ProMoE block with null-label samples", "[gradients][promoe]",
                        test_backends) {
  using B = TestType;
  using layer_t = promoe_layer<B, double>;
  for (index_t k : {1, 2}) {
    CAPTURE(k);
    typename layer_t::config cfg;
    cfg.dim = 5;
    cfg.routed_experts = 4;
    cfg.expert_hidden = 6;
    cfg.unconditional_experts = 1;
    cfg.shared_experts = 1;
    cfg.router.inner = {k, score_fn::identity, false, 1.0};
    cfg.router.null_label = 10;
    cfg.loss = {{1.0, 0.07, true}};
    layer_t layer(cfg, rng{4});
    for (auto& p : layer.parameters())
      if (p.name == "cluster_centers") {
        const auto v = random_vector<double>(static_cast<std::size_t>(p.size()), 78, 1.0);
        backend_traits<B>::copy_from_host(v.data(), p.size(), p.value);
      }
    const std::vector<std::int64_t> labels{3, 10, 0, 7, 10};  // 5 samples of 3 tokens
    check_layer_gradients(layer, 15, 41, 1.0, labels);
  }
}

TEMPLATE_LIST_TEST_CASE("finite differences: conditional over a linear top-k router with load balancing",
                        "[gradients][conditional]", test_backends) {
  using B = TestType;
  using layer_t = moe_layer<router::conditional<router::top_k>, expert::mlp<act::gelu_tanh>,
                            losses<loss::load_balance, loss::z_loss>, B, double>;
  typename layer_t::config cfg;
  cfg.dim = 5;
  cfg.routed_experts = 3;
  cfg.expert_hidden = 4;
  cfg.unconditional_experts = 2;  // null-label tokens split evenly between two
  cfg.router.inner = {2, score_fn::softmax, false};
  cfg.router.null_label = 4;
  cfg.loss = {{0.5}, {0.2}};
  layer_t layer(cfg, rng{6});
  const std::vector<std::int64_t> labels{4, 1, 2, 4};
  check_layer_gradients(layer, 8, 51, 1.0, labels);
}

TEMPLATE_LIST_TEST_CASE("finite differences: expert choice per sample and per batch", "[gradients][expert_choice]",
                        test_backends) {
  using B = TestType;
  using layer_t = moe_layer<router::expert_choice, expert::mlp<act::gelu_tanh>, losses<loss::z_loss>, B, double>;
  for (bool per_sample : {true, false})
    for (score_fn fn : {score_fn::softmax, score_fn::identity}) {
      CAPTURE(per_sample, fn);
      typename layer_t::config cfg;
      cfg.dim = 5;
      cfg.routed_experts = 3;
      cfg.expert_hidden = 6;
      cfg.shared_experts = 1;
      cfg.router = {1.5, per_sample, fn};
      cfg.loss = {{0.2}};
      layer_t layer(cfg, rng{12});
      const std::vector<std::int64_t> labels{0, 1, 2};  // 3 samples of 4 tokens
      check_layer_gradients(layer, 12, 61, 1.0, labels);
    }
}

TEMPLATE_LIST_TEST_CASE("finite differences: Expert Race", "[gradients][expert_race]", test_backends) {
  using B = TestType;
  using layer_t = moe_layer<router::expert_race, expert::mlp<act::gelu_tanh>, losses<loss::load_balance>, B, double>;
  for (index_t k : {1, 2}) {
    CAPTURE(k);
    typename layer_t::config cfg;
    cfg.dim = 5;
    cfg.routed_experts = 4;
    cfg.expert_hidden = 6;
    cfg.router.k = k;
    cfg.loss = {{0.3}};
    layer_t layer(cfg, rng{13});
    check_layer_gradients(layer, 10, 71, 1.0);
  }
}
