// SPDX-License-Identifier: Apache-2.0
/// \file promoe.hpp
/// \brief router::promoe: ProMoE's two-step router, conditional over prototypical.
/// Null-label samples go to the unconditional expert; labelled tokens are routed by cosine
/// similarity to the prototypes `cluster_centers`. Pair it with loss::routing_contrastive.
#pragma once

#include "conditional.hpp"
#include "prototypical.hpp"

namespace promoe::router {

/// Options: {.inner = {.k, .score (identity), .renormalize, .scale}, .null_label}.
using promoe = conditional<prototypical>;

static_assert(RouterPolicy<promoe>);

}  // namespace promoe::router
