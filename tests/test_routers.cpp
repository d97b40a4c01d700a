// SPDX-License-Identifier: Apache-2.0
// Expert choice and Expert Race: training routing against naive selections, threshold
// updates, and the inference modes that make a sample's output independent of the batch.
#include <catch2/catch.hpp>

#include <algorithm>
#include <numeric>
#include <string>

#include <promoe/promoe.hpp>

#include "backends.hpp"
#include "layer_helpers.hpp"

using namespace promoe;

namespace {

template <class Router, class B>
using layer_of = moe_layer<Router, expert::mlp<act::gelu_tanh>, losses<>, B, double>;

template <class Layer>
typename Layer::config base_config(typename Layer::config cfg) {
  cfg.dim = 8;
  cfg.routed_experts = 4;
  cfg.expert_hidden = 6;
  cfg.shared_experts = 1;
  return cfg;
}

/// (token, expert) pairs of a plan, as a [tokens, E] 0/1 mask.
template <class Plan>
std::vector<int> mask_of(const Plan& plan, index_t experts) {
  const auto se = plan.slot_expert.to_host();
  std::vector<int> m(static_cast<std::size_t>(plan.tokens * experts), 0);
  for (index_t t = 0; t < plan.tokens; ++t)
    for (index_t s = 0; s < plan.slots_per_token; ++s)
      if (se[t * plan.slots_per_token + s] >= 0) m[t * experts + se[t * plan.slots_per_token + s]] = 1;
  return m;
}

/// Router R with its `routes_per_token` hidden: conditional<gathered<R>> hands R only the
/// labelled tokens, gathered, where conditional<R> routes every token and masks.
template <class R>
struct gathered {
  using options = typename R::options;
  static constexpr const char* name = R::name;
  template <class T, class B>
  class impl : public R::template impl<T, B> {
   public:
    using R::template impl<T, B>::impl;
    static constexpr bool routes_per_token = false;
  };
};

/// One training step (forward with losses, backward) of two layers with the same weights:
/// their outputs, loss values, input gradients and parameter gradients agree.
template <class B, class Masked, class Gathered>
void check_same_step(Masked& masked, Gathered& gathered, index_t tokens, const std::vector<std::int64_t>& labels) {
  for (const auto& p : masked.parameters())
    for (const auto& q : gathered.parameters())
      if (p.name == q.name) Masked::traits::copy(p.value, p.size(), q.value);
  const index_t d = masked.dim();
  const auto x = to_device<B>(random_vector<double>(static_cast<std::size_t>(tokens * d), 31), {tokens, d});
  const auto dy = to_device<B>(random_vector<double>(static_cast<std::size_t>(tokens * d), 32), {tokens, d});
  typename Masked::cache cm;
  typename Gathered::cache cg;
  const auto ym = masked.forward(x, labels, cm).to_host(), yg = gathered.forward(x, labels, cg).to_host();
  CHECK(promoe_test::relative_error(ym, yg) <= 1e-13);
  const auto lm = masked.aux_losses(cm), lg = gathered.aux_losses(cg);
  REQUIRE(lm.size() == lg.size());
  for (std::size_t i = 0; i < lm.size(); ++i) {
    CAPTURE(lm[i].first);
    CHECK(lm[i].second == Approx(lg[i].second).epsilon(1e-12).margin(1e-15));
  }
  const auto dxm = masked.backward(dy, cm).to_host(), dxg = gathered.backward(dy, cg).to_host();
  CHECK(promoe_test::relative_error(dxm, dxg) <= 1e-12);
  const auto gm = promoe_test::read_grads(masked), gg = promoe_test::read_grads(gathered);
  for (const auto& [name, g] : gm.tensors) {
    CAPTURE(name);
    CHECK(promoe_test::relative_error(g, gg.at(name), 1e-12) <= 1e-12);
  }
}

/// Rows [first, first + count) of a [tokens, D] host matrix.
std::vector<double> rows(const std::vector<double>& m, index_t d, index_t first, index_t count) {
  return {m.begin() + first * d, m.begin() + (first + count) * d};
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("expert choice per sample: each expert takes its top-C tokens of every sample", "[routers]",
                        test_backends) {
  using B = TestType;
  using layer_t = layer_of<router::expert_choice, B>;
  auto cfg = base_config<layer_t>(typename layer_t::config{});
  cfg.router = {1.0, true, score_fn::softmax};
  layer_t layer(cfg, rng{1});
  const index_t samples = 3, l = 10, n = samples * l, d = 8, e = 4, capacity = l / e;  // C = floor(10 / 4) = 2
  const auto xh = random_vector<double>(n * d, 5);
  auto x = to_device<B>(xh, {n, d});
  const std::vector<std::int64_t> labels{0, 1, 2};
  typename layer_t::cache c;
  layer.forward(x, labels, c);
  const auto mask = mask_of(c.plan, e);
  const auto scores = c.router.scores.to_host();
  for (index_t s = 0; s < samples; ++s)
    for (index_t x_ = 0; x_ < e; ++x_) {
      std::vector<index_t> order(l);
      std::iota(order.begin(), order.end(), s * l);
      std::stable_sort(order.begin(), order.end(), [&](index_t a, index_t b) { return scores[a * e + x_] > scores[b * e + x_]; });
      for (index_t i = 0; i < l; ++i) CHECK(mask[order[i] * e + x_] == (i < capacity ? 1 : 0));
    }
  // gates are the scores of the chosen pairs
  const auto se = c.plan.slot_expert.to_host();
  const auto sg = c.plan.slot_gate.to_host();
  for (index_t i = 0; i < n * e; ++i)
    if (se[i] >= 0) CHECK(sg[i] == scores[i]);
}

TEMPLATE_LIST_TEST_CASE("Expert Race routes the top K = k * tokens pairs of the batch and learns a threshold",
                        "[routers]", test_backends) {
  using B = TestType;
  using layer_t = layer_of<router::expert_race, B>;
  auto cfg = base_config<layer_t>(typename layer_t::config{});
  cfg.router.k = 2;
  layer_t layer(cfg, rng{2});
  const index_t n = 25, d = 8, e = 4;
  auto x = to_device<B>(random_vector<double>(n * d, 6), {n, d});
  typename layer_t::cache c;
  layer.forward(x, {}, c);
  const auto mask = mask_of(c.plan, e);
  const auto logits = c.router.logits.to_host();
  std::vector<index_t> order(n * e);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](index_t a, index_t b) { return logits[a] > logits[b]; });
  for (index_t i = 0; i < n * e; ++i) CHECK(mask[order[i]] == (i < 2 * n ? 1 : 0));
  // tau = 0.95 * 1 + 0.05 * (K-th logit)
  const auto buffers = layer.buffers();
  REQUIRE(buffers.size() == 1);
  CHECK(buffers[0].name == "threshold");
  CHECK(buffers[0].grad == nullptr);
  double tau;
  backend_traits<B>::copy_to_host(buffers[0].value, 1, &tau);
  CHECK(tau == Approx(0.95 + 0.05 * logits[order[2 * n - 1]]).epsilon(1e-14));
}

