"""The GPU check, one command on a machine with one GPU (written for an H200; under 8 minutes):

    python -m lnfree.bench.gpu [--out experiments/bench/gpu.json] [--steps 30] [--budget-s 450]
    python -m lnfree.bench.gpu --dry-run [--out ...]   # the same parts on CPU, tiny shapes, in-process (CI)

Parts, each recorded in the JSON as ok / error / timeout / skipped with its error message (the JSON is rewritten
before and after every part, so a session cut short keeps what it measured and says which part was running):
  train:<shape>-<strategy>-<removal>  bf16-mixed training of GPT-2-small/-medium shapes (random init, built-in
        corpus, nothing from the network), single device and FSDP2 on one device, removal schedule on / off:
        training tokens/s (lnfree.training.callbacks.Throughput: steps after the third, validation excluded), MFU,
        validation CE, whether every site ended removed;
  resume  the first shape's FSDP2 removal run resumed from its mid-run checkpoint: same sigmas and val CE;
  folded:<shape>  inference tokens/s (and MFU) of stock GPT-2 and of the folded LN-free model (FoldedGPT2)
        at the same batch and context, bf16 autocast and fp32.
On the GPU every part runs in its own process under a time limit (`timeout_s`, and the whole under --budget-s), so
an out-of-memory error or a hang ends that part only. The dry run (CPU, bf16-mixed: single device and FSDP2 on one
gloo process, 8 steps of a 2 x 64 model) runs in-process: starting a process costs more than a part does.

MFU = FLOPs per token x tokens/s / peak, with FLOPs per token from `flops_per_token` (6 N + 12 L T d for a
training step, 2 N + 4 L T d for a forward; N = non-embedding parameters plus the unembedding's V x d, whose
matmul the model runs although its weight is tied to the embedding) and the peak from PEAK_FLOPS (stated below;
the CPU entry is nominal: the dry run checks the arithmetic, not the machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..families import family

# dense peak FLOP/s (no sparsity) by device-name substring, from the vendors' datasheets (SXM parts); fp32 is the
# non-tensor-core rate (PyTorch's default fp32 matmul precision, "highest", does not use TF32)
PEAK_FLOPS = {
    "H200": {"bf16": 989e12, "fp32": 67e12},
    "H100": {"bf16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp32": 19.5e12},
    "cpu": {"bf16": 1e12, "fp32": 1e12},  # nominal: the dry run's MFU only checks the plumbing
}
BUDGET_S = 450  # the whole real run, with process start-ups: under 8 minutes of a 15-minute device session


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def peak_flops(device: str, precision: str) -> float | None:
    return next((v[precision] for k, v in PEAK_FLOPS.items() if k in device), None)


def flops_per_token(n_layer: int, d: int, ctx: int, vocab: int, n_non_embedding: int, training: bool) -> float:
    """Matmul FLOPs per token (PaLM's count: attention scores and values over the full context)."""
    n = n_non_embedding + vocab * d
    return (6 * n + 12 * n_layer * ctx * d) if training else (2 * n + 4 * n_layer * ctx * d)


def mfu(flops: float, tokens_per_s: float | None, peak: float | None) -> float | None:
    return flops * tokens_per_s / peak if (peak and tokens_per_s) else None


@dataclass
class Part:
    name: str
    kind: str  # train | resume | folded
    timeout_s: int
    overrides: list[str] = field(default_factory=list)  # train / resume: Hydra overrides of conf/train.yaml
    needs: str | None = None  # resume: the train part whose mid-run checkpoint it resumes
    shape: dict = field(default_factory=dict)  # folded: GPT2Config fields, batch, context, precisions, reps


# every site removed by step 7 (all blocks of a kind at once), then plain fine-tuning
REMOVAL = ["schedule=fast", "schedule.pre_mlp.start=2", "schedule.pre_mlp.gap=0", "schedule.attn_qk.gap=0",
           "schedule.attn_v.start=4", "schedule.attn_v.gap=0", "schedule.final.start=6"]
NO_REMOVAL = ["schedule=none"]


def model_shape(option: str) -> dict:
    """GPT2Config fields of a random-init model option (conf/model/<option>.yaml)."""
    from omegaconf import OmegaConf

    from ..paths import CONF_DIR

    return OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / f"{option}.yaml").shape)


