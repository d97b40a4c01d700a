// SPDX-License-Identifier: Apache-2.0
/// \file bad_router.cpp
/// \brief Must NOT compile: moe_layer with a router that has no slots_per_token(). The
/// CTest test static.bad_router runs the compiler on this file and passes only when the
/// diagnostic names the RouterPolicy concept (it fails for the right reason). With
/// PROMOE_STATIC_CONTROL the same file uses good_router and must compile (test
/// static.good_router), so a broken include path cannot pass for the expected failure.

#include <promoe/promoe.hpp>

#include "bad_router.hpp"

#if defined(PROMOE_STATIC_CONTROL)
using router_under_test = promoe_static::good_router;
#else
using router_under_test = promoe_static::bad_router;
#endif

using bad_layer = promoe::moe_layer<router_under_test, promoe::expert::mlp<promoe::act::gelu_tanh>>;

int main() {
  bad_layer::config cfg;
  cfg.dim = 8;
  cfg.routed_experts = 2;
  cfg.expert_hidden = 4;
  bad_layer layer(cfg, promoe::rng{0});
  return static_cast<int>(layer.dim());
}
