"""`make bench`: the cost of the removal machinery and the speed of the LN-free model, on this machine.

    python -m lnfree.bench.cpu [--reps 7] [--passes 2] [--threads 1] [--shapes builtin_2x128 gpt2_small]
                               [--precisions fp32 bf16] [--out experiments/bench/cpu.json]

The table of experiments/bench/README.md is generated from the committed JSON by `make tables`
(tools/doc_tables.py, with the further runs cpu_run2-4.json); a run only writes its JSON and prints the table.

All timings in one process, on the same shapes, alternating the variants in every repetition in a rotating order
(so drift and noise hit all of them), reporting per variant the median and quartiles of the per-repetition
ratios to stock (each repetition pairs a variant's call with stock's call in the same repetition), plus medians
and the ratio of medians in the JSON; repetitions: --reps x the shape's rep_scale. One thread by default (the
machine is shared; its load average before and after is recorded). The parts:
  a. training step (forward + backward + AdamW step, plus the per-step statistics commit for the removable
     model) of the removable model with every site real, mid-schedule (half removed) and all removed,
     against stock GPT2LMHeadModel, in the given precisions (bf16: autocast; emulated, and slow, on CPUs without
     avx512_bf16/amx: machine.native_bf16 in the JSON says which);
  b. inference forward (fp32) of the folded LN-free model against stock GPT-2 with LayerNorm, and against stock
     GPT-2 with the folded model's fused GELU (`gelu_pytorch_tanh`; HF's `gelu_new` is a chain of elementwise
     ops): the second ratio is what removing the norms does to a forward. --passes times it that many times
     (each pass its own interleaved repetitions), to show that the ratio reproduces;
  c. evaluation throughput (tokens/s of the evaluator's forward + token statistics, stock and folded side by
     side at the same batch and context) in the precisions evaluation uses here: fp32, and bf16 autocast only
     where the CPU has native bf16;
  d. host syncs in a training step attributable to the removal machinery (lnfree.bench.syncs);
  e. distillation's cost (schedule.distill; docs/removal_methods.md): a training step of the removable model
     mid-schedule with the teacher's forward and the KL term, against the same step without them (fp32), and the
     teacher's weights against the training state (weights, gradients, AdamW's two moments: 16 bytes a parameter).
Shapes: the built-in default (2 x 128, vocab 4096, 16 x 256 tokens) and GPT-2 small (124M) at a short context.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from omegaconf import OmegaConf
from transformers import GPT2Config, GPT2LMHeadModel

from ..analysis.metrics import token_stats
from ..data.corpus import VOCAB_SIZE
from ..export import fold
from ..model import make_removable, next_token_ce, parse_site_name
from ..model_record import logits
from ..paths import CONF_DIR
from ..training.module import distill_kl, frozen_teacher
from .syncs import count_syncs

# GPT-2 configs (the bench times stock GPT-2 against its removable and folded forms).
# rep_scale: repetitions = rep_scale x --reps (the small shape is cheap and its ratios are noisier); infer_scale:
# forward repetitions per pass = infer_scale x --reps; eval: (batch, context) as `make eval` (conf/eval.yaml) for
# the built-in model, and GPT-2's context at batch 1 for GPT-2 small (8 x 1024 logits in fp32 are 1.6 GB)
SHAPES = {
    "builtin_2x128": dict(cfg=dict(OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model/builtin_w128.yaml").shape),
                                   vocab_size=VOCAB_SIZE),
                          train=(16, 256), infer=(16, 256), eval=(8, 256), rep_scale=2, infer_scale=5),
    "gpt2_small": dict(cfg=OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model/gpt2_small_random.yaml").shape),
                       train=(4, 128), infer=(4, 128), eval=(1, 1024), rep_scale=1, infer_scale=2),
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


def train_step(model, x, opt, autocast, commit):
    def run():
        with autocast:
            out = model(input_ids=x, use_cache=False).logits
        next_token_ce(out, x).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if commit:
            model.commit_norm_stats(0.9)
    return run


# wall: elapsed time; thread: the CPU time of the calling thread, which with one torch thread is all of the
# compute and leaves out the time the thread waits for a core that other work holds (a shared machine)
CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}


def alternate(fns: dict, reps: int, warmup: int = 2, clock=time.perf_counter) -> dict[str, list[float]]:
    """Seconds per call of each fn in every repetition. Calls are interleaved, and the order rotates every
    repetition (A B C, B C A, C A B, ...) so that no fn always runs first or always follows the same one."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    keys = list(fns)
    times = {k: [] for k in fns}
    for r in range(reps):
        for k in keys[r % len(keys):] + keys[: r % len(keys)]:
            t = clock()
            fns[k]()
            times[k].append(clock() - t)
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