def plan(dry_run: bool, steps: int) -> list[Part]:
    if dry_run:
        shapes = {"tiny": (["model=tiny", "data.block_size=64", "hardware.micro_batch_size=2"], 120)}
        strategies = {"single": ["hardware=cpu", "hardware.precision=bf16-mixed"],
                      "fsdp": ["hardware=cpu_fsdp", "hardware.devices=1", "hardware.precision=bf16-mixed"]}  # gloo
        folded = {"tiny": dict(cfg=dict(model_shape("tiny"), vocab_size=512),
                               batch=2, ctx=64, precisions=["fp32"], reps=3)}
    else:
        shapes = {"gpt2_small": (["model=gpt2_small_random", "data.block_size=1024", "hardware.micro_batch_size=8"],
                                 75),
                  "gpt2_medium": (["model=gpt2_medium_random", "data.block_size=1024",
                                   "hardware.micro_batch_size=8"], 100)}
        strategies = {"single": ["hardware=gpu"], "fsdp": ["hardware=gpu_fsdp", "hardware.devices=1"]}
        folded = {name: dict(cfg=model_shape(f"{name}_random"), batch=8, ctx=1024, precisions=["bf16", "fp32"],
                             reps=10) for name in shapes}
    # no export, no validation before training: the parts measure training, not the run's bookkeeping; one
    # checkpoint at the end (the resume's source also keeps one at mid-run, which the resume starts from)
    common = [f"trainer.max_steps={steps}", f"trainer.val_every={steps}", "data.val_blocks=8", "model.dropout=0.0",
              "export=false"]
    at_end = [f"trainer.ckpt_every={steps}", "trainer.keep_checkpoints=1"]
    first = next(iter(shapes))
    source = f"train:{first}-fsdp-removal"
    parts = []  # the first shape's parts, its resume and its folded model first: what a cut-short session keeps
    for shape, (so, timeout) in shapes.items():
        for strat, st in strategies.items():
            for rem_name, rem in (("no_removal", NO_REMOVAL), ("removal", REMOVAL)):
                name = f"train:{shape}-{strat}-{rem_name}"
                ckpt = [f"trainer.ckpt_every={steps // 2}", "trainer.keep_checkpoints=-1"] if name == source else at_end
                parts.append(Part(name, "train", timeout, [*st, *so, *common, *ckpt, *rem]))
        if shape == first:
            parts.append(Part("resume", "resume", timeout, [*strategies["fsdp"], *so, *common, *at_end, *REMOVAL],
                              needs=source))
        if shape in folded:
            parts.append(Part(f"folded:{shape}", "folded", 60 if dry_run else 90, shape=folded[shape]))
    return parts


# ---- the parts -----------------------------------------------------------------------------------------------

def run_dir(tmp: Path, part: str) -> Path:
    return tmp / part.replace(":", "_")


def compose_part(tmp: Path, part: Part, overrides: list[str]):
    """The training config of a train / resume part (conf/train.yaml with the part's overrides)."""
    from hydra import compose, initialize_config_dir

    from ..paths import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=[f"paths.output_dir={run_dir(tmp, part.name)}",
                                           f"paths.cache_dir={tmp / 'cache'}", "logger=csv",
                                           "trainer.progress_bar=false", "overwrite=true",
                                           "trainer.validate_before=false", *overrides])


def _train(tmp: Path, part: Part, overrides: list[str]) -> dict:
    from ..training.run import train

    s = train(compose_part(tmp, part, overrides))
    c = s["config"]
    shape, hw = c["model"]["shape"], c["hardware"]
    prec = "bf16" if hw["precision"].startswith("bf16") else "fp32"
    d = shape["n_embd"]
    fam = family({"model_type": "gpt2", **shape})  # a shape without model_type is GPT-2's
    positions = shape[fam.ctx_field] if len(fam.embedding_names) > 1 else 0  # a learned position table: T_max rows
    vocab = (s["n_params"] - s["n_params_non_embedding"]) // d - positions  # embeddings: (V + positions) d
    flops = flops_per_token(shape["n_layer"], d, c["data"]["block_size"], vocab, s["n_params_non_embedding"],
                            training=True)
    tps = s["train_tokens_per_s"]
    return {"strategy": hw["strategy"], "precision": hw["precision"], "world_size": s["world_size"], "vocab": vocab,
            "tokens_per_step": s["tokens_per_step"], "tokens_per_s": tps, "flops_per_token": flops,
            "peak_flops": peak_flops(device_name(), prec), "mfu": mfu(flops, tps, peak_flops(device_name(), prec)),
            "val_ce": s["val_ce"], "all_removed": s["all_removed"], "events": len(s["events"]),
            "sigmas": s["sigmas"], "steps": s["steps"]}


def train_part(tmp: Path, part: Part, results: dict) -> dict:
    return _train(tmp, part, part.overrides)


