// SPDX-License-Identifier: Apache-2.0
/// \file test_optim.cpp
/// \brief Training utilities: optim::adamw against a float64 re-implementation of the PyTorch
/// docs' algorithm and against numbers printed by torch.optim.AdamW, its state round trip,
/// optim::ema and optim::clip_grad_norm / queue_clip_grad_norm against naive loops,
/// optim::schedule values.

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <limits>
#include <numbers>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include <promoe/backend/tensor.hpp>
#include <promoe/core/error.hpp>
#include <promoe/optim/adamw.hpp>
#include <promoe/optim/clip.hpp>
#include <promoe/optim/ema.hpp>
#include <promoe/optim/schedule.hpp>

#include "backends.hpp"

using promoe::index_t;
using promoe::named_parameter;

namespace {

/// A stand-in for a model's parameter list: a few parameters of assorted shapes (one below and
/// one above the serial threshold, one above a norm chunk, a 0-d one, an empty one) and a buffer.
/// The empty parameter's tensors have no storage, so its grad pointer is null like a buffer's.
template <class T, class B>
struct toy_model {
  struct entry {
    std::string name;
    std::vector<index_t> shape;
    bool buffer;
    promoe::tensor<T, B> value, grad;
  };
  std::deque<entry> entries;  // stable addresses

  explicit toy_model(std::uint64_t seed) {
    add("blocks.0.attn.qkv.weight", {12, 10}, false, seed);
    add("blocks.0.mlp.fc1.weight", {40, 37}, false, seed + 1);
    add("blocks.0.mlp.fc1.bias", {37}, false, seed + 2);
    add("pos_embed", {6, 4}, true, seed + 3);
    add("final.scale", {}, false, seed + 4);
    add("blocks.0.moe.experts.3.w1", {5, 0}, false, seed + 5);
  }

  void add(std::string name, std::vector<index_t> shape, bool buffer, std::uint64_t seed) {
    entry e{std::move(name), shape, buffer, promoe::tensor<T, B>(shape), {}};
    e.value = to_device<B>(random_vector<T>(static_cast<std::size_t>(e.value.size()), seed), shape);
    if (!buffer) {
      e.grad.resize(shape);
      e.grad.fill(T(0));
    }
    entries.push_back(std::move(e));
  }

  std::vector<named_parameter<T>> named() {
    std::vector<named_parameter<T>> out;
    for (auto& e : entries) out.push_back({e.name, e.shape, e.value.data(), e.buffer ? nullptr : e.grad.data()});
    return out;
  }

  /// Fresh gradients drawn from `seed`, uniform in [-scale, scale), written in place.
  void set_grads(std::uint64_t seed, double scale = 1.0) {
    for (auto& e : entries)
      if (!e.buffer) fill_from(e.grad, random_vector<T>(static_cast<std::size_t>(e.grad.size()), seed++, scale));
  }
  /// Fresh values (buffers included) drawn from `seed`, written in place.
  void set_values(std::uint64_t seed) {
    for (auto& e : entries) fill_from(e.value, random_vector<T>(static_cast<std::size_t>(e.value.size()), seed++));
  }
  static void fill_from(promoe::tensor<T, B>& t, const std::vector<T>& v) {
    promoe::backend_traits<B>::copy_from_host(v.data(), t.size(), t.data());
  }
};

/// Entries with a gradient: 4 of toy_model's 6 (the buffer and the empty parameter, whose
/// pointers are null, are not).
template <class T>
std::size_t num_with_grad(const std::vector<named_parameter<T>>& params) {
  std::size_t n = 0;
  for (const auto& p : params) n += p.grad != nullptr;
  REQUIRE(n == 4);
  return n;
}

/// Host copy of n values at a backend pointer.
template <class T, class B>
std::vector<T> host_copy(const T* p, index_t n) {
  std::vector<T> out(static_cast<std::size_t>(n));
  if (n > 0) promoe::backend_traits<B>::copy_to_host(p, n, out.data());
  return out;
}

template <class T>
std::vector<double> as_double(const std::vector<T>& v) {
  return std::vector<double>(v.begin(), v.end());
}

/// |got - want| <= tol * max(1, max |want|) element by element.
template <class T>
void check_close(const std::vector<T>& got, const std::vector<double>& want, double tol, const std::string& what) {
  REQUIRE(got.size() == want.size());
  double scale = 1.0;
  for (double w : want) scale = std::max(scale, std::abs(w));
  double worst = 0.0;
  std::size_t at = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double err = std::abs(static_cast<double>(got[i]) - want[i]);
    if (!(err <= worst)) {
      worst = err;
      at = i;
    }
  }
  INFO(what << ": worst error " << worst << " at " << at << " (tolerance " << tol * scale << ")");
  CHECK(worst <= tol * scale);
}

