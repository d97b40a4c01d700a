#!/usr/bin/env python3
"""Write the MoE parity cases (PyTorch reference -> files the C++ tool `promoe-parity` reads).

    python3 make_cases.py --out DIR [--quick]     # one folder per case
    python3 make_cases.py --self-check            # torch.autograd.gradcheck of the reference

Each case folder holds:
  config.json            the block configuration (keys listed in CONFIG_KEYS)
  weights.safetensors    the block's full state_dict
  inputs.safetensors     hidden_states [B,S,D] (case dtype), labels [B] int64, grad_output [B,S,D]
  expected.safetensors   output, aux_loss (0-dim), grad.hidden_states, grad.<param> for every
                         parameter (zeros where nothing reaches it), from autograd of
                         (output * grad_output).sum() + aux_loss
"""

import argparse
import json
import math
import os
import sys
import time
import zlib

import torch
import torch.nn.functional as F

sys.dont_write_bytecode = True  # keep the source tree free of __pycache__
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import moe_reference as ref  # noqa: E402
import safetensors_io as st  # noqa: E402

CONFIG_KEYS = [
    "hidden_size", "num_routed_experts", "top_k", "moe_intermediate_size",
    "shared_expert_intermediate_size", "use_shared_expert", "use_uncond_expert", "null_label",
    "router", "router_weight_mode", "norm_topk_prob", "routing_contrastive_lam",
    "routing_contrastive_temperature", "use_top_k_for_routing_contrastive",
    "load_balance_loss_coef", "training", "dtype",
]

B, D, E, I, NULL = 4, 12, 5, 16, 10
LABELS = {
    "null": [3, NULL, 7, NULL],      # two conditional, two unconditional samples
    "nonull": [3, 1, 7, 0],
    "allnull": [NULL] * 4,           # the classifier-free-guidance unconditional batch
    "onecond": [NULL, 5, NULL, NULL],
}
MIN_MARGIN = 1e-3   # routing must be this far from a tie (so float32 C++ routes identically)
DTYPES = {"float64": torch.float64, "float32": torch.float32}


def promoe(dtype="float64", k=1, mode="identity", labels="null", train=True, S=7, quick=False,
           tag="", special=None, **over):
    base = dict(router="prototypical", top_k=k, router_weight_mode=mode, training=train,
                dtype=dtype, use_uncond_expert=True, use_shared_expert=True,
                shared_expert_intermediate_size=20, routing_contrastive_lam=1.0,
                routing_contrastive_temperature=0.07, load_balance_loss_coef=0.0)
    base.update(over)
    name = "promoe_%s_top%d_%s_%s_%s%s" % (
        "f64" if dtype == "float64" else "f32", k, mode, labels, "train" if train else "eval", tag)
    return dict(name=name, cfg=base, labels=labels, S=S, quick=quick, special=special)


def linear(dtype="float64", k=1, mode="softmax", labels="nonull", train=True, S=7, quick=False,
           tag="", special=None, shared=0, **over):
    base = dict(router="linear", top_k=k, router_weight_mode=mode, training=train, dtype=dtype,
                use_uncond_expert=False, use_shared_expert=shared > 0,
                shared_expert_intermediate_size=shared, routing_contrastive_lam=0.0,
                load_balance_loss_coef=0.1)
    base.update(over)
    name = "linear_%s_top%d_%s_%s_%s%s" % (
        "f64" if dtype == "float64" else "f32", k, mode, labels, "train" if train else "eval", tag)
    return dict(name=name, cfg=base, labels=labels, S=S, quick=quick, special=special)


