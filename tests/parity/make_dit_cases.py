#!/usr/bin/env python3
"""Write the DiT parity cases (PyTorch reference DiT -> files the C++ tool `promoe-parity --model dit`
reads).

    python3 make_dit_cases.py --out DIR [--quick] [--list]   # one folder per case
    python3 make_dit_cases.py --self-check                   # torch.autograd.gradcheck (fast mode)
    python3 make_dit_cases.py --self-check-full              # every Jacobian entry (~2 min)

Each case folder holds:
  config.json            the DiT configuration (keys in CONFIG_KEYS; `moe` is the MoE block's config
                         with make_cases.py's keys minus hidden_size, or null for a dense DiT)
  weights.safetensors    the model's full state_dict, pos_embed included
  inputs.safetensors     x [B,C,H,W] (case dtype), t [B] (case dtype), y [B] int64,
                         grad_output [B, out_channels, H, W]
  expected.safetensors   output, aux_loss (0-dim), grad.x, grad.<param> for every trainable
                         parameter (not pos_embed; zeros where nothing reaches it), from autograd of
                         (output * grad_output).sum() + aux_loss

DiT zero-initialises adaLN and the final layer, which would blind the test, so every trainable
parameter is overwritten with random values (biases non-zero). Cases are regenerated until no MoE
block's routing is within MIN_MARGIN of a tie.
"""

import argparse
import json
import math
import os
import sys
import time
import zlib

import torch

sys.dont_write_bytecode = True  # keep the source tree free of __pycache__
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402
import dit_reference as dref  # noqa: E402
import moe_reference as mref  # noqa: E402
import safetensors_io as st  # noqa: E402

CONFIG_KEYS = ["input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads",
               "mlp_ratio", "num_classes", "learn_sigma", "interleave", "training", "moe", "dtype"]
MOE_KEYS = [
    "num_routed_experts", "top_k", "moe_intermediate_size",
    "shared_expert_intermediate_size", "use_shared_expert", "use_uncond_expert", "null_label",
    "router", "router_weight_mode", "norm_topk_prob", "routing_contrastive_lam",
    "routing_contrastive_temperature", "use_top_k_for_routing_contrastive",
    "load_balance_loss_coef", "training", "dtype",
]

B, NUM_CLASSES = 3, 10
NULL = NUM_CLASSES
LABELS = {
    "null": [3, NULL, 7],            # two conditional samples, one null-label sample
    "nonull": [3, 1, 7],
    "allnull": [NULL] * 3,           # the classifier-free-guidance unconditional batch
    "twonull": [NULL, 5, NULL],
}
MIN_MARGIN = 1e-3   # routing must be this far from a tie (so float32 C++ routes identically)
F32_TWIN_TOL = 1e-5  # float32 expected values must be this close (relative) to float64 ones
DTYPES = {"float64": torch.float64, "float32": torch.float32}


def spec(name, dtype="float64", moe=None, labels="nonull", quick=False, special=None, tint=False,
         **over):
    cfg = dref.dit_config(input_size=8, patch_size=2, in_channels=3, hidden_size=16, depth=2,
                          num_heads=2, mlp_ratio=2.0, num_classes=NUM_CLASSES, learn_sigma=True,
                          interleave=True, training=True, moe=None, dtype=dtype)
    cfg.update(over)
    if moe is not None:
        m = dict(moe)
        m["training"] = cfg["training"]
        m["dtype"] = dtype
        cfg["moe"] = m
    full = "dit_%s_%s" % ("f64" if dtype == "float64" else "f32", name)
    return dict(name=full, cfg=cfg, labels=labels, quick=quick, special=special, tint=tint)


def promoe_moe(k=1, mode="identity", **over):
    m = dict(num_routed_experts=5, top_k=k, moe_intermediate_size=12,
             shared_expert_intermediate_size=20, use_shared_expert=True, use_uncond_expert=True,
             null_label=NULL, router="prototypical", router_weight_mode=mode, norm_topk_prob=False,
             routing_contrastive_lam=1.0, routing_contrastive_temperature=0.07,
             use_top_k_for_routing_contrastive=True, load_balance_loss_coef=0.0)
    m.update(over)
    return m


