// SPDX-License-Identifier: Apache-2.0
// The whole MoE layer (top-k router, dispatch, mlp experts, SwiGLU shared experts, load
// balance and z-loss) against the naive float64 reference, on every backend, at awkward sizes.
#include <catch2/catch.hpp>

#include <promoe/promoe.hpp>

#include "backends.hpp"
#include "layer_helpers.hpp"

using namespace promoe;

namespace {

template <class B, class T>
using baseline_layer = moe_layer<router::top_k, expert::mlp<act::gelu_tanh>, losses<loss::load_balance, loss::z_loss>, B,
                                 T, expert::swiglu>;

struct case_sizes {
  index_t tokens, dim, experts, k;
};

std::vector<case_sizes> awkward_sizes() {
  std::vector<case_sizes> out;
  for (index_t n : {1, 7, 733})
    for (index_t d : {3, 19, 64})
      for (index_t e : {1, 5, 16})
        for (index_t k : {index_t{1}, index_t{2}, e})
          if (k <= e)  // each valid k once
            if (std::none_of(out.begin(), out.end(),
                             [&](const case_sizes& c) { return c.tokens == n && c.dim == d && c.experts == e && c.k == k; }))
              out.push_back({n, d, e, k});
  return out;
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("moe_layer matches the float64 reference at awkward sizes", "[layer][reference]", test_configs) {
  using B = typename TestType::backend;
  using T = typename TestType::scalar;
  using layer_t = baseline_layer<B, T>;
  const double tol = promoe_test::tolerance<T>();
  const auto cases = awkward_sizes();
  REQUIRE(cases.size() == 3 * 3 * (1 + 3 + 3));  // E = 1: k = 1; E = 5, 16: k = 1, 2, E

  for (std::size_t ci = 0; ci < cases.size(); ++ci) {
    const auto [n, d, e, k] = cases[ci];
    const score_fn fn = static_cast<score_fn>(ci % 3);
    const bool renorm = fn != score_fn::identity && (ci / 3) % 2 == 1;
    const index_t shared = static_cast<index_t>(ci % 3 == 2 ? 2 : ci % 2);
    CAPTURE(n, d, e, k, fn, renorm, shared);

    typename layer_t::config cfg;
    cfg.dim = d;
    cfg.routed_experts = e;
    cfg.expert_hidden = 2 * d + 1;
    cfg.shared_experts = shared;
    cfg.shared_hidden = d + 3;
    cfg.router = {k, fn, renorm};
    cfg.loss = {{0.01}, {1e-3}};
    cfg.names = param_naming::dit_moe();
    layer_t layer(cfg, rng{100 + ci});

    const auto xh = random_vector<T>(static_cast<std::size_t>(n * d), 7 + ci, 2.0);
    auto x = to_device<B>(xh, {n, d});
    typename layer_t::cache cache;
    const auto y = layer.forward(x, {}, cache).to_host();

    reference::layer_spec spec;
    spec.dim = static_cast<int>(d);
    spec.routed = static_cast<int>(e);
    spec.hidden = static_cast<int>(cfg.expert_hidden);
    spec.shared = static_cast<int>(shared);
    spec.shared_hidden = static_cast<int>(cfg.shared_hidden);
    spec.k = static_cast<int>(k);
    spec.fn = promoe_test::reference_score(fn);
    spec.renormalize = renorm;
    spec.routed_kind = reference::kind::mlp_gelu_tanh;
    spec.shared_kind = reference::kind::swiglu;
    spec.shared_prefix = "shared_experts";
    spec.mlp_in = "fc1";
    spec.mlp_out = "fc2";
    spec.load_balance = 0.01;
    spec.z_loss = 1e-3;
    const auto ref = reference::forward(spec, promoe_test::read_params(layer),
                                        reference::vec(xh.begin(), xh.end()), static_cast<int>(n));

    // In float32 a token whose k-th and (k+1)-th scores are closer than rounding may be
    // routed differently from the float64 reference: leave such near-ties out (counted).
    const double tie = sizeof(T) == 8 ? 0.0 : 1e-5;
    const auto slot_expert = cache.plan.slot_expert.to_host();
    std::vector<double> got, want;
    index_t ties = 0;
    for (index_t t = 0; t < n; ++t) {
      if (ref.margin[t] <= tie) {
        ++ties;
        continue;
      }
      for (index_t s = 0; s < k; ++s) REQUIRE(slot_expert[t * k + s] == ref.slots[t][s]);
      for (index_t j = 0; j < d; ++j) {
        got.push_back(y[t * d + j]);
        want.push_back(ref.y[t * d + j]);
      }
    }
    REQUIRE(ties <= n / 100);
    CHECK(promoe_test::relative_error(got, want) <= tol);
    if (ties == 0) {
      const auto aux = layer.aux_losses(cache);
      REQUIRE(aux.size() == 2);
      CHECK(aux[0].first == "load_balance");
      CHECK(std::abs(aux[0].second - ref.load_balance) <= tol * std::abs(ref.load_balance) + 1e-300);
      CHECK(std::abs(aux[1].second - ref.z_loss) <= tol * std::abs(ref.z_loss) + 1e-300);
    }

    // The inference path routes and computes the same outputs, without a cache.
    const auto y_infer = layer.infer(x).to_host();
    CHECK(promoe_test::relative_error(y_infer, y) == 0.0);
  }
}

TEST_CASE("the dispatch plan groups tokens per expert in token order", "[layer][dispatch]") {
  using layer_t = baseline_layer<backend::cpu, double>;
  typename layer_t::config cfg;
  cfg.dim = 8;
  cfg.routed_experts = 4;
  cfg.expert_hidden = 5;
  cfg.router.k = 2;
  layer_t layer(cfg, rng{3});
  const index_t n = 37;
  auto x = to_device<backend::cpu>(random_vector<double>(n * 8, 11), {n, 8});
  typename layer_t::cache cache;
  layer.forward(x, {}, cache);
  const auto& plan = cache.plan;
  REQUIRE(plan.rows() == n * 2);
  const auto slot_expert = plan.slot_expert.to_host();
  const auto row_slot = plan.row_slot.to_host();
  for (index_t e = 0; e < 4; ++e) {
    index_t prev = -1;
    for (index_t r = plan.host_offsets[e]; r < plan.host_offsets[e + 1]; ++r) {
      CHECK(slot_expert[row_slot[r]] == e);
      CHECK(row_slot[r] > prev);
      prev = row_slot[r];
    }
  }
}

#if defined(PROMOE_TEST_THRUST)
TEMPLATE_TEST_CASE("cpu and thrust backends agree on outputs and every gradient", "[layer][backends]", double, float) {
  using T = TestType;
  using cpu_layer = baseline_layer<backend::cpu, T>;
  using thrust_layer = baseline_layer<backend::thrust, T>;
  const index_t n = 733, d = 19;
  auto make_cfg = [](auto cfg) {
    cfg.dim = d;
    cfg.routed_experts = 5;
    cfg.expert_hidden = 23;
    cfg.shared_experts = 1;
    cfg.shared_hidden = 11;
    cfg.router = {2, score_fn::softmax, true};
    cfg.loss = {{0.01}, {1e-3}};
    return cfg;
  };
  cpu_layer a(make_cfg(typename cpu_layer::config{}), rng{5});
  thrust_layer b(make_cfg(typename thrust_layer::config{}), rng{5});
  const auto xh = random_vector<T>(n * d, 1, 2.0), dyh = random_vector<T>(n * d, 2, 1.0);
  typename cpu_layer::cache ca;
  typename thrust_layer::cache cb;
  auto xa = to_device<backend::cpu>(xh, {n, d});
  auto xb = to_device<backend::thrust>(xh, {n, d});
  const auto ya = a.forward(xa, {}, ca).to_host();
  const auto yb = b.forward(xb, {}, cb).to_host();
  const double tol = promoe_test::tolerance<T>();
  CHECK(promoe_test::relative_error(yb, ya) <= tol);
  CHECK(cb.plan.slot_expert.to_host() == ca.plan.slot_expert.to_host());
  CHECK(std::abs(b.aux_loss(cb) - a.aux_loss(ca)) <= tol * std::abs(a.aux_loss(ca)));
  const auto dxa = a.backward(to_device<backend::cpu>(dyh, {n, d}), ca).to_host();
  const auto dxb = b.backward(to_device<backend::thrust>(dyh, {n, d}), cb).to_host();
  CHECK(promoe_test::relative_error(dxb, dxa) <= tol);
  const auto pa = promoe_test::read_grads(a), pb = promoe_test::read_grads(b);
  REQUIRE(pa.tensors.size() == pb.tensors.size());
  for (const auto& [name, ga] : pa.tensors) {
    INFO(name);
    CHECK(promoe_test::relative_error(pb.at(name), ga, 1e-30) <= tol);
  }
}
#endif

namespace {

/// Every gradient of bank b, concatenated on the host.
template <class T, class Bank>
std::vector<T> bank_gradients(Bank& b) {
  std::vector<T> out;
  for (index_t e = 0; e < b.count(); ++e)
    b.for_each_parameter(e, "", param_naming::dit_moe(), [&](const named_parameter<T>& p) {
      std::vector<T> host(static_cast<std::size_t>(p.size()));
      Bank::traits::copy_to_host(p.grad, p.size(), host.data());
      out.insert(out.end(), host.begin(), host.end());
    });
  return out;
}

/// The grouped forward and backward of an expert bank against expert-by-expert calls on the
/// same weights, rows split unevenly with experts that get none (first, middle and last).
template <class Expert, class B, class T>
void check_grouped_bank(index_t dim, index_t hidden, double tol) {
  using bank_t = typename Expert::template bank<T, B>;
  const index_t experts = 6;
  const std::vector<index_t> offsets = {0, 0, 37, 38, 38, 301, 301};  // experts 0, 3 and 5 empty
  const index_t rows = offsets.back(), cw = Expert::cache_width(hidden), sw = Expert::scratch_width(hidden);
  bank_t grouped(experts, dim, hidden), single(experts, dim, hidden);
  // random weights and biases (init() zeroes biases, which would hide a bias of the wrong
  // expert), and random gradients to accumulate onto (zeros would hide an overwrite)
  for (bank_t* b : {&grouped, &single}) {
    std::uint64_t seed = 30;
    for (index_t e = 0; e < experts; ++e)
      b->for_each_parameter(e, "", param_naming::dit_moe(), [&](const named_parameter<T>& p) {
        const auto v = random_vector<T>(static_cast<std::size_t>(p.size()), seed++, 0.3);
        bank_t::traits::copy_from_host(v.data(), p.size(), p.value);
        const auto g = random_vector<T>(static_cast<std::size_t>(p.size()), seed++, 0.3);
        bank_t::traits::copy_from_host(g.data(), p.size(), p.grad);
      });
  }
  const auto initial_grads = bank_gradients<T>(grouped);
  const auto x = to_device<B>(random_vector<T>(rows * dim, 11, 2.0), {rows, dim});
  const auto dy = to_device<B>(random_vector<T>(rows * dim, 12, 1.0), {rows, dim});
  const auto device_offsets = to_device<B>(offsets, {experts + 1});
  tensor<T, B> ones({rows}), act_g({rows, cw}), act_s({rows, cw}), y_g({rows, dim}), y_s({rows, dim});
  tensor<T, B> dx_g({rows, dim}), dx_s({rows, dim}), scratch({rows, sw});
  ones.fill(T(1));
  dx_g.fill(T(7));  // overwritten
  const expert::expert_rows groups{offsets, device_offsets.data()};

  grouped.forward_grouped(groups, x.cmatrix(), act_g.matrix(), y_g.matrix());
  for (index_t e = 0; e < experts; ++e) {
    const index_t first = offsets[e], m = offsets[e + 1] - first;
    single.forward(e, x.cmatrix().row_block(first, m), act_s.matrix().row_block(first, m),
                   y_s.matrix().row_block(first, m), false);
  }
  CHECK(promoe_test::relative_error(y_g.to_host(), y_s.to_host()) <= tol);
  CHECK(promoe_test::relative_error(act_g.to_host(), act_s.to_host()) <= tol);

  grouped.backward_grouped(groups, x.cmatrix(), act_g.cmatrix(), dy.cmatrix(), dx_g.matrix(), scratch.matrix(),
                           ones.data());
  for (index_t e = 0; e < experts; ++e) {
    const index_t first = offsets[e], m = offsets[e + 1] - first;
    single.backward(e, x.cmatrix().row_block(first, m), act_s.cmatrix().row_block(first, m),
                    dy.cmatrix().row_block(first, m), dx_s.matrix().row_block(first, m), false,
                    matrix_view<T>{scratch.data() + first * sw, m, sw}, ones.data());
  }
  CHECK(promoe_test::relative_error(dx_g.to_host(), dx_s.to_host()) <= tol);
  const auto gg = bank_gradients<T>(grouped), gs = bank_gradients<T>(single);
  REQUIRE(gg.size() == gs.size());
  CHECK(promoe_test::relative_error(gg, gs) <= tol);
  // the empty experts' gradients stay as they were
  double empty = 0;
  std::size_t at = 0;
  for (index_t e = 0; e < experts; ++e)
    grouped.for_each_parameter(e, "", param_naming::dit_moe(), [&](const named_parameter<T>& p) {
      if (offsets[e + 1] == offsets[e])
        for (index_t i = 0; i < p.size(); ++i)
          empty = std::max(empty, std::abs(static_cast<double>(gg[at + i]) - static_cast<double>(initial_grads[at + i])));
      at += static_cast<std::size_t>(p.size());
    });
  CHECK(empty == 0.0);

  // rows grouped for another bank, or inputs of the wrong height, are refused by name
  const std::vector<index_t> short_offsets = {0, 10, 20};
  CHECK_THROWS_WITH(grouped.forward_grouped({short_offsets, device_offsets.data()}, x.cmatrix(), act_g.matrix(),
                                            y_g.matrix()),
                    Catch::Contains("forward_grouped: rows grouped for 2 experts, the bank has 6"));
  CHECK_THROWS_WITH(grouped.backward_grouped(groups, x.cmatrix().row_block(0, 5), act_g.cmatrix(), dy.cmatrix(),
                                             dx_g.matrix(), scratch.matrix(), ones.data()),
                    Catch::Contains("inputs have 5 rows, the groups 301"));
}

}  // namespace

#if defined(PROMOE_TEST_THRUST)
using grouped_bank_configs = std::tuple<config<backend::cpu, double>, config<backend::cpu, float>,
                                        config<backend::cpu, bf16>, config<backend::thrust, double>,
                                        config<backend::thrust, float>, config<backend::thrust, bf16>>;
#else
using grouped_bank_configs =
    std::tuple<config<backend::cpu, double>, config<backend::cpu, float>, config<backend::cpu, bf16>>;
#endif

TEMPLATE_LIST_TEST_CASE("expert banks: the grouped path (one grouped GEMM per stage) equals expert by expert",
                        "[layer][experts]", grouped_bank_configs) {
  using B = typename TestType::backend;
  using T = typename TestType::scalar;
  // bf16: the same roundings both ways; the limit leaves room for GEMM blocking only
  const double tol = std::is_same_v<T, bf16> ? 1e-2 : promoe_test::tolerance<T>();
  // odd sizes, and sizes whose operands are 16-byte aligned (cuBLAS's grouped call takes
  // those; on a GPU the odd ones run as plain GEMMs)
  for (const auto& [dim, hidden] : {std::pair<index_t, index_t>{19, 23}, {32, 64}}) {
    CAPTURE(dim, hidden);
    check_grouped_bank<expert::mlp<act::gelu_tanh>, B, T>(dim, hidden, tol);
    check_grouped_bank<expert::swiglu, B, T>(dim, hidden, tol);
  }
}

TEMPLATE_LIST_TEST_CASE("strided views of x, y, dy and dx give the contiguous results", "[layer][views]", test_backends) {
  using B = TestType;
  using layer_t = baseline_layer<B, double>;
  typename layer_t::config cfg;
  cfg.dim = 6;
  cfg.routed_experts = 3;
  cfg.expert_hidden = 7;
  cfg.shared_experts = 1;
  cfg.shared_hidden = 5;
  cfg.router.k = 2;
  cfg.validate = true;
  layer_t layer(cfg, rng{8});
  const index_t n = 150, d = 6, ld = 9;  // 150 tokens: the parallel paths run too
  const auto xh = random_vector<double>(n * d, 3), dyh = random_vector<double>(n * d, 4);
  std::vector<double> xs(n * ld, 1e300), dys(n * ld, 1e300);
  for (index_t t = 0; t < n; ++t)
    for (index_t j = 0; j < d; ++j) {
      xs[t * ld + j] = xh[t * d + j];
      dys[t * ld + j] = dyh[t * d + j];
    }
  auto x = to_device<B>(xh, {n, d});
  auto x_wide = to_device<B>(xs, {n, ld});
  auto dy_wide = to_device<B>(dys, {n, ld});
  tensor<double, B> y_wide({n, ld}), dx_wide({n, ld});
  const matrix_view<double> xv{x_wide.data(), n, d, ld}, yv{y_wide.data(), n, d, ld}, dyv{dy_wide.data(), n, d, ld},
      dxv{dx_wide.data(), n, d, ld};

  typename layer_t::cache c1, c2;
  const auto y = layer.forward(x, {}, c1).to_host();
  layer.zero_grad();
  const auto dx = layer.backward(to_device<B>(dyh, {n, d}), c1).to_host();
  const auto g1 = promoe_test::read_grads(layer);

  layer.forward(xv, {}, yv, c2);
  layer.zero_grad();
  layer.backward(dyv, c2, dxv);
  const auto g2 = promoe_test::read_grads(layer);
  const auto yw = y_wide.to_host(), dxw = dx_wide.to_host();
  for (index_t t = 0; t < n; ++t)
    for (index_t j = 0; j < d; ++j) {
      REQUIRE(yw[t * ld + j] == Approx(y[t * d + j]).epsilon(1e-12));
      REQUIRE(dxw[t * ld + j] == Approx(dx[t * d + j]).epsilon(1e-12));
    }
  for (const auto& [name, g] : g1.tensors) CHECK(promoe_test::relative_error(g2.at(name), g, 1e-30) <= 1e-12);

  layer.infer(xv, {}, yv);
  const auto yi = y_wide.to_host();
  for (index_t t = 0; t < n; ++t)
    for (index_t j = 0; j < d; ++j) REQUIRE(yi[t * ld + j] == Approx(y[t * d + j]).epsilon(1e-12));
}
