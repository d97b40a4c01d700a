// SPDX-License-Identifier: Apache-2.0
/// \file test_routing.cpp
/// \brief dispatch_plan grouping, the routing kernels (gather, combine, combine_backward,
/// scatter_rows) against float64 loops, and router::top_k's selection (ties, ordering,
/// scores, renormalisation) through its impl, on every backend.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <string>
#include <type_traits>
#include <vector>

#include <catch2/catch.hpp>

#include <promoe/core/bf16.hpp>
#include <promoe/core/rng.hpp>
#include <promoe/router/selection.hpp>
#include <promoe/router/top_k.hpp>
#include <promoe/routing/dispatch_plan.hpp>

#include "backends.hpp"

using promoe::index_t;

namespace {

/// What group() must produce, computed by brute force on the host.
struct naive_plan {
  std::vector<index_t> offsets, row_slot, slot_row, counts;
};

naive_plan plan_of(const std::vector<std::int32_t>& slot_expert, index_t experts) {
  naive_plan p;
  p.slot_row.assign(slot_expert.size(), -1);
  p.offsets.push_back(0);
  for (index_t e = 0; e < experts; ++e) {
    for (std::size_t s = 0; s < slot_expert.size(); ++s)
      if (slot_expert[s] == e) {
        p.slot_row[s] = static_cast<index_t>(p.row_slot.size());
        p.row_slot.push_back(static_cast<index_t>(s));
      }
    p.offsets.push_back(static_cast<index_t>(p.row_slot.size()));
    p.counts.push_back(p.offsets[e + 1] - p.offsets[e]);
  }
  return p;
}

/// Fills a plan from host slot arrays and groups it.
template <class T, class B>
void make_plan(promoe::dispatch_plan<T, B>& plan, index_t tokens, index_t slots, index_t experts,
               const std::vector<std::int32_t>& slot_expert, const std::vector<T>& slot_gate) {
  plan.reset(tokens, slots, experts);
  REQUIRE(plan.slot_expert.size() == tokens * slots);
  REQUIRE(plan.slot_gate.size() == tokens * slots);
  promoe::backend_traits<B>::copy_from_host(slot_expert.data(), tokens * slots, plan.slot_expert.data());
  promoe::backend_traits<B>::copy_from_host(slot_gate.data(), tokens * slots, plan.slot_gate.data());
  plan.group();
}

/// Largest |got - want| / max(1, |want|).
template <class T>
double max_rel_err(const std::vector<T>& got, const std::vector<double>& want) {
  REQUIRE(got.size() == want.size());
  double worst = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double g = static_cast<double>(got[i]);
    const double e = std::isfinite(g) ? std::abs(g - want[i]) / std::max(1.0, std::abs(want[i]))
                                      : std::numeric_limits<double>::infinity();
    worst = std::max(worst, e);
  }
  return worst;
}

struct plan_case {
  std::string name;
  index_t tokens, slots, experts;
  std::vector<std::int32_t> slot_expert;
};