def linear_moe(k=1, mode="softmax", shared=0, **over):
    m = dict(num_routed_experts=4, top_k=k, moe_intermediate_size=12,
             shared_expert_intermediate_size=shared, use_shared_expert=shared > 0,
             use_uncond_expert=False, null_label=NULL, router="linear", router_weight_mode=mode,
             norm_topk_prob=False, routing_contrastive_lam=0.0,
             routing_contrastive_temperature=0.07, use_top_k_for_routing_contrastive=True,
             load_balance_loss_coef=0.1)
    m.update(over)
    return m


def case_list():
    P, L = promoe_moe, linear_moe
    c = [
        # ---- dense DiT
        spec("dense_sigma", quick=True),
        spec("dense_nosigma_c1", in_channels=1, learn_sigma=False, tint=True),
        spec("dense_d24_h4_depth3", hidden_size=24, num_heads=4, depth=3, training=False),
        spec("dense_sigma", dtype="float32", quick=True),
        spec("dense_nosigma_c1_d24_h4", dtype="float32", in_channels=1, learn_sigma=False,
             hidden_size=24, num_heads=4),
        # ---- ProMoE (prototypical router, unconditional + shared experts, identity score)
        spec("promoe_top1_inter_train", moe=P(1), labels="null", quick=True),
        spec("promoe_top1_inter_eval", moe=P(1), labels="null", training=False),
        spec("promoe_top2_inter_train", moe=P(2), labels="null", quick=True),
        spec("promoe_top2_all_train", moe=P(2), labels="twonull", interleave=False),
        spec("promoe_top1_all_eval_nosigma_c1", moe=P(1), labels="null", interleave=False,
             training=False, learn_sigma=False, in_channels=1, tint=True),
        spec("promoe_top1_all_train_d24_h4_depth3", moe=P(1), labels="null", interleave=False,
             hidden_size=24, num_heads=4, depth=3),
        spec("promoe_top2_inter_train_depth3_rcltop1", moe=P(2, use_top_k_for_routing_contrastive=False),
             labels="null", depth=3),
        spec("promoe_top1_all_train_nonull", moe=P(1), labels="nonull", interleave=False),
        spec("promoe_top1_all_train_allnull", moe=P(1), labels="allnull", interleave=False,
             quick=True),                                                   # RCL = 0
        spec("promoe_top2_all_train_auxonly", moe=P(2), labels="null", interleave=False,
             special="auxonly", quick=True),                                # grad_output = 0
        # ---- ProMoE, float32
        spec("promoe_top1_inter_train", dtype="float32", moe=P(1), labels="null", quick=True),
        spec("promoe_top2_all_train", dtype="float32", moe=P(2), labels="null", interleave=False),
        spec("promoe_top1_all_eval_nosigma_c1", dtype="float32", moe=P(1), labels="twonull",
             interleave=False, training=False, learn_sigma=False, in_channels=1),
        # ---- linear top-k (DiT-MoE baseline, softmax score)
        spec("linear_top1_inter_train", moe=L(1), quick=True),
        spec("linear_top1_inter_eval", moe=L(1), training=False),
        spec("linear_top2_inter_train", moe=L(2), quick=True),
        spec("linear_top2_all_train_nosigma", moe=L(2), interleave=False, learn_sigma=False),
        spec("linear_top2_all_train_shared_null", moe=L(2, shared=8), labels="null",
             interleave=False),
        spec("linear_top1_all_train_d24_h4_c1", moe=L(1), interleave=False, hidden_size=24,
             num_heads=4, in_channels=1, tint=True),
        # ---- linear, float32
        spec("linear_top1_inter_train", dtype="float32", moe=L(1), quick=True),
        spec("linear_top2_all_eval", dtype="float32", moe=L(2, shared=8), interleave=False,
             training=False),
    ]
    names = [x["name"] for x in c]
    assert len(names) == len(set(names)), "duplicate case names"
    for x in c:
        assert sorted(x["cfg"]) == sorted(CONFIG_KEYS)
        if x["cfg"]["moe"] is not None:
            assert sorted(x["cfg"]["moe"]) == sorted(MOE_KEYS)
    return c


