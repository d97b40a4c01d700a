"""PyTorch reference of the promoe MoE blocks (written from docs/DESIGN sections 2 and 2b).

Two blocks, with PyTorch state-dict names that the C++ library reproduces:

* ``ProMoEBlock``   (router "prototypical"): conditional routing of null-label samples to an
  unconditional expert, cosine-to-prototype routing for the others, an optional shared
  expert, and the routing contrastive loss (RCL).
* ``LinearTopKBlock`` (router "linear"): the DiT-MoE baseline, linear gate + top-k,
  an optional shared SwiGLU expert, and the Switch load-balance loss.

``forward(h [B,S,D], labels [B] int64, training) -> (out [B,S,D], aux_loss 0-dim)``.
Works in float32 or float64 (``block.to(dtype)``).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

COS_EPS = 1e-12  # eps of F.normalize in every cosine


def default_config(**overrides):
    cfg = {
        "hidden_size": 12,
        "num_routed_experts": 5,
        "top_k": 1,
        "moe_intermediate_size": 16,
        "shared_expert_intermediate_size": 16,
        "use_shared_expert": True,
        "use_uncond_expert": True,
        "null_label": 10,
        "router": "prototypical",
        "router_weight_mode": "identity",
        "norm_topk_prob": False,
        "routing_contrastive_lam": 1.0,
        "routing_contrastive_temperature": 0.07,
        "use_top_k_for_routing_contrastive": True,
        "load_balance_loss_coef": 0.0,
        "training": True,
        "dtype": "float64",
    }
    for k, v in overrides.items():
        if k not in cfg:
            raise KeyError("unknown config key %s" % k)
        cfg[k] = v
    return cfg


def activate(z, mode):
    if mode == "identity":
        return z
    if mode == "softmax":
        return torch.softmax(z, dim=-1)
    if mode == "sigmoid":
        return torch.sigmoid(z)
    raise ValueError("unknown router_weight_mode %r" % mode)


def select_top_k(scores, k, norm_topk_prob):
    """torch.topk (largest, sorted); gate = activated score, optionally renormalised over the k."""
    gates, idx = torch.topk(scores, k, dim=-1, largest=True, sorted=True)
    if norm_topk_prob:
        gates = gates / gates.sum(dim=-1, keepdim=True)
    return gates, idx


def dispatch_experts(x, token_rows, gates, idx, experts, out):
    """out[token_rows[r]] += gates[r, s] * experts[idx[r, s]](x[token_rows[r]]) (reference style)."""
    for e, expert in enumerate(experts):
        rows, slots = torch.nonzero(idx == e, as_tuple=True)
        if rows.numel() == 0:
            continue
        tok = token_rows[rows]
        y = expert(x[tok]) * gates[rows, slots].unsqueeze(-1)
        out = out.index_add(0, tok, y)
    return out


class GeluMLP(nn.Module):
    """ProMoE expert: up_proj (D->I, bias), GELU tanh, down_proj (I->D, bias)."""

    def __init__(self, d, i):
        super().__init__()
        self.up_proj = nn.Linear(d, i, bias=True)
        self.down_proj = nn.Linear(i, d, bias=True)

    def forward(self, x):
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


class Fc12MLP(nn.Module):
    """DiT-MoE expert: fc1 (D->I, bias), GELU tanh, fc2 (I->D, bias)."""

    def __init__(self, d, i):
        super().__init__()
        self.fc1 = nn.Linear(d, i, bias=True)
        self.fc2 = nn.Linear(i, d, bias=True)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SwiGLU(nn.Module):
    """Shared expert of the DiT-MoE baseline: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, d, i):
        super().__init__()
        self.gate_proj = nn.Linear(d, i, bias=False)
        self.up_proj = nn.Linear(d, i, bias=False)
        self.down_proj = nn.Linear(i, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class ProMoEBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.cfg = dict(config)
        d = config["hidden_size"]
        e = config["num_routed_experts"]
        i = config["moe_intermediate_size"]
        self.num_experts = e
        self.top_k = config["top_k"]
        if not 1 <= self.top_k <= e:
            raise ValueError("top_k must be in 1..num_routed_experts")
        self.cluster_centers = nn.Parameter(torch.randn(e, d) * 0.02)
        n_exp = e + (1 if config["use_uncond_expert"] else 0)
        self.experts = nn.ModuleList([GeluMLP(d, i) for _ in range(n_exp)])
        if config["use_shared_expert"]:
            si = config["shared_expert_intermediate_size"]
            if si <= 0:
                raise ValueError("use_shared_expert needs shared_expert_intermediate_size > 0")
            self.shared_expert = GeluMLP(d, si)
        else:
            self.shared_expert = None

    def conditional_mask(self, labels, seq):
        """Per-token bool mask: True for tokens routed by the prototypes."""
        tok_labels = labels.repeat_interleave(seq)
        if self.cfg["use_uncond_expert"]:
            return tok_labels != self.cfg["null_label"]
        return torch.ones_like(tok_labels, dtype=torch.bool)

    def route(self, xc):
        """Cosine scores, activation, top-k for the conditional tokens xc [Nc, D]."""
        z = F.normalize(xc, dim=-1, eps=COS_EPS) @ F.normalize(self.cluster_centers, dim=-1, eps=COS_EPS).t()
        scores = activate(z, self.cfg["router_weight_mode"])
        gates, idx = select_top_k(scores, self.top_k, self.cfg["norm_topk_prob"])
        return z, gates, idx

    def routing_contrastive_loss(self, xc, idx):
        member = idx if self.cfg["use_top_k_for_routing_contrastive"] else idx[:, :1]
        active, centroids = [], []
        for e in range(self.num_experts):
            rows = torch.nonzero((member == e).any(dim=-1), as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            active.append(e)
            centroids.append(xc[rows].mean(dim=0))
        if len(active) < 2:
            return xc.new_zeros(())
        p = F.normalize(self.cluster_centers[active], dim=-1, eps=COS_EPS)
        m = F.normalize(torch.stack(centroids), dim=-1, eps=COS_EPS)
        logits = p @ m.t() / self.cfg["routing_contrastive_temperature"]
        target = torch.arange(len(active), device=xc.device)
        return F.cross_entropy(logits, target)

    def forward(self, h, labels, training):
        b, s, d = h.shape
        x = h.reshape(b * s, d)
        cond = self.conditional_mask(labels, s)
        cond_rows = torch.nonzero(cond, as_tuple=True)[0]
        uncond_rows = torch.nonzero(~cond, as_tuple=True)[0]
        out = torch.zeros_like(x)
        aux = x.new_zeros(())
        if cond_rows.numel() > 0:
            xc = x[cond_rows]
            _, gates, idx = self.route(xc)
            out = dispatch_experts(x, cond_rows, gates, idx, self.experts[: self.num_experts], out)
            if training:
                aux = self.cfg["routing_contrastive_lam"] * self.routing_contrastive_loss(xc, idx)
        if uncond_rows.numel() > 0:  # only possible with use_uncond_expert; gate 1.0
            out = out.index_add(0, uncond_rows, self.experts[self.num_experts](x[uncond_rows]))
        if self.shared_expert is not None:
            out = out + self.shared_expert(x)
        return out.reshape(b, s, d), aux


class LinearTopKBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.cfg = dict(config)
        d = config["hidden_size"]
        e = config["num_routed_experts"]
        i = config["moe_intermediate_size"]
        self.num_experts = e
        self.top_k = config["top_k"]
        if not 1 <= self.top_k <= e:
            raise ValueError("top_k must be in 1..num_routed_experts")
        self.gate = nn.Linear(d, e, bias=False)  # kaiming_uniform(a=sqrt(5)) as nn.Linear
        self.experts = nn.ModuleList([Fc12MLP(d, i) for _ in range(e)])
        si = config["shared_expert_intermediate_size"]
        self.shared_experts = SwiGLU(d, si) if si > 0 else None

    def route(self, x):
        logits = x @ self.gate.weight.t()
        scores = activate(logits, self.cfg["router_weight_mode"])
        gates, idx = select_top_k(scores, self.top_k, self.cfg["norm_topk_prob"])
        return logits, gates, idx

    def load_balance_loss(self, logits, idx):
        n = logits.shape[0]
        e = self.num_experts
        probs = torch.softmax(logits, dim=-1)  # always softmax, whatever router_weight_mode
        with torch.no_grad():
            counts = torch.bincount(idx.reshape(-1), minlength=e).to(logits.dtype)
            f = counts / (n * self.top_k)
        p = probs.mean(dim=0)
        return self.cfg["load_balance_loss_coef"] * e * (f * p).sum()

    def forward(self, h, labels, training):
        del labels  # the linear router ignores labels
        b, s, d = h.shape
        x = h.reshape(b * s, d)
        rows = torch.arange(b * s, device=h.device)
        logits, gates, idx = self.route(x)
        out = dispatch_experts(x, rows, gates, idx, self.experts, torch.zeros_like(x))
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        aux = self.load_balance_loss(logits, idx) if training else x.new_zeros(())
        return out.reshape(b, s, d), aux


def build_block(config):
    if config["router"] == "prototypical":
        return ProMoEBlock(config)
    if config["router"] == "linear":
        return LinearTopKBlock(config)
    raise ValueError("unknown router %r" % config["router"])


def router_margins(block, h, labels):
    """For every routed token, the smallest gap between adjacent raw router scores (cosine or
    logit; the activations are monotonic) among its k+1 best, i.e. how far the token is from
    changing its top-k set or its top-1 (inf when k == E == 1)."""
    with torch.no_grad():
        b, s, d = h.shape
        x = h.reshape(b * s, d)
        if isinstance(block, ProMoEBlock):
            cond = block.conditional_mask(labels, s)
            if not bool(cond.any()):
                return torch.full((0,), math.inf, dtype=h.dtype)
            z, _, _ = block.route(x[cond])
        else:
            z, _, _ = block.route(x)
        m = min(block.top_k + 1, z.shape[-1])
        if m < 2:
            return torch.full((z.shape[0],), math.inf, dtype=h.dtype)
        srt = torch.sort(z, dim=-1, descending=True).values[:, :m]
        return (srt[:, :-1] - srt[:, 1:]).min(dim=-1).values
