// SPDX-License-Identifier: Apache-2.0
/// \file moe_layer.hpp
/// \brief moe_layer: a Mixture-of-Experts feed-forward block composed from a router policy,
/// an expert policy, auxiliary-loss policies and a backend.
///
/// Forward (backward runs it in reverse and reuses the plan):
///   1. the router scores the tokens and fills the dispatch plan;
///   2. token rows are gathered into contiguous per-expert blocks;
///   3. each expert runs on its block (GEMMs on the block);
///   4. rows are scaled by their gates and summed back per token; shared experts see every
///      token and add in;
///   5. the auxiliary losses read the router's logits and the plan.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <span>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "backend/backend.hpp"
#include "backend/ops.hpp"
#include "backend/tensor.hpp"
#include "core/bf16.hpp"
#include "core/error.hpp"
#include "core/rng.hpp"
#include "core/view.hpp"
#include "expert/concept.hpp"
#include "expert/expert_rows.hpp"
#include "expert/naming.hpp"
#include "loss/concept.hpp"
#include "router/concept.hpp"
#include "router/conditional.hpp"
#include "routing/dispatch_plan.hpp"

namespace promoe {

/// Sizes of one MoE block. Routed and unconditional experts share one width and one bank
/// (ids 0..routed-1, then the unconditional ones); shared experts see every token.
struct moe_layout {
  index_t dim = 0;                    ///< D, token width
  index_t routed_experts = 0;         ///< experts the router chooses among
  index_t expert_hidden = 0;          ///< I of routed and unconditional experts
  index_t unconditional_experts = 0;  ///< experts of null-label samples (conditional routers)
  index_t shared_experts = 0;         ///< experts applied to every token
  index_t shared_hidden = 0;          ///< I of shared experts; 0 means expert_hidden
};

namespace detail {
template <class L>
constexpr bool needs_prototypes_v = requires { requires L::needs_prototypes; };
}  // namespace detail

template <RouterPolicy Router, ExpertPolicy Expert, class Losses = losses<>, Backend B = backend::cpu,
          class T = float, ExpertPolicy SharedExpert = Expert>
class moe_layer;

/// \tparam Router        router policy (router::top_k, ...)
/// \tparam Expert        expert policy of routed and unconditional experts (expert::mlp<act::gelu_tanh>, ...)
/// \tparam L...          auxiliary-loss policies (loss::load_balance, loss::z_loss)
/// \tparam B             backend tag (backend::cpu, backend::thrust)
/// \tparam T             float or double
/// \tparam SharedExpert  expert policy of shared experts (defaults to Expert)
template <RouterPolicy Router, ExpertPolicy Expert, LossPolicy... L, Backend B, class T, ExpertPolicy SharedExpert>
class moe_layer<Router, Expert, losses<L...>, B, T, SharedExpert> {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double> || std::is_same_v<T, bf16>,
                "moe_layer: T must be float, double or bf16");

 public:
  using scalar = T;
  using backend_type = B;
  using traits = backend_traits<B>;
  using router_impl = typename Router::template impl<T, B>;
  using expert_bank = typename Expert::template bank<T, B>;
  using shared_bank = typename SharedExpert::template bank<T, B>;
  static constexpr std::size_t num_losses = sizeof...(L);

 private:
  static_assert(sizeof...(L) == 0 ||
                    requires(router_impl& r, const route_input<T>& in, typename router_impl::cache& c,
                             const dispatch_plan<T, B>& p) {
                      { r.loss_view(in, c, p, true) } -> std::same_as<loss_input<T, B>>;
                    },
                "moe_layer: auxiliary losses need a router with loss_view(input, cache, plan, for_backward)");
  static_assert(((!detail::needs_prototypes_v<L> || router::detail::has_prototypes_v<router_impl>) && ...),
                "moe_layer: loss::routing_contrastive needs a router with prototypes (router::prototypical or "
                "router::promoe)");

 public:
  struct config : moe_layout {
    typename Router::options router{};
    std::tuple<typename L::options...> loss{};  ///< one options struct per loss, in order
    param_naming names = param_naming::promoe();
    /// Check inputs for NaN/Inf in release builds too (always on without NDEBUG).
    bool validate = false;
  };