def bench_train(shape, reps, precisions=("fp32", "bf16"), clock=time.perf_counter):
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
            fns[name] = train_step(m, x, opt, ac, commit=name != "stock")
        times = alternate(fns, reps, clock=clock)
        med = medians(times)
        out[prec] = {"reps": reps, "median_s": med, "ratio_to_stock": {k: med[k] / med["stock"] for k in variants},
                     "spread": paired_ratios(times)}
    return out


def _stock_and_folded(shape):
    s = SHAPES[shape]
    return (s, *build_models(s["cfg"], folded=True))


def fused_gelu_twin(stock: GPT2LMHeadModel) -> GPT2LMHeadModel:
    """Stock GPT-2 with stock's weights and LayerNorms, but the folded model's activation kernel: `gelu_new` and
    `gelu_pytorch_tanh` are the same function, one as seven elementwise ops, one as a single fused op."""
    cfg = GPT2Config.from_dict({**stock.config.to_dict(), "activation_function": "gelu_pytorch_tanh"})
    cfg._attn_implementation = stock.config._attn_implementation
    twin = GPT2LMHeadModel(cfg)
    twin.load_state_dict(stock.state_dict())
    return twin.eval()


@torch.inference_mode()
def bench_infer(shape, reps, passes=2, clock=time.perf_counter):
    s, stock, folded = _stock_and_folded(shape)
    twin = fused_gelu_twin(stock)
    b, t = s["infer"]
    x = torch.randint(0, s["cfg"]["vocab_size"], (b, t))
    out = {"batch": b, "context": t, "passes": []}
    for _ in range(passes):
        fns = {"stock": lambda: stock(x, use_cache=False), "stock_fused_gelu": lambda: twin(x, use_cache=False),
               "folded": lambda: folded(x)}
        times = alternate(fns, s["infer_scale"] * reps, clock=clock)
        med = medians(times)
        out["passes"].append({"median_s": med, "ratio_folded_to_stock": med["folded"] / med["stock"],
                              "spread": paired_ratios(times)["folded"],
                              "spread_vs_fused_gelu": paired_ratios(times, base="stock_fused_gelu")["folded"]})
    out["passes_agree"] = {k: passes_agree([p[k] for p in out["passes"]]) for k in ("spread", "spread_vs_fused_gelu")}
    return out


def passes_agree(spreads: list[dict]) -> bool:
    """Every pass's median lies inside every other pass's interquartile range."""
    return all(a["q25"] <= b["median"] <= a["q75"] for a in spreads for b in spreads)


@torch.inference_mode()
def bench_eval(shape, reps, native_bf16: bool, clock=time.perf_counter):
    """The evaluator's per-batch work (lnfree.analysis.compare: model_record.logits, then metrics.token_stats) for
    stock and folded at the same batch and context, in fp32, and in bf16 autocast where the CPU has native bf16."""
    s, stock, folded = _stock_and_folded(shape)
    b, ctx = s["eval"]
    x = torch.randint(0, s["cfg"]["vocab_size"], (b, ctx))
    out = {"batch": b, "context": ctx}
    for prec in ["fp32", "bf16"] if native_bf16 else ["fp32"]:
        ac = torch.autocast("cpu", dtype=torch.bfloat16, enabled=prec == "bf16")

        def ev(m, ac=ac):  # (ac bound here: each precision's closures run inside its own iteration)
            def run():
                with ac:
                    out = logits(m, x)
                token_stats(out, x)
            return run

        med = medians(alternate({"stock": ev(stock), "folded": ev(folded)}, reps, clock=clock))
        out[prec] = {"tokens_per_s": {k: b * ctx / v for k, v in med.items()}}
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def bench_syncs(shape):
    s = SHAPES[shape]
    stock, variants = build_models(s["cfg"])
    x = torch.randint(0, s["cfg"]["vocab_size"], (2, 32))
    out = {}
    for name, m in [("stock", stock), *variants.items()]:
        m.train()

        def run(m=m, commit=name != "stock"):
            next_token_ce(m(input_ids=x).logits, x).backward()
            if commit:
                m.commit_norm_stats(0.9)
        out[name] = count_syncs(run)
    return out


