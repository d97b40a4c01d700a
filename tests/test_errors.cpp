// SPDX-License-Identifier: Apache-2.0
/// \file test_errors.cpp
/// \brief Bad input raises promoe::error with a message that names the tensor or option and
/// the expected value; zero tokens are not an error. One layer type per backend (float), to
/// keep compile time down.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include <promoe/promoe.hpp>

#include "backends.hpp"

using Catch::Contains;
using promoe::index_t;

namespace {

template <class B>
using layer_t = promoe::moe_layer<promoe::router::top_k, promoe::expert::mlp<promoe::act::gelu_tanh>,
                                  promoe::losses<promoe::loss::load_balance, promoe::loss::z_loss>, B, float>;

/// D = 64, four routed experts, top-2.
template <class B>
typename layer_t<B>::config base_config() {
  typename layer_t<B>::config cfg;
  cfg.dim = 64;
  cfg.routed_experts = 4;
  cfg.expert_hidden = 8;
  cfg.router.k = 2;
  return cfg;
}

template <class B>
promoe::tensor<float, B> input(index_t tokens, index_t dim, std::uint64_t seed = 1) {
  return to_device<B>(random_vector<float>(static_cast<std::size_t>(tokens * dim), seed), {tokens, dim});
}

const float nan_f = std::numeric_limits<float>::quiet_NaN();
const float inf_f = std::numeric_limits<float>::infinity();

}  // namespace

TEMPLATE_LIST_TEST_CASE("errors: x, y, dy and dx shapes", "[errors]", test_backends) {
  using B = TestType;
  using layer = layer_t<B>;
  layer m(base_config<B>(), promoe::rng{1});
  typename layer::cache c;

  SECTION("x with the wrong width") {
    const auto x = input<B>(7, 5);
    REQUIRE_THROWS_AS(m.forward(x, {}, c), promoe::error);
    REQUIRE_THROWS_WITH(m.forward(x, {}, c), Contains("x has shape [7, 5]") && Contains("64"));
    REQUIRE_THROWS_WITH(m.infer(x), Contains("infer") && Contains("x has shape [7, 5]") && Contains("64"));
  }
  SECTION("x that is not a matrix") {
    const promoe::tensor<float, B> x({7, 8, 8});
    REQUIRE_THROWS_AS(m.forward(x, {}, c), promoe::error);
    REQUIRE_THROWS_WITH(m.forward(x, {}, c), Contains("x must be a matrix") && Contains("[7, 8, 8]"));
  }
  SECTION("y with the wrong shape") {
    const auto x = input<B>(7, 64);
    for (const auto& shape : {std::vector<index_t>{6, 64}, std::vector<index_t>{7, 63}}) {
      promoe::tensor<float, B> y(shape);
      const promoe::matrix_view<float> yv{y.data(), shape[0], shape[1]};
      const std::string got = "y has shape [" + std::to_string(shape[0]) + ", " + std::to_string(shape[1]) + "]";
      REQUIRE_THROWS_AS(m.forward(x.cmatrix(), {}, yv, c), promoe::error);
      REQUIRE_THROWS_WITH(m.forward(x.cmatrix(), {}, yv, c), Contains(got) && Contains("expected [7, 64]"));
      REQUIRE_THROWS_WITH(m.infer(x.cmatrix(), {}, yv), Contains(got) && Contains("expected [7, 64]"));
    }
  }
  SECTION("dy and dx with the wrong shape") {
    const auto x = input<B>(7, 64);
    const auto y = m.forward(x, {}, c);
    REQUIRE(c.ready);
    const auto dy_rows = input<B>(6, 64), dy_cols = input<B>(7, 32);
    REQUIRE_THROWS_AS(m.backward(dy_rows, c), promoe::error);
    REQUIRE_THROWS_WITH(m.backward(dy_rows, c), Contains("dy has shape [6, 64]") && Contains("expected [7, 64]"));
    REQUIRE_THROWS_WITH(m.backward(dy_cols, c), Contains("dy has shape [7, 32]") && Contains("expected [7, 64]"));
    const auto dy = input<B>(7, 64);
    promoe::tensor<float, B> dx({7, 63});
    REQUIRE_THROWS_WITH(m.backward(dy.cmatrix(), c, promoe::matrix_view<float>{dx.data(), 7, 63}),
                        Contains("dx has shape [7, 63]") && Contains("expected [7, 64]"));
    // The failed calls left the cache usable.
    REQUIRE_NOTHROW(m.backward(dy, c));
  }
}