  /// Everything backward needs from one training forward. The caller owns it; its buffers
  /// are reused by the next forward, so a steady batch size stops allocating.
  struct cache {
    index_t tokens = 0;
    bool ready = false;  ///< a forward filled it
    tensor<T, B> x;      ///< [tokens, D] the input
    std::vector<std::int64_t> labels;
    index_t tokens_per_sample = 0;
    typename router_impl::cache router;
    dispatch_plan<T, B> plan;
    tensor<T, B> xp;          ///< [rows, D] inputs in expert order
    tensor<T, B> act;         ///< [rows, cache_width] expert activations
    tensor<T, B> yp;          ///< [rows, D] expert outputs before gates
    tensor<T, B> shared_act;  ///< [shared, tokens, cache_width]
    std::tuple<typename L::template impl<T, B>::cache...> loss_caches;
    /// [losses] the weighted loss values, in device memory: read only when asked for
    /// (aux_loss, aux_losses), so a training step does not wait for them
    tensor<compute_t<T>, B> loss_values;
    // backward workspaces
    tensor<T, B> dyp, dxp, scratch, dgate, ones;
    // the experts' work as tasks: forward row tiles {expert, first row, rows}, backward
    // experts by decreasing rows
    std::vector<std::array<index_t, 3>> tiles;
    std::vector<index_t> expert_order;
  };

  /// Where tasks run one after another (a GPU) and the expert policy offers it, the experts
  /// run together: one grouped GEMM per stage for the whole bank. Elsewhere they run as tasks
  /// side by side (forward row tiles, backward one task per expert), which keeps each expert's
  /// operands in cache on the host.
  static constexpr bool grouped_experts =
      !traits::concurrent_tasks && requires(expert_bank& b, const expert::expert_rows& g, const_matrix_view<T> cv,
                                            matrix_view<T> v, const T* ones) {
        std::as_const(b).forward_grouped(g, cv, v, v);
        b.backward_grouped(g, cv, cv, cv, v, v, ones);
      };

  /// Rows per forward task where tasks run side by side: small enough to spread the experts
  /// over the threads, large enough for efficient GEMMs. Elsewhere one task per expert.
  static constexpr index_t tile_rows = traits::concurrent_tasks ? 256 : std::numeric_limits<index_t>::max();

  moe_layer(const config& cfg, rng& gen) : cfg_(checked(cfg)), router_(cfg.router, router_layout_of(cfg), gen),
        experts_(cfg.routed_experts + cfg.unconditional_experts, cfg.dim, cfg.expert_hidden),
        shared_(cfg.shared_experts, cfg.dim, shared_hidden(cfg)),
        losses_(make_losses(cfg, std::index_sequence_for<L...>{})) {
    experts_.init(gen);
    shared_.init(gen);
  }
  /// With a temporary generator: moe_layer block(cfg, rng{seed}).
  moe_layer(const config& cfg, rng&& gen) : moe_layer(cfg, gen) {}

  const config& cfg() const { return cfg_; }
  router_impl& router() { return router_; }
  const router_impl& router() const { return router_; }
  index_t dim() const { return cfg_.dim; }

  /// Training forward: y [tokens, D] = block(x [tokens, D]); labels per sample (may be
  /// empty when the router does not use them). Fills `c` for backward.
  void forward(const_matrix_view<T> x, std::span<const std::int64_t> labels, matrix_view<T> y, cache& c) {
    c.ready = false;
    const index_t spt = check_input("forward", x, labels, y);
    c.tokens = x.rows;
    c.labels.assign(labels.begin(), labels.end());
    c.tokens_per_sample = spt;
    c.loss_values.resize({static_cast<index_t>(num_losses)});
    c.loss_values.fill(compute_t<T>(0));
    c.x.resize({x.rows, cfg_.dim});
    ops::copy<B>(x, c.x.matrix());
    if (x.rows > 0) run(route_input<T>{c.x.cmatrix(), c.labels, spt, true}, c, y, true);
    c.ready = true;
  }

