"""PyTorch reference DiT (facebookresearch/DiT semantics, docs DESIGN section 3) with an optional
MoE feed-forward block (moe_reference.py) in some or all of its blocks.

State-dict names are exactly DiT's (``x_embedder.proj.weight``, ``pos_embed``,
``t_embedder.mlp.0.weight``, ``y_embedder.embedding_table.weight``, ``blocks.{i}.attn.qkv.weight``,
``blocks.{i}.mlp.fc1.weight`` or the MoE block's names under ``blocks.{i}.mlp.``,
``blocks.{i}.adaLN_modulation.1.weight``, ``final_layer.linear.weight``, ...).

``DiT(config).forward(x [B,C,H,W], t [B] float, y [B] int64, training)
    -> (out [B, out_channels, H, W], aux_loss 0-dim)``

Differences from the original code, all deliberate and documented:
* no label dropout: labels are used as given (the null label is ``num_classes``), and the MoE
  blocks route with exactly these labels; ``training`` only switches the MoE auxiliary losses;
* the timestep frequencies and angles are computed in float64, then cos/sin are cast to the
  model dtype (the original computes them in float32);
* ``pos_embed`` is computed in float64 (as DiT's numpy code does) and cast to the model dtype.
Works in float32 or float64 (``model.to(dtype)``).
"""

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import moe_reference as moe_ref

LN_EPS = 1e-6
FREQ_DIM = 256          # timestep frequency embedding size (128 cos + 128 sin)
MAX_PERIOD = 10000


def dit_config(**overrides):
    cfg = {
        "input_size": 8,
        "patch_size": 2,
        "in_channels": 3,
        "hidden_size": 16,
        "depth": 2,
        "num_heads": 2,
        "mlp_ratio": 2.0,
        "num_classes": 10,
        "learn_sigma": True,
        "interleave": True,
        "training": True,
        "moe": None,
        "dtype": "float64",
    }
    for k, v in overrides.items():
        if k not in cfg:
            raise KeyError("unknown DiT config key %s" % k)
        cfg[k] = v
    return cfg


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# ----------------------------------------------------------------------------------------
# fixed 2-D sin-cos position embedding, exactly DiT's numpy code (float64)
def get_1d_sincos_pos_embed_from_grid(embed_dim, pos):
    assert embed_dim % 2 == 0
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000 ** omega                      # (D/2,)
    pos = pos.reshape(-1)                             # (M,)
    out = np.einsum("m,d->md", pos, omega)            # (M, D/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # sin first


def get_2d_sincos_pos_embed(embed_dim, grid_size):
    assert embed_dim % 4 == 0, "hidden_size must be divisible by 4"
    # DiT uses float32 grids; the integer coordinates are exact either way.
    grid_h = np.arange(grid_size, dtype=np.float64)
    grid_w = np.arange(grid_size, dtype=np.float64)
    grid = np.meshgrid(grid_w, grid_h)                # w goes first: grid[0] = column index
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])
    emb_a = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])  # column -> first D/2
    emb_b = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])  # row -> last D/2
    return np.concatenate([emb_a, emb_b], axis=1)     # (T, D), T = grid_size**2


# ----------------------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    """timm PatchEmbed: Conv2d(C, D, kernel=stride=p), flatten to tokens in row-major order."""

    def __init__(self, img_size, patch_size, in_chans, embed_dim):
        super().__init__()
        self.patch_size = (patch_size, patch_size)
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        x = self.proj(x)                              # [B, D, G, G]
        return x.flatten(2).transpose(1, 2)           # [B, T, D], token = row * G + col


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size, frequency_embedding_size=FREQ_DIM):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    @staticmethod
    def timestep_embedding(t, dim, max_period=MAX_PERIOD):
        """[cos(t f), sin(t f)], f_i = exp(-ln(max_period) i / half); computed in float64."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float64, device=t.device) / half)
        args = t.detach().to(torch.float64)[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t):
        f = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(f.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Table [num_classes + 1, D]; the last row is the null label. No dropout here."""

    def __init__(self, num_classes, hidden_size):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels):
        return self.embedding_table(labels)