template <class T>
const named_parameter<T>* find(const std::vector<named_parameter<T>>& list, const std::string& name) {
  for (const auto& p : list)
    if (p.name == name) return &p;
  return nullptr;
}

/// The PyTorch docs' AdamW, written from the algorithm box in float64:
///   theta -= gamma * lambda * theta; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
///   m_hat = m / (1 - b1^t); v_hat = v / (1 - b2^t); theta -= gamma * m_hat / (sqrt(v_hat) + eps).
struct naive_adamw {
  std::vector<double> theta, m, v;
  double b1, b2, eps, wd;
  int t = 0;
  void step(const std::vector<double>& g, double gamma) {
    ++t;
    for (std::size_t i = 0; i < theta.size(); ++i) {
      theta[i] -= gamma * wd * theta[i];
      m[i] = b1 * m[i] + (1 - b1) * g[i];
      v[i] = b2 * v[i] + (1 - b2) * g[i] * g[i];
      const double m_hat = m[i] / (1 - std::pow(b1, t));
      const double v_hat = v[i] / (1 - std::pow(b2, t));
      theta[i] -= gamma * m_hat / (std::sqrt(v_hat) + eps);
    }
  }
};

}  // namespace

// ---------------------------------------------------------------------------
// AdamW
// ---------------------------------------------------------------------------

TEMPLATE_LIST_TEST_CASE("adamw matches a float64 re-implementation of the PyTorch algorithm", "[optim][adamw]",
                        test_configs) {
  using B = typename TestType::backend;
  using T = typename TestType::scalar;
  for (double wd : {0.0, 0.05}) {
    INFO("weight_decay " << wd);
    toy_model<T, B> model(11);
    auto params = model.named();
    promoe::optim::adamw_options o;
    o.beta1 = 0.8;
    o.beta2 = 0.95;
    o.eps = 1e-6;
    o.weight_decay = wd;
    promoe::optim::adamw<T, B> opt(params, o);
    const auto sched = promoe::optim::schedule::cosine(3e-2, 2, 6, 1e-3);

    std::vector<naive_adamw> ref;
    for (const auto& p : params) {
      if (!p.grad) continue;
      const auto n = static_cast<std::size_t>(p.size());
      ref.push_back({as_double(host_copy<T, B>(p.value, p.size())), std::vector<double>(n, 0.0),
                     std::vector<double>(n, 0.0), o.beta1, o.beta2, o.eps, wd});
    }
    const auto buffer_before = host_copy<T, B>(find(params, "pos_embed")->value, 24);

    for (int s = 0; s < 7; ++s) {
      model.set_grads(100 + 10 * static_cast<std::uint64_t>(s), 0.5 + s);
      const double lr = sched.lr_at(opt.step());
      std::size_t k = 0;
      for (const auto& p : params) {
        if (!p.grad) continue;
        ref[k++].step(as_double(host_copy<T, B>(p.grad, p.size())), lr);
      }
      opt.step(lr);
    }
    CHECK(opt.step() == 7);

    // Buffers are neither updated nor given state.
    CHECK(host_copy<T, B>(find(params, "pos_embed")->value, 24) == buffer_before);
    auto state = opt.state();
    REQUIRE(state.size() == 2 * num_with_grad(params));
    CHECK(find(state, "exp_avg.pos_embed") == nullptr);

    std::size_t k = 0;
    for (const auto& p : params) {
      if (!p.grad) continue;
      INFO(p.name);
      const auto* m = find(state, "exp_avg." + p.name);
      const auto* v = find(state, "exp_avg_sq." + p.name);
      REQUIRE(m);
      REQUIRE(v);
      CHECK(m->shape == p.shape);
      CHECK(v->shape == p.shape);
      CHECK(m->grad == nullptr);
      CHECK(v->grad == nullptr);
      const double tol = promoe_test::tolerance<T>();
      check_close(host_copy<T, B>(p.value, p.size()), ref[k].theta, tol, "param");
      check_close(host_copy<T, B>(m->value, p.size()), ref[k].m, tol, "exp_avg");
      check_close(host_copy<T, B>(v->value, p.size()), ref[k].v, tol, "exp_avg_sq");
      ++k;
    }
  }
}

