// SPDX-License-Identifier: Apache-2.0
// Must not compile: the routing contrastive loss reads prototypes, and router::top_k has
// none. The layer's static_assert says so. With PROMOE_STATIC_CONTROL the router is
// prototypical and the file compiles (the control that the command line is sound).
#include <promoe/promoe.hpp>

#if defined(PROMOE_STATIC_CONTROL)
using router_t = promoe::router::prototypical;
#else
using router_t = promoe::router::top_k;
#endif

using layer_t = promoe::moe_layer<router_t, promoe::expert::mlp<promoe::act::gelu_tanh>,
                                  promoe::losses<promoe::loss::routing_contrastive>>;

int main() {
  layer_t::config cfg;
  cfg.dim = 4;
  cfg.routed_experts = 2;
  cfg.expert_hidden = 4;
  layer_t layer(cfg, promoe::rng{1});
  return static_cast<int>(layer.parameters().size()) > 0 ? 0 : 1;
}