def resume_part(tmp: Path, part: Part, results: dict) -> dict:
    src = results["parts"].get(part.needs, {})
    if src.get("status") != "ok":
        raise RuntimeError(f"needs the checkpoint of {part.needs}, which is {src.get('status', 'not run')}")
    steps = src["result"]["steps"]
    ckpt = run_dir(tmp, part.needs) / "checkpoints" / f"step{steps // 2:06d}.ckpt"
    r = _train(tmp, part, [*part.overrides, f"ckpt_path={ckpt}"])
    full = src["result"]
    return {"from": str(ckpt), "val_ce_full": full["val_ce"], "val_ce_resumed": r["val_ce"],
            "same_sigmas": r["sigmas"] == full["sigmas"], "tokens_per_s": r["tokens_per_s"]}


def folded_part(tmp: Path, part: Part, results: dict) -> dict:
    """Inference forwards of stock GPT-2 and the folded LN-free model, alternated (lnfree.bench.cpu.alternate)."""
    from contextlib import nullcontext

    from .cpu import alternate, build_models, medians, paired_ratios

    s, dev = part.shape, "cuda" if torch.cuda.is_available() else "cpu"
    stock, folded = build_models(s["cfg"], device=dev, folded=True)
    x = torch.randint(0, s["cfg"]["vocab_size"], (s["batch"], s["ctx"]), device=dev)
    n_non_embedding = sum(p.numel() for n, p in stock.named_parameters() if not n.startswith(("transformer.wte",
                                                                                              "transformer.wpe")))
    flops = flops_per_token(s["cfg"]["n_layer"], s["cfg"]["n_embd"], s["ctx"], s["cfg"]["vocab_size"],
                            n_non_embedding, training=False)
    out = {"batch": s["batch"], "context": s["ctx"], "flops_per_token": flops}
    for prec in s["precisions"]:
        ac = torch.autocast(dev, dtype=torch.bfloat16) if prec == "bf16" else nullcontext()

        def call(m, ac=ac, **kw):  # (ac bound here: the closures run inside this precision's iteration)
            def run():
                with torch.inference_mode(), ac:
                    m(x, **kw)
                if dev == "cuda":
                    torch.cuda.synchronize()
            return run

        times = alternate({"stock": call(stock, use_cache=False), "folded": call(folded)}, s["reps"])
        med = medians(times)
        tps = {k: s["batch"] * s["ctx"] / v for k, v in med.items()}
        peak = peak_flops(device_name(), prec)
        out[prec] = {"tokens_per_s": tps, "mfu": {k: mfu(flops, v, peak) for k, v in tps.items()},
                     "peak_flops": peak, "folded_over_stock_time": paired_ratios(times)["folded"]}
    return out


KINDS = {"train": train_part, "resume": resume_part, "folded": folded_part}


# ---- running and recording ---------------------------------------------------------------------------------

def _write(results: dict, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(path)


def _in_process(part: Part, tmp: Path, results: dict) -> dict:
    """The part in this process. What an FSDP part sets up for its one-process group (the group itself, and
    MASTER_ADDR / MASTER_PORT / WORLD_SIZE ... in the environment, which child processes would inherit and try to
    join) is taken down after it, so that the next part, or whatever else this process runs, starts clean."""
    import torch.distributed as dist

    environ = dict(os.environ)
    try:
        return KINDS[part.kind](tmp, part, results)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)


def _isolated(part: Part, tmp: Path, results: dict, timeout: float, argv: list[str]) -> dict:
    """The part in a child process (`--part NAME`), killed with its process group after `timeout` seconds."""
    res_file, log = run_dir(tmp, part.name).with_suffix(".result.json"), run_dir(tmp, part.name).with_suffix(".log")
    state = run_dir(tmp, part.name).with_suffix(".state.json")  # what the child needs of earlier parts
    res_file.parent.mkdir(parents=True, exist_ok=True)
    res_file.unlink(missing_ok=True)
    state.write_text(json.dumps(results))
    cmd = [sys.executable, "-m", "lnfree.bench.gpu", *argv, "--part", part.name, "--part-state", str(state),
           "--part-result", str(res_file)]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"killed after {timeout:.0f} s; log tail: {_tail(log)}") from None
        finally:  # a time limit, or this process told to stop (SIGTERM, Ctrl-C): the child does not outlive it
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if rc != 0 or not res_file.exists():
        raise RuntimeError(f"exit code {rc}; log tail: {_tail(log)}")
    return json.loads(res_file.read_text())