// The numbers below were printed once by torch 1.13 (single-tensor AdamW, float64) with:
//
//   import torch
//   def run(wd):
//       p = torch.tensor([[0.5, -1.25, 2.0], [0.0, 3.5, -0.75]], dtype=torch.float64, requires_grad=True)
//       q = torch.tensor([0.125, -0.5], dtype=torch.float64, requires_grad=True)
//       opt = torch.optim.AdamW([p, q], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd, foreach=False)
//       for s, lr in enumerate([1e-2, 5e-3, 2e-2, 1e-3]):
//           for g in opt.param_groups: g['lr'] = lr
//           p.grad = torch.tensor([((7 * i + 3 * s) % 11 - 5) * 0.25 for i in range(6)],
//                                 dtype=torch.float64).reshape(2, 3)
//           q.grad = torch.tensor([((7 * i + 3 * s) % 11 - 5) * 0.25 for i in range(6, 8)], dtype=torch.float64)
//           opt.step()
//       for t in [p, q, opt.state[p]['exp_avg'], opt.state[p]['exp_avg_sq'],
//                 opt.state[q]['exp_avg'], opt.state[q]['exp_avg_sq']]:
//           print('{' + ', '.join(f'{x:.17g}' for x in t.detach().flatten().tolist()) + '},')
//   for wd in [0.0, 0.1]:
//       run(wd)
TEMPLATE_LIST_TEST_CASE("adamw reproduces torch.optim.AdamW", "[optim][adamw][torch]", test_configs) {
  using B = typename TestType::backend;
  using T = typename TestType::scalar;
  // p, q, exp_avg(p), exp_avg_sq(p), exp_avg(q), exp_avg_sq(q)
  const std::vector<std::vector<double>> expected[2] = {
      {
          {0.52584756408277045, -1.2714327731455874, 2.0022852125848845, -0.014292003550664938, 3.484728937572092,
           -0.73796925323285212},
          {0.11821586789331706, -0.49829655596851002},
          {-0.009125000000000022, 0.070199999999999985, -0.026200000000000001, 0.10537499999999998,
           -0.015774999999999997, -0.11217499999999998},
          {0.0028697549359375024, 0.002370564812250002, 0.0023106258122500018, 0.0026816927484375028,
           0.0021218136874375016, 0.0026852516869375022},
          {0.019399999999999997, -0.10174999999999998},
          {0.0023074414990000018, 0.0023723130625000022},
      },
      {
          {0.52401293442751118, -1.266901083542028, 1.9950650407756616, -0.014263709454951508, 3.4721777716275297,
           -0.73530499042713193},
          {0.1177914812036014, -0.49649117162379491},
          {-0.009125000000000022, 0.070199999999999985, -0.026200000000000001, 0.10537499999999998,
           -0.015774999999999997, -0.11217499999999998},
          {0.0028697549359375024, 0.002370564812250002, 0.0023106258122500018, 0.0026816927484375028,
           0.0021218136874375016, 0.0026852516869375022},
          {0.019399999999999997, -0.10174999999999998},
          {0.0023074414990000018, 0.0023723130625000022},
      },
  };
  const double wds[2] = {0.0, 0.1};
  for (int c = 0; c < 2; ++c) {
    INFO("weight_decay " << wds[c]);
    auto p = to_device<B>(std::vector<T>{T(0.5), T(-1.25), T(2.0), T(0.0), T(3.5), T(-0.75)}, {2, 3});
    auto q = to_device<B>(std::vector<T>{T(0.125), T(-0.5)}, {2});
    promoe::tensor<T, B> gp({2, 3}), gq({2});
    std::vector<named_parameter<T>> params{{"p", {2, 3}, p.data(), gp.data()}, {"q", {2}, q.data(), gq.data()}};
    promoe::optim::adamw_options o;
    o.lr = 1e-2;
    o.weight_decay = wds[c];
    promoe::optim::adamw<T, B> opt(params, o);
    const double lrs[4] = {1e-2, 5e-3, 2e-2, 1e-3};
    for (int s = 0; s < 4; ++s) {
      std::vector<T> g(8);
      for (int i = 0; i < 8; ++i) g[static_cast<std::size_t>(i)] = static_cast<T>(((7 * i + 3 * s) % 11 - 5) * 0.25);
      promoe::backend_traits<B>::copy_from_host(g.data(), 6, gp.data());
      promoe::backend_traits<B>::copy_from_host(g.data() + 6, 2, gq.data());
      opt.step(lrs[s]);
    }
    auto state = opt.state();
    REQUIRE(state.size() == 4);
    CHECK(state[0].name == "exp_avg.p");
    CHECK(state[1].name == "exp_avg_sq.p");
    CHECK(state[2].name == "exp_avg.q");
    CHECK(state[3].name == "exp_avg_sq.q");
    const double tol = promoe_test::tolerance<T>();
    const auto& e = expected[c];
    check_close(p.to_host(), e[0], tol, "p");
    check_close(q.to_host(), e[1], tol, "q");
    check_close(host_copy<T, B>(state[0].value, 6), e[2], tol, "exp_avg.p");
    check_close(host_copy<T, B>(state[1].value, 6), e[3], tol, "exp_avg_sq.p");
    check_close(host_copy<T, B>(state[2].value, 2), e[4], tol, "exp_avg.q");
    check_close(host_copy<T, B>(state[3].value, 2), e[5], tol, "exp_avg_sq.q");
  }
}