def bench_distill(shape, reps, clock=time.perf_counter):
    """Part e: per-repetition ratio of a distilled training step to a plain one (same student, same batch), and
    the memory the teacher adds: its weights (it keeps no gradients or optimizer state; its activations are
    transient, under no_grad) over the student's training state."""
    s = SHAPES[shape]
    reps *= s["rep_scale"]
    stock, variants = build_models(s["cfg"])
    student, teacher = variants["mid_schedule"].train(), frozen_teacher(make_removable(stock))
    b, t = s["train"]
    x = torch.randint(0, s["cfg"]["vocab_size"], (b, t))
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5, foreach=True)

    def step(distill: bool):
        def run():
            logits = student(input_ids=x, use_cache=False).logits
            loss = next_token_ce(logits, x)
            if distill:
                with torch.no_grad():
                    teacher_logits = teacher(input_ids=x, use_cache=False).logits
                loss = loss + distill_kl(logits, teacher_logits)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            student.commit_norm_stats(0.9)
        return run

    times = alternate({"plain": step(False), "distill": step(True)}, reps, clock=clock)
    n_bytes = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
    state = 4 * n_bytes(student)  # weights + gradients + AdamW's exp_avg and exp_avg_sq, all fp32
    return {"reps": reps, "median_s": medians(times), "spread": paired_ratios(times, base="plain")["distill"],
            "teacher_bytes": n_bytes(teacher), "training_state_bytes": state,
            "memory_ratio": (state + n_bytes(teacher)) / state}


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
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "native_bf16": native_bf16}


PARTS = ["train", "inference", "eval", "syncs", "distill"]
OUT = Path("experiments/bench/cpu.json")


CLOCK_WORDS = {"wall": "elapsed (wall-clock) time", "thread": "CPU time of the one compute thread"}


def cell(s):  # median [quartiles] of the per-repetition ratios: robust to a slow repetition of either side
    return f"{s['median']:.3f} [{s['q25']:.3f}, {s['q75']:.3f}]"


def _load(m) -> str:
    return (f"load average {m['loadavg_before'][0]:.2f} before, {m['loadavg_after'][0]:.2f} after"
            if "loadavg_after" in m else "load average not recorded")


