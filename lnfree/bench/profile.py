"""Where the time of a forward (or a training step) goes, per operator: stock GPT-2 against the folded LN-free
model (and against stock with the folded model's fused GELU), and stock against the all-removed removable model
in a training step; plus the removal's own cost in a step, timed apart. Explains `make bench`'s ratios.

    python -m lnfree.bench.profile [--shapes builtin_2x128 gpt2_small] [--train gpt2_small] [--steps 3]
                                   [--norm-reps 40] [--out experiments/bench/profile.json]

Its tables in experiments/bench/README.md are generated from profile.json by `make tables` (lnfree.analysis.doc_tables).

torch.profiler on CPU, fp32, one thread, the shapes of lnfree.bench.cpu. Per model, per operator (aten ops, self
time): calls and milliseconds per forward (or step), grouped into what they do (GROUPS), and the operators that
differ most between two models. The profiler's times are elapsed times, so on a shared machine they carry its
noise; `norm_paths` times only what the removal changes (ln_1 -> c_attn and ln_2 per block, and ln_f) by the
thread's CPU time, interleaved, and scales it to a training step.
"""

from __future__ import annotations

import argparse
import json
import os
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from ..families import family
from .cpu import CLOCKS, SHAPES, alternate, build_models, fused_gelu_twin, machine, medians, train_step

# operator -> what it is part of in these models (anything else: "other")
GROUPS = {
    "aten::mm": "matmul", "aten::addmm": "matmul", "aten::bmm": "matmul",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward": "attention",
    "aten::native_layer_norm": "layernorm", "aten::native_layer_norm_backward": "layernorm",
    "aten::gelu": "gelu", "aten::gelu_backward": "gelu", "aten::tanh": "gelu", "aten::pow": "gelu",
    "aten::tanh_backward": "gelu",
    "aten::copy_": "copy", "aten::cat": "copy", "aten::clone": "copy", "aten::contiguous": "copy",
}
TOP = 6  # operators listed per comparison


def per_op(fn, steps: int) -> dict:
    """Self CPU time (ms per call of fn) and calls per call of fn, per aten operator."""
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as p:
        for _ in range(steps):
            fn()
    ops = {}
    for e in p.key_averages():
        if e.key.startswith("aten::") and e.self_cpu_time_total > 0:
            ops[e.key] = {"ms": e.self_cpu_time_total / 1000 / steps, "calls": e.count / steps}
    return ops


def grouped(ops: dict) -> dict:
    g = {}
    for k, v in ops.items():
        name = GROUPS.get(k, "elementwise and other")
        g[name] = g.get(name, 0.0) + v["ms"]
    return g


@torch.inference_mode()
def profile_forward(shape: str, steps: int) -> dict:
    s = SHAPES[shape]
    stock, folded = build_models(s["cfg"], folded=True)
    twin = fused_gelu_twin(stock)
    b, t = s["infer"]
    x = torch.randint(0, s["cfg"]["vocab_size"], (b, t))
    models = {"stock": lambda: stock(x, use_cache=False), "stock_fused_gelu": lambda: twin(x, use_cache=False),
              "folded": lambda: folded(x)}
    return {"batch": b, "context": t, "ops": {k: per_op(f, steps) for k, f in models.items()}}


def profile_train(shape: str, steps: int) -> dict:
    s = SHAPES[shape]
    stock, variants = build_models(s["cfg"])
    b, t = s["train"]
    x = torch.randint(0, s["cfg"]["vocab_size"], (b, t))
    out = {"batch": b, "context": t, "ops": {}}
    for name, m in (("stock", stock), ("all_removed", variants["all_removed"])):
        m.train()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-5, foreach=True)
        out["ops"][name] = per_op(train_step(m, x, opt, nullcontext(), commit=name != "stock"), steps)
    return out


def norm_paths(shape: str, reps: int) -> dict:
    """Forward + backward of only what the removal changes in a training step, stock against all removed, timed
    by the thread's CPU time (interleaved, like the bench): per block ln_1 -> c_attn (the split LayerNorm's
    frozen paths and the projection that applies their factors) and ln_2, and once ln_f; inputs of the training
    step's shape. Times the number of blocks, the difference is the removal's cost in a step."""
    s = SHAPES[shape]
    stock, variants = build_models(s["cfg"])
    removed = variants["all_removed"]
    b, t = s["train"]
    x = torch.randn(b, t, s["cfg"]["n_embd"], requires_grad=True)

    def paths(m):
        fam = family(m.config)
        blk, ln_f = fam.blocks(m)[0], fam.final_norm(m)

        def run():
            h = fam.attn_norm(blk)(x)
            y = sum(blk.get_submodule(r)(h).sum() for r in fam.attn_readers) + fam.mlp_norm(blk)(x).sum()
            y.backward()
        return run, lambda: ln_f(x).sum().backward()

    for m in (stock, removed):
        m.train()
    (sb, sf), (rb, rf) = paths(stock), paths(removed)
    med = medians(alternate({"stock_block": sb, "removed_block": rb, "stock_lnf": sf, "removed_lnf": rf}, reps,
                            clock=CLOCKS["thread"]))
    n = s["cfg"]["n_layer"]
    extra = n * (med["removed_block"] - med["stock_block"]) + med["removed_lnf"] - med["stock_lnf"]
    return {"batch": b, "context": t, "n_layer": n, "median_s": med, "extra_s_per_step": extra}