TEMPLATE_LIST_TEST_CASE("adamw state round trip continues bitwise identically", "[optim][adamw][state]", test_configs) {
  using B = typename TestType::backend;
  using T = typename TestType::scalar;
  promoe::optim::adamw_options o;
  o.lr = 1e-2;
  o.weight_decay = 0.01;

  toy_model<T, B> a(5);
  auto pa = a.named();
  promoe::optim::adamw<T, B> opt_a(pa, o);
  for (int s = 0; s < 3; ++s) {
    a.set_grads(200 + 10 * static_cast<std::uint64_t>(s));
    opt_a.step(1e-2);
  }

  // The checkpoint: parameter values, optimizer state by name, the step.
  struct saved {
    std::string name;
    std::vector<T> values;
  };
  std::vector<saved> checkpoint_params, checkpoint_state;
  for (const auto& p : pa) checkpoint_params.push_back({p.name, host_copy<T, B>(p.value, p.size())});
  for (const auto& s : opt_a.state()) checkpoint_state.push_back({s.name, host_copy<T, B>(s.value, s.size())});
  const std::int64_t checkpoint_step = opt_a.step();
  CHECK(checkpoint_step == 3);

  for (int s = 3; s < 6; ++s) {
    a.set_grads(200 + 10 * static_cast<std::uint64_t>(s));
    opt_a.step(1e-2 / (s + 1));
  }

  // A fresh model and optimizer restored from the checkpoint.
  toy_model<T, B> b(99);
  auto pb = b.named();
  for (const auto& c : checkpoint_params) {
    const auto* p = find(pb, c.name);
    REQUIRE(p);
    promoe::backend_traits<B>::copy_from_host(c.values.data(), p->size(), p->value);
  }
  promoe::optim::adamw<T, B> opt_b(pb, o);
  auto state_b = opt_b.state();
  REQUIRE(state_b.size() == checkpoint_state.size());
  for (const auto& c : checkpoint_state) {
    const auto* s = find(state_b, c.name);
    REQUIRE(s);
    REQUIRE(s->size() == static_cast<index_t>(c.values.size()));
    promoe::backend_traits<B>::copy_from_host(c.values.data(), s->size(), s->value);
  }
  opt_b.set_step(checkpoint_step);
  for (int s = 3; s < 6; ++s) {
    b.set_grads(200 + 10 * static_cast<std::uint64_t>(s));
    opt_b.step(1e-2 / (s + 1));
  }

  CHECK(opt_b.step() == opt_a.step());
  for (std::size_t i = 0; i < pa.size(); ++i) {
    INFO(pa[i].name);
    CHECK(host_copy<T, B>(pa[i].value, pa[i].size()) == host_copy<T, B>(pb[i].value, pb[i].size()));
  }
  const auto state_a = opt_a.state();
  for (std::size_t i = 0; i < state_a.size(); ++i) {
    INFO(state_a[i].name);
    CHECK(state_a[i].name == state_b[i].name);
    CHECK(host_copy<T, B>(state_a[i].value, state_a[i].size()) == host_copy<T, B>(state_b[i].value, state_b[i].size()));
  }
}

TEMPLATE_LIST_TEST_CASE("adamw rejects bad options and arguments", "[optim][adamw][errors]", test_backends) {
  using B = TestType;
  toy_model<double, B> model(1);
  const auto params = model.named();
  const auto with = [](auto edit) {
    promoe::optim::adamw_options o;
    edit(o);
    return o;
  };
  using O = promoe::optim::adamw_options;
  using A = promoe::optim::adamw<double, B>;
  CHECK_THROWS_AS(A(params, with([](O& o) { o.lr = -1; })), promoe::error);
  CHECK_THROWS_AS(A(params, with([](O& o) { o.beta1 = 1.0; })), promoe::error);
  CHECK_THROWS_AS(A(params, with([](O& o) { o.beta2 = -0.1; })), promoe::error);
  CHECK_THROWS_AS(A(params, with([](O& o) { o.eps = std::numeric_limits<double>::quiet_NaN(); })), promoe::error);
  CHECK_THROWS_WITH(A(params, with([](O& o) { o.weight_decay = -1; })), Catch::Contains("weight_decay"));
  auto dup = params;
  dup.push_back(params[0]);
  CHECK_THROWS_WITH(A(dup), Catch::Contains("blocks.0.attn.qkv.weight") && Catch::Contains("twice"));

  A opt(params);
  CHECK(opt.parameters().size() == num_with_grad(params));
  CHECK(opt.options().lr == 1e-4);
  CHECK(opt.options().beta1 == 0.9);
  CHECK(opt.options().beta2 == 0.999);
  CHECK(opt.options().eps == 1e-8);
  CHECK(opt.options().weight_decay == 0.0);
  CHECK_THROWS_AS(opt.step(-1e-3), promoe::error);
  CHECK_THROWS_AS(opt.step(std::numeric_limits<double>::infinity()), promoe::error);
  CHECK_THROWS_AS(opt.set_step(-1), promoe::error);
  CHECK_THROWS_AS(opt.set_options(with([](O& o) { o.beta1 = 2; })), promoe::error);
  CHECK(opt.step() == 0);
}