TEMPLATE_LIST_TEST_CASE("errors: backward without a training forward", "[errors]", test_backends) {
  using B = TestType;
  using layer = layer_t<B>;
  layer m(base_config<B>(), promoe::rng{1});
  typename layer::cache c;
  const auto dy = input<B>(7, 64);
  REQUIRE_THROWS_AS(m.backward(dy, c), promoe::error);
  REQUIRE_THROWS_WITH(m.backward(dy, c), Contains("backward") && Contains("no training forward"));
  // infer() does not fill a cache either.
  const auto x = input<B>(7, 64);
  m.infer(x);
  REQUIRE_THROWS_WITH(m.backward(dy, c), Contains("no training forward"));
  // A forward that failed invalidates the cache of an earlier good one.
  m.forward(x, {}, c);
  REQUIRE(c.ready);
  REQUIRE_THROWS_AS(m.forward(input<B>(7, 5), {}, c), promoe::error);
  CHECK_FALSE(c.ready);
  REQUIRE_THROWS_WITH(m.backward(dy, c), Contains("no training forward"));
}

TEMPLATE_LIST_TEST_CASE("errors: tokens that do not split into the labelled samples", "[errors]", test_backends) {
  using B = TestType;
  using layer = layer_t<B>;
  layer m(base_config<B>(), promoe::rng{1});
  typename layer::cache c;
  const auto x = input<B>(7, 64);
  const std::vector<std::int64_t> labels{3, 1};
  REQUIRE_THROWS_AS(m.forward(x, labels, c), promoe::error);
  REQUIRE_THROWS_WITH(m.forward(x, labels, c), Contains("7 tokens") && Contains("2 samples"));
  REQUIRE_THROWS_WITH(m.infer(x, labels), Contains("7 tokens") && Contains("2 samples"));
  // 8 tokens in 2 samples are fine (top_k ignores the labels).
  REQUIRE_NOTHROW(m.forward(input<B>(8, 64), labels, c));
}

