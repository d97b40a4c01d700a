// SPDX-License-Identifier: Apache-2.0
/// \file naming.hpp
/// \brief State-dict naming of an MoE block's experts, as the reference PyTorch models spell it.
#pragma once

#include <string>

#include "../core/config.hpp"

namespace promoe {

/// Prefixes and linear-layer names of the experts inside one MoE block.
struct param_naming {
  std::string experts = "experts";              ///< routed (then unconditional) experts: experts.{j}.
  std::string shared_expert = "shared_expert";  ///< one shared expert: shared_expert. ; several: shared_expert.{j}.
  std::string mlp_in = "up_proj";               ///< mlp first linear
  std::string mlp_out = "down_proj";            ///< mlp second linear

  /// ProMoE: experts.{j}.up_proj / down_proj, shared_expert.up_proj / down_proj.
  static param_naming promoe() { return {}; }
  /// DiT-MoE (linear top-k baseline): experts.{j}.fc1 / fc2, shared_experts.{gate,up,down}_proj.
  static param_naming dit_moe() { return {"experts", "shared_experts", "fc1", "fc2"}; }

  std::string routed_prefix(index_t j) const { return experts + "." + std::to_string(j) + "."; }
  std::string shared_prefix(index_t j, index_t count) const {
    return count == 1 ? shared_expert + "." : shared_expert + "." + std::to_string(j) + ".";
  }
};

}  // namespace promoe
