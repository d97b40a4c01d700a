// SPDX-License-Identifier: Apache-2.0
/// \file config.hpp
/// \brief dit_config: the DiT hyper-parameters (the reference model's names), their checks,
/// and the presets.
#pragma once

#include <string>

#include "../core/config.hpp"
#include "../core/error.hpp"

namespace promoe::dit {

struct dit_config {
  index_t input_size = 32;   ///< H = W of the (latent) images
  index_t patch_size = 2;    ///< p
  index_t in_channels = 4;   ///< C
  index_t hidden_size = 384; ///< D
  index_t depth = 12;        ///< blocks
  index_t num_heads = 6;
  double mlp_ratio = 4.0;    ///< dense MLP width = mlp_ratio * D
  index_t num_classes = 1000;  ///< labels 0..num_classes-1; num_classes is the null label
  bool learn_sigma = true;     ///< doubles the output channels
  bool interleave = true;      ///< MoE in odd blocks (1, 3, ...); else in every block
  double class_dropout_prob = 0.1;  ///< label dropout in training

  index_t out_channels() const { return learn_sigma ? 2 * in_channels : in_channels; }
  index_t grid() const { return input_size / patch_size; }
  index_t tokens() const { return grid() * grid(); }
  index_t mlp_hidden() const { return static_cast<index_t>(static_cast<double>(hidden_size) * mlp_ratio); }
  index_t image_size() const { return in_channels * input_size * input_size; }
  index_t output_size() const { return out_channels() * input_size * input_size; }
  /// Whether block i holds the MoE MLP (when the model has one).
  bool moe_block(index_t i) const { return !interleave || i % 2 == 1; }

  /// Throws promoe::error naming the first inconsistent value.
  void validate() const {
    PROMOE_CHECK(input_size >= 1 && patch_size >= 1 && in_channels >= 1 && hidden_size >= 1 && depth >= 0 &&
                     num_heads >= 1 && num_classes >= 1,
                 "dit_config: sizes must be positive (input_size ", input_size, ", patch_size ", patch_size,
                 ", in_channels ", in_channels, ", hidden_size ", hidden_size, ", depth ", depth, ", num_heads ",
                 num_heads, ", num_classes ", num_classes, ")");
    PROMOE_CHECK(input_size % patch_size == 0, "dit_config: input_size ", input_size,
                 " is not divisible by patch_size ", patch_size);
    PROMOE_CHECK(hidden_size % 4 == 0, "dit_config: hidden_size ", hidden_size,
                 " is not divisible by 4 (the 2-D sin-cos position embedding needs it)");
    PROMOE_CHECK(hidden_size % num_heads == 0, "dit_config: hidden_size ", hidden_size,
                 " is not divisible by num_heads ", num_heads);
    PROMOE_CHECK(mlp_ratio > 0 && mlp_hidden() >= 1, "dit_config: mlp_ratio ", mlp_ratio, " gives no MLP width");
    PROMOE_CHECK(class_dropout_prob >= 0 && class_dropout_prob <= 1, "dit_config: class_dropout_prob ",
                 class_dropout_prob, " is not in [0, 1]");
  }
};

/// The paper's presets on 32x32x4 latents with patch 2 ("S", "B", "L", "XL"), and small
/// presets for CPUs: "mini-28" (28x28x1 images, e.g. Fashion-MNIST, 10 classes) and
/// "mini-32" (32x32x3 images, 10 classes). Unknown names are an error listing the known.
inline dit_config preset(const std::string& name) {
  dit_config c;
  if (name == "S") {
    c.depth = 12, c.hidden_size = 384, c.num_heads = 6;
  } else if (name == "B") {
    c.depth = 12, c.hidden_size = 768, c.num_heads = 12;
  } else if (name == "L") {
    c.depth = 24, c.hidden_size = 1024, c.num_heads = 16;
  } else if (name == "XL") {
    c.depth = 28, c.hidden_size = 1152, c.num_heads = 16;
  } else if (name == "mini-28") {
    c.input_size = 28, c.patch_size = 4, c.in_channels = 1, c.hidden_size = 96, c.depth = 6, c.num_heads = 4;
    c.num_classes = 10, c.learn_sigma = false;
  } else if (name == "mini-32") {
    c.input_size = 32, c.patch_size = 4, c.in_channels = 3, c.hidden_size = 128, c.depth = 6, c.num_heads = 4;
    c.num_classes = 10, c.learn_sigma = false;
  } else {
    fail("unknown DiT preset '", name, "' (known: S, B, L, XL, mini-28, mini-32)");
  }
  return c;
}

}  // namespace promoe::dit