TEMPLATE_LIST_TEST_CASE("errors: router and layer options", "[errors]", test_backends) {
  using B = TestType;
  using layer = layer_t<B>;
  auto make = [](typename layer::config cfg) { layer m(cfg, promoe::rng{1}); };

  SECTION("k = 0 and k > routed experts") {
    auto cfg = base_config<B>();
    cfg.router.k = 0;
    REQUIRE_THROWS_AS(make(cfg), promoe::error);
    REQUIRE_THROWS_WITH(make(cfg), Contains("k = 0") && Contains("<= 4") && Contains("routed experts"));
    cfg.router.k = 5;
    REQUIRE_THROWS_AS(make(cfg), promoe::error);
    REQUIRE_THROWS_WITH(make(cfg), Contains("k = 5") && Contains("<= 4") && Contains("routed experts"));
    cfg.router.k = 4;
    REQUIRE_NOTHROW(make(cfg));
    // Directly on the router: no routed experts at all.
    promoe::rng gen(1);
    using impl = promoe::router::top_k::impl<float, B>;
    REQUIRE_THROWS_WITH(impl(promoe::router::top_k::options{}, promoe::router_layout{8, 0, 0}, gen),
                        Contains("at least one routed expert") && Contains("got 0"));
  }
  SECTION("zero or negative sizes") {
    auto cfg = base_config<B>();
    cfg.dim = 0;
    REQUIRE_THROWS_AS(make(cfg), promoe::error);
    REQUIRE_THROWS_WITH(make(cfg), Contains("dim must be >= 1, got 0"));
    cfg = base_config<B>();
    cfg.routed_experts = 0;
    REQUIRE_THROWS_WITH(make(cfg), Contains("routed_experts must be >= 1, got 0"));
    cfg = base_config<B>();
    cfg.expert_hidden = 0;
    REQUIRE_THROWS_WITH(make(cfg), Contains("expert_hidden must be >= 1, got 0"));
    cfg = base_config<B>();
    cfg.unconditional_experts = -1;
    REQUIRE_THROWS_WITH(make(cfg), Contains("unconditional_experts must be >= 0, got -1"));
    cfg = base_config<B>();
    cfg.shared_experts = -2;
    REQUIRE_THROWS_WITH(make(cfg), Contains("shared_experts must be >= 0, got -2"));
    cfg = base_config<B>();
    cfg.shared_hidden = -3;
    REQUIRE_THROWS_WITH(make(cfg), Contains("shared_hidden must be >= 0, got -3"));
  }
  SECTION("score function names") {
    CHECK(promoe::parse_score_fn("softmax") == promoe::score_fn::softmax);
    CHECK(promoe::parse_score_fn("sigmoid") == promoe::score_fn::sigmoid);
    CHECK(promoe::parse_score_fn("identity") == promoe::score_fn::identity);
    REQUIRE_THROWS_AS(promoe::parse_score_fn("tanh"), promoe::error);
    REQUIRE_THROWS_WITH(promoe::parse_score_fn("tanh"),
                        Contains("'tanh'") && Contains("softmax") && Contains("sigmoid") && Contains("identity"));
  }
}

TEMPLATE_LIST_TEST_CASE("errors: non-finite x and dy under validate", "[errors]", test_backends) {
  using B = TestType;
  using layer = layer_t<B>;
  auto cfg = base_config<B>();
  cfg.validate = true;
  layer m(cfg, promoe::rng{1});
  typename layer::cache c;
  auto host = random_vector<float>(7 * 64, 3);

  SECTION("NaN in x") {
    auto bad = host;
    bad[3 * 64 + 5] = nan_f;
    bad[6 * 64 + 1] = nan_f;  // only the first is reported
    const auto x = to_device<B>(bad, {7, 64});
    REQUIRE_THROWS_AS(m.forward(x, {}, c), promoe::error);
    REQUIRE_THROWS_WITH(m.forward(x, {}, c), Contains("x") && Contains("non-finite") && Contains("[3, 5]"));
    REQUIRE_THROWS_WITH(m.infer(x), Contains("non-finite") && Contains("[3, 5]"));
  }
  SECTION("Inf and -Inf in x") {
    auto bad = host;
    bad[0] = inf_f;
    REQUIRE_THROWS_WITH(m.forward(to_device<B>(bad, {7, 64}), {}, c), Contains("non-finite") && Contains("[0, 0]"));
    bad = host;
    bad[6 * 64 + 63] = -inf_f;
    REQUIRE_THROWS_WITH(m.forward(to_device<B>(bad, {7, 64}), {}, c), Contains("non-finite") && Contains("[6, 63]"));
  }
  SECTION("NaN in dy") {
    const auto x = to_device<B>(host, {7, 64});
    m.forward(x, {}, c);
    auto bad = random_vector<float>(7 * 64, 4);
    bad[2 * 64 + 7] = nan_f;
    const auto dy = to_device<B>(bad, {7, 64});
    REQUIRE_THROWS_AS(m.backward(dy, c), promoe::error);
    REQUIRE_THROWS_WITH(m.backward(dy, c), Contains("dy") && Contains("non-finite") && Contains("[2, 7]"));
    // Nothing was accumulated by the failed backward.
    for (const auto& p : m.parameters()) {
      std::vector<float> g(static_cast<std::size_t>(p.size()));
      promoe::backend_traits<B>::copy_to_host(p.grad, p.size(), g.data());
      INFO(p.name);
      CHECK(std::all_of(g.begin(), g.end(), [](float v) { return v == 0.0f; }));
    }
  }
  SECTION("finite input passes") {
    const auto x = to_device<B>(host, {7, 64});
    REQUIRE_NOTHROW(m.forward(x, {}, c));
    REQUIRE_NOTHROW(m.backward(input<B>(7, 64, 9), c));
  }
}