  /// Inference forward: no cache for backward, no loss statistics. Uses a workspace inside
  /// the layer, so one layer object must not run infer() from two threads at once.
  void infer(const_matrix_view<T> x, std::span<const std::int64_t> labels, matrix_view<T> y) {
    const index_t spt = check_input("infer", x, labels, y);
    if (x.rows == 0) return;
    const route_input<T> in{x, labels, spt, false};
    if constexpr (requires { router_.dense_expert(in); }) {
      // Classifier-free guidance's null batch: one expert on every token, gate 1, no router.
      if (const index_t e = router_.dense_expert(in); e >= 0) {
        auto& c = workspace_;
        c.act.resize({x.rows, Expert::cache_width(cfg_.expert_hidden)});
        experts_.forward(e, x, c.act.matrix(), y, false);
        run_shared(x, c, y);
        return;
      }
    }
    run(in, workspace_, y, false);
  }

  /// Backward: dx [tokens, D] (overwritten) from dy; parameter gradients accumulate. The
  /// auxiliary losses' gradients (each with weight 1 on its weighted value) are included.
  void backward(const_matrix_view<T> dy, cache& c, matrix_view<T> dx) {
    PROMOE_CHECK(c.ready, "moe_layer::backward: the cache holds no training forward");
    PROMOE_CHECK(dy.rows == c.tokens && dy.cols == cfg_.dim, "moe_layer::backward: dy has shape [", dy.rows, ", ",
                 dy.cols, "], expected [", c.tokens, ", ", cfg_.dim, "] (the forward's output shape)");
    PROMOE_CHECK(dx.rows == c.tokens && dx.cols == cfg_.dim, "moe_layer::backward: dx has shape [", dx.rows, ", ",
                 dx.cols, "], expected [", c.tokens, ", ", cfg_.dim, "]");
    if (c.tokens == 0) return;
    if (validating()) ops::check_finite<B>(dy, "moe_layer::backward: dy");
    const index_t n = c.tokens, d = cfg_.dim, rows = c.plan.rows();
    const index_t slots = c.plan.slots_per_token;
    const index_t h = cfg_.expert_hidden, hs = shared_hidden(cfg_);
    const route_input<T> in{c.x.cmatrix(), c.labels, c.tokens_per_sample, true};

    c.dyp.resize({rows, d});
    c.dxp.resize({rows, d});
    c.dgate.resize({n * slots});
    const index_t scratch_cols = std::max(Expert::scratch_width(h), SharedExpert::scratch_width(hs));
    c.scratch.resize({std::max(rows, n), scratch_cols});
    if (c.ones.size() < std::max(rows, n)) {
      c.ones.resize({std::max(rows, n)});
      c.ones.fill(T(1));
    }
    routing::combine_backward<B>(c.plan, dy, c.yp.cmatrix(), c.dyp.matrix(), c.dgate.data());
    const index_t cw = Expert::cache_width(h), sw = Expert::scratch_width(h);
    if constexpr (grouped_experts) {
      experts_.backward_grouped(expert_rows_of(c.plan), c.xp.cmatrix(), const_matrix_view<T>{c.act.data(), rows, cw},
                                c.dyp.cmatrix(), c.dxp.matrix(), matrix_view<T>{c.scratch.data(), rows, sw},
                                c.ones.data());
    } else {
      backward_expert_tasks(c, rows, cw, sw);
    }
    routing::scatter_rows<B>(c.plan, c.dxp.cmatrix(), dx, false);
    const index_t scw = SharedExpert::cache_width(hs), ssw = SharedExpert::scratch_width(hs);
    for (index_t s = 0; s < shared_.count(); ++s)
      shared_.backward(s, c.x.cmatrix(), const_matrix_view<T>{c.shared_act.data() + s * n * scw, n, scw}, dy, dx, true,
                       matrix_view<T>{c.scratch.data(), n, ssw}, c.ones.data());
    if constexpr (num_losses > 0) {
      const auto li = router_.loss_view(in, c.router, c.plan, true);
      backward_losses(li, c, std::index_sequence_for<L...>{});
    }
    router_.backward(in, c.router, c.plan, c.dgate.data(), dx);
  }