// ---------------------------------------------------------------------------
// EMA
// ---------------------------------------------------------------------------

TEMPLATE_LIST_TEST_CASE("ema follows shadow = decay * shadow + (1 - decay) * value", "[optim][ema]", test_configs) {
  using B = typename TestType::backend;
  using T = typename TestType::scalar;
  for (bool buffers : {false, true}) {
    INFO("include_buffers " << buffers);
    toy_model<T, B> model(21);
    auto params = model.named();
    promoe::optim::ema<T, B> avg(params, 0.9, buffers);
    CHECK(avg.decay() == 0.9);

    // Naive shadow per tracked entry, in float64 from the T values.
    std::vector<std::vector<double>> ref;
    std::vector<std::string> names;
    for (const auto& p : params) {
      if (!p.grad && !buffers) continue;
      names.push_back(p.name);
      ref.push_back(as_double(host_copy<T, B>(p.value, p.size())));
    }
    auto shadow = avg.shadow();
    REQUIRE(shadow.size() == names.size());
    for (std::size_t k = 0; k < shadow.size(); ++k) {
      CHECK(shadow[k].name == names[k]);
      CHECK(shadow[k].grad == nullptr);
      CHECK(host_copy<T, B>(shadow[k].value, shadow[k].size()) == host_copy<T, B>(find(params, names[k])->value, shadow[k].size()));
    }

    const double decays[4] = {0.9, 0.9, 0.5, 0.9};
    for (int s = 0; s < 4; ++s) {
      model.set_values(300 + 10 * static_cast<std::uint64_t>(s));
      if (s == 2)
        avg.update(0.5);
      else
        avg.update();
      for (std::size_t k = 0; k < ref.size(); ++k) {
        const auto v = as_double(host_copy<T, B>(find(params, names[k])->value, static_cast<index_t>(ref[k].size())));
        for (std::size_t i = 0; i < v.size(); ++i) ref[k][i] = decays[s] * ref[k][i] + (1 - decays[s]) * v[i];
      }
    }
    for (std::size_t k = 0; k < ref.size(); ++k) {
      INFO(names[k]);
      check_close(host_copy<T, B>(shadow[k].value, shadow[k].size()), ref[k], promoe_test::tolerance<T>(), "shadow");
    }

    // copy_to: another model with the same names receives the averages.
    toy_model<T, B> other(77);
    auto other_params = other.named();
    const auto other_buffer = host_copy<T, B>(find(other_params, "pos_embed")->value, 24);
    avg.copy_to(other_params);
    for (std::size_t k = 0; k < shadow.size(); ++k)
      CHECK(host_copy<T, B>(find(other_params, names[k])->value, shadow[k].size()) ==
            host_copy<T, B>(shadow[k].value, shadow[k].size()));
    if (!buffers) CHECK(host_copy<T, B>(find(other_params, "pos_embed")->value, 24) == other_buffer);

    // swap twice restores both sides bitwise; in between the live model holds the averages.
    std::vector<std::vector<T>> live_before, shadow_before;
    for (std::size_t k = 0; k < shadow.size(); ++k) {
      live_before.push_back(host_copy<T, B>(find(params, names[k])->value, shadow[k].size()));
      shadow_before.push_back(host_copy<T, B>(shadow[k].value, shadow[k].size()));
    }
    avg.swap(params);
    for (std::size_t k = 0; k < shadow.size(); ++k) {
      CHECK(host_copy<T, B>(find(params, names[k])->value, shadow[k].size()) == shadow_before[k]);
      CHECK(host_copy<T, B>(shadow[k].value, shadow[k].size()) == live_before[k]);
    }
    avg.swap(params);
    for (std::size_t k = 0; k < shadow.size(); ++k) {
      CHECK(host_copy<T, B>(find(params, names[k])->value, shadow[k].size()) == live_before[k]);
      CHECK(host_copy<T, B>(shadow[k].value, shadow[k].size()) == shadow_before[k]);
    }

    // decay 1 keeps, decay 0 copies, reset copies.
    model.set_values(999);
    avg.update(1.0);
    for (std::size_t k = 0; k < shadow.size(); ++k)
      CHECK(host_copy<T, B>(shadow[k].value, shadow[k].size()) == shadow_before[k]);
    avg.update(0.0);
    for (std::size_t k = 0; k < shadow.size(); ++k)
      CHECK(host_copy<T, B>(shadow[k].value, shadow[k].size()) ==
            host_copy<T, B>(find(params, names[k])->value, shadow[k].size()));
    model.set_values(1999);
    avg.reset();
    for (std::size_t k = 0; k < shadow.size(); ++k)
      CHECK(host_copy<T, B>(shadow[k].value, shadow[k].size()) ==
            host_copy<T, B>(find(params, names[k])->value, shadow[k].size()));
  }
}