def case_list():
    c = [
        # ---- ProMoE (prototypical router), float64
        promoe(k=1, quick=True),                                        # the paper's setting
        promoe(k=1, train=False),
        promoe(k=2, quick=True),
        promoe(k=2, train=False),
        promoe(k=2, tag="_rcltop1", use_top_k_for_routing_contrastive=False, quick=True),
        promoe(k=1, tag="_rcltop1", use_top_k_for_routing_contrastive=False),
        promoe(k=2, labels="nonull"),
        promoe(k=1, labels="onecond"),
        promoe(k=1, tag="_norm", norm_topk_prob=True),                  # gate == 1 exactly
        promoe(k=1, mode="softmax"),
        promoe(k=2, mode="softmax", tag="_norm", norm_topk_prob=True, quick=True),
        promoe(k=2, mode="softmax", train=False),
        promoe(k=3, mode="softmax", labels="nonull", S=16),
        promoe(k=1, mode="sigmoid"),
        promoe(k=2, mode="sigmoid", tag="_norm", norm_topk_prob=True),
        promoe(k=2, mode="sigmoid", labels="nonull", train=False),
        promoe(k=2, tag="_nouncond", use_uncond_expert=False, quick=True),  # null labels routed
        promoe(k=2, tag="_noshared", use_shared_expert=False,
               shared_expert_intermediate_size=0),
        promoe(k=2, S=16, tag="_s16_lam0p3_tau0p5", routing_contrastive_lam=0.3,
               routing_contrastive_temperature=0.5),
        promoe(k=1, labels="allnull", quick=True),                      # CFG batch: RCL = 0
        promoe(k=1, tag="_oneexpert", special="oneexpert", quick=True),  # |A| = 1: RCL = 0
        promoe(k=1, tag="_twoexperts_tau0p5", special="twoexperts",    # |A| = 2
               routing_contrastive_temperature=0.5),
        promoe(k=2, tag="_auxonly", special="auxonly"),                 # grad_output = 0
        promoe(k=1, S=16, labels="nonull", tag="_auxonly_s16", special="auxonly"),
        # ---- ProMoE, float32
        promoe(dtype="float32", k=1, quick=True),
        promoe(dtype="float32", k=2),
        promoe(dtype="float32", k=2, mode="softmax", tag="_norm", norm_topk_prob=True),
        promoe(dtype="float32", k=2, mode="sigmoid", labels="nonull", train=False),
        promoe(dtype="float32", k=1, labels="allnull"),
        promoe(dtype="float32", k=1, tag="_oneexpert", special="oneexpert"),
        # ---- linear top-k (DiT-MoE baseline), float64
        linear(k=1, quick=True),
        linear(k=1, train=False),
        linear(k=2),
        linear(k=2, tag="_norm", norm_topk_prob=True, quick=True),
        linear(k=2, mode="sigmoid"),
        linear(k=2, mode="sigmoid", tag="_norm", norm_topk_prob=True),
        linear(k=1, mode="identity"),
        linear(k=2, mode="identity", train=False),
        linear(k=2, tag="_shared", shared=8, quick=True),
        linear(k=1, labels="null", tag="_shared", shared=8, load_balance_loss_coef=0.01),
        linear(k=2, S=16, tag="_s16"),
        linear(k=1, tag="_oneexpert", special="oneexpert"),
        linear(k=2, tag="_auxonly", special="auxonly"),
        # ---- linear, float32
        linear(dtype="float32", k=1, quick=True),
        linear(dtype="float32", k=2, tag="_shared_norm", shared=8, norm_topk_prob=True),
        linear(dtype="float32", k=2, mode="sigmoid", train=False),
    ]
    names = [x["name"] for x in c]
    assert len(names) == len(set(names)), "duplicate case names"
    return c


def full_config(spec):
    cfg = ref.default_config(hidden_size=D, num_routed_experts=E, moe_intermediate_size=I,
                             null_label=NULL)
    cfg.update(spec["cfg"])
    assert sorted(cfg) == sorted(CONFIG_KEYS)
    return cfg


def perturb_biases(block, gen):
    with torch.no_grad():
        for name, p in block.named_parameters():
            if name.endswith(".bias"):
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1)


