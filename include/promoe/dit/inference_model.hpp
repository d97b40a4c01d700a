// SPDX-License-Identifier: Apache-2.0
/// \file inference_model.hpp
/// \brief inference_model: a dit_model as the DiffusionModel the samplers and guidance call
/// (images [N, C, H, W] in, [N, C_out, H, W] out), running the model's inference forward.
#pragma once

#include <span>
#include <vector>

#include "../backend/tensor.hpp"
#include "../core/bf16.hpp"
#include "objective.hpp"

namespace promoe::dit {

/// Wraps a dit_model (by reference) and the cache its inference forwards reuse.
template <class Model>
class inference_model {
 public:
  using T = typename Model::scalar;
  using B = typename Model::backend_type;

  explicit inference_model(Model& model) : model_(&model) {}

  void operator()(const tensor<T, B>& x_t, const std::vector<compute_t<T>>& t, std::span<const std::int64_t> y,
                  tensor<T, B>& out) {
    const auto& cfg = model_->cfg();
    PROMOE_CHECK(x_t.rank() == 4 && x_t.dim(1) == cfg.in_channels && x_t.dim(2) == cfg.input_size &&
                     x_t.dim(3) == cfg.input_size,
                 "dit::inference_model: x_t has shape ", promoe::detail::shape_string(x_t.shape()), ", expected [N, ",
                 cfg.in_channels, ", ", cfg.input_size, ", ", cfg.input_size, "]");
    const index_t n = x_t.dim(0);
    out.resize({n, cfg.out_channels(), cfg.input_size, cfg.input_size});
    model_->infer({x_t.data(), n, cfg.image_size()}, std::span<const compute_t<T>>(t), y,
                  {out.data(), n, cfg.output_size()}, cache_);
  }

 private:
  Model* model_;
  typename Model::cache cache_;
};

}  // namespace promoe::dit