def table(res, more: list[dict] = ()) -> str:
    """The README table of one run; `more`: further runs (e.g. of one part only) whose training steps and forward
    passes are listed with this run's; agreement is judged over the forward passes of all of them."""
    m = res["machine"]
    lines = [f"Machine: {m['cpu']}, {m.get('cores', '?')} cores, {m['threads']} thread(s) used, torch {m['torch']}, "
             f"native bf16: {'yes' if m['native_bf16'] else 'no'}; {_load(m)} (1-minute); times: "
             f"{CLOCK_WORDS[res.get('clock', 'wall')]}."
             + "".join(f" Run {n}: {_load(r['machine'])}." for n, r in enumerate(more, 2)), "",
             "Training step, per-repetition ratio to stock GPT-2: median [quartiles].", "",
             "| shape | precision | reps | all real / stock | mid-schedule / stock | all removed / stock "
             "| stock step (ms) |", "|---|---|---|---|---|---|---|"]
    for k, r in enumerate([res, *more], 1):
        for shape, steps in r["train_step"].items():
            for prec, v in steps.items():
                q, name = v["spread"], shape if not more else f"{shape} (run {k})"
                lines.append(f"| {name} | {prec} | {v['reps']} | {cell(q['all_real'])} | {cell(q['mid_schedule'])} "
                             f"| {cell(q['all_removed'])} | {1000 * v['median_s']['stock']:.1f} |")
    lines += ["", "Inference forward, fp32, per-repetition ratio of the folded LN-free model's time: median "
              "[quartiles]; `passes agree`: each pass's median inside the other passes' quartiles.", "",
              "| shape | batch x context | pass | reps | folded / stock | folded / stock with fused GELU "
              "| stock forward (ms) |", "|---|---|---|---|---|---|---|"]
    for shape, i in res["inference"].items():
        runs = [(f"{n}" if not more else f"run 1, {n}", p) for n, p in enumerate(i["passes"], 1)]
        runs += [(f"run {k}, {n}", p) for k, r in enumerate(more, 2) if shape in r["inference"]
                 for n, p in enumerate(r["inference"][shape]["passes"], 1)]
        for name, p in runs:
            lines.append(f"| {shape} | {i['batch']} x {i['context']} | {name} | {p['spread']['n']} "
                         f"| {cell(p['spread'])} | {cell(p['spread_vs_fused_gelu'])} "
                         f"| {1000 * p['median_s']['stock']:.1f} |")
        agree = {k: passes_agree([p[k] for _, p in runs]) for k in ("spread", "spread_vs_fused_gelu")}
        lines.append(f"| {shape} | | passes agree | | {'yes' if agree['spread'] else 'no'} "
                     f"| {'yes' if agree['spread_vs_fused_gelu'] else 'no'} | |")
    lines += ["", "Evaluation throughput (the evaluator's forward and token statistics), tokens/s, median of "
              "the repetitions.", "",
              "| shape | batch x context | precision | stock | folded LN-free | folded / stock |",
              "|---|---|---|---|---|---|"]
    for shape, e in res["eval"].items():
        for prec in ("fp32", "bf16"):
            if prec in e:
                t = e[prec]["tokens_per_s"]
                lines.append(f"| {shape} | {e['batch']} x {e['context']} | {prec} | {t['stock']:.0f} "
                             f"| {t['folded']:.0f} | {t['folded'] / t['stock']:.2f} |")
    distilled = [(k, r) for k, r in enumerate([res, *more], 1) if r.get("distill")]
    if distilled:
        lines += ["", "Distillation (schedule.distill), fp32: a training step with the teacher's forward and the KL "
                  "term over the same step without them, per-repetition ratio: median [quartiles]; memory: the "
                  "teacher's weights over the training state (weights, gradients, AdamW moments).", "",
                  "| shape | reps | distilled / plain step | plain step (ms) | teacher (MB) | memory ratio |",
                  "|---|---|---|---|---|---|"]
        for k, r in distilled:
            for shape, d in r["distill"].items():
                name = shape if not more else f"{shape} (run {k})"
                lines.append(f"| {name} | {d['reps']} | {cell(d['spread'])} | {1000 * d['median_s']['plain']:.1f} "
                             f"| {d['teacher_bytes'] / 1e6:.1f} | {d['memory_ratio']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description="lnfree benchmarks (CPU)")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--passes", type=int, default=2, help="times the folded/stock forward comparison is repeated")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    p.add_argument("--clock", choices=list(CLOCKS), default=None,
                   help="what a timing counts (default: thread with one thread, else wall)")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES))
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], help="of the training step")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--parts", nargs="+", default=PARTS, choices=PARTS)
    a = p.parse_args(argv)
    clock_name = a.clock or ("thread" if a.threads == 1 else "wall")
    if clock_name == "thread" and a.threads != 1:
        p.error("--clock thread counts the calling thread only: use it with --threads 1")
    clock = CLOCKS[clock_name]
    torch.set_num_threads(a.threads)
    res = {"machine": {**machine(), "loadavg_before": os.getloadavg()}, "clock": clock_name, "reps": a.reps,
           "passes": a.passes, "parts": a.parts,
           "train_step": {}, "inference": {}, "eval": {}, "host_syncs": {}, "distill": {}}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial.json")  # written after every part: a long run that stops loses nothing
    for shape in a.shapes:
        for prec in a.precisions if "train" in a.parts else []:
            print(f"[bench] {shape}: training step, {prec} ...", flush=True)
            res["train_step"].setdefault(shape, {}).update(bench_train(shape, a.reps, (prec,), clock))
            partial.write_text(json.dumps(res, indent=1))
        if "inference" in a.parts:
            print(f"[bench] {shape}: inference ...", flush=True)
            res["inference"][shape] = bench_infer(shape, a.reps, a.passes, clock)
            partial.write_text(json.dumps(res, indent=1))
        if "eval" in a.parts:
            print(f"[bench] {shape}: evaluation ...", flush=True)
            res["eval"][shape] = bench_eval(shape, a.reps, res["machine"]["native_bf16"], clock)
        if "syncs" in a.parts:
            res["host_syncs"][shape] = bench_syncs(shape)
        if "distill" in a.parts:
            print(f"[bench] {shape}: distillation ...", flush=True)
            res["distill"][shape] = bench_distill(shape, a.reps, clock)
        partial.write_text(json.dumps(res, indent=1))
    res["machine"]["loadavg_after"] = os.getloadavg()
    out.write_text(json.dumps(res, indent=1))
    partial.unlink()
    print(table(res))
    print("host syncs per training step (forward + backward + commit):", json.dumps(res["host_syncs"]))
    print(f"[bench] written to {out}")


if __name__ == "__main__":
    main()