def table(res: dict) -> str:
    lines = [f"Self CPU time per forward (training step), ms, by what the operators do; torch.profiler, fp32, "
             f"{res['machine']['threads']} thread, {res['steps']} calls each (load average "
             f"{res['loadavg'][0]:.2f}: the machine was shared, so the shares say more than the milliseconds).", "",
             "| shape | what | model | matmul | attention | layernorm | gelu | copy | elementwise and other | total "
             "| aten calls |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    cols = ["matmul", "attention", "layernorm", "gelu", "copy", "elementwise and other"]
    for kind in ("forward", "train_step"):
        for shape, r in res.get(kind, {}).items():
            for model, ops in r["ops"].items():
                g = grouped(ops)
                total = sum(g.values())
                calls = sum(v["calls"] for v in ops.values())
                lines.append(f"| {shape} | {kind.replace('_', ' ')} | {model} | "
                             + " | ".join(f"{g.get(c, 0.0):.1f}" for c in cols) + f" | {total:.1f} | {calls:.0f} |")
    lines += ["", "The operators that differ most (self ms per forward or step, and calls; B - A):", "",
              "| shape | what | A -> B | operator | A ms | B ms | A calls | B calls |",
              "|---|---|---|---|---|---|---|---|"]
    for kind, a, b in (("forward", "stock", "folded"), ("forward", "stock", "stock_fused_gelu"),
                       ("train_step", "stock", "all_removed")):
        for shape, r in res.get(kind, {}).items():
            oa, ob = r["ops"][a], r["ops"][b]
            zero = {"ms": 0.0, "calls": 0}
            diff = sorted(set(oa) | set(ob), key=lambda k: -abs(ob.get(k, zero)["ms"] - oa.get(k, zero)["ms"]))
            for k in diff[:TOP]:
                va, vb = oa.get(k, zero), ob.get(k, zero)
                lines.append(f"| {shape} | {kind.replace('_', ' ')} | {a} -> {b} | `{k.removeprefix('aten::')}` "
                             f"| {va['ms']:.1f} | {vb['ms']:.1f} | {va['calls']:.0f} | {vb['calls']:.0f} |")
    for shape, r in res.get("norm_paths", {}).items():
        m = r["median_s"]
        lines += ["", f"{shape}, training step's shape ({r['batch']} x {r['context']}): ln_1 -> c_attn and ln_2, "
                  f"forward + backward, {1000 * m['stock_block']:.2f} ms per block in stock GPT-2 and "
                  f"{1000 * m['removed_block']:.2f} ms with every site removed; ln_f {1000 * m['stock_lnf']:.2f} -> "
                  f"{1000 * m['removed_lnf']:.2f} ms; over the {r['n_layer']} blocks and ln_f "
                  f"{1000 * r['extra_s_per_step']:+.0f} ms per training step (CPU time of the thread, "
                  f"median of {res['norm_reps']} interleaved repetitions)."]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES))
    p.add_argument("--train", nargs="*", default=["gpt2_small"], help="shapes whose training step is profiled")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--norm-reps", type=int, default=40, help="repetitions of the norm paths' timing")
    p.add_argument("--out", default="experiments/bench/profile.json")
    p.add_argument("--only-norm-paths", action="store_true", help="time the norm paths only, into --out's JSON")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    if a.only_norm_paths:
        res = json.loads(Path(a.out).read_text())
        res.update(norm_paths={s: norm_paths(s, a.norm_reps) for s in a.train}, norm_reps=a.norm_reps)
        Path(a.out).write_text(json.dumps(res, indent=1))
        print(table(res))
        return
    res = {"machine": machine(), "loadavg": os.getloadavg(), "steps": a.steps,
           "forward": {s: profile_forward(s, a.steps) for s in a.shapes},
           "train_step": {s: profile_train(s, a.steps) for s in a.train},
           "norm_paths": {s: norm_paths(s, a.norm_reps) for s in a.train}, "norm_reps": a.norm_reps}
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(table(res))


if __name__ == "__main__":
    main()
