// SPDX-License-Identifier: Apache-2.0
/// \file promoe.hpp
/// \brief Everything of promoe that runs on the CPU backend. The Thrust backend is separate:
/// include <promoe/backend/thrust.hpp> where Thrust is available.
#pragma once

#include "backend/cpu.hpp"
#include "core/config.hpp"
#include "core/error.hpp"
#include "core/rng.hpp"
#include "expert/activation.hpp"
#include "expert/mlp.hpp"
#include "expert/swiglu.hpp"
#include "loss/load_balance.hpp"
#include "loss/z_loss.hpp"
#include "moe_layer.hpp"
#include "router/top_k.hpp"
