// SPDX-License-Identifier: Apache-2.0
// A user-written router plugged into moe_layer as a policy: a hash router that sends each
// token to an expert chosen by hashing its position in the sample (Roller et al., "Hash
// Layers For Large Sparse Models"), gate 1. No parameters to train; the experts still learn.
#include <cstdio>
#include <vector>

#include <promoe/promoe.hpp>

using namespace promoe;

struct hash_router {
  struct options {
    std::uint32_t salt = 0x9E3779B9u;  // change it to get another fixed assignment
  };

  template <class T, class B>
  class impl {
   public:
    struct cache {};  // nothing to remember for backward

    impl(const options& o, const router_layout& layout, rng&) : opt_(o), layout_(layout) {
      PROMOE_CHECK(layout.routed >= 1, "hash_router: needs at least one routed expert");
    }

    index_t slots_per_token() const { return 1; }

    // Fill one slot per token (expert id, gate), then group the plan by expert.
    void forward(const route_input<T>& in, cache&, dispatch_plan<T, B>& plan) const {
      const index_t n = in.x.rows;
      plan.reset(n, 1, layout_.experts());
      std::vector<std::int32_t> expert(static_cast<std::size_t>(n));
      std::vector<T> gate(static_cast<std::size_t>(n), T(1));
      for (index_t t = 0; t < n; ++t) {
        const auto position = static_cast<std::uint32_t>(t % in.tokens_per_sample);
        expert[t] = static_cast<std::int32_t>(((position + 1) * opt_.salt >> 7) % layout_.routed);
      }
      backend_traits<B>::copy_from_host(expert.data(), n, plan.slot_expert.data());
      backend_traits<B>::copy_from_host(gate.data(), n, plan.slot_gate.data());
      plan.group();
    }

    // Constant gates: no gradient reaches x through the router.
    void backward(const route_input<T>&, cache&, const dispatch_plan<T, B>&, const T*, matrix_view<T>) {}

    void zero_grad() {}
    template <class F>
    void for_each_parameter(F&&) {}

   private:
    options opt_;
    router_layout layout_;
  };
};

static_assert(RouterPolicy<hash_router>, "hash_router must satisfy the router contract");

int main() {
  using block = moe_layer<hash_router, expert::mlp<act::gelu_tanh>, losses<>, backend::cpu, float>;
  block::config cfg;
  cfg.dim = 16;
  cfg.routed_experts = 4;
  cfg.expert_hidden = 32;
  block layer(cfg, rng{1});

  const index_t samples = 2, tokens = 8;
  std::vector<float> xh(static_cast<std::size_t>(samples * tokens * cfg.dim));
  for (std::size_t i = 0; i < xh.size(); ++i) xh[i] = static_cast<float>(rng::normal(3, 0, i));
  const auto x = tensor<float, backend::cpu>::from_host(xh, {samples * tokens, cfg.dim});
  const std::vector<std::int64_t> labels{0, 1};  // one per sample: tells the layer where samples end

  block::cache cache;
  const auto y = layer.forward(x, labels, cache);
  std::printf("tokens per expert:");
  for (index_t count : cache.plan.counts()) std::printf(" %lld", static_cast<long long>(count));
  std::printf("\ny[0, 0:4] = %.4f %.4f %.4f %.4f\n", y.data()[0], y.data()[1], y.data()[2], y.data()[3]);
  const auto dx = layer.backward(y, cache);
  std::printf("parameters: %zu, |dx[0]| = %.4f\n", layer.parameters().size(), std::abs(dx.data()[0]));
}