  /// Tensor conveniences: allocate and return the result.
  tensor<T, B> forward(const tensor<T, B>& x, std::span<const std::int64_t> labels, cache& c) {
    tensor<T, B> y({rows_of(x), cfg_.dim});
    forward(x.cmatrix(), labels, y.matrix(), c);
    return y;
  }
  tensor<T, B> infer(const tensor<T, B>& x, std::span<const std::int64_t> labels = {}) {
    tensor<T, B> y({rows_of(x), cfg_.dim});
    infer(x.cmatrix(), labels, y.matrix());
    return y;
  }
  tensor<T, B> backward(const tensor<T, B>& dy, cache& c) {
    tensor<T, B> dx({c.tokens, cfg_.dim});
    backward(dy.cmatrix(), c, dx.matrix());
    return dx;
  }

  /// Sum of the weighted auxiliary losses of the forward that filled `c`.
  /// Reads the values back from the device (a wait for it there).
  T aux_loss(const cache& c) const {
    compute_t<T> s = 0;
    for (compute_t<T> v : loss_values(c)) s += v;
    return static_cast<T>(s);
  }
  /// (name, weighted value) per auxiliary loss, in order.
  std::vector<std::pair<std::string, T>> aux_losses(const cache& c) const {
    std::vector<std::pair<std::string, T>> out;
    const auto values = loss_values(c);
    std::size_t i = 0;
    ((out.emplace_back(L::name, static_cast<T>(values[i++]))), ...);
    return out;
  }

  /// Every parameter by its PyTorch state-dict name: router, experts.{j} (routed, then
  /// unconditional), shared expert(s).
  std::vector<named_parameter<T>> parameters() {
    std::vector<named_parameter<T>> out;
    auto push = [&](named_parameter<T> p) { out.push_back(std::move(p)); };
    router_.for_each_parameter(push);
    for (index_t e = 0; e < experts_.count(); ++e)
      experts_.for_each_parameter(e, cfg_.names.routed_prefix(e), cfg_.names, push);
    for (index_t s = 0; s < shared_.count(); ++s)
      shared_.for_each_parameter(s, cfg_.names.shared_prefix(s, shared_.count()), cfg_.names, push);
    return out;
  }

  /// State that is saved with the parameters but not trained (grad is null): e.g. the
  /// inference thresholds of batch-level routers, named like parameters.
  std::vector<named_parameter<T>> buffers() {
    std::vector<named_parameter<T>> out;
    if constexpr (requires { router_.for_each_buffer([](named_parameter<T>) {}); })
      router_.for_each_buffer([&](named_parameter<T> p) { out.push_back(std::move(p)); });
    return out;
  }

  void zero_grad() {
    router_.zero_grad();
    experts_.zero_grad();
    shared_.zero_grad();
  }

 private:
  static const config& checked(const config& cfg) {
    PROMOE_CHECK(cfg.dim >= 1, "moe_layer: dim must be >= 1, got ", cfg.dim);
    PROMOE_CHECK(cfg.routed_experts >= 1, "moe_layer: routed_experts must be >= 1, got ", cfg.routed_experts);
    PROMOE_CHECK(cfg.expert_hidden >= 1, "moe_layer: expert_hidden must be >= 1, got ", cfg.expert_hidden);
    PROMOE_CHECK(cfg.unconditional_experts >= 0, "moe_layer: unconditional_experts must be >= 0, got ",
                 cfg.unconditional_experts);
    PROMOE_CHECK(cfg.shared_experts >= 0, "moe_layer: shared_experts must be >= 0, got ", cfg.shared_experts);
    PROMOE_CHECK(cfg.shared_hidden >= 0, "moe_layer: shared_hidden must be >= 0, got ", cfg.shared_hidden);
    return cfg;
  }
  static router_layout router_layout_of(const config& cfg) {
    return {cfg.dim, cfg.routed_experts, cfg.unconditional_experts};
  }
  static index_t shared_hidden(const config& cfg) { return cfg.shared_hidden ? cfg.shared_hidden : cfg.expert_hidden; }
  template <std::size_t... I>
  static std::tuple<typename L::template impl<T, B>...> make_losses(const config& cfg, std::index_sequence<I...>) {
    return {typename L::template impl<T, B>(std::get<I>(cfg.loss), router_layout_of(cfg))...};
  }
  static index_t rows_of(const tensor<T, B>& x) {
    PROMOE_CHECK(x.rank() == 2, "moe_layer: x must be a matrix [tokens, D], got shape ", detail::shape_string(x.shape()));
    return x.dim(0);
  }