TEMPLATE_LIST_TEST_CASE("ema rejects bad decays and mismatched targets", "[optim][ema][errors]", test_backends) {
  using B = TestType;
  toy_model<double, B> model(1);
  auto params = model.named();
  using E = promoe::optim::ema<double, B>;
  CHECK_THROWS_AS(E(params, 1.5), promoe::error);
  CHECK_THROWS_AS(E(params, -0.1), promoe::error);
  CHECK_THROWS_AS(E(params, std::numeric_limits<double>::quiet_NaN()), promoe::error);
  E avg(params);
  CHECK(avg.decay() == 0.9999);
  CHECK(avg.tracked().size() == num_with_grad(params));
  CHECK_THROWS_AS(avg.update(2.0), promoe::error);
  CHECK_THROWS_AS(avg.set_decay(-1.0), promoe::error);

  auto missing = params;
  missing.erase(missing.begin() + 1);
  CHECK_THROWS_WITH(avg.copy_to(missing), Catch::Contains("blocks.0.mlp.fc1.weight"));
  auto reshaped = params;
  reshaped[2].shape = {1, 37};
  CHECK_THROWS_WITH(avg.swap(reshaped), Catch::Contains("shape"));
  auto dup = params;
  dup.push_back(params[0]);
  CHECK_THROWS_WITH(E(dup), Catch::Contains("twice"));
}

// ---------------------------------------------------------------------------
// Gradient clipping
// ---------------------------------------------------------------------------

TEMPLATE_LIST_TEST_CASE("clip_grad_norm matches torch.nn.utils.clip_grad_norm_ semantics", "[optim][clip]", test_configs) {
  using B = typename TestType::backend;
  using T = typename TestType::scalar;
  toy_model<T, B> model(31);
  auto params = model.named();

  const auto grads_of = [&] {
    std::vector<std::vector<T>> out;
    for (const auto& p : params) out.push_back(p.grad ? host_copy<T, B>(p.grad, p.size()) : std::vector<T>{});
    return out;
  };
  const auto naive_norm = [&] {
    double s = 0;
    for (const auto& g : grads_of())
      for (T v : g) s += static_cast<double>(v) * static_cast<double>(v);
    return std::sqrt(s);
  };

  model.set_grads(400, 0.3);
  const double norm = naive_norm();
  REQUIRE(norm > 1.0);

  // The norm alone, deterministic.
  const double n1 = promoe::optim::grad_norm<T, B>(params);
  CHECK(n1 == promoe::optim::grad_norm<T, B>(params));
  CHECK(std::abs(n1 - norm) <= 1e-13 * norm);

  // No clip: max_norm above the norm leaves the gradients bitwise untouched.
  auto before = grads_of();
  CHECK(std::abs(promoe::optim::clip_grad_norm<T, B>(params, 2 * norm) - norm) <= 1e-13 * norm);
  CHECK(grads_of() == before);
  CHECK(promoe::optim::clip_grad_norm<T, B>(params, std::numeric_limits<double>::infinity()) == n1);
  CHECK(grads_of() == before);

  // Clip: every gradient times max_norm / (norm + 1e-6).
  const double max_norm = norm / 4;
  const double total = promoe::optim::clip_grad_norm<T, B>(params, max_norm);
  CHECK(std::abs(total - norm) <= 1e-13 * norm);
  const double coef = max_norm / (norm + 1e-6);
  const auto after = grads_of();
  for (std::size_t k = 0; k < after.size(); ++k) {
    std::vector<double> want;
    for (T v : before[k]) want.push_back(static_cast<double>(v) * coef);
    check_close(after[k], want, promoe_test::tolerance<T>(), params[k].name);
  }
  CHECK(std::abs(naive_norm() - max_norm * norm / (norm + 1e-6)) <= promoe_test::tolerance<T>() * max_norm);

  // PyTorch's rule clips whenever max_norm / (norm + 1e-6) < 1: a quarter-strength clip, and
  // max_norm equal to the norm (a factor within 1e-6 of 1) both scale by exactly that factor.
  for (double fraction : {0.75, 1.0}) {
    INFO("max_norm = " << fraction << " * norm");
    model.set_grads(500, 0.3);
    const auto g0 = grads_of();
    const double n0 = promoe::optim::grad_norm<T, B>(params);
    const double m = fraction * n0;
    CHECK(promoe::optim::clip_grad_norm<T, B>(params, m) == n0);
    const T c = static_cast<T>(m / (n0 + 1e-6));
    REQUIRE(c < T(1));
    const auto g1 = grads_of();
    bool exact = true;
    for (std::size_t k = 0; k < g0.size(); ++k)
      for (std::size_t i = 0; i < g0[k].size(); ++i) exact = exact && g1[k][i] == g0[k][i] * c;
    CHECK(exact);
  }

  // No gradients at all: 0.
  CHECK(promoe::optim::clip_grad_norm<T, B>(std::vector<named_parameter<T>>{}, 1.0) == 0.0);
  CHECK_THROWS_AS((promoe::optim::clip_grad_norm<T, B>(params, 0.0)), promoe::error);
  CHECK_THROWS_AS((promoe::optim::clip_grad_norm<T, B>(params, std::numeric_limits<double>::quiet_NaN())),
                  promoe::error);
}

