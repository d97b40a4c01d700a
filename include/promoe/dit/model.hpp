// SPDX-License-Identifier: Apache-2.0
/// \file model.hpp
/// \brief dit_model: the class-conditional Diffusion Transformer (Peebles & Xie), with the
/// MLP of each block a dense GELU-tanh MLP or an MoE layer of this library.
///
///   tokens = patch_embed(x) + pos_embed;  c = t_embedder(t) + y_embedder(y)
///   block:  (shift, scale, gate) x 2 = adaLN_modulation(SiLU(c))
///           x += gate_msa * attn(modulate(norm1(x), shift_msa, scale_msa))
///           x += gate_mlp * mlp(modulate(norm2(x), shift_mlp, scale_mlp), y)
///   out = unpatchify(final_layer(x, c))
/// The labels the MoE blocks route with are the labels after dropout. Parameter names are
/// the reference state-dict names.
#pragma once

#include <memory>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../backend/ops.hpp"
#include "../backend/tensor.hpp"
#include "../core/bf16.hpp"
#include "../core/error.hpp"
#include "../core/rng.hpp"
#include "../expert/mlp.hpp"
#include "../nn/attention.hpp"
#include "../nn/final_layer.hpp"
#include "../nn/label_embedder.hpp"
#include "../nn/layer_norm.hpp"
#include "../nn/linear.hpp"
#include "../nn/modulation.hpp"
#include "../nn/patch_embed.hpp"
#include "../nn/position_embedding.hpp"
#include "../nn/timestep_embedder.hpp"
#include "config.hpp"

namespace promoe::dit {

namespace detail {
/// Stands in for the MoE layer type of a dense DiT.
struct no_moe {
  struct config {};
  struct cache {};
};
}  // namespace detail

/// \tparam B   backend tag
/// \tparam T   float or double
/// \tparam MoE a moe_layer<..., B, T> type for the MoE blocks, or void for a dense DiT
template <class B, class T, class MoE = void>
class dit_model {
 public:
  using scalar = T;
  using backend_type = B;
  using traits = backend_traits<B>;
  static constexpr bool has_moe = !std::is_void_v<MoE>;
  using moe_type = std::conditional_t<has_moe, MoE, detail::no_moe>;
  using moe_config = typename moe_type::config;
  using dense_mlp = typename expert::mlp<act::gelu_tanh>::template bank<T, B>;

  /// One DiT block's parameters.
  struct block {
    nn::attention<T, B> attn;
    nn::linear<T, B> adaLN;           ///< adaLN_modulation.1: D -> 6D
    std::unique_ptr<dense_mlp> dense;  ///< fc1 / fc2, or null in an MoE block
    std::unique_ptr<moe_type> moe;     ///< the MoE layer, or null in a dense block
  };

  /// One block's activations.
  struct block_cache {
    typename nn::layer_norm<T, B>::cache norm1, norm2;
    typename nn::attention<T, B>::cache attn;
    tensor<T, B> mod;       ///< [N, 6D] adaLN output
    tensor<T, B> h1, a;     ///< [n, D] attention input (modulated) and output
    tensor<T, B> x_mid;     ///< [n, D] residual stream after attention
    tensor<T, B> h2, m;     ///< [n, D] MLP input (modulated) and output
    tensor<T, B> mlp_act;   ///< [n, 2I] dense MLP activations
    typename moe_type::cache moe;  ///< the MoE layer's cache (MoE blocks)
  };

  struct cache {
    index_t samples = 0;
    bool ready = false;     ///< a training forward filled it (backward may run)
    std::vector<std::int64_t> labels;  ///< after dropout: what the embedder and MoE blocks saw
    tensor<compute_t<T>, B> t;         ///< [N] model time
    typename nn::patch_embed<T, B>::cache patch;
    typename nn::timestep_embedder<T, B>::cache temb;
    typename nn::label_embedder<T, B>::cache yemb;
    tensor<T, B> c, c_act;        ///< [N, D] conditioning and SiLU(c)
    tensor<T, B> y_emb;           ///< [N, D]
    std::vector<tensor<T, B>> xs;  ///< residual stream at each block input, [n, D] each (depth + 1)
    std::vector<block_cache> blocks;
    typename nn::final_layer<T, B>::cache final;
    tensor<T, B> out_tokens;       ///< [n, p*p*C_out]
    // backward scratch
    tensor<T, B> dx, dtok, dh, dmod, dc, dc_act, dm, dscratch, ones;
  };

