// SPDX-License-Identifier: Apache-2.0
/// \file promoe.hpp
/// \brief Everything of promoe that runs on the CPU backend. The Thrust backend is separate:
/// include <promoe/backend/thrust.hpp> where Thrust is available.
#pragma once

#include "backend/cpu.hpp"
#include "core/config.hpp"
#include "core/error.hpp"
#include "core/precision.hpp"
#include "core/rng.hpp"
#include "expert/activation.hpp"
#include "expert/mlp.hpp"
#include "expert/swiglu.hpp"
#include "loss/load_balance.hpp"
#include "loss/routing_contrastive.hpp"
#include "loss/z_loss.hpp"
#include "moe_layer.hpp"
#include "router/conditional.hpp"
#include "router/expert_choice.hpp"
#include "router/expert_race.hpp"
#include "router/promoe.hpp"
#include "router/prototypical.hpp"
#include "router/top_k.hpp"

namespace promoe {

/// ProMoE's block (Wei et al.): conditional + prototypical routing, GELU-tanh MLP experts,
/// the routing contrastive loss. Layout: routed experts, one unconditional, shared experts.
template <class B = backend::cpu, class T = float>
using promoe_layer = moe_layer<router::promoe, expert::mlp<act::gelu_tanh>, losses<loss::routing_contrastive>, B, T>;

}  // namespace promoe