  bool validating() const {
#ifdef NDEBUG
    return cfg_.validate;
#else
    return true;
#endif
  }

  /// Shapes, labels and (when validating) finiteness; returns tokens per sample.
  index_t check_input(const char* fn, const_matrix_view<T> x, std::span<const std::int64_t> labels,
                      matrix_view<T> y) const {
    PROMOE_CHECK(x.cols == cfg_.dim, "moe_layer::", fn, ": x has shape [", x.rows, ", ", x.cols,
                 "], expected [tokens, ", cfg_.dim, "] (dim = ", cfg_.dim, ")");
    PROMOE_CHECK(y.rows == x.rows && y.cols == cfg_.dim, "moe_layer::", fn, ": y has shape [", y.rows, ", ", y.cols,
                 "], expected [", x.rows, ", ", cfg_.dim, "]");
    index_t spt = x.rows;
    if (!labels.empty()) {
      const auto samples = static_cast<index_t>(labels.size());
      PROMOE_CHECK(x.rows % samples == 0, "moe_layer::", fn, ": ", x.rows, " tokens do not split into ", samples,
                   " samples (labels has ", samples, " entries)");
      spt = x.rows / samples;
    }
    if (validating() && x.rows > 0) {
      char what[64];  // the name of x, formatted without a heap allocation
      std::snprintf(what, sizeof what, "moe_layer::%s: x", fn);
      ops::check_finite<B>(x, what);
    }
    return spt;
  }

  template <std::size_t... I>
  void forward_losses(const loss_input<T, B>& li, cache& c, std::index_sequence<I...>) const {
    (forward_loss<I, L>(li, c), ...);
  }
  /// Loss I writes its value into c.loss_values[I] on the device; a loss that returns its
  /// value on the host has it copied there.
  template <std::size_t I, class Loss>
  void forward_loss(const loss_input<T, B>& li, cache& c) const {
    compute_t<T>* value = c.loss_values.data() + I;
    if constexpr (loss_writes_device_value<Loss, T, B>) {
      std::get<I>(losses_).forward(li, std::get<I>(c.loss_caches), value);
    } else {
      const auto v = static_cast<compute_t<T>>(std::get<I>(losses_).forward(li, std::get<I>(c.loss_caches)));
      traits::copy_from_host(&v, 1, value);
    }
  }
  /// The weighted loss values of the forward that filled `c` (zeros before one), read back.
  std::array<compute_t<T>, num_losses> loss_values(const cache& c) const {
    std::array<compute_t<T>, num_losses> v{};
    if (num_losses > 0 && c.loss_values.size() == static_cast<index_t>(num_losses))
      traits::copy_to_host(c.loss_values.data(), static_cast<index_t>(num_losses), v.data());
    return v;
  }
  template <std::size_t... I>
  void backward_losses(const loss_input<T, B>& li, cache& c, std::index_sequence<I...>) const {
    (std::get<I>(losses_).backward(li, std::get<I>(c.loss_caches)), ...);
  }

  /// y += shared experts of x.
  void run_shared(const_matrix_view<T> x, cache& c, matrix_view<T> y) {
    const index_t n = x.rows, scw = SharedExpert::cache_width(shared_hidden(cfg_));
    c.shared_act.resize({shared_.count(), n, scw});
    for (index_t s = 0; s < shared_.count(); ++s)
      shared_.forward(s, x, matrix_view<T>{c.shared_act.data() + s * n * scw, n, scw}, y, true);
  }