TEMPLATE_LIST_TEST_CASE("inference routing does not depend on the other samples of the batch", "[routers][inference]",
                        test_backends) {
  using B = TestType;
  const index_t l = 6, d = 8;
  // Samples a, b, c, f: the batch [a, b, c] and the batch [f, a] must give a the same output.
  const auto xa = random_vector<double>(l * d, 11), xb = random_vector<double>(l * d, 12, 3.0),
             xc = random_vector<double>(l * d, 13, 0.2), xf = random_vector<double>(l * d, 14, 5.0);
  auto concat = [](std::initializer_list<const std::vector<double>*> parts) {
    std::vector<double> out;
    for (const auto* p : parts) out.insert(out.end(), p->begin(), p->end());
    return out;
  };
  const auto batch1 = concat({&xa, &xb, &xc}), batch2 = concat({&xf, &xa});
  const std::vector<std::int64_t> labels1{0, 1, 2}, labels2{3, 0};

  auto check = [&](auto& layer) {
    // Train-mode forwards move the thresholds towards their running estimates.
    typename std::remove_reference_t<decltype(layer)>::cache c;
    for (std::uint64_t step = 0; step < 20; ++step) {
      auto xt = to_device<B>(random_vector<double>(4 * l * d, 100 + step), {4 * l, d});
      layer.forward(xt, std::vector<std::int64_t>{0, 1, 2, 3}, c);
    }
    const auto y1 = layer.infer(to_device<B>(batch1, {3 * l, d}), labels1).to_host();
    const auto y2 = layer.infer(to_device<B>(batch2, {2 * l, d}), labels2).to_host();
    // equal up to GEMM rounding (BLAS blocks a 3-sample batch differently from a 2-sample one);
    // a routing difference would show at the size of the outputs
    CHECK(promoe_test::relative_error(rows(y1, d, 0, l), rows(y2, d, l, l)) <= 1e-13);
    return std::make_pair(y1, y2);
  };

  SECTION("Expert Race") {
    using layer_t = layer_of<router::expert_race, B>;
    auto cfg = base_config<layer_t>(typename layer_t::config{});
    cfg.router.k = 1;
    layer_t layer(cfg, rng{3});
    check(layer);
  }
  SECTION("expert choice over the batch") {
    using layer_t = layer_of<router::expert_choice, B>;
    auto cfg = base_config<layer_t>(typename layer_t::config{});
    cfg.router = {1.0, false, score_fn::softmax};
    layer_t layer(cfg, rng{4});
    check(layer);
    // training-mode routing over the batch differs between the two batches for sample a
    typename layer_t::cache c1, c2;
    const auto t1 = layer.forward(to_device<B>(batch1, {3 * l, d}), labels1, c1).to_host();
    const auto t2 = layer.forward(to_device<B>(batch2, {2 * l, d}), labels2, c2).to_host();
    CHECK(promoe_test::relative_error(rows(t1, d, 0, l), rows(t2, d, l, l)) > 1e-3);
  }
  SECTION("expert choice per sample") {
    using layer_t = layer_of<router::expert_choice, B>;
    auto cfg = base_config<layer_t>(typename layer_t::config{});
    cfg.router = {1.0, true, score_fn::identity};
    layer_t layer(cfg, rng{5});
    check(layer);
  }
}