def draw_case(spec, seed):
    """Build the block and inputs (all drawn in float64, then cast to the case dtype)."""
    cfg = full_config(spec)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    block = ref.build_block(cfg).to(torch.float64)
    perturb_biases(block, gen)
    S = spec["S"]
    labels = torch.tensor(LABELS[spec["labels"]], dtype=torch.int64)
    noise = torch.randn(B, S, D, generator=gen, dtype=torch.float64)
    special = spec["special"]
    if cfg["router"] == "prototypical":
        protos = block.cluster_centers.detach()
        if special == "oneexpert":
            # every token points (nearly) at prototype 0: one active expert, RCL = 0
            u = F.normalize(protos[0], dim=0)
            h = 3.0 * u * math.sqrt(D) + 0.3 * noise
        elif special == "twoexperts":
            # tokens alternate between prototypes 0 and 1: exactly two active experts
            c = (torch.arange(B * S) % 2).reshape(B, S)
            h = 0.5 * noise + 3.0 * math.sqrt(D) * F.normalize(protos, dim=-1)[c]
        else:
            # noise plus a pull toward a random prototype: cosines spread over [-1, 1],
            # several experts active, meaningful RCL
            c = torch.randint(0, E, (B, S), generator=gen)
            h = 1.5 * noise + 2.5 * math.sqrt(D) * F.normalize(protos, dim=-1)[c] / math.sqrt(2)
    else:
        if special == "oneexpert":
            u = torch.randn(D, generator=gen, dtype=torch.float64)
            u = u / u.norm()
            with torch.no_grad():
                block.gate.weight[0] = 2.0 * u
            h = 3.0 * u + 0.3 * noise
        else:
            h = 1.5 * noise
    go = torch.randn(B, S, D, generator=gen, dtype=torch.float64)
    if special == "auxonly":
        go.zero_()
    dt = DTYPES[cfg["dtype"]]
    return cfg, block.to(dt), h.to(dt), labels, go.to(dt)


def compute_expected(block, h, labels, go, training):
    block.zero_grad(set_to_none=True)
    h = h.detach().clone().requires_grad_(True)
    out, aux = block(h, labels, training)
    loss = (out * go).sum() + aux
    loss.backward()
    exp = {"output": out.detach(), "aux_loss": aux.detach().reshape(()),
           "grad.hidden_states": h.grad.detach()}
    for name, p in block.named_parameters():
        exp["grad." + name] = p.grad.detach() if p.grad is not None else torch.zeros_like(p)
    return exp


def active_experts(block, h, labels):
    """Number of experts in the routing contrastive loss (prototypical router), else None."""
    if not isinstance(block, ref.ProMoEBlock):
        return None
    with torch.no_grad():
        cond = block.conditional_mask(labels, h.shape[1])
        if not bool(cond.any()):
            return 0
        _, _, idx = block.route(h.reshape(-1, h.shape[-1])[cond])
        if not block.cfg["use_top_k_for_routing_contrastive"]:
            idx = idx[:, :1]
        return int(torch.unique(idx).numel())


def well_conditioned(cfg, block, h, labels):
    """ProMoE training cases: a nearly saturated RCL (value = mean log(1 + tiny)) has a rounding
    floor of about |L| * eps absolute (|L| <= 1/tau), too close to the relative tolerance when
    the RCL itself is tiny; ask for RCL >= 1e-2 (float32) / 1e-3 (float64), or exactly 0."""
    if cfg["router"] != "prototypical" or not cfg["training"]:
        return True
    with torch.no_grad():
        _, aux = block(h, labels, True)
    rcl = float(aux) / cfg["routing_contrastive_lam"]
    return rcl == 0.0 or rcl >= (1e-2 if cfg["dtype"] == "float32" else 1e-3)


def make_case(spec, out_dir):
    base_seed = zlib.crc32(spec["name"].encode()) % 100000
    for attempt in range(50):
        seed = base_seed + 100003 * attempt
        cfg, block, h, labels, go = draw_case(spec, seed)
        margins = ref.router_margins(block, h, labels)
        if margins.numel() and float(margins.min()) < MIN_MARGIN:
            continue
        if well_conditioned(cfg, block, h, labels):
            break
    else:
        raise RuntimeError("%s: no seed without near-ties" % spec["name"])
    exp = compute_expected(block, h, labels, go, cfg["training"])
    d = os.path.join(out_dir, spec["name"])
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    st.save(os.path.join(d, "weights.safetensors"),
            {k: v.detach() for k, v in block.state_dict().items()})
    st.save(os.path.join(d, "inputs.safetensors"),
            {"hidden_states": h, "labels": labels, "grad_output": go})
    st.save(os.path.join(d, "expected.safetensors"), exp, metadata={"case": spec["name"]})
    return exp, (float(margins.min()) if margins.numel() else math.inf), active_experts(block, h, labels)