  dit_model(const dit_config& cfg, const moe_config& moe_cfg, rng& gen) : cfg_(checked(cfg)) {
    const index_t d = cfg.hidden_size;
    x_embedder_ = nn::patch_embed<T, B>(cfg.in_channels, d, cfg.patch_size);
    pos_embed_ = nn::position_embedding<T, B>(d, cfg.grid());
    t_embedder_ = nn::timestep_embedder<T, B>(d);
    y_embedder_ = nn::label_embedder<T, B>(cfg.num_classes, d);
    final_ = nn::final_layer<T, B>(d, cfg.patch_size, cfg.out_channels());
    // DiT's initialize_weights: Xavier everywhere, then N(0, 0.02) embeddings, zero adaLN/final.
    x_embedder_.init_xavier(gen);
    y_embedder_.init(gen);
    t_embedder_.init(gen);
    blocks_.resize(static_cast<std::size_t>(cfg.depth));
    for (index_t i = 0; i < cfg.depth; ++i) {
      block& b = blocks_[i];
      b.attn = nn::attention<T, B>(d, cfg.num_heads);
      b.attn.init(gen);
      b.adaLN = nn::linear<T, B>(d, 6 * d, true);
      b.adaLN.init_zero();
      if constexpr (has_moe) {
        if (cfg.moe_block(i)) {
          auto mc = moe_cfg;
          mc.dim = d;
          b.moe = std::make_unique<MoE>(mc, gen);
          continue;
        }
      }
      b.dense = std::make_unique<dense_mlp>(1, d, cfg.mlp_hidden());
      b.dense->init(gen);
    }
    final_.init_zero();
    if constexpr (!has_moe) (void)moe_cfg;
  }
  dit_model(const dit_config& cfg, const moe_config& moe_cfg, rng&& gen) : dit_model(cfg, moe_cfg, gen) {}

  const dit_config& cfg() const { return cfg_; }
  std::vector<block>& blocks() { return blocks_; }

  /// Labels after classifier-free-guidance dropout: each becomes the null label num_classes
  /// with probability class_dropout_prob, drawn from stream `stream` of `gen` (counter-based,
  /// so a training step's stream fixes the draw). Pass the result to forward().
  std::vector<std::int64_t> drop_labels(std::span<const std::int64_t> labels, const rng& gen,
                                        std::uint64_t stream) const {
    return nn::drop_labels(labels, cfg_.num_classes, cfg_.class_dropout_prob, gen, stream);
  }
  /// The same into `out` (no allocation once it has the capacity).
  void drop_labels(std::span<const std::int64_t> labels, const rng& gen, std::uint64_t stream,
                   std::vector<std::int64_t>& out) const {
    nn::drop_labels(labels, cfg_.num_classes, cfg_.class_dropout_prob, gen, stream, out);
  }

  /// Training forward: out [N, C_out*H*W] = DiT(x [N, C*H*W], t [N] (host, model time),
  /// labels [N] (host)). Labels are used as given (drop them first with drop_labels); the
  /// MoE blocks route with them. Fills `c` for backward.
  void forward(const_matrix_view<T> x, std::span<const compute_t<T>> t, std::span<const std::int64_t> labels,
               matrix_view<T> out, cache& c) {
    run(x, t, labels, out, c, true);
  }

  /// Inference forward: as forward(), but the MoE blocks route in inference mode (batch-
  /// independent thresholds; the dense unconditional path for an all-null batch) and no
  /// auxiliary losses are computed. `c` only holds scratch afterwards: no backward.
  void infer(const_matrix_view<T> x, std::span<const compute_t<T>> t, std::span<const std::int64_t> labels, matrix_view<T> out,
             cache& c) {
    run(x, t, labels, out, c, false);
  }

