// SPDX-License-Identifier: Apache-2.0
/// \file latents.hpp
/// \brief A labelled set of latents (e.g. VAE encodings of images) from a safetensors file.
///
/// The file holds two tensors: "latents", [N, C, H, W] of F32, F64, F16 or BF16 (read as
/// float), and "labels", [N] of an integer type. Latents are used as they are stored, so scale
/// them beforehand as the model expects (Stable Diffusion's VAE: multiply by 0.18215). A missing
/// tensor, a wrong rank, N that disagree, a negative label or a non-finite value is a
/// promoe::error naming the file, the tensor and the index.
#pragma once

#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "../core/config.hpp"
#include "../core/error.hpp"
#include "safetensors.hpp"

namespace promoe::io {

/// N latents of shape [C, H, W] (row-major, sample after sample) and their class labels.
struct labelled_latents {
  index_t N = 0, C = 0, H = 0, W = 0;
  std::vector<float> values;
  std::vector<std::int64_t> labels;

  /// The C * H * W values of sample n.
  std::span<const float> sample(index_t n) const {
    PROMOE_CHECK(n >= 0 && n < N, "labelled_latents::sample: index ", n, " out of range [0, ", N, ")");
    const auto size = static_cast<std::size_t>(C * H * W);
    return std::span<const float>(values).subspan(static_cast<std::size_t>(n) * size, size);
  }
};

/// Reads "latents" [N, C, H, W] and "labels" [N] from a safetensors file (see the file comment).
inline labelled_latents load_latents(const std::string& path) {
  const auto file = safetensors_file::read(path);
  const auto& lat = file.at("latents");
  const auto& lab = file.at("labels");
  PROMOE_CHECK(lat.shape.size() == 4, path, ": tensor 'latents' has shape ", ::promoe::detail::shape_string(lat.shape),
               "; expected [N, C, H, W]");
  PROMOE_CHECK(lab.shape.size() == 1 && lab.shape[0] == lat.shape[0], path, ": tensor 'labels' has shape ",
               ::promoe::detail::shape_string(lab.shape), "; expected [", lat.shape[0], "] (one per latent)");
  labelled_latents out;
  out.N = lat.shape[0], out.C = lat.shape[1], out.H = lat.shape[2], out.W = lat.shape[3];
  PROMOE_CHECK(out.N > 0 && out.C > 0 && out.H > 0 && out.W > 0, path, ": tensor 'latents' has shape ",
               ::promoe::detail::shape_string(lat.shape), "; every dimension must be >= 1");
  out.values = file.values<float>("latents");
  out.labels = file.values<std::int64_t>("labels");
  const auto per = static_cast<std::size_t>(out.C * out.H * out.W);
  for (std::size_t i = 0; i < out.values.size(); ++i)
    if (!std::isfinite(out.values[i]))
      fail(path, ": tensor 'latents' holds ", out.values[i], " at sample ", i / per, ", element ", i % per,
           " (values must be finite)");
  for (std::size_t i = 0; i < out.labels.size(); ++i)
    PROMOE_CHECK(out.labels[i] >= 0, path, ": tensor 'labels' holds ", out.labels[i], " at index ", i,
                 " (labels must be >= 0)");
  return out;
}

}  // namespace promoe::io