TEMPLATE_LIST_TEST_CASE("clip_grad_norm names NaN and Inf gradients", "[optim][clip][errors]", test_configs) {
  using B = typename TestType::backend;
  using T = typename TestType::scalar;
  for (T bad : {std::numeric_limits<T>::quiet_NaN(), -std::numeric_limits<T>::infinity()}) {
    toy_model<T, B> model(41);
    model.set_grads(600, 100.0);
    auto params = model.named();
    const auto* bias = find(params, "blocks.0.mlp.fc1.bias");
    const auto* fc1 = find(params, "blocks.0.mlp.fc1.weight");
    promoe::backend_traits<B>::copy_from_host(&bad, 1, bias->grad + 5);
    promoe::backend_traits<B>::copy_from_host(&bad, 1, fc1->grad + 1234);
    const auto qkv_before = host_copy<T, B>(params[0].grad, params[0].size());
    CHECK(!std::isfinite(promoe::optim::grad_norm<T, B>(params)));
    // fc1.weight comes first in the list, so it is the one named.
    CHECK_THROWS_WITH((promoe::optim::clip_grad_norm<T, B>(params, 1e-3)),
                      Catch::Contains("NaN/Inf") && Catch::Contains("'blocks.0.mlp.fc1.weight'") &&
                          Catch::Contains("index 1234"));
    CHECK(host_copy<T, B>(params[0].grad, params[0].size()) == qkv_before);
  }
}

TEMPLATE_LIST_TEST_CASE("queue_clip_grad_norm scales as clip_grad_norm does and counts non-finite norms",
                        "[optim][clip]", test_configs) {
  using B = typename TestType::backend;
  using T = typename TestType::scalar;
  toy_model<T, B> host_side(31), queued_side(31);
  auto hp = host_side.named(), qp = queued_side.named();
  const auto grads_of = [](const std::vector<named_parameter<T>>& params) {
    std::vector<std::vector<T>> out;
    for (const auto& p : params) out.push_back(p.grad ? host_copy<T, B>(p.grad, p.size()) : std::vector<T>{});
    return out;
  };
  promoe::optim::grad_norm_workspace<B> w;
  CHECK(w.read_record().last_norm == 0.0);  // nothing queued yet
  std::uint64_t seed = 400;
  for (double fraction : {2.0, 0.25, 1.0, 0.999}) {
    INFO("max_norm = " << fraction << " * norm");
    host_side.set_grads(seed, 0.3);
    queued_side.set_grads(seed++, 0.3);
    const double norm = promoe::optim::grad_norm<T, B>(hp);
    const double n1 = promoe::optim::clip_grad_norm<T, B>(hp, fraction * norm);
    promoe::optim::queue_clip_grad_norm<T, B>(qp, fraction * norm, w);
    const auto record = w.read_record();
    CHECK(record.last_norm == n1);  // the same chunks, summed in the same order
    CHECK(record.non_finite_calls == 0);
    CHECK(grads_of(qp) == grads_of(hp));  // bit for bit: scaled, or (2x) untouched
  }
  // A NaN: the gradients are left as they are and the call is counted, not thrown.
  queued_side.set_grads(600, 100.0);
  const T nan = std::numeric_limits<T>::quiet_NaN();
  promoe::backend_traits<B>::copy_from_host(&nan, 1, find(qp, "blocks.0.mlp.fc1.bias")->grad + 5);
  const auto first_before = host_copy<T, B>(qp[0].grad, qp[0].size());
  promoe::optim::queue_clip_grad_norm<T, B>(qp, 1e-3, w);
  auto record = w.read_record();
  CHECK(!std::isfinite(record.last_norm));
  CHECK(record.non_finite_calls == 1);
  CHECK(host_copy<T, B>(qp[0].grad, qp[0].size()) == first_before);
  // The count stays until the workspace is replaced; a later finite call updates the norm.
  queued_side.set_grads(601, 0.3);
  promoe::optim::queue_clip_grad_norm<T, B>(qp, 1e-3, w);
  record = w.read_record();
  CHECK(std::isfinite(record.last_norm));
  CHECK(record.non_finite_calls == 1);
  // No gradients at all: norm 0; bad max_norm throws before anything is queued.
  promoe::optim::grad_norm_workspace<B> empty;
  promoe::optim::queue_clip_grad_norm<T, B>(std::vector<named_parameter<T>>{}, 1.0, empty);
  CHECK(empty.read_record().last_norm == 0.0);
  CHECK_THROWS_AS((promoe::optim::queue_clip_grad_norm<T, B>(qp, 0.0, w)), promoe::error);
}