TEST_CASE("expert choice and Expert Race reject bad options", "[routers][errors]") {
  using ec = layer_of<router::expert_choice, backend::cpu>;
  auto cfg = base_config<ec>(typename ec::config{});
  cfg.router.capacity = 0;
  REQUIRE_THROWS_WITH(ec(cfg, rng{1}), Catch::Contains("capacity must be positive"));
  using race = layer_of<router::expert_race, backend::cpu>;
  auto rcfg = base_config<race>(typename race::config{});
  rcfg.router.k = 5;
  REQUIRE_THROWS_WITH(race(rcfg, rng{1}), Catch::Contains("k = 5") && Catch::Contains("<= 4"));
  // per-sample choice needs the tokens to split into the samples
  auto pcfg = base_config<ec>(typename ec::config{});
  ec layer(pcfg, rng{1});
  typename ec::cache c;
  auto x = to_device<backend::cpu>(random_vector<double>(7 * 8, 1), {7, 8});
  REQUIRE_THROWS_WITH(layer.forward(x, std::vector<std::int64_t>{0, 1}, c), Catch::Contains("do not split"));
}

TEMPLATE_LIST_TEST_CASE("ProMoE: null-label samples go to the unconditional expert; an all-null batch takes the dense path",
                        "[routers][promoe]", test_backends) {
  using B = TestType;
  using layer_t = promoe_layer<B, double>;
  typename layer_t::config cfg;
  cfg.dim = 8;
  cfg.routed_experts = 4;
  cfg.expert_hidden = 6;
  cfg.unconditional_experts = 1;
  cfg.shared_experts = 1;
  cfg.router.inner.k = 2;
  cfg.router.null_label = 10;
  layer_t layer(cfg, rng{7});
  const index_t l = 5, d = 8;
  auto x = to_device<B>(random_vector<double>(3 * l * d, 21), {3 * l, d});

  typename layer_t::cache c;
  layer.forward(x, std::vector<std::int64_t>{2, 10, 9}, c);
  const auto se = c.plan.slot_expert.to_host();
  const auto sg = c.plan.slot_gate.to_host();
  for (index_t t = 0; t < 3 * l; ++t) {
    const bool null_sample = t / l == 1;
    CAPTURE(t);
    if (null_sample) {
      CHECK(se[t * 2] == 4);  // the unconditional expert, id = routed experts
      CHECK(sg[t * 2] == 1.0);
      CHECK(se[t * 2 + 1] == -1);
    } else {
      CHECK(se[t * 2] >= 0);
      CHECK(se[t * 2] < 4);
      CHECK(se[t * 2 + 1] < 4);
    }
  }
  // the contrastive loss and the load of the routed experts see only labelled tokens
  CHECK(c.plan.expert_rows(4) == l);

  const std::vector<std::int64_t> nulls{10, 10, 10};
  typename layer_t::cache c2;
  const auto y_train = layer.forward(x, nulls, c2).to_host();
  const auto y_fast = layer.infer(x, nulls).to_host();
  CHECK(promoe_test::relative_error(y_fast, y_train) <= 1e-14);
  CHECK(layer.aux_loss(c2) == 0.0);
}

