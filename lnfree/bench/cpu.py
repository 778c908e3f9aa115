"""`make bench`: the cost of the removal machinery and the speed of the LN-free model, on this machine.

    python -m lnfree.bench.cpu [--reps 7] [--shapes builtin_2x128 gpt2_small] [--precisions fp32 bf16]
                               [--out experiments/bench/cpu.json]

All timings in one process, on the same shapes, alternating A and B in every repetition in a rotating order
(so drift and noise hit both), reporting per variant the median and quartiles of the per-repetition ratios to
stock (each repetition pairs a variant's call with stock's call in the same repetition), plus medians and the
ratio of medians in the JSON; repetitions: --reps x the shape's rep_scale. The table shows the paired ratios:
  python -m lnfree.bench.cpu --precisions fp32     # fp32 only (bf16 is emulated, and slow, on CPUs without
                                                   # avx512_bf16/amx: machine.native_bf16 in the JSON says which)
  a. training step (forward + backward + AdamW step, plus the per-step statistics commit for the removable
     model) of the removable model with every site real, mid-schedule (half removed) and all removed,
     against stock GPT2LMHeadModel, in fp32 and bf16 autocast;
  b. inference forward of the folded LN-free model against stock GPT-2 with LayerNorm (fp32);
  c. evaluation throughput (tokens/s, bf16 autocast, batch 1 x context) and peak memory;
  d. host syncs in a training step attributable to the removal machinery (lnfree.bench.syncs).
Shapes: the built-in default (2 x 128, vocab 4096, 16 x 256 tokens) and GPT-2 small (124M) at a short context.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from ..export import fold
from ..model import make_removable, parse_site_name
from .syncs import count_syncs

SHAPES = {  # rep_scale: repetitions = rep_scale x --reps (the small shape is cheap and its ratios are noisier)
    "builtin_2x128": dict(cfg=dict(n_layer=2, n_head=4, n_embd=128, n_positions=256, vocab_size=4096),
                          train=(16, 256), infer=(16, 256), eval_ctx=256, rep_scale=2),
    "gpt2_small": dict(cfg=dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024, vocab_size=50257),
                       train=(4, 128), infer=(4, 128), eval_ctx=1024, rep_scale=1),
}


def bench_config(cfg_kw) -> GPT2Config:
    """A random-init GPT-2 config for the benchmarks: no dropout, and bos/eos at the last id of the vocabulary
    (GPT-2's convention, 50256 in its own vocabulary; GPT2Config's default 50256 lies outside a smaller one)."""
    v = cfg_kw["vocab_size"]
    return GPT2Config(**cfg_kw, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=v - 1, eos_token_id=v - 1)


def build_models(cfg_kw, device="cpu", folded=False):
    """Stock GPT-2 (seed 0) and the removable model with every site real, half removed and all removed (sigmas
    calibrated on random tokens), or with folded=True stock and the folded LN-free model of the all-removed one."""
    cfg = bench_config(cfg_kw)
    torch.manual_seed(0)
    stock = GPT2LMHeadModel(cfg).to(device)
    x = torch.randint(0, cfg.vocab_size, (4, 64), device=device)
    fracs = {"all_removed": 1.0} if folded else {"all_real": 0.0, "mid_schedule": 0.5, "all_removed": 1.0}
    variants = {}
    for name, frac in fracs.items():
        m = variants[name] = make_removable(stock)
        if frac:
            m.calibrate(x)
            names = list(m.sites())
            for n in names[: round(frac * len(names))]:
                m.remove(*parse_site_name(n))
    if folded:
        return stock.eval(), fold(variants["all_removed"]).to(device)
    return stock, variants


def _train_step(model, x, opt, autocast, commit):
    def run():
        with autocast:
            logits = model(input_ids=x, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if commit:
            model.commit_norm_stats(0.9)
    return run


def alternate(fns: dict, reps: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per call of each fn in every repetition. Calls are interleaved, and the order rotates every
    repetition (A B C, B C A, C A B, ...) so that no fn always runs first or always follows the same one."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    keys = list(fns)
    times = {k: [] for k in fns}
    for r in range(reps):
        for k in keys[r % len(keys):] + keys[: r % len(keys)]:
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)
    return times


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {k: statistics.median(v) for k, v in times.items()}


def paired_ratios(times: dict[str, list[float]], base: str = "stock") -> dict[str, dict]:
    """Per variant: the ratio of medians, and the spread of the per-repetition ratios (each variant's call over
    the base's call in the same repetition, so slow drift of the machine cancels): quartiles, min and max."""
    out = {}
    for k, v in times.items():
        if k == base:
            continue
        r = sorted(a / b for a, b in zip(v, times[base]))
        q = statistics.quantiles(r, n=4) if len(r) > 1 else [r[0]] * 3
        out[k] = {"ratio_of_medians": statistics.median(v) / statistics.median(times[base]),
                  "q25": q[0], "median": q[1], "q75": q[2], "min": r[0], "max": r[-1], "n": len(r)}
    return out


def bench_train(shape, reps, precisions=("fp32", "bf16")):
    s = SHAPES[shape]
    reps *= s["rep_scale"]
    stock, variants = build_models(s["cfg"])
    b, t = s["train"]
    x = torch.randint(0, s["cfg"]["vocab_size"], (b, t))
    out = {}
    for prec in precisions:
        ac = torch.autocast("cpu", dtype=torch.bfloat16) if prec == "bf16" else nullcontext()
        fns = {"stock": None, **{k: None for k in variants}}
        for name, m in [("stock", stock), *variants.items()]:
            m.train()
            opt = torch.optim.AdamW(m.parameters(), lr=1e-5, foreach=True)
            fns[name] = _train_step(m, x, opt, ac, commit=name != "stock")
        times = alternate(fns, reps)
        med = medians(times)
        out[prec] = {"reps": reps, "median_s": med, "ratio_to_stock": {k: med[k] / med["stock"] for k in variants},
                     "spread": paired_ratios(times)}
    return out


def _stock_and_folded(shape):
    s = SHAPES[shape]
    return (s, *build_models(s["cfg"], folded=True))


@torch.inference_mode()
def bench_infer(shape, reps):
    s, stock, folded = _stock_and_folded(shape)
    b, t = s["infer"]
    x = torch.randint(0, s["cfg"]["vocab_size"], (b, t))
    # forwards are cheap next to training steps: 5x the repetitions, for a steadier median
    times = alternate({"stock": lambda: stock(x, use_cache=False), "folded": lambda: folded(x)}, 5 * reps)
    med = medians(times)
    return {"median_s": med, "ratio_folded_to_stock": med["folded"] / med["stock"],
            "spread": paired_ratios(times)["folded"]}


@torch.inference_mode()
def bench_eval(shape, reps):
    s, stock, folded = _stock_and_folded(shape)
    ctx = s["eval_ctx"]
    x = torch.randint(0, s["cfg"]["vocab_size"], (1, ctx))

    def ev(m):
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = m(x)
            logits = out.logits if hasattr(out, "logits") else out
            torch.nn.functional.log_softmax(logits.float(), -1)  # as the evaluator does
        return run

    med = medians(alternate({"stock": ev(stock), "folded": ev(folded)}, reps))
    return {"context": ctx, "tokens_per_s": {k: ctx / v for k, v in med.items()},
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def bench_syncs(shape):
    s = SHAPES[shape]
    stock, variants = build_models(s["cfg"])
    x = torch.randint(0, s["cfg"]["vocab_size"], (2, 32))
    out = {}
    for name, m in [("stock", stock), *variants.items()]:
        m.train()

        def run(m=m, commit=name != "stock"):
            m(input_ids=x, labels=x).loss.backward()
            if commit:
                m.commit_norm_stats(0.9)
        out[name] = count_syncs(run)
    return out


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = ""
    try:
        flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "")
    except OSError:
        pass
    # without avx512_bf16 / amx_bf16, CPU bf16 matmuls are emulated (much slower than fp32): bf16 ratios then
    # measure the removal machinery against emulated matmuls, not against what a GPU or a bf16 CPU would do
    native_bf16 = any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "native_bf16": native_bf16}