// ---------------------------------------------------------------------------
// Learning-rate schedule
// ---------------------------------------------------------------------------

TEST_CASE("schedule: linear warm-up, then constant or cosine to a floor", "[optim][schedule]") {
  using promoe::optim::schedule;
  const schedule dit;  // DiT: 1e-4, no warm-up
  CHECK(dit.lr_at(0) == 1e-4);
  CHECK(dit.lr_at(400000) == 1e-4);
  CHECK_FALSE(dit.is_cosine());

  const schedule warm(2e-4, 4);
  CHECK(warm.lr_at(0) == Approx(0.5e-4).epsilon(1e-15));
  CHECK(warm.lr_at(1) == Approx(1e-4).epsilon(1e-15));
  CHECK(warm.lr_at(2) == Approx(1.5e-4).epsilon(1e-15));
  CHECK(warm.lr_at(3) == 2e-4);
  CHECK(warm.lr_at(4) == 2e-4);
  CHECK(warm.lr_at(1000000) == 2e-4);
  CHECK(warm.warmup_steps() == 4);
  CHECK(warm.base_lr() == 2e-4);

  const auto cos = schedule::cosine(1.0, 2, 10, 0.1);
  CHECK(cos.is_cosine());
  CHECK(cos.total_steps() == 10);
  CHECK(cos.min_lr() == 0.1);
  CHECK(cos.lr_at(0) == 0.5);
  CHECK(cos.lr_at(1) == 1.0);
  CHECK(cos.lr_at(2) == 1.0);
  CHECK(cos.lr_at(6) == Approx(0.55).epsilon(1e-14));  // halfway
  CHECK(cos.lr_at(4) == Approx(0.1 + 0.9 * 0.5 * (1 + std::cos(std::numbers::pi / 4))).epsilon(1e-14));
  CHECK(cos.lr_at(10) == 0.1);
  CHECK(cos.lr_at(11) == 0.1);
  CHECK(cos.lr_at(1000) == 0.1);
  for (index_t s = 2; s < 10; ++s) CHECK(cos.lr_at(s + 1) < cos.lr_at(s));
  const auto to_zero = schedule::cosine(3e-4, 0, 100);
  CHECK(to_zero.lr_at(0) == 3e-4);
  CHECK(to_zero.lr_at(100) == 0.0);
  CHECK(to_zero.lr_at(99) > 0.0);

  CHECK_THROWS_AS(schedule(0.0), promoe::error);
  CHECK_THROWS_AS(schedule(-1e-4), promoe::error);
  CHECK_THROWS_AS(schedule(std::numeric_limits<double>::quiet_NaN()), promoe::error);
  CHECK_THROWS_AS(schedule(1e-4, -1), promoe::error);
  CHECK_THROWS_WITH(schedule::cosine(1e-4, 10, 10), Catch::Contains("total_steps"));
  CHECK_THROWS_WITH(schedule::cosine(1e-4, 0, 10, 2e-4), Catch::Contains("min_lr"));
  CHECK_THROWS_AS(schedule::cosine(1e-4, 0, 10, -1.0), promoe::error);
  CHECK_THROWS_AS(dit.lr_at(-1), promoe::error);
}