TEMPLATE_LIST_TEST_CASE("conditional routing: masking every token equals gathering the labelled ones",
                        "[routers][conditional]", test_backends) {
  using B = TestType;
  const std::vector<std::int64_t> labels{3, 10, 0, 10, 7};  // 5 samples of 4 tokens, two null
  SECTION("linear top-2, two unconditional experts, load balance and z-loss") {
    using all_losses = losses<loss::load_balance, loss::z_loss>;
    using masked_t = moe_layer<router::conditional<router::top_k>, expert::mlp<act::gelu_tanh>, all_losses, B, double>;
    using gathered_t =
        moe_layer<router::conditional<gathered<router::top_k>>, expert::mlp<act::gelu_tanh>, all_losses, B, double>;
    STATIC_REQUIRE(masked_t::router_impl::masked);
    STATIC_REQUIRE(!gathered_t::router_impl::masked);
    typename masked_t::config cfg;
    cfg.dim = 6, cfg.routed_experts = 4, cfg.expert_hidden = 5, cfg.unconditional_experts = 2;
    cfg.router.inner = {2, score_fn::softmax, true};
    cfg.router.null_label = 10;
    cfg.loss = {{0.5}, {0.3}};
    typename gathered_t::config gcfg;
    gcfg.dim = 6, gcfg.routed_experts = 4, gcfg.expert_hidden = 5, gcfg.unconditional_experts = 2;
    gcfg.router.inner = cfg.router.inner;
    gcfg.router.null_label = 10;
    gcfg.loss = cfg.loss;
    masked_t masked(cfg, rng{41});
    gathered_t gathered(gcfg, rng{42});
    check_same_step<B>(masked, gathered, 20, labels);
  }
  SECTION("ProMoE: prototypes, RCL, load balance and z-loss") {
    using all_losses = losses<loss::routing_contrastive, loss::load_balance, loss::z_loss>;
    using masked_t =
        moe_layer<router::conditional<router::prototypical>, expert::mlp<act::gelu_tanh>, all_losses, B, double>;
    using gathered_t = moe_layer<router::conditional<gathered<router::prototypical>>, expert::mlp<act::gelu_tanh>,
                                 all_losses, B, double>;
    typename masked_t::config cfg;
    cfg.dim = 6, cfg.routed_experts = 4, cfg.expert_hidden = 5, cfg.unconditional_experts = 1;
    cfg.shared_experts = 1;
    cfg.router.inner.k = 2;
    cfg.router.null_label = 10;
    cfg.loss = {{1.0, 0.07, true}, {0.5}, {0.3}};
    typename gathered_t::config gcfg;
    gcfg.dim = 6, gcfg.routed_experts = 4, gcfg.expert_hidden = 5, gcfg.unconditional_experts = 1;
    gcfg.shared_experts = 1;
    gcfg.router.inner = cfg.router.inner;
    gcfg.router.null_label = 10;
    gcfg.loss = cfg.loss;
    masked_t masked(cfg, rng{43});
    gathered_t gathered(gcfg, rng{44});
    for (auto& p : masked.parameters())  // prototypes far enough apart that every expert gets tokens
      if (p.name == "cluster_centers") {
        const auto v = random_vector<double>(static_cast<std::size_t>(p.size()), 45, 1.0);
        backend_traits<B>::copy_from_host(v.data(), p.size(), p.value);
      }
    check_same_step<B>(masked, gathered, 20, labels);
    check_same_step<B>(masked, gathered, 20, std::vector<std::int64_t>{10, 10, 10, 10, 2});
  }
}