def table(res) -> str:
    def cell(s):  # median [quartiles] of the per-repetition ratios: robust to a slow repetition of either side
        return f"{s['median']:.3f} [{s['q25']:.3f}, {s['q75']:.3f}]"

    lines = ["| shape | precision | all real / stock | mid-schedule / stock | all removed / stock | stock step (ms) |",
             "|---|---|---|---|---|---|"]
    for shape, r in res["train_step"].items():
        for prec, v in r.items():
            q = v["spread"]
            lines.append(f"| {shape} | {prec} | {cell(q['all_real'])} | {cell(q['mid_schedule'])} "
                         f"| {cell(q['all_removed'])} | {1000 * v['median_s']['stock']:.1f} |")
    lines += ["",
              "| shape | folded LN-free forward / stock forward | eval tokens/s stock (bf16) | eval tokens/s folded |",
              "|---|---|---|---|"]
    for shape in res["inference"]:
        i, e = res["inference"][shape], res["eval"][shape]
        lines.append(f"| {shape} | {cell(i['spread'])} | {e['tokens_per_s']['stock']:.0f} "
                     f"| {e['tokens_per_s']['folded']:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description="lnfree benchmarks (CPU)")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES))
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--out", default="experiments/bench/cpu.json")
    a = p.parse_args(argv)
    res = {"machine": machine(), "reps": a.reps, "train_step": {}, "inference": {}, "eval": {}, "host_syncs": {}}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial.json")  # written after every part: a long run that stops loses nothing
    for shape in a.shapes:
        for prec in a.precisions:
            print(f"[bench] {shape}: training step, {prec} ...", flush=True)
            res["train_step"].setdefault(shape, {}).update(bench_train(shape, a.reps, (prec,)))
            partial.write_text(json.dumps(res, indent=1))
        print(f"[bench] {shape}: inference ...", flush=True)
        res["inference"][shape] = bench_infer(shape, a.reps)
        res["eval"][shape] = bench_eval(shape, a.reps)
        res["host_syncs"][shape] = bench_syncs(shape)
        partial.write_text(json.dumps(res, indent=1))
    out.write_text(json.dumps(res, indent=1))
    partial.unlink()
    print(table(res))
    print("host syncs per training step (forward + backward + commit):", json.dumps(res["host_syncs"]))
    print(f"[bench] written to {out}")


if __name__ == "__main__":
    main()
