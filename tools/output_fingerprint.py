"""Fingerprint of the product's outputs, to show a refactor changed none of them (run it before and after).

    python -m tools.output_fingerprint --out before.json      # in a checkout of the old commit
    python -m tools.output_fingerprint --out after.json       # in the new one, same machine
    python -m tools.output_fingerprint --compare before.json after.json

For each built-in family member (GPT-2, Llama, NeoX), a short LN-free fine-tune through `python -m lnfree.train`
(one thread, fp32, the built-in schedule, 30 steps) and its vanilla twin; then, for every run, the sha256 of the
per-token CE of its final checkpoint and of each export (export/hf, export/folded) on 8 blocks of the built-in
validation text, and of every export file's tensors. Same machine and same torch: equal hashes mean bit-identical
outputs. About 3 CPU minutes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MODELS = ("builtin_w128", "builtin_llama_w128", "builtin_neox_w128")
SCHEDULES = ("builtin", "none")
STEPS = 30


def _sha(a) -> str:
    return hashlib.sha256(a.detach().float().contiguous().numpy().tobytes()).hexdigest()


def fingerprint(run: Path) -> dict:
    import torch
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    from lnfree import load
    from lnfree.analysis.eval_config import DatasetSpec
    from lnfree.analysis.eval_data import eval_chunks
    from lnfree.analysis.metrics import token_stats
    from lnfree.model_record import logits

    spec = OmegaConf.structured(DatasetSpec(name="in_domain", source="builtin", split="validation"))

    out = {}
    for form in ("", "export/hf", "export/folded"):
        d = run / form if form else run
        if form and not d.exists():
            continue
        model, tok = load(str(d))
        ids = eval_chunks(spec, tok, 256, 8 * 256)
        with torch.inference_mode():
            ce = token_stats(logits(model, ids), ids)[0]["ce"]
        out[form or "run"] = {"ce": _sha(ce), "mean_ce": float(ce.mean())}
        if form:
            out[form]["tensors"] = {f.name: _sha(torch.cat([t.flatten().float() for _, t in sorted(
                load_file(str(f)).items())])) for f in sorted(d.glob("*.safetensors"))}
    return out


def run_all(work: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", WANDB_MODE="disabled")
    res = {}
    for m in MODELS:
        for s in SCHEDULES:
            d = work / f"{m}-{s}"
            if not (d / "summary.json").exists():
                subprocess.run([sys.executable, "-m", "lnfree.train", f"model={m}", f"schedule={s}", "hardware=cpu",
                                "data=builtin", "optim=builtin", f"trainer.max_steps={STEPS}", "seed=1",
                                "trainer.progress_bar=false", f"hydra.run.dir={d}"], check=True, env=env,
                               capture_output=True)
            res[f"{m}/{s}"] = fingerprint(d)
            print(f"[fingerprint] {m}/{s}: {res[f'{m}/{s}']['run']['mean_ce']:.6f}", flush=True)
    return res


def compare(a: dict, b: dict) -> list[str]:
    diffs = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            diffs.append(f"{k}: {json.dumps(a.get(k))[:200]} != {json.dumps(b.get(k))[:200]}")
    return diffs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="write the fingerprint here")
    ap.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    ap.add_argument("--work", help="keep the runs here (default: a temporary dir); finished runs are reused")
    a = ap.parse_args(argv)
    if a.compare:
        diffs = compare(*(json.loads(Path(p).read_text()) for p in a.compare))
        print("\n".join(diffs) if diffs else "[fingerprint] identical: every output bit-identical")
        return 1 if diffs else 0
    if a.work:
        res = run_all(Path(a.work))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            res = run_all(Path(tmp))
    text = json.dumps(res, indent=1) + "\n"
    Path(a.out).write_text(text) if a.out else print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