# ----------------------------------------------------------------------------------------
# gradcheck of the reference itself
def self_check():
    from torch.nn.utils.stateless import functional_call
    checks = [
        dict(router="prototypical", top_k=2, router_weight_mode="identity", labels=[3, NULL]),
        dict(router="prototypical", top_k=1, router_weight_mode="identity", labels=[3, NULL],
             use_top_k_for_routing_contrastive=False),
        dict(router="prototypical", top_k=2, router_weight_mode="softmax", norm_topk_prob=True,
             labels=[3, 4], use_top_k_for_routing_contrastive=False),
        dict(router="prototypical", top_k=2, router_weight_mode="sigmoid", norm_topk_prob=True,
             labels=[NULL, 2], use_uncond_expert=False),
        dict(router="linear", top_k=2, router_weight_mode="softmax", labels=[1, 2],
             shared_expert_intermediate_size=4, use_shared_expert=True, use_uncond_expert=False,
             load_balance_loss_coef=0.5, routing_contrastive_lam=0.0),
        dict(router="linear", top_k=1, router_weight_mode="sigmoid", norm_topk_prob=False,
             labels=[1, 2], shared_expert_intermediate_size=0, use_shared_expert=False,
             use_uncond_expert=False, load_balance_loss_coef=0.5, routing_contrastive_lam=0.0),
        dict(router="linear", top_k=2, router_weight_mode="identity", labels=[1, 2],
             shared_expert_intermediate_size=0, use_shared_expert=False,
             use_uncond_expert=False, load_balance_loss_coef=0.5, routing_contrastive_lam=0.0),
    ]
    ok = True
    for i, chk in enumerate(checks):
        chk = dict(chk)
        lab = torch.tensor(chk.pop("labels"), dtype=torch.int64)
        over = dict(hidden_size=6, num_routed_experts=3, moe_intermediate_size=5,
                    shared_expert_intermediate_size=4, null_label=NULL,
                    routing_contrastive_temperature=0.5)
        over.update(chk)
        cfg = ref.default_config(**over)
        for attempt in range(100):
            torch.manual_seed(1000 + 17 * i + 1009 * attempt)
            block = ref.build_block(cfg).double()
            with torch.no_grad():
                for n_, p in block.named_parameters():
                    if n_.endswith(".bias"):
                        p.add_(torch.randn_like(p) * 0.1)
                    if n_ == "cluster_centers":
                        p.mul_(20.0)
            h = torch.randn(2, 3, 6, dtype=torch.float64)
            m = ref.router_margins(block, h, lab)
            if m.numel() == 0 or float(m.min()) > 1e-2:
                break
        names = [n_ for n_, _ in block.named_parameters()]
        params = [p.detach().clone().requires_grad_(True) for _, p in block.named_parameters()]
        h = h.requires_grad_(True)

        def fn(hh, *ps):
            out, aux = functional_call(block, dict(zip(names, ps)), (hh, lab, True))
            return out, aux

        with torch.no_grad():
            _, aux0 = fn(h, *params)
        good = torch.autograd.gradcheck(fn, (h, *params), eps=1e-6, atol=1e-8, rtol=1e-6,
                                        raise_exception=False)
        desc = ", ".join("%s=%s" % kv for kv in sorted(chk.items()))
        print("gradcheck %d (%s; labels=%s; aux=%.6g; min margin %.3g): %s"
              % (i, desc, lab.tolist(), float(aux0), float(m.min()) if m.numel() else math.inf,
                 "PASS" if good else "FAIL"))
        ok = ok and good
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="output directory (one sub-folder per case)")
    ap.add_argument("--quick", action="store_true", help="only the quick subset of cases")
    ap.add_argument("--self-check", action="store_true",
                    help="run torch.autograd.gradcheck on the reference blocks")
    ap.add_argument("--list", action="store_true", help="print the case names and exit")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.self_check:
        ok = self_check()
        print("self-check:", "PASS" if ok else "FAIL")
        if not args.out:
            return 0 if ok else 1
        if not ok:
            return 1
    cases = [c for c in case_list() if c["quick"] or not args.quick]
    if args.list:
        for c in cases:
            print(c["name"])
        return 0
    if not args.out:
        ap.error("--out is required")
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    for c in cases:
        exp, margin, n_active = make_case(c, args.out)
        print("%-54s aux_loss=%.6e  min_margin=%.2e%s" % (
            c["name"], float(exp["aux_loss"]), margin,
            "" if n_active is None else "  rcl_experts=%d" % n_active))
    with open(os.path.join(args.out, "cases.txt"), "w") as f:
        f.write("".join(c["name"] + "\n" for c in cases))
    print("wrote %d cases to %s in %.1f s" % (len(cases), args.out, time.time() - t0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