TEMPLATE_LIST_TEST_CASE("routing contrastive loss: zero, and no gradient, with fewer than two active experts",
                        "[routers][promoe][losses]", test_backends) {
  using B = TestType;
  using layer_t = moe_layer<router::prototypical, expert::mlp<act::gelu_tanh>, losses<loss::routing_contrastive>, B,
                            double>;
  typename layer_t::config cfg;
  cfg.dim = 5, cfg.routed_experts = 4, cfg.expert_hidden = 6;
  cfg.router.k = 1;
  const auto input = [](index_t tokens, std::uint64_t seed) {
    return to_device<B>(random_vector<double>(static_cast<std::size_t>(tokens * 5), seed), {tokens, 5});
  };
  // Gradients (dx, then every parameter's) of a step on `tokens` tokens with `c`, and the loss.
  const auto step = [&](layer_t& layer, typename layer_t::cache& c, index_t tokens, double& value) {
    layer.zero_grad();
    (void)layer.forward(input(tokens, 8), {}, c);
    value = layer.aux_loss(c);
    auto out = layer.backward(input(tokens, 9), c).to_host();
    for (const auto& [name, g] : promoe_test::read_grads(layer).tensors) out.insert(out.end(), g.begin(), g.end());
    return out;
  };
  layer_t layer(cfg, rng{7});
  cfg.loss = {{0.0, 0.07, true}};
  layer_t unweighted(cfg, rng{7});
  typename layer_t::cache reused, fresh;
  double value = -1, zero = -1;
  // several tokens: several active experts, a loss, and gradients it changes
  const auto many = step(layer, reused, 12, value), many0 = step(unweighted, fresh, 12, zero);
  CHECK(value > 0.0);
  CHECK(zero == 0.0);
  CHECK(many != many0);
  // then one token, top-1, in the same cache: one active expert, so no loss and nothing
  // left over from the larger step's centroids and softmax rows
  typename layer_t::cache fresh1;
  const auto one = step(layer, reused, 1, value), one0 = step(unweighted, fresh1, 1, zero);
  CHECK(value == 0.0);
  CHECK(one == one0);
}

/// A loss of one's own that computes its value on the host: forward returns it, and the layer
/// stores it with the built-in losses' values (which are written on the device).
struct counted_tokens_loss {
  static constexpr const char* name = "counted_tokens";
  struct options {
    double weight = 1.0;
  };
  template <class T, class B>
  struct impl {
    struct cache {};
    impl(const options& o, const router_layout&) : opt(o) {}
    T forward(const loss_input<T, B>& in, cache&) const { return static_cast<T>(opt.weight * in.counted); }
    void backward(const loss_input<T, B>&, cache&) const {}
    options opt;
  };
};
static_assert(LossPolicy<counted_tokens_loss>);

