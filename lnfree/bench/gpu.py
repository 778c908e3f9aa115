"""The GPU check: bf16-mixed training and FSDP (one device) on GPT-2-small/-medium shapes, with and without
the removal machinery, plus a save-and-resume under FSDP. Needs nothing from the network (random init,
built-in corpus, GPT-2's vocabulary size) and finishes in a few minutes on one H100.

    python -m lnfree.bench.gpu [--steps 30] [--out experiments/bench/gpu.json]
    python -m lnfree.bench.gpu --smoke      # the same code path on CPU with a tiny model (CI)

Reports training tokens/s (lnfree.training.callbacks.Throughput: steps after the third, validation excluded) and
model FLOPs utilisation, MFU = (6 N + 12 L T d) * tokens/s / peak (N non-embedding parameters, T context).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from ..paths import CONF_DIR
from ..training.train import train

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def run(tmp: Path, tag: str, overrides: list[str]) -> dict:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.output_dir={tmp / tag}", f"paths.cache_dir={tmp / 'cache'}",
                                          "logger=csv", "trainer.progress_bar=false", "overwrite=true",
                                          "trainer.validate_before=false", *overrides])
    t = time.time()
    s = train(cfg)
    shape = s["config"]["model"]["shape"]
    L, d, T = shape["n_layer"], shape["n_embd"], s["config"]["data"]["block_size"]
    flops_per_token = 6 * s["n_params_non_embedding"] + 12 * L * T * d
    peak = peak_flops()
    tps = s["train_tokens_per_s"]
    return {"tag": tag, "tokens_per_s": tps, "mfu": (flops_per_token * tps / peak) if (peak and tps) else None,
            "val_ce": s["val_ce"], "all_removed": s["all_removed"], "events": len(s["events"]),
            "sigmas": s["sigmas"], "wall_s": round(time.time() - t, 1)}


def _write(results: dict, path: str):
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--out", default="experiments/bench/gpu.json")
    p.add_argument("--tmp", default="outputs/bench_gpu")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model, few steps: checks the script itself")
    a = p.parse_args(argv)
    tmp = Path(a.tmp)
    steps = 12 if a.smoke else a.steps
    # every site removed by step 7 (all blocks of a kind at once), then plain fine-tuning
    removal = ["schedule=fast", "schedule.ln2.start=2", "schedule.ln2.gap=0", "schedule.ln1qk.gap=0",
               "schedule.ln1v.start=4", "schedule.ln1v.gap=0", "schedule.lnf.start=6"]
    common = [f"trainer.max_steps={steps}", f"trainer.val_every={steps}", f"trainer.ckpt_every={steps // 2}",
              "data.val_blocks=8", "model.dropout=0.0"]
    if a.smoke:
        shapes = {"tiny": ["model=tiny", "data.block_size=64", "hardware=cpu", "hardware.micro_batch_size=2"]}
        strategies = {"single": []}
    else:
        shapes = {"gpt2_small": ["model=gpt2_small_random", "data.block_size=1024", "hardware.micro_batch_size=8"],
                  "gpt2_medium": ["model=gpt2_medium_random", "data.block_size=1024", "hardware.micro_batch_size=8"]}
        strategies = {"single": ["hardware=gpu"], "fsdp": ["hardware=gpu_fsdp", "hardware.devices=1"]}
    results = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "torch": torch.__version__, "steps": steps, "runs": []}
    for shape, so in shapes.items():
        for strat, st in strategies.items():
            for rem_name, rem in (("no_removal", ["schedule=none"]), ("removal", removal)):
                tag = f"{shape}-{strat}-{rem_name}"
                print(f"[bench_gpu] {tag}", flush=True)
                results["runs"].append(run(tmp, tag, [*st, *so, *common, *rem]))
                _write(results, a.out)  # after every run: a cut-short session keeps what it measured
    # save and resume (under FSDP on a GPU): resume from the mid-run checkpoint, compare with the full run
    strat = strategies.get("fsdp", strategies["single"])
    shape = next(iter(shapes.values()))
    full_tag = f"{next(iter(shapes))}-{'fsdp' if 'fsdp' in strategies else 'single'}-removal"
    ckpt = tmp / full_tag / "checkpoints" / f"step{steps // 2:06d}.ckpt"
    resumed = run(tmp, "resume", [*strat, *shape, *common, *removal, f"ckpt_path={ckpt}"])
    full = next(r for r in results["runs"] if r["tag"] == full_tag)
    results["resume"] = {"from": str(ckpt), "val_ce_full": full["val_ce"], "val_ce_resumed": resumed["val_ce"],
                         "same_sigmas": resumed["sigmas"] == full["sigmas"]}
    _write(results, a.out)
    for r in results["runs"]:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "n/a"
        print(f"{r['tag']:40s} {r['tokens_per_s'] or 0:12.0f} tok/s  MFU {mfu}  val CE {r['val_ce']:.3f}")
    print("resume:", results["resume"])


if __name__ == "__main__":
    main()