class Attention(nn.Module):
    """timm Attention (qkv_bias=True, no q/k norm, no dropout)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        assert dim % num_heads == 0
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                       # [B, heads, T, head_dim]
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(x)


class Mlp(nn.Module):
    """timm Mlp with GELU(approximate='tanh'): fc1, act, fc2."""

    def __init__(self, in_features, hidden_features):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=True)
        self.fc2 = nn.Linear(hidden_features, in_features, bias=True)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    def __init__(self, hidden_size, num_heads, mlp_ratio, moe_cfg=None):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=LN_EPS)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=LN_EPS)
        self.is_moe = moe_cfg is not None
        if self.is_moe:
            self.mlp = moe_ref.build_block(moe_cfg)
        else:
            self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c, y, training):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = \
            self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        h = modulate(self.norm2(x), shift_mlp, scale_mlp)
        if self.is_moe:
            m, aux = self.mlp(h, y, training)
        else:
            m, aux = self.mlp(h), None
        x = x + gate_mlp.unsqueeze(1) * m
        return x, aux


class FinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=LN_EPS)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        x = modulate(self.norm_final(x), shift, scale)
        return self.linear(x)


def moe_block_indices(depth, interleave):
    """Blocks with an MoE MLP: odd indices (1, 3, ...) when interleaving, else all."""
    return [i for i in range(depth) if (i % 2 == 1 if interleave else True)]


class DiT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.cfg = dict(config)
        d = config["hidden_size"]
        p = config["patch_size"]
        self.in_channels = config["in_channels"]
        self.out_channels = self.in_channels * 2 if config["learn_sigma"] else self.in_channels
        self.patch_size = p
        self.num_heads = config["num_heads"]
        self.num_classes = config["num_classes"]
        if config["input_size"] % p:
            raise ValueError("input_size must be a multiple of patch_size")

        self.x_embedder = PatchEmbed(config["input_size"], p, self.in_channels, d)
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = LabelEmbedder(self.num_classes, d)
        t_count = self.x_embedder.num_patches
        pe = get_2d_sincos_pos_embed(d, self.x_embedder.grid_size)
        self.pos_embed = nn.Parameter(torch.from_numpy(pe).unsqueeze(0).reshape(1, t_count, d),
                                      requires_grad=False)  # fixed, in the state dict

        moe = config.get("moe")
        self.moe_indices = moe_block_indices(config["depth"], config["interleave"]) if moe else []
        blocks = []
        for i in range(config["depth"]):
            mc = None
            if i in self.moe_indices:
                mc = dict(moe)
                mc["hidden_size"] = d
            blocks.append(DiTBlock(d, self.num_heads, config["mlp_ratio"], mc))
        self.blocks = nn.ModuleList(blocks)
        self.final_layer = FinalLayer(d, p, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        """DiT's initialisation (adaLN and final layer zero). Parity cases overwrite it."""
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        for blk in self.blocks:  # keep the MoE blocks' own init (prototypes N(0, 0.02) etc.)
            blk.attn.apply(_basic_init)
            if not blk.is_moe:
                blk.mlp.apply(_basic_init)
        self.final_layer.linear.apply(_basic_init)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for blk in self.blocks:
            nn.init.constant_(blk.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(blk.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x):
        """x [N, T, p*p*C] -> imgs [N, C, H, W]; channel index of x = (pi * p + qj) * C + c."""
        c = self.out_channels
        p = self.patch_size
        h = w = int(round(x.shape[1] ** 0.5))
        assert h * w == x.shape[1]
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x, t, y, training):
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        aux = x.new_zeros(())
        for blk in self.blocks:
            x, a = blk(x, c, y, training)
            if a is not None:
                aux = aux + a
        x = self.final_layer(x, c)
        return self.unpatchify(x), aux

    def trainable_parameters(self):
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]