TEMPLATE_LIST_TEST_CASE("a loss whose forward returns its value on the host sits beside the device-written ones",
                        "[routers][losses]", test_backends) {
  using B = TestType;
  using layer_t =
      moe_layer<router::top_k, expert::mlp<act::gelu_tanh>, losses<loss::z_loss, counted_tokens_loss>, B, double>;
  using plain_t = moe_layer<router::top_k, expert::mlp<act::gelu_tanh>, losses<loss::z_loss>, B, double>;
  typename layer_t::config cfg;
  cfg.dim = 4, cfg.routed_experts = 3, cfg.expert_hidden = 5;
  cfg.loss = {{0.1}, {0.5}};
  typename plain_t::config pcfg;
  pcfg.dim = 4, pcfg.routed_experts = 3, pcfg.expert_hidden = 5;
  pcfg.loss = {{0.1}};
  layer_t layer(cfg, rng{3});
  plain_t plain(pcfg, rng{3});
  typename layer_t::cache c;
  typename plain_t::cache pc;
  CHECK(layer.aux_loss(c) == 0.0);  // before any forward
  const auto x = to_device<B>(random_vector<double>(7 * 4, 5), {7, 4});
  (void)layer.forward(x, {}, c);
  (void)plain.forward(x, {}, pc);
  const auto values = layer.aux_losses(c);
  REQUIRE(values.size() == 2);
  CHECK(values[0].first == std::string("z_loss"));
  CHECK(values[0].second == plain.aux_losses(pc)[0].second);
  CHECK(values[0].second > 0.0);
  CHECK(values[1].first == std::string("counted_tokens"));
  CHECK(values[1].second == 0.5 * 7);
  CHECK(layer.aux_loss(c) == values[0].second + values[1].second);
}

TEST_CASE("conditional routing checks its labels", "[routers][errors]") {
  using layer_t = promoe_layer<backend::cpu, double>;
  typename layer_t::config cfg;
  cfg.dim = 4;
  cfg.routed_experts = 3;
  cfg.expert_hidden = 5;
  cfg.unconditional_experts = 1;
  cfg.router.null_label = 10;
  layer_t layer(cfg, rng{1});
  auto x = to_device<backend::cpu>(random_vector<double>(6 * 4, 2), {6, 4});
  typename layer_t::cache c;
  REQUIRE_THROWS_WITH(layer.forward(x, std::vector<std::int64_t>{3, 11}, c),
                      Catch::Contains("labels[1] = 11") && Catch::Contains("0..10"));
  REQUIRE_THROWS_WITH(layer.forward(x, std::vector<std::int64_t>{-1, 2}, c), Catch::Contains("labels[0] = -1"));
  REQUIRE_THROWS_WITH(layer.forward(x, {}, c), Catch::Contains("one label per sample"));
  REQUIRE_THROWS_WITH(layer.infer(x, std::vector<std::int64_t>{10, 12}), Catch::Contains("labels[1] = 12"));
  typename layer_t::config bad = cfg;
  bad.router.null_label = -1;
  REQUIRE_THROWS_WITH(layer_t(bad, rng{1}), Catch::Contains("null_label"));
}

TEST_CASE("the routing contrastive loss needs a router with prototypes", "[routers][static]") {
  // A layer type pairing the contrastive loss with a linear router is refused at compile time
  // (tests/static/bad_loss_pairing.cpp); here: the pairing with prototypes is accepted.
  STATIC_REQUIRE(router::top_k::impl<double, backend::cpu>::has_prototypes == false);
  STATIC_REQUIRE(router::promoe::impl<double, backend::cpu>::has_prototypes == true);
}