 private:
  void run(const_matrix_view<T> x, std::span<const compute_t<T>> t, std::span<const std::int64_t> labels, matrix_view<T> out,
           cache& c, bool training) {
    c.ready = false;
    const index_t n = x.rows, d = cfg_.hidden_size, tokens = cfg_.tokens(), rows = n * tokens;
    PROMOE_CHECK(x.cols == cfg_.image_size(), "dit_model::forward: x has shape [", x.rows, ", ", x.cols,
                 "], expected [N, ", cfg_.image_size(), "] (C*H*W = ", cfg_.in_channels, "*", cfg_.input_size, "*",
                 cfg_.input_size, ")");
    PROMOE_CHECK(static_cast<index_t>(t.size()) == n, "dit_model::forward: t has ", t.size(), " entries, expected ", n,
                 " (one per sample)");
    PROMOE_CHECK(static_cast<index_t>(labels.size()) == n, "dit_model::forward: labels has ", labels.size(),
                 " entries, expected ", n, " (one per sample)");
    PROMOE_CHECK(out.rows == n && out.cols == cfg_.output_size(), "dit_model::forward: out has shape [", out.rows, ", ",
                 out.cols, "], expected [", n, ", ", cfg_.output_size(), "]");
    c.samples = n;
    c.labels.assign(labels.begin(), labels.end());
    c.t.resize({n});
    traits::copy_from_host(t.data(), n, c.t.data());
    // embeddings
    c.xs.resize(static_cast<std::size_t>(cfg_.depth + 1));
    for (auto& xi : c.xs) xi.resize({rows, d});
    x_embedder_.forward(x, cfg_.input_size, cfg_.input_size, c.xs[0].matrix(), c.patch);
    pos_embed_.forward(c.xs[0].matrix());
    for (auto* tt : {&c.c, &c.c_act, &c.y_emb}) tt->resize({n, d});
    t_embedder_.forward(c.t.data(), n, c.c.matrix(), c.temb);
    y_embedder_.forward(c.labels, c.y_emb.matrix(), c.yemb);
    ops::add<B>(c.y_emb.cmatrix(), c.c.matrix());
    traits::parallel_for(n, act::apply_rows_functor<act::silu, T>{c.c.data(), d, c.c_act.data(), d, d});
    // blocks
    c.blocks.resize(blocks_.size());
    for (std::size_t i = 0; i < blocks_.size(); ++i) forward_block(i, c, training);
    // final layer and unpatchify
    c.out_tokens.resize({rows, final_.out_features()});
    final_.forward(c.xs.back().cmatrix(), c.c.cmatrix(), c.out_tokens.matrix(), c.final);
    nn::unpatchify<B, T>(c.out_tokens.cmatrix(), out_grid(n), out);
    c.ready = training;
  }

 public:

  /// Backward from dout [N, C_out*H*W]: parameter gradients accumulate (the auxiliary losses
  /// of the MoE blocks included, weight 1); dx [N, C*H*W] += the input gradient unless empty.
  void backward(const_matrix_view<T> dout, cache& c, matrix_view<T> dx = {}) {
    PROMOE_CHECK(c.ready, "dit_model::backward: the cache holds no training forward");
    const index_t n = c.samples, d = cfg_.hidden_size, tokens = cfg_.tokens(), rows = n * tokens;
    PROMOE_CHECK(dout.rows == n && dout.cols == cfg_.output_size(), "dit_model::backward: dout has shape [", dout.rows,
                 ", ", dout.cols, "], expected [", n, ", ", cfg_.output_size(), "]");
    if (n == 0) return;
    ensure_ones(c, rows);
    c.dtok.resize({rows, final_.out_features()});
    c.dtok.fill(T(0));
    nn::unpatchify_backward<B, T>(dout, out_grid(n), c.dtok.matrix());
    c.dx.resize({rows, d});
    c.dx.fill(T(0));
    c.dc.resize({n, d});
    c.dc.fill(T(0));
    final_.backward(c.c.cmatrix(), c.dtok.cmatrix(), c.dx.matrix(), c.dc.matrix(), c.final);
    c.dc_act.resize({n, d});
    c.dc_act.fill(T(0));
    for (std::size_t i = blocks_.size(); i-- > 0;) backward_block(i, c);
    traits::parallel_for(n, act::backward_rows_functor<act::silu, T>{c.c.data(), d, c.dc_act.data(), d, c.dc.data(), d, d, true});
    t_embedder_.backward(c.dc.cmatrix(), c.temb);
    y_embedder_.backward(c.dc.cmatrix(), c.yemb);
    x_embedder_.backward(c.dx.cmatrix(), dx, c.patch);
  }

  /// Sum of the MoE blocks' weighted auxiliary losses of the forward that filled `c`.
  /// The values stay on the device through the step; this reads them back (a wait there).
  T aux_loss(const cache& c) const {
    compute_t<T> s = 0;
    if constexpr (has_moe)
      if (c.ready)
        for (std::size_t i = 0; i < blocks_.size(); ++i)
          if (blocks_[i].moe) s += static_cast<compute_t<T>>(blocks_[i].moe->aux_loss(c.blocks[i].moe));
    return static_cast<T>(s);
  }

