// SPDX-License-Identifier: Apache-2.0
// A small class-conditional DiT with ProMoE blocks: rectified-flow training steps (plain SGD
// on synthetic class-coloured images), then sampling with classifier-free guidance.
#include <cstdio>
#include <vector>

#include <promoe/dit.hpp>

using namespace promoe;

using moe = promoe_layer<backend::cpu, float>;          // ProMoE block
using net = dit::dit_model<backend::cpu, float, moe>;  // MoE in blocks 1, 3, ...

int main() {
  dit::dit_config cfg;  // a toy: 8x8x1 images, 4 classes
  cfg.input_size = 8, cfg.patch_size = 2, cfg.in_channels = 1, cfg.hidden_size = 32;
  cfg.depth = 2, cfg.num_heads = 2, cfg.num_classes = 4, cfg.learn_sigma = false;
  moe::config mc;  // dim comes from the DiT
  mc.routed_experts = 4, mc.expert_hidden = 64, mc.unconditional_experts = 1, mc.shared_experts = 1;
  mc.router.null_label = cfg.num_classes;
  net model(cfg, mc, rng{0});

  const index_t n = 16;
  tensor<float, backend::cpu> x0({n, 1, 8, 8}), out({n, 1, 8, 8}), dout;
  std::vector<std::int64_t> labels(n);
  std::vector<float> pixels(static_cast<std::size_t>(x0.size()));
  for (index_t i = 0; i < n; ++i) labels[i] = i % cfg.num_classes;
  for (index_t i = 0; i < x0.size(); ++i)  // class k: brightness k / 2 - 0.75, plus noise
    pixels[i] = 0.5f * float(labels[i / 64]) - 0.75f + 0.05f * float(rng::normal(1, 0, i));
  x0 = tensor<float, backend::cpu>::from_host(pixels, {n, 1, 8, 8});

  dit::rectified_flow flow;
  net::cache cache;
  const rng gen(7);
  for (std::uint64_t step = 0; step < 400; ++step) {
    const auto batch = flow.sample(x0, gen.seed(), step);            // x_t, t = 1000 sigma, target eps - x0
    const auto y = model.drop_labels(labels, gen, 1000 + step);      // dropped labels reach the MoE blocks
    model.forward(batch.x_t.matrix(), batch.t, y, out.matrix(), cache);
    const float loss = flow.loss_and_grad(out, batch, dout) + model.aux_loss(cache);
    model.zero_grad();
    model.backward(dout.matrix(), cache);                            // gradients of the loss + aux losses
    for (auto& p : model.parameters())
      for (index_t i = 0; i < p.size(); ++i) p.value[i] -= 0.05f * p.grad[i];
    if (step % 50 == 0) std::printf("step %2d  loss %.4f  rcl %.4f\n", int(step), loss, model.aux_loss(cache));
  }

  dit::inference_model sampler_net(model);  // guided sampling; the null pass runs the dense path
  auto guided = dit::classifier_free_guidance<float, backend::cpu>(sampler_net, 2.0, cfg.num_classes);
  tensor<float, backend::cpu> x({4, 1, 8, 8});
  const std::vector<std::int64_t> want{0, 1, 2, 3};
  dit::euler_flow(guided, x, want, {.steps = 20, .seed = 3});
  const auto h = x.to_host();
  for (index_t k = 0; k < 4; ++k) {
    double mean = 0;
    for (index_t i = 0; i < 64; ++i) mean += h[k * 64 + i] / 64.0;
    std::printf("class %d: mean brightness %.3f (data: %.3f)\n", int(k), mean, 0.5 * double(k) - 0.75);
  }
}