std::vector<plan_case> plan_cases() {
  std::vector<plan_case> cases;
  // Empty slots (-1) and an expert (1) with no tokens; expert 3 only in the last token.
  cases.push_back({"hand-made", 6, 2, 4, {0, 2, 2, -1, -1, -1, 0, 2, 2, 0, 3, -1}});
  // Every token to one expert (the other experts empty).
  cases.push_back({"all tokens to one expert", 9, 1, 3, std::vector<std::int32_t>(9, 2)});
  // Every slot empty.
  cases.push_back({"all slots empty", 4, 2, 3, std::vector<std::int32_t>(8, -1)});
  // No tokens at all.
  cases.push_back({"no tokens", 0, 2, 3, {}});
  // Random experts and empty slots (a token may name an expert twice: two rows).
  plan_case r{"random", 57, 3, 7, {}};
  for (index_t i = 0; i < r.tokens * r.slots; ++i) {
    const double u = promoe::rng::uniform(5, 0, static_cast<std::uint64_t>(i));
    r.slot_expert.push_back(u < 0.15 ? -1 : static_cast<std::int32_t>(promoe::rng::uniform(5, 1, i) * 7));
  }
  cases.push_back(r);
  return cases;
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("dispatch_plan::group matches a brute-force grouping", "[routing][plan]", test_configs) {
  using B = typename TestType::backend;
  using T = typename TestType::scalar;
  for (const auto& pc : plan_cases()) {
    INFO("case: " << pc.name);
    const auto gates = random_vector<T>(pc.slot_expert.size(), 3);
    promoe::dispatch_plan<T, B> plan;
    make_plan(plan, pc.tokens, pc.slots, pc.experts, pc.slot_expert, gates);
    const auto want = plan_of(pc.slot_expert, pc.experts);
    CHECK(plan.tokens == pc.tokens);
    CHECK(plan.slots_per_token == pc.slots);
    CHECK(plan.experts == pc.experts);
    CHECK(plan.host_offsets == want.offsets);
    CHECK(plan.offsets.to_host() == want.offsets);
    CHECK(plan.rows() == static_cast<index_t>(want.row_slot.size()));
    CHECK(plan.row_slot.size() == plan.rows());
    CHECK(plan.row_slot.to_host() == want.row_slot);
    CHECK(plan.slot_row.to_host() == want.slot_row);
    CHECK(plan.counts() == want.counts);
    for (index_t e = 0; e < pc.experts; ++e) CHECK(plan.expert_rows(e) == want.counts[e]);
    // group() leaves the slots as they were.
    CHECK(plan.slot_expert.to_host() == pc.slot_expert);
    CHECK(plan.slot_gate.to_host() == gates);
  }
}

TEMPLATE_LIST_TEST_CASE("dispatch_plan is reusable across batch sizes", "[routing][plan]", test_configs) {
  using B = typename TestType::backend;
  using T = typename TestType::scalar;
  promoe::dispatch_plan<T, B> plan;
  // Large batch, then a small one, then an empty one: nothing stale may survive.
  const auto cases = plan_cases();
  for (const std::size_t i : {std::size_t{4}, std::size_t{0}, std::size_t{3}, std::size_t{1}, std::size_t{4}}) {
    const auto& pc = cases[i];
    INFO("case: " << pc.name);
    make_plan(plan, pc.tokens, pc.slots, pc.experts, pc.slot_expert, std::vector<T>(pc.slot_expert.size(), T(1)));
    const auto want = plan_of(pc.slot_expert, pc.experts);
    CHECK(plan.host_offsets == want.offsets);
    CHECK(plan.row_slot.to_host() == want.row_slot);
    CHECK(plan.slot_row.to_host() == want.slot_row);
  }
  // reset() empties every slot.
  plan.reset(3, 2, 4);
  CHECK(plan.slot_expert.to_host() == std::vector<std::int32_t>(6, -1));
  CHECK(plan.slot_gate.to_host() == std::vector<T>(6, T(0)));
}

TEMPLATE_LIST_TEST_CASE("gather, combine, combine_backward, scatter_rows against float64 loops", "[routing][kernels]",
                        test_configs) {
  using B = typename TestType::backend;
  using T = typename TestType::scalar;
  using promoe::const_matrix_view;
  using promoe::matrix_view;
  const double tol = promoe_test::tolerance<T>();
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const index_t d = 5;
  for (const auto& pc : plan_cases()) {
    INFO("case: " << pc.name);
    const index_t n = pc.tokens, slots = pc.slots, ns = n * slots;
    const auto gates = random_vector<T>(static_cast<std::size_t>(ns), 17, 2.0);
    promoe::dispatch_plan<T, B> plan;
    make_plan(plan, n, slots, pc.experts, pc.slot_expert, gates);
    const auto p = plan_of(pc.slot_expert, pc.experts);
    const index_t rows = plan.rows();

    // gather: xp[r] = x[token of r]
    const auto hx = random_vector<T>(static_cast<std::size_t>(n * d), 21);
    auto x = to_device<B>(hx, {n, d});
    auto xp = to_device<B>(std::vector<T>(static_cast<std::size_t>(rows * d), nan), {rows, d});
    promoe::routing::gather<B>(plan, const_matrix_view<T>{x.data(), n, d}, matrix_view<T>{xp.data(), rows, d});
    {
      std::vector<double> want;
      for (index_t r = 0; r < rows; ++r)
        for (index_t j = 0; j < d; ++j) want.push_back(hx[(p.row_slot[r] / slots) * d + j]);
      CHECK(max_rel_err(xp.to_host(), want) == 0.0);
    }

    // combine: y[t] (+)= sum over t's filled slots of gate * yp[row]
    const auto hyp = random_vector<T>(static_cast<std::size_t>(rows * d), 22);
    auto yp = to_device<B>(hyp, {rows, d});
    const auto hy0 = random_vector<T>(static_cast<std::size_t>(n * d), 23);
    for (const bool accumulate : {false, true}) {
      INFO("accumulate = " << accumulate);
      std::vector<T> start = hy0;
      if (!accumulate) std::fill(start.begin(), start.end(), nan);  // overwritten, NaN included
      auto y = to_device<B>(start, {n, d});
      promoe::routing::combine<B>(plan, const_matrix_view<T>{yp.data(), rows, d}, matrix_view<T>{y.data(), n, d},
                                  accumulate);
      std::vector<double> want(static_cast<std::size_t>(n * d), 0.0);
      for (index_t t = 0; t < n; ++t)
        for (index_t j = 0; j < d; ++j) {
          double acc = accumulate ? static_cast<double>(hy0[t * d + j]) : 0.0;
          for (index_t s = 0; s < slots; ++s) {
            const index_t r = p.slot_row[t * slots + s];
            if (r >= 0) acc += static_cast<double>(gates[t * slots + s]) * hyp[r * d + j];
          }
          want[t * d + j] = acc;
        }
      CHECK(max_rel_err(y.to_host(), want) <= tol);
    }

    // combine_backward: dyp[r] = gate * dy[t]; dgate[slot] = <dy[t], yp[r]>, 0 for empty slots
    const auto hdy = random_vector<T>(static_cast<std::size_t>(n * d), 24);
    auto dy = to_device<B>(hdy, {n, d});
    auto dyp = to_device<B>(std::vector<T>(static_cast<std::size_t>(rows * d), nan), {rows, d});
    auto dgate = to_device<B>(std::vector<T>(static_cast<std::size_t>(ns), nan), {ns});
    promoe::routing::combine_backward<B>(plan, const_matrix_view<T>{dy.data(), n, d},
                                         const_matrix_view<T>{yp.data(), rows, d}, matrix_view<T>{dyp.data(), rows, d},
                                         dgate.data());
    {
      std::vector<double> want_dyp, want_dgate(static_cast<std::size_t>(ns), 0.0);
      for (index_t r = 0; r < rows; ++r) {
        const index_t s = p.row_slot[r], t = s / slots;
        double dot = 0;
        for (index_t j = 0; j < d; ++j) {
          want_dyp.push_back(static_cast<double>(gates[s]) * hdy[t * d + j]);
          dot += static_cast<double>(hdy[t * d + j]) * hyp[r * d + j];
        }
        want_dgate[s] = dot;
      }
      CHECK(max_rel_err(dyp.to_host(), want_dyp) <= tol);
      CHECK(max_rel_err(dgate.to_host(), want_dgate) <= tol);
    }

    // scatter_rows: dx[t] (+)= sum over t's filled slots of dxp[row]
    const auto hdxp = random_vector<T>(static_cast<std::size_t>(rows * d), 25);
    auto dxp = to_device<B>(hdxp, {rows, d});
    for (const bool accumulate : {false, true}) {
      INFO("accumulate = " << accumulate);
      std::vector<T> start = hy0;
      if (!accumulate) std::fill(start.begin(), start.end(), nan);
      auto dx = to_device<B>(start, {n, d});
      promoe::routing::scatter_rows<B>(plan, const_matrix_view<T>{dxp.data(), rows, d},
                                       matrix_view<T>{dx.data(), n, d}, accumulate);
      std::vector<double> want(static_cast<std::size_t>(n * d), 0.0);
      for (index_t t = 0; t < n; ++t)
        for (index_t j = 0; j < d; ++j) {
          double acc = accumulate ? static_cast<double>(hy0[t * d + j]) : 0.0;
          for (index_t s = 0; s < slots; ++s) {
            const index_t r = p.slot_row[t * slots + s];
            if (r >= 0) acc += hdxp[r * d + j];
          }
          want[t * d + j] = acc;
        }
      CHECK(max_rel_err(dx.to_host(), want) <= tol);
    }
  }
}

// ---------------------------------------------------------------------------
// router::top_k selection
// ---------------------------------------------------------------------------

namespace {

template <class T>
struct routed {
  std::vector<std::int32_t> expert;  // [tokens, k]
  std::vector<T> gate;               // [tokens, k]
  std::vector<T> logits, scores;     // [tokens, E]
  std::vector<index_t> offsets;
};

/// Runs top_k::impl<T, B>::forward with gate weight w [E, D] on x [tokens, D].
template <class B, class T>
routed<T> route(const promoe::router::top_k::options& o, index_t experts, index_t dim, const std::vector<T>& w,
                const std::vector<T>& hx) {
  promoe::rng gen(1);
  promoe::router::top_k::impl<T, B> r(o, promoe::router_layout{dim, experts, 0}, gen);
  REQUIRE(r.slots_per_token() == o.k);
  int found = 0;
  r.for_each_parameter([&](const promoe::named_parameter<T>& p) {
    REQUIRE(p.name == "gate.weight");
    REQUIRE(p.shape == std::vector<index_t>{experts, dim});
    promoe::backend_traits<B>::copy_from_host(w.data(), p.size(), p.value);
    ++found;
  });
  REQUIRE(found == 1);
  const auto tokens = static_cast<index_t>(hx.size()) / dim;
  auto x = to_device<B>(hx, {tokens, dim});
  typename promoe::router::top_k::impl<T, B>::cache c;
  promoe::dispatch_plan<T, B> plan;
  r.forward(promoe::route_input<T>{x.cmatrix(), {}, tokens, true}, c, plan);
  REQUIRE(plan.tokens == tokens);
  REQUIRE(plan.slots_per_token == o.k);
  REQUIRE(plan.rows() == tokens * o.k);  // top-k fills every slot
  return {plan.slot_expert.to_host(), plan.slot_gate.to_host(), c.logits.to_host(), c.scores.to_host(),
          plan.host_offsets};
}

/// Scores of one token's logits in float64.
std::vector<double> scores_of(promoe::score_fn f, const std::vector<double>& z) {
  std::vector<double> p(z.size());
  if (f == promoe::score_fn::softmax) {
    const double m = *std::max_element(z.begin(), z.end());
    double s = 0;
    for (std::size_t e = 0; e < z.size(); ++e) s += p[e] = std::exp(z[e] - m);
    for (double& v : p) v /= s;
  } else if (f == promoe::score_fn::sigmoid) {
    for (std::size_t e = 0; e < z.size(); ++e) p[e] = 1.0 / (1.0 + std::exp(-z[e]));
  } else {
    p = z;
  }
  return p;
}

/// Indices of the k largest values, highest first, ties to the lower index.
template <class T>
std::vector<std::int32_t> top_indices(const T* p, index_t experts, index_t k) {
  std::vector<std::int32_t> idx(static_cast<std::size_t>(experts));
  for (index_t e = 0; e < experts; ++e) idx[e] = static_cast<std::int32_t>(e);
  std::stable_sort(idx.begin(), idx.end(), [&](std::int32_t a, std::int32_t b) { return p[a] > p[b]; });
  idx.resize(static_cast<std::size_t>(k));
  return idx;
}

const promoe::score_fn all_scores[] = {promoe::score_fn::softmax, promoe::score_fn::sigmoid,
                                       promoe::score_fn::identity};

}  // namespace

TEMPLATE_LIST_TEST_CASE("top_k: exact ties go to the lower expert, slots ordered by score", "[routing][top_k]",
                        test_configs) {
  using B = typename TestType::backend;
  using T = typename TestType::scalar;
  // D = 2, E = 4; gate rows (1, 0), (0, 1), (1, 0), (0.5, 0.5): logits (a, b, a, (a + b) / 2),
  // exact in binary, so experts 0 and 2 always tie, and all four tie when a = b.
  const index_t dim = 2, experts = 4;
  const std::vector<T> w{T(1), T(0), T(0), T(1), T(1), T(0), T(0.5), T(0.5)};
  const std::vector<T> x{T(1), T(1),    // all tie:            0 1 2 3
                         T(2), T(1),    // (2, 1, 2, 1.5):     0 2 3 1
                         T(1), T(3),    // (1, 3, 1, 2):       1 3 0 2
                         T(-1), T(0),   // (-1, 0, -1, -0.5):  1 3 0 2
                         T(0), T(-2)};  // (0, -2, 0, -1):     0 2 3 1
  const std::vector<std::vector<std::int32_t>> order{{0, 1, 2, 3}, {0, 2, 3, 1}, {1, 3, 0, 2}, {1, 3, 0, 2}, {0, 2, 3, 1}};
  for (const auto fn : all_scores)
    for (const index_t k : {index_t{1}, index_t{2}, experts}) {
      INFO("score " << fn << ", k = " << k);
      promoe::router::top_k::options o;
      o.k = k;
      o.score = fn;
      const auto got = route<B, T>(o, experts, dim, w, x);
      for (std::size_t t = 0; t < order.size(); ++t) {
        INFO("token " << t);
        const std::vector<std::int32_t> want(order[t].begin(), order[t].begin() + k);
        const std::vector<std::int32_t> have(got.expert.begin() + static_cast<index_t>(t) * k,
                                             got.expert.begin() + static_cast<index_t>(t + 1) * k);
        CHECK(have == want);
        // Tied experts have bit-identical scores and gates.
        CHECK(got.scores[t * experts + 0] == got.scores[t * experts + 2]);
        for (index_t s = 0; s < k; ++s)
          CHECK(got.gate[t * k + s] == got.scores[t * experts + static_cast<std::size_t>(want[s])]);
      }
    }
}

TEMPLATE_LIST_TEST_CASE("top_k: logits, scores, gates and renormalisation on random inputs", "[routing][top_k]",
                        test_configs) {
  using B = typename TestType::backend;
  using T = typename TestType::scalar;
  const double tol = promoe_test::tolerance<T>();
  const index_t dim = 5, experts = 6, tokens = 37;
  const auto w = random_vector<T>(static_cast<std::size_t>(experts * dim), 41);
  const auto x = random_vector<T>(static_cast<std::size_t>(tokens * dim), 42, 3.0);
  for (const auto fn : all_scores)
    for (const index_t k : {index_t{1}, index_t{2}, experts})
      for (const bool renorm : {false, true}) {
        if (renorm && fn == promoe::score_fn::identity) continue;  // rejected (test_errors)
        INFO("score " << fn << ", k = " << k << ", renormalize = " << renorm);
        promoe::router::top_k::options o;
        o.k = k;
        o.score = fn;
        o.renormalize = renorm;
        const auto got = route<B, T>(o, experts, dim, w, x);
        REQUIRE(got.logits.size() == static_cast<std::size_t>(tokens * experts));
        REQUIRE(got.scores.size() == static_cast<std::size_t>(tokens * experts));

        // logits = x W^T
        std::vector<double> want_logits;
        for (index_t t = 0; t < tokens; ++t)
          for (index_t e = 0; e < experts; ++e) {
            double z = 0;
            for (index_t j = 0; j < dim; ++j) z += static_cast<double>(x[t * dim + j]) * w[e * dim + j];
            want_logits.push_back(z);
          }
        CHECK(max_rel_err(got.logits, want_logits) <= tol);

        std::vector<double> want_scores, want_gates;
        std::vector<index_t> counts(static_cast<std::size_t>(experts), 0);
        bool order_ok = true, distinct_ok = true, sum_ok = true;
        for (index_t t = 0; t < tokens; ++t) {
          // scores from the router's own logits (so no tie can flip between precisions)
          std::vector<double> z(got.logits.begin() + t * experts, got.logits.begin() + (t + 1) * experts);
          const auto p = scores_of(fn, z);
          want_scores.insert(want_scores.end(), p.begin(), p.end());
          // selection on the router's own scores: exact
          const auto top = top_indices(got.scores.data() + t * experts, experts, k);
          double total = 0;
          for (index_t s = 0; s < k; ++s) total += p[static_cast<std::size_t>(top[s])];
          double gate_sum = 0;
          for (index_t s = 0; s < k; ++s) {
            const std::int32_t e = got.expert[t * k + s];
            order_ok = order_ok && e == top[s];
            for (index_t q = 0; q < s; ++q) distinct_ok = distinct_ok && got.expert[t * k + q] != e;
            ++counts[static_cast<std::size_t>(e)];
            const double g = p[static_cast<std::size_t>(top[s])];
            want_gates.push_back(renorm ? g / total : g);
            gate_sum += static_cast<double>(got.gate[t * k + s]);
          }
          if (renorm) sum_ok = sum_ok && std::abs(gate_sum - 1.0) <= 10 * tol;
          if (fn == promoe::score_fn::softmax)
            sum_ok = sum_ok && std::abs(std::accumulate(p.begin(), p.end(), 0.0) - 1.0) <= 1e-12;
        }
        CHECK(order_ok);
        CHECK(distinct_ok);
        CHECK(sum_ok);
        CHECK(max_rel_err(got.scores, want_scores) <= tol);
        CHECK(max_rel_err(got.gate, want_gates) <= tol);
        // The plan groups the chosen experts.
        std::vector<index_t> want_offsets{0};
        for (index_t e = 0; e < experts; ++e) want_offsets.push_back(want_offsets.back() + counts[e]);
        CHECK(got.offsets == want_offsets);
        if (k == experts) {
          // every expert in every token: slots are a permutation sorted by score
          for (index_t e = 0; e < experts; ++e) CHECK(counts[e] == tokens);
        }
      }
}

// ---------------------------------------------------------------------------
// select_top_in_groups against a stable sort on the host
// ---------------------------------------------------------------------------

namespace {

/// Scores on `levels` values (many exact ties, +0 and -0 among them), selected per group on
/// the backend and by a stable sort on the host: the same items and the same count-th score.
template <class B, class T>
void check_top_in_groups(const promoe::router::score_groups& groups, index_t total, index_t count,
                         std::uint64_t seed, int levels) {
  INFO("groups " << groups.groups << " of " << groups.size << ", count " << count << ", levels " << levels);
  std::vector<T> host(static_cast<std::size_t>(total));
  for (index_t i = 0; i < total; ++i) {
    const double u = std::floor(promoe::rng::uniform(seed, 0, static_cast<std::uint64_t>(i)) * levels);
    host[i] = static_cast<T>(u / levels - 0.5);
    if (i % 11 == 3) host[i] = static_cast<T>(-0.0);
  }
  // reference: each group sorted by score (descending, as doubles: -0 == +0), ties by index
  std::vector<std::uint8_t> want(static_cast<std::size_t>(total), 0);
  std::vector<T> want_kth;
  std::vector<index_t> items;
  for (index_t g = 0; g < groups.groups; ++g) {
    items.clear();
    for (index_t j = 0; j < groups.size; ++j) items.push_back(groups.flat(g, j));
    std::stable_sort(items.begin(), items.end(), [&](index_t a, index_t b) {
      return static_cast<double>(host[a]) > static_cast<double>(host[b]);
    });
    const index_t taken = std::min(count, groups.size);
    for (index_t q = 0; q < taken; ++q) want[items[q]] = 1;
    want_kth.push_back(taken > 0 ? host[items[taken - 1]] : static_cast<T>(-std::numeric_limits<T>::infinity()));
  }
  const auto scores = promoe::tensor<T, B>::from_host(host, {total});
  promoe::tensor<std::uint8_t, B> selected({total});
  selected.fill(std::uint8_t{7});  // every item is written
  promoe::tensor<T, B> kth({groups.groups});
  promoe::router::top_in_groups_workspace<T, B> w;
  promoe::router::select_top_in_groups<B>(scores.data(), groups, count, selected.data(), kth.data(), w);
  CHECK(selected.to_host() == want);
  const auto got_kth = kth.to_host();
  for (index_t g = 0; g < groups.groups; ++g) {
    CAPTURE(g);
    CHECK(got_kth[g] == want_kth[g]);  // -inf when nothing is selected
  }
}

template <class B, class T>
void check_top_in_groups_shapes() {
  using promoe::router::score_groups;
  const index_t samples = 3, l = 50, e = 4;
  // per-sample expert choice: [samples * l, e], a group per (sample, expert)
  for (index_t count : {0, 1, 12, 50, 60})
    for (int levels : {5, 1000})
      check_top_in_groups<B, T>(score_groups{samples * e, l, e, e, l * e}, samples * l * e, count, 1, levels);
  // batch-level expert choice: 2500 tokens (three chunks), a group per expert
  for (index_t count : {0, 1, 625, 2500})
    for (int levels : {3, 100000})
      check_top_in_groups<B, T>(score_groups{e, 2500, e, e, 0}, 2500 * e, count, 2, levels);
  // Expert Race: one group of every score
  for (index_t count : {1, 1500, 3000})
    check_top_in_groups<B, T>(score_groups{1, 3000, 1, 1, 0}, 3000, count, 3, 7);
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("select_top_in_groups: the top scores of every group, ties to the lower index",
                        "[routing][selection]", test_configs) {
  check_top_in_groups_shapes<typename TestType::backend, typename TestType::scalar>();
  if constexpr (std::is_same_v<typename TestType::scalar, float>)
    check_top_in_groups_shapes<typename TestType::backend, promoe::bf16>();
}