TEMPLATE_LIST_TEST_CASE("errors: tensor construction", "[errors]", test_backends) {
  using B = TestType;
  using tensor = promoe::tensor<float, B>;
  const std::vector<float> five(5, 1.0f);
  REQUIRE_THROWS_AS(tensor::from_host(five, {2, 3}), promoe::error);
  REQUIRE_THROWS_WITH(tensor::from_host(five, {2, 3}),
                      Contains("from_host") && Contains("5 values") && Contains("[2, 3]") && Contains("6 elements"));
  REQUIRE_THROWS_WITH(tensor(std::vector<index_t>{4, -1}), Contains("negative dimension") && Contains("[4, -1]"));
  REQUIRE_NOTHROW(tensor::from_host({}, {0, 3}));
}

TEMPLATE_LIST_TEST_CASE("zero tokens: empty forward, empty backward, zero losses", "[errors][empty]", test_backends) {
  using B = TestType;
  using layer = layer_t<B>;
  auto cfg = base_config<B>();
  cfg.validate = true;
  cfg.shared_experts = 1;
  layer m(cfg, promoe::rng{1});
  typename layer::cache c;

  SECTION("tensor API") {
    const promoe::tensor<float, B> x({0, 64});
    promoe::tensor<float, B> y;
    REQUIRE_NOTHROW(y = m.forward(x, {}, c));
    CHECK(y.shape() == std::vector<index_t>{0, 64});
    CHECK(y.size() == 0);
    CHECK(c.ready);
    CHECK(c.tokens == 0);
    CHECK(m.aux_loss(c) == 0.0f);
    const auto losses = m.aux_losses(c);
    REQUIRE(losses.size() == 2);
    CHECK(losses[0].first == "load_balance");
    CHECK(losses[1].first == "z_loss");
    CHECK(losses[0].second == 0.0f);
    CHECK(losses[1].second == 0.0f);
    promoe::tensor<float, B> dx;
    REQUIRE_NOTHROW(dx = m.backward(promoe::tensor<float, B>({0, 64}), c));
    CHECK(dx.shape() == std::vector<index_t>{0, 64});
    CHECK(dx.size() == 0);
    promoe::tensor<float, B> yi;
    REQUIRE_NOTHROW(yi = m.infer(x));
    CHECK(yi.shape() == std::vector<index_t>{0, 64});
  }
  SECTION("view API") {
    const promoe::const_matrix_view<float> x{nullptr, 0, 64};
    const promoe::matrix_view<float> y{nullptr, 0, 64};
    REQUIRE_NOTHROW(m.forward(x, {}, y, c));
    CHECK(c.ready);
    CHECK(m.aux_loss(c) == 0.0f);
    REQUIRE_NOTHROW(m.backward(x, c, y));
    REQUIRE_NOTHROW(m.infer(x, {}, y));
  }
  SECTION("after a non-empty batch") {
    // Loss values of an earlier batch do not leak into an empty one.
    m.forward(input<B>(8, 64), {}, c);
    CHECK(m.aux_loss(c) > 0.0f);
    const promoe::matrix_view<float> y{nullptr, 0, 64};
    REQUIRE_NOTHROW(m.forward(promoe::const_matrix_view<float>{nullptr, 0, 64}, {}, y, c));
    CHECK(m.aux_loss(c) == 0.0f);
  }
  // Parameter gradients stay zero.
  for (const auto& p : m.parameters()) {
    std::vector<float> g(static_cast<std::size_t>(p.size()));
    promoe::backend_traits<B>::copy_to_host(p.grad, p.size(), g.data());
    INFO(p.name);
    CHECK(std::all_of(g.begin(), g.end(), [](float v) { return v == 0.0f; }));
  }
}
