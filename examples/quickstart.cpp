// SPDX-License-Identifier: Apache-2.0
// Quickstart: compose an MoE block at compile time, then train it to imitate a fixed
// "teacher" block on random tokens (a synthetic regression task) with plain SGD.
#include <cstdio>
#include <vector>

#include <promoe/promoe.hpp>

using namespace promoe;

// Router, expert, auxiliary losses, backend, scalar: one type.
using block = moe_layer<router::top_k, expert::mlp<act::gelu_tanh>, losses<loss::load_balance>, backend::cpu, float>;

int main() {
  block::config cfg;
  cfg.dim = 32;
  cfg.routed_experts = 8;
  cfg.expert_hidden = 64;
  cfg.shared_experts = 1;
  cfg.router = {.k = 2, .score = score_fn::softmax, .renormalize = false};
  block student(cfg, rng{1}), teacher(cfg, rng{2});

  const index_t tokens = 256;
  const float lr = 0.05f;
  block::cache cache;
  tensor<float, backend::cpu> x({tokens, cfg.dim}), dy({tokens, cfg.dim});
  for (int step = 0; step <= 400; ++step) {
    // fresh random tokens each step: counter-based draws, stream = step
    std::vector<float> xh(static_cast<std::size_t>(tokens * cfg.dim));
    for (std::size_t i = 0; i < xh.size(); ++i) xh[i] = static_cast<float>(rng::normal(7, step, i));
    x = tensor<float, backend::cpu>::from_host(xh, {tokens, cfg.dim});

    const auto target = teacher.infer(x);
    const auto y = student.forward(x, {}, cache);
    // mean squared error and its gradient
    double mse = 0;
    for (index_t i = 0; i < y.size(); ++i) {
      const float diff = y.data()[i] - target.data()[i];
      mse += double(diff) * diff / double(y.size());
      dy.data()[i] = 2.0f * diff / float(y.size());
    }
    student.zero_grad();
    student.backward(dy, cache);
    for (auto& p : student.parameters())  // SGD over the named parameters
      for (index_t i = 0; i < p.size(); ++i) p.value[i] -= lr * cfg.dim * p.grad[i];
    if (step % 50 == 0)
      std::printf("step %3d  mse %.5f  load_balance %.4f\n", step, mse, double(student.aux_loss(cache)));
  }
}