def _tail(log: Path, n: int = 1500) -> str:
    return log.read_text(errors="replace")[-n:] if log.exists() else ""


def run_parts(parts: list[Part], out: Path, tmp: Path, results: dict, isolate: bool, budget_s: float,
              argv: list[str]) -> dict:
    t_start = time.time()
    for part in parts:
        left = budget_s - (time.time() - t_start)
        rec = {"kind": part.kind, "timeout_s": part.timeout_s, "status": "running", "error": None, "result": None}
        results["parts"][part.name] = rec
        if left < 10:
            rec.update(status="skipped", error=f"budget of {budget_s:.0f} s spent")
            continue
        _write(results, out)
        print(f"[bench_gpu] {part.name} (limit {min(part.timeout_s, left):.0f} s)", flush=True)
        t = time.time()
        try:
            if isolate:
                rec["result"] = _isolated(part, tmp, results, min(part.timeout_s, left), argv)
            else:
                rec["result"] = _in_process(part, tmp, results)
            rec["status"] = "ok"
        except TimeoutError as e:
            rec.update(status="timeout", error=str(e))
        except Exception as e:  # noqa: BLE001  (recorded; the next part runs)
            rec.update(status="error", error=f"{type(e).__name__}: {e}")
            traceback.print_exc()
        rec["wall_s"] = round(time.time() - t, 1)
        print(f"[bench_gpu] {part.name}: {rec['status']} in {rec['wall_s']} s"
              + (f" ({rec['error'][:300]})" if rec["error"] else ""), flush=True)
        _write(results, out)
        if part.kind == "train" and not any(p.needs == part.name for p in parts):
            shutil.rmtree(run_dir(tmp, part.name) / "checkpoints", ignore_errors=True)  # disk: medium is 4 GB
    results["wall_s"] = round(time.time() - t_start, 1)
    results["finished"] = True
    _write(results, out)
    return results


def summary_lines(results: dict) -> list[str]:
    lines = []
    for name, r in results["parts"].items():
        if r["status"] != "ok":
            lines.append(f"{name:40s} {r['status']}: {(r['error'] or '')[:200]}")
        elif r["kind"] == "train":
            m = r["result"]["mfu"]
            lines.append(f"{name:40s} {r['result']['tokens_per_s'] or 0:12.0f} tok/s  MFU "
                         f"{f'{100 * m:.1f}%' if m else 'n/a'}  val CE {r['result']['val_ce']:.3f}")
        else:
            lines.append(f"{name:40s} {json.dumps(r['result'])[:300]}")
    return lines


def main(argv=None, parts: list[Part] | None = None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, in-process: checks the plumbing")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per training part (30; dry run 8)")
    p.add_argument("--budget-s", type=float, default=BUDGET_S)
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="each part in its own process under its time limit (default: on the GPU, not in a dry run)")
    p.add_argument("--out", default="experiments/bench/gpu.json")
    p.add_argument("--tmp", default="outputs/bench_gpu")
    p.add_argument("--part", help=argparse.SUPPRESS)  # child process: run this one part
    p.add_argument("--part-state", help=argparse.SUPPRESS)
    p.add_argument("--part-result", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    steps = a.steps or (8 if a.dry_run else 30)
    parts = parts if parts is not None else plan(a.dry_run, steps)
    tmp = Path(a.tmp)
    if a.part:  # the child of an isolated part
        part = next(x for x in parts if x.name == a.part)
        result = _in_process(part, tmp, json.loads(Path(a.part_state).read_text()))
        Path(a.part_result).write_text(json.dumps(result))
        return result
    if not a.dry_run and not torch.cuda.is_available():
        p.error("no GPU: use --dry-run to check the script on CPU")
    child_argv = [*(["--dry-run"] if a.dry_run else []), "--steps", str(steps), "--tmp", str(tmp)]
    results = {"mode": "dry-run" if a.dry_run else "gpu", "device": device_name(), "torch": torch.__version__,
               "python": platform.python_version(), "steps": steps, "budget_s": a.budget_s,
               "peak_flops_table": PEAK_FLOPS, "plan": [asdict(x) for x in parts], "parts": {}, "finished": False}
    isolate = (not a.dry_run) if a.isolate is None else a.isolate
    # stopped from outside (e.g. `timeout`): unwind, so the running part's child is killed; the JSON already
    # names that part as running
    if isolate:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results = run_parts(parts, Path(a.out), tmp, results, isolate, a.budget_s, child_argv)
    print("\n".join(summary_lines(results)))
    print(f"[bench_gpu] written to {a.out}")
    return results


if __name__ == "__main__":
    main()