  /// Steps 1-5 of the forward on x = in.x (tokens > 0).
  void run(const route_input<T>& in, cache& c, matrix_view<T> y, bool training) {
    const index_t d = cfg_.dim;
    router_.forward(in, c.router, c.plan);
    const index_t rows = c.plan.rows();
    const index_t h = cfg_.expert_hidden, cw = Expert::cache_width(h);
    c.xp.resize({rows, d});
    c.act.resize({rows, cw});
    c.yp.resize({rows, d});
    routing::gather<B>(c.plan, in.x, c.xp.matrix());
    if constexpr (grouped_experts)
      experts_.forward_grouped(expert_rows_of(c.plan), c.xp.cmatrix(), c.act.matrix(), c.yp.matrix());
    else
      forward_expert_tasks(c);
    routing::combine<B>(c.plan, c.yp.cmatrix(), y, false);
    run_shared(in.x, c, y);
    if constexpr (num_losses > 0) {
      if (training) forward_losses(router_.loss_view(in, c.router, c.plan, false), c, std::index_sequence_for<L...>{});
    }
  }

  static expert::expert_rows expert_rows_of(const dispatch_plan<T, B>& plan) {
    return {plan.host_offsets, plan.offsets.data()};
  }

  /// The forward's experts as tasks: row tiles (rows are independent in the forward).
  void forward_expert_tasks(cache& c) {
    // Reserved for the most tiles any routing of this many slots can make, so that a batch
    // whose rows split differently over the experts does not allocate.
    c.tiles.clear();
    c.tiles.reserve(static_cast<std::size_t>(c.plan.tokens * c.plan.slots_per_token / tile_rows + experts_.count()));
    for (index_t e = 0; e < experts_.count(); ++e) {
      const index_t end = c.plan.host_offsets[e] + c.plan.expert_rows(e);
      for (index_t first = c.plan.host_offsets[e]; first < end;) {
        const index_t m = std::min(tile_rows, end - first);
        c.tiles.push_back({e, first, m});
        first += m;
      }
    }
    traits::parallel_tasks(static_cast<index_t>(c.tiles.size()), [&](index_t i) {
      const auto [e, first, m] = c.tiles[static_cast<std::size_t>(i)];
      experts_.forward(e, c.xp.cmatrix().row_block(first, m), c.act.matrix().row_block(first, m),
                       c.yp.matrix().row_block(first, m), false);
    });
  }

  /// The backward's experts as tasks: one per expert (each writes only its own gradients and
  /// rows), largest first.
  void backward_expert_tasks(cache& c, index_t rows, index_t cw, index_t sw) {
    c.expert_order.clear();
    for (index_t e = 0; e < experts_.count(); ++e)
      if (c.plan.expert_rows(e) > 0) c.expert_order.push_back(e);
    std::sort(c.expert_order.begin(), c.expert_order.end(), [&](index_t a, index_t b) {
      const index_t ra = c.plan.expert_rows(a), rb = c.plan.expert_rows(b);
      return ra != rb ? ra > rb : a < b;
    });
    traits::parallel_tasks(static_cast<index_t>(c.expert_order.size()), [&](index_t i) {
      const index_t e = c.expert_order[static_cast<std::size_t>(i)];
      const index_t first = c.plan.host_offsets[e], m = c.plan.expert_rows(e);
      experts_.backward(e, c.xp.cmatrix().row_block(first, m),
                        const_matrix_view<T>{c.act.data(), rows, cw}.row_block(first, m),
                        c.dyp.cmatrix().row_block(first, m), c.dxp.matrix().row_block(first, m), false,
                        matrix_view<T>{c.scratch.data() + first * sw, m, sw}, c.ones.data());
    });
  }

  config cfg_;
  router_impl router_;
  expert_bank experts_;
  shared_bank shared_;
  std::tuple<typename L::template impl<T, B>...> losses_;
  cache workspace_;  // infer()'s buffers
};

}  // namespace promoe
