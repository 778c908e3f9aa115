"""python -m lnfree.analysis.interp.controls_cli [--replicates 0 1 2]: the positive controls over seeds
(controls.py), resumable: each replicate's measurements are written to <out>/controls/r<r>.json as soon as they
are done and not measured again while that file's settings match; then the over-replicate summaries
<out>/{patching,sinks,neurons}.json, their tables and figures (controls_plot.py). `make interp-control` pretrains
and fine-tunes the replicates first, and rewrites the README's generated tables after (`make tables`)."""

from __future__ import annotations

import argparse
import json
import time

import torch

from ...data.synthetic import BigramBackcopy
from ...io import load
from ...records import output_dir
from . import controls
from .cli import add_prompt_args, synthetic_task, val_data


def settings(a) -> dict:
    return {"prompts": a.prompts, "length": a.length, "n_boot": a.n_boot, "seed": a.seed, "val_blocks": a.val_blocks,
            "neuron_candidates": a.k, "runs": a.runs}


def measure(r: int, a) -> dict:
    paths = controls.replicate_models(r, a.runs)
    models, tok = {}, None
    for arm, path in paths.items():
        models[arm], t = load(path)
        models[arm].eval()
        tok = tok or t
    task = BigramBackcopy(**synthetic_task()[0])
    data = val_data(tok, "synthetic", micro_batch_size=1, val_blocks=a.val_blocks)
    start = time.time()
    res = controls.replicate(models, task, data, tok.eos_token_id, a.prompts, a.length, a.n_boot, a.seed, a.k)
    return {"replicate": r, "models": paths, "settings": settings(a), "seconds": round(time.time() - start, 1), **res}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--replicates", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--runs", default="outputs/interp_control", help="where the replicates' fine-tunes are")
    p.add_argument("--out", help="output dir (default: a new dir under outputs/; make interp-control: "
                                 "--out experiments/interp; name the same dir again to resume)")
    add_prompt_args(p)
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0, help="prompts and bootstrap")
    p.add_argument("--val-blocks", type=int, default=32, help="validation blocks of data=synthetic (sinks, neurons)")
    p.add_argument("--k", type=int, default=16, help="entropy-neuron candidates of each ranking")
    p.add_argument("--measure-only", action="store_true", help="write the replicates' files, not the summaries "
                   "(to measure replicates in parallel; a last run without it writes the summaries)")
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)
    out = output_dir(a.out, "interp/controls")
    (out / "controls").mkdir(parents=True, exist_ok=True)
    reps = {}
    for r in a.replicates:
        f = out / "controls" / f"r{r}.json"
        if f.exists() and json.loads(f.read_text()).get("settings") == settings(a):
            print(f"[lnfree] replicate {r}: measured already ({f})")
        else:
            f.write_text(json.dumps(measure(r, a), indent=1))
            print(f"[lnfree] replicate {r} -> {f}")
        reps[r] = json.loads(f.read_text())
    if a.measure_only:
        return
    summary = controls.aggregate(reps)
    for key in ("patching", "sinks", "neurons"):
        (out / f"{key}.json").write_text(json.dumps({"replicates": summary["replicates"], "settings": settings(a),
                                                     "models": {r: reps[r]["models"] for r in reps},
                                                     key: summary[key]}, indent=1))
    from .controls_plot import write_all

    write_all(out)
    print(f"[lnfree] written to {out}")


if __name__ == "__main__":
    main()