  /// Every trainable parameter by its reference state-dict name.
  std::vector<named_parameter<T>> parameters() {
    std::vector<named_parameter<T>> out;
    auto push = [&](named_parameter<T> p) { out.push_back(std::move(p)); };
    x_embedder_.for_each_parameter("x_embedder.", push);
    t_embedder_.for_each_parameter("t_embedder.", push);
    y_embedder_.for_each_parameter("y_embedder.", push);
    for (std::size_t i = 0; i < blocks_.size(); ++i) {
      const std::string prefix = "blocks." + std::to_string(i) + ".";
      block& b = blocks_[i];
      b.attn.for_each_parameter(prefix + "attn.", push);
      b.adaLN.for_each_parameter(prefix + "adaLN_modulation.1.", push);
      if (b.dense) b.dense->for_each_parameter(0, prefix + "mlp.", dense_names(), push);
      if constexpr (has_moe)
        if (b.moe)
          for (auto p : b.moe->parameters()) push({prefix + "mlp." + p.name, p.shape, p.value, p.grad});
    }
    final_.for_each_parameter("final_layer.", push);
    return out;
  }

  /// Saved, untrained state: pos_embed and the MoE routers' buffers.
  std::vector<named_parameter<T>> buffers() {
    std::vector<named_parameter<T>> out;
    pos_embed_.for_each_buffer("", [&](named_parameter<T> p) { out.push_back(std::move(p)); });
    if constexpr (has_moe)
      for (std::size_t i = 0; i < blocks_.size(); ++i)
        if (blocks_[i].moe)
          for (auto p : blocks_[i].moe->buffers())
            out.push_back({"blocks." + std::to_string(i) + ".mlp." + p.name, p.shape, p.value, p.grad});
    return out;
  }

  /// Clears every gradient. The gradient buffers are listed once (the model is move-only and
  /// its buffers never move), so this allocates nothing after the first call.
  void zero_grad() {
    if (grads_.empty())
      for (auto& p : parameters()) grads_.push_back({p.grad, p.size()});
    for (const auto& [g, n] : grads_) traits::fill(g, n, T(0));
  }

 private:
  static const dit_config& checked(const dit_config& cfg) {
    cfg.validate();
    return cfg;
  }
  static param_naming dense_names() {
    param_naming names;
    names.mlp_in = "fc1";
    names.mlp_out = "fc2";
    return names;
  }
  nn::patch_grid out_grid(index_t n) const {
    nn::patch_grid g;
    g.batch = n;
    g.channels = cfg_.out_channels();
    g.height = g.width = cfg_.input_size;
    g.patch = cfg_.patch_size;
    return g;
  }
  static void ensure_ones(cache& c, index_t n) {
    if (c.ones.size() < n) {
      c.ones.resize({n});
      c.ones.fill(T(1));
    }
  }

  void forward_block(std::size_t i, cache& c, bool training) {
    block& b = blocks_[i];
    block_cache& k = c.blocks[i];
    const index_t n = c.samples, d = cfg_.hidden_size, tokens = cfg_.tokens(), rows = n * tokens;
    const auto x = c.xs[i].cmatrix();
    k.mod.resize({n, 6 * d});
    b.adaLN.forward(c.c_act.cmatrix(), k.mod.matrix());
    const auto mod = k.mod.cmatrix();
    for (auto* t : {&k.h1, &k.a, &k.x_mid, &k.h2, &k.m}) t->resize({rows, d});
    // attention branch
    b_norm(d).forward_modulated(x, mod.col_block(0, d), mod.col_block(d, d), tokens, k.h1.matrix(), k.norm1);
    b.attn.forward(k.h1.cmatrix(), tokens, k.a.matrix(), k.attn);
    nn::gated_residual<T, B>::forward(x, mod.col_block(2 * d, d), k.a.cmatrix(), tokens, k.x_mid.matrix());
    // MLP branch
    b_norm(d).forward_modulated(k.x_mid.cmatrix(), mod.col_block(3 * d, d), mod.col_block(4 * d, d), tokens,
                                k.h2.matrix(), k.norm2);
    if (b.dense) {
      k.mlp_act.resize({rows, 2 * cfg_.mlp_hidden()});
      b.dense->forward(0, k.h2.cmatrix(), k.mlp_act.matrix(), k.m.matrix(), false);
    } else if constexpr (has_moe) {
      if (training) {
        b.moe->forward(k.h2.cmatrix(), c.labels, k.m.matrix(), k.moe);
      } else {
        b.moe->infer(k.h2.cmatrix(), c.labels, k.m.matrix());
      }
    }
    nn::gated_residual<T, B>::forward(k.x_mid.cmatrix(), mod.col_block(5 * d, d), k.m.cmatrix(), tokens,
                                      c.xs[i + 1].matrix());
  }

