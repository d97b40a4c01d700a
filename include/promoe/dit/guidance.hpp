// SPDX-License-Identifier: Apache-2.0
/// \file guidance.hpp
/// \brief Classifier-free guidance as a model adaptor: guided(x, t, y) = u + s (c − u) with
/// c = model(x, t, y) and u = model(x, t, null labels), on all output channels.
///
///     auto guided = dit::classifier_free_guidance<float, backend::cpu>(model, 4.0, num_classes);
///     dit::euler_flow(guided, x, labels, {.steps = 250, .seed = 1});
///
/// The unconditional output comes from a separate call of the wrapped model with every label
/// equal to the null label (so a ProMoE model takes its dense unconditional path), not from
/// one doubled batch. At scale 1 the null call is skipped and the output is the conditional
/// output bit for bit. Unlike the reference DiT script (which guides only the first three
/// channels), every channel is guided, learned-sigma channels included.
#pragma once

#include <cmath>
#include <cstdint>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

#include "../backend/backend.hpp"
#include "../backend/tensor.hpp"
#include "../core/bf16.hpp"
#include "../core/config.hpp"
#include "../core/error.hpp"
#include "objective.hpp"

namespace promoe::dit {

namespace detail {

/// out ← u + s (out − u).
template <class T>
struct cfg_combine_functor {
  T* out;           // [N, C_out, H, W]: the conditional output on entry
  const T* uncond;  // [N, C_out, H, W]
  T scale;
  PROMOE_HOST_DEVICE void operator()(index_t i) const {
    const T u = uncond[i];
    out[i] = u + scale * (out[i] - u);
  }
};

}  // namespace detail

/// A DiffusionModel that applies classifier-free guidance to another.
/// \tparam Model the wrapped model type; a reference type (the adaptor refers to the model)
///         when made from an lvalue, a value type (the adaptor owns it) from an rvalue.
/// \tparam T, B scalar and backend of the tensors it is called with.
template <class Model, class T, class B>
class guided_model {
 public:
  /// \param scale guidance scale s, finite and >= 1 (1 = no guidance, no null pass)
  /// \param null_label the label of the unconditional class (DiT: num_classes)
  guided_model(Model model, double scale, std::int64_t null_label)
      : model_(static_cast<Model&&>(model)), scale_(scale), null_label_(null_label) {
    detail::require_diffusion_model<Model, T, B>();
    PROMOE_CHECK(std::isfinite(scale) && scale >= 1.0, "classifier_free_guidance: scale is ", scale,
                 "; expected a finite value >= 1");
  }

  double scale() const { return scale_; }
  std::int64_t null_label() const { return null_label_; }
  std::remove_reference_t<Model>& model() { return model_; }

  void operator()(const tensor<T, B>& x, const std::vector<compute_t<T>>& t, std::span<const std::int64_t> y,
                  tensor<T, B>& out) {
    model_(x, t, y, out);
    if (scale_ == 1.0) return;
    null_labels_.assign(y.size(), null_label_);
    model_(x, t, std::span<const std::int64_t>(null_labels_), uncond_);
    PROMOE_CHECK(uncond_.shape() == out.shape(), "classifier_free_guidance: the conditional output has shape ",
                 promoe::detail::shape_string(out.shape()), " but the unconditional one ",
                 promoe::detail::shape_string(uncond_.shape()));
    if (out.size() == 0) return;
    backend_traits<B>::parallel_for(out.size(),
                                    detail::cfg_combine_functor<T>{out.data(), uncond_.data(), static_cast<T>(scale_)});
  }

 private:
  Model model_;
  double scale_;
  std::int64_t null_label_;
  std::vector<std::int64_t> null_labels_;  // [N], all null_label_
  tensor<T, B> uncond_;                    // [N, C_out, H, W] workspace
};

/// Wraps `model` (kept by reference when an lvalue, moved in when an rvalue) in classifier-free
/// guidance with scale s >= 1 and the given null label; throws promoe::error for s < 1 or a
/// non-finite s.
template <class T, class B, class Model>
guided_model<Model, T, B> classifier_free_guidance(Model&& model, double scale, std::int64_t null_label) {
  return guided_model<Model, T, B>(std::forward<Model>(model), scale, null_label);
}

}  // namespace promoe::dit