# ----------------------------------------------------------------------------------------
def randomize_parameters(model, gen):
    """Overwrite every trainable parameter (DiT zero-initialises adaLN and the final layer).
    Weights ~ N(0, std) with std = clamp(1/sqrt(fan_in), 0.02, 0.3) (label table 0.3,
    prototypes 0.3); biases ~ N(0, 0.1)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if name.endswith(".bias"):
                std = 0.1
            elif name.endswith("embedding_table.weight") or name.endswith("cluster_centers"):
                std = 0.3
            else:
                fan_in = p[0].numel() if p.dim() > 1 else p.numel()
                std = min(0.3, max(0.02, 1.0 / math.sqrt(fan_in)))
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) * std)


def draw_timesteps(gen, integer):
    """One t in each of [0, 100), [400, 600), [900, 1000), in a random order; integer t for
    DDPM-like cases (then 0 and 999 appear)."""
    if integer:
        t = torch.tensor([0.0, float(torch.randint(1, 999, (1,), generator=gen)), 999.0],
                         dtype=torch.float64)
    else:
        lo = torch.tensor([0.0, 400.0, 900.0], dtype=torch.float64)
        span = torch.tensor([100.0, 200.0, 100.0], dtype=torch.float64)
        t = lo + span * torch.rand(3, generator=gen, dtype=torch.float64)
    return t[torch.randperm(3, generator=gen)]


def draw_case(sp, seed):
    """Build the model and inputs (all drawn in float64, then cast to the case dtype)."""
    cfg = sp["cfg"]
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    model = dref.DiT(cfg).to(torch.float64)
    randomize_parameters(model, gen)
    c, s = cfg["in_channels"], cfg["input_size"]
    x = torch.randn(B, c, s, s, generator=gen, dtype=torch.float64)
    t = draw_timesteps(gen, sp["tint"])
    y = torch.tensor(LABELS[sp["labels"]], dtype=torch.int64)
    go = torch.randn(B, model.out_channels, s, s, generator=gen, dtype=torch.float64)
    if sp["special"] == "auxonly":
        go.zero_()
    dt = DTYPES[cfg["dtype"]]
    return model.to(dt), x.to(dt), t.to(dt), y, go.to(dt)


def probe_moe(model, x, t, y):
    """Run one forward with hooks: per MoE block (index, min routing margin, its aux loss in
    training mode (also printed for eval cases, where it is not part of the expected values))."""
    records = []
    hooks = []
    for i in model.moe_indices:
        blk = model.blocks[i].mlp

        def hook(mod, inputs, output, i=i):
            h, labels = inputs[0], inputs[1]
            m = mref.router_margins(mod, h, labels)
            records.append((i, float(m.min()) if m.numel() else math.inf, float(output[1]), mod))
        hooks.append(blk.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x, t, y, True)
    finally:
        for hk in hooks:
            hk.remove()
    return records


def acceptable(cfg, records):
    """No near-ties; ProMoE RCL of each block either exactly 0 or not nearly saturated
    (>= 1e-2 float32, 1e-3 float64), as make_cases.py asks."""
    for _, margin, aux, mod in records:
        if margin < MIN_MARGIN:
            return False
        if isinstance(mod, mref.ProMoEBlock):
            rcl = aux / mod.cfg["routing_contrastive_lam"]
            if not (rcl == 0.0 or rcl >= (1e-2 if cfg["dtype"] == "float32" else 1e-3)):
                return False
    return True


def compute_expected(model, x, t, y, go, training):
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out, aux = model(x, t, y, training)
    loss = (out * go).sum() + aux
    loss.backward()
    exp = {"output": out.detach(), "aux_loss": aux.detach().reshape(()), "grad.x": x.grad.detach()}
    for name, p in model.trainable_parameters():
        exp["grad." + name] = p.grad.detach() if p.grad is not None else torch.zeros_like(p)
    return exp


def f64_twin_error(model, x, t, y, go, cfg, exp):
    """float32 cases: the worst relative error (compare.py's measure) of PyTorch's float32 results
    against the same computation in float64 from the same (float32) weights and inputs. A correct
    float32 implementation then errs by about as much; ask for a tenth of the tolerance."""
    c64 = dict(cfg, dtype="float64")
    if c64["moe"] is not None:
        c64["moe"] = dict(c64["moe"], dtype="float64")
    twin = dref.DiT(c64).to(torch.float64)
    twin.load_state_dict({k: v.detach().to(torch.float64) for k, v in model.state_dict().items()})
    e64 = compute_expected(twin, x.to(torch.float64), t.to(torch.float64), y,
                           go.to(torch.float64), cfg["training"])
    fails, _, worst, _ = compare.compare(e64, exp, "float32")
    return math.inf if fails else worst


def make_case(sp, out_dir):
    base_seed = zlib.crc32(sp["name"].encode()) % 100000
    cfg = sp["cfg"]
    for attempt in range(100):
        seed = base_seed + 100003 * attempt
        model, x, t, y, go = draw_case(sp, seed)
        records = probe_moe(model, x, t, y)
        if not acceptable(cfg, records):
            continue
        exp = compute_expected(model, x, t, y, go, cfg["training"])
        twin_err = None
        if cfg["dtype"] == "float32":
            twin_err = f64_twin_error(model, x, t, y, go, cfg, exp)
            if twin_err > F32_TWIN_TOL:
                continue
        break
    else:
        raise RuntimeError("%s: no acceptable seed (near-ties or float32 rounding)" % sp["name"])
    d = os.path.join(out_dir, sp["name"])
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    st.save(os.path.join(d, "weights.safetensors"),
            {k: v.detach() for k, v in model.state_dict().items()})
    st.save(os.path.join(d, "inputs.safetensors"), {"x": x, "t": t, "y": y, "grad_output": go})
    st.save(os.path.join(d, "expected.safetensors"), exp, metadata={"case": sp["name"]})
    margin = min([r[1] for r in records], default=math.inf)
    return exp, margin, attempt, [(r[0], r[2]) for r in records], twin_err


# ----------------------------------------------------------------------------------------
# gradcheck of the reference itself
def self_check(full=False):
    """gradcheck of the reference DiT through (x, every trainable parameter), training mode (aux
    losses included). fast_mode (random projections u^T J v, seconds) unless full (every
    Jacobian entry, about two minutes: t_embedder.mlp.0.weight alone has 256 * D entries)."""
    from torch.nn.utils.stateless import functional_call
    tiny = dict(input_size=4, patch_size=2, in_channels=1, hidden_size=8, depth=2, num_heads=2,
                mlp_ratio=2.0, num_classes=3, learn_sigma=True, interleave=True, training=True,
                dtype="float64")
    pm = promoe_moe(2, num_routed_experts=3, moe_intermediate_size=5,
                    shared_expert_intermediate_size=4, null_label=3,
                    routing_contrastive_temperature=0.5, training=True, dtype="float64")
    lm = linear_moe(2, num_routed_experts=3, moe_intermediate_size=5, shared=4, null_label=3,
                    load_balance_loss_coef=0.5, training=True, dtype="float64")
    checks = [
        ("dense", dict(tiny, moe=None), [1, 3]),
        ("promoe top2, interleave", dict(tiny, moe=pm), [1, 3]),
        ("promoe top1, all blocks, rcl top1, no sigma",
         dict(tiny, moe=dict(pm, top_k=1, use_top_k_for_routing_contrastive=False), interleave=False,
              learn_sigma=False), [2, 0]),
        ("linear top2 + shared swiglu, all blocks", dict(tiny, moe=lm, interleave=False), [0, 3]),
    ]
    ok = True
    for i, (desc, cfg, labels) in enumerate(checks):
        y = torch.tensor(labels, dtype=torch.int64)
        for attempt in range(100):
            torch.manual_seed(2000 + 31 * i + 1009 * attempt)
            gen = torch.Generator().manual_seed(7 + 31 * i + 1009 * attempt)
            model = dref.DiT(cfg).to(torch.float64)
            randomize_parameters(model, gen)
            x = torch.randn(2, cfg["in_channels"], 4, 4, generator=gen, dtype=torch.float64)
            t = torch.tensor([37.25, 912.5], dtype=torch.float64)
            recs = probe_moe(model, x, t, y)
            if all(r[1] > 1e-2 for r in recs):
                break
        names = [n for n, _ in model.trainable_parameters()]
        params = [p.detach().clone().requires_grad_(True) for _, p in model.trainable_parameters()]
        x = x.requires_grad_(True)

        def fn(xx, *ps):
            return functional_call(model, dict(zip(names, ps)), (xx, t, y, True))

        with torch.no_grad():
            _, aux0 = fn(x, *params)
        n_el = x.numel() + sum(p.numel() for p in params)
        t0 = time.time()
        good = torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-8, rtol=1e-6,
                                        raise_exception=False, fast_mode=not full)
        print("gradcheck%s %d (%s; labels=%s; aux=%.6g; min margin %.3g; %d inputs; %.1f s): %s"
              % ("" if full else " (fast mode)", i, desc, labels, float(aux0),
                 min([r[1] for r in recs], default=math.inf), n_el, time.time() - t0,
                 "PASS" if good else "FAIL"))
        ok = ok and good
    # the fixed position embedding: DiT's layout (first D/2 channels from the column)
    pe = dref.get_2d_sincos_pos_embed(8, 3)
    col, row = 2, 1
    tok = row * 3 + col
    want = [math.sin(col), math.sin(col * 0.01), math.cos(col), math.cos(col * 0.01),
            math.sin(row), math.sin(row * 0.01), math.cos(row), math.cos(row * 0.01)]
    pe_ok = max(abs(float(a) - b) for a, b in zip(pe[tok], want)) < 1e-15
    print("pos_embed layout (token row*G+col; [sin col, cos col, sin row, cos row]): %s"
          % ("PASS" if pe_ok else "FAIL"))
    return ok and pe_ok


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="output directory (one sub-folder per case)")
    ap.add_argument("--quick", action="store_true", help="only the quick subset of cases")
    ap.add_argument("--self-check", action="store_true",
                    help="run torch.autograd.gradcheck (fast mode) on the reference DiT")
    ap.add_argument("--self-check-full", action="store_true",
                    help="the same gradcheck over every Jacobian entry (about two minutes)")
    ap.add_argument("--list", action="store_true", help="print the case names and exit")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.self_check or args.self_check_full:
        ok = self_check(full=args.self_check_full)
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
        exp, margin, attempt, auxes, twin_err = make_case(c, args.out)
        print("%-50s aux_loss=%.5e  min_margin=%.2e  seed#%d%s%s" % (
            c["name"], float(exp["aux_loss"]), margin, attempt,
            "" if twin_err is None else "  f32-vs-f64 %.1e" % twin_err,
            "".join("  aux[b%d]=%.3g" % ia for ia in auxes)))
    with open(os.path.join(args.out, "cases.txt"), "w") as f:
        f.write("".join(c["name"] + "\n" for c in cases))
    print("wrote %d cases to %s in %.1f s" % (len(cases), args.out, time.time() - t0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
