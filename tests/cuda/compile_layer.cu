// SPDX-License-Identifier: Apache-2.0
// Compile-only check that the whole MoE layer builds for a GPU: every functor the Thrust
// backend launches must be a valid CUDA kernel body. (Run on a GPU by the CUDA tests.)
#include <promoe/backend/thrust.hpp>
#include <promoe/promoe.hpp>

using namespace promoe;

template class promoe::moe_layer<router::top_k, expert::mlp<act::gelu_tanh>, losses<loss::load_balance, loss::z_loss>,
                                 backend::thrust, float, expert::swiglu>;
template class promoe::moe_layer<router::top_k, expert::mlp<act::gelu_tanh>, losses<>, backend::thrust, double>;
// SwiGLU routed experts on bf16: the other bank's grouped path and cuBLAS's bf16 grouped GEMM
template class promoe::moe_layer<router::top_k, expert::swiglu, losses<loss::z_loss>, backend::thrust, bf16>;
// The routers that select within groups on the device (radix select, device thresholds)
template class promoe::moe_layer<router::expert_choice, expert::mlp<act::gelu_tanh>, losses<loss::load_balance>,
                                 backend::thrust, float>;
template class promoe::moe_layer<router::expert_race, expert::mlp<act::gelu_tanh>, losses<>, backend::thrust, bf16>;
template class promoe::moe_layer<router::expert_race, expert::mlp<act::gelu_tanh>, losses<>, backend::thrust, double>;
// ProMoE with every loss: the routing contrastive loss's E x E functors on the device
template class promoe::moe_layer<router::promoe, expert::mlp<act::gelu_tanh>,
                                 losses<loss::routing_contrastive, loss::load_balance, loss::z_loss>, backend::thrust,
                                 float>;

int main() {
  using layer_t = moe_layer<router::top_k, expert::mlp<act::gelu_tanh>, losses<loss::load_balance>, backend::thrust, float>;
  layer_t::config cfg;
  cfg.dim = 8;
  cfg.routed_experts = 4;
  cfg.expert_hidden = 8;
  cfg.router.k = 2;
  layer_t layer(cfg, rng{1});
  layer_t::cache c;
  tensor<float, backend::thrust> x({16, 8});
  x.fill(0.5f);
  const auto y = layer.forward(x, {}, c);
  return layer.backward(y, c).size() == 16 * 8 ? 0 : 1;
}