  /// c.dx holds d(block output) on entry and d(block input) on exit; adds into c.dc_act.
  void backward_block(std::size_t i, cache& c) {
    block& b = blocks_[i];
    block_cache& k = c.blocks[i];
    const index_t n = c.samples, d = cfg_.hidden_size, tokens = cfg_.tokens(), rows = n * tokens;
    const auto mod = k.mod.cmatrix();
    c.dmod.resize({n, 6 * d});
    c.dmod.fill(T(0));
    const auto dmod = c.dmod.matrix();
    for (auto* t : {&c.dm, &c.dh}) t->resize({rows, d});
    // x_out = x_mid + gate_mlp * m: dx (the residual) flows on; dm, dgate_mlp
    c.dm.fill(T(0));
    nn::gated_residual<T, B>::backward(mod.col_block(5 * d, d), k.m.cmatrix(), tokens, c.dx.cmatrix(), {},
                                       c.dm.matrix(), dmod.col_block(5 * d, d));
    // MLP: dh = d(modulated MLP input), overwritten
    if (b.dense) {
      const index_t hidden = cfg_.mlp_hidden();
      c.dscratch.resize({rows, hidden});
      b.dense->backward(0, k.h2.cmatrix(), k.mlp_act.cmatrix(), c.dm.cmatrix(), c.dh.matrix(), false,
                        c.dscratch.matrix(), c.ones.data());
    } else if constexpr (has_moe) {
      b.moe->backward(c.dm.cmatrix(), k.moe, c.dh.matrix());
    }
    // h2 = modulate(norm2(x_mid)): shift/scale gradients, then LayerNorm's with dh * (1 + scale)
    nn::modulate<T, B>::backward(k.norm2.xhat.cmatrix(), mod.col_block(4 * d, d), tokens, c.dh.cmatrix(), {},
                                 dmod.col_block(3 * d, d), dmod.col_block(4 * d, d));
    b_norm(d).backward_modulated(k.norm2, mod.col_block(4 * d, d), tokens, c.dh.cmatrix(), c.dx.matrix());
    // x_mid = x + gate_msa * a
    c.dm.fill(T(0));  // reused as d(attention output)
    nn::gated_residual<T, B>::backward(mod.col_block(2 * d, d), k.a.cmatrix(), tokens, c.dx.cmatrix(), {},
                                       c.dm.matrix(), dmod.col_block(2 * d, d));
    c.dh.fill(T(0));
    b.attn.backward(k.attn, k.h1.cmatrix(), c.dm.cmatrix(), c.dh.matrix());
    nn::modulate<T, B>::backward(k.norm1.xhat.cmatrix(), mod.col_block(d, d), tokens, c.dh.cmatrix(), {},
                                 dmod.col_block(0, d), dmod.col_block(d, d));
    b_norm(d).backward_modulated(k.norm1, mod.col_block(d, d), tokens, c.dh.cmatrix(), c.dx.matrix());
    // adaLN_modulation.1 on SiLU(c)
    b.adaLN.backward(c.c_act.cmatrix(), c.dmod.cmatrix(), c.dc_act.matrix(), c.ones.data());
  }

  static nn::layer_norm<T, B> b_norm(index_t d) { return nn::layer_norm<T, B>(d, 1e-6); }

  dit_config cfg_;
  nn::patch_embed<T, B> x_embedder_;
  nn::position_embedding<T, B> pos_embed_;
  nn::timestep_embedder<T, B> t_embedder_;
  nn::label_embedder<T, B> y_embedder_;
  std::vector<block> blocks_;
  std::vector<std::pair<T*, index_t>> grads_;  ///< zero_grad's list
  nn::final_layer<T, B> final_;
};

}  // namespace promoe::dit
