"""Remove every norm of a model at once, without fine-tuning: the baseline that fine-tuning must beat.

    python -m lnfree.training.remove_now builtin:w128 outputs/builtin/no_finetune [--blocks 16]

Calibrates every site's sigma on `--blocks` blocks of the built-in training split, freezes them all and
writes the verified HF-compatible and folded exports (same layout as a training run's export/). When the model
with every norm frozen gives non-finite logits (a model with massive activations can overflow), that is the
result: nothing is exported, and removed_without_finetuning.json says where the forward overflows and which
site's removal, freezing them one at a time in removal order, first makes it non-finite (lnfree.diagnose).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..diagnose import describe, first_nonfinite_removal, locate_nonfinite
from ..export import export_folded, export_hf
from ..io import load
from ..model import parse_site_name
from ..paths import DEFAULT_CACHE_DIR
from .config import data_module


def data_for_calibration(tok, block_size: int, blocks: int):
    """conf/data/builtin.yaml, calibrating on the first `blocks` training blocks in file order (no shuffle) and
    checking the exports on 4 validation blocks."""
    return data_module(tok, "builtin", block_size=block_size, micro_batch_size=blocks, val_blocks=4, shuffle_buffer=0)


def remove_now(source: str, out_dir: str, blocks: int = 16, block_size: int = 256, cache_dir=DEFAULT_CACHE_DIR):
    model, tok = load(source, cache_dir, removable=True)
    model.eval()
    dm = data_for_calibration(tok, block_size, blocks)
    dm.setup()
    model.calibrate(dm.calibration_batch())
    for name in list(model.sites()):
        model.remove(*parse_site_name(name))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    check = dm.val_data[:4]
    record = {"source": source, "calibration_blocks": blocks, "sigmas": model.sigmas()}
    report = locate_nonfinite(model, check)
    if report is None:
        record["export_errors"] = {"hf": export_hf(model, out / "export" / "hf", tok, input_ids=check),
                                   "folded": export_folded(model, out / "export" / "folded", tok, input_ids=check)}
        print(f"[lnfree] every norm of {source} removed without fine-tuning -> {out}")
    else:  # the result is that it overflows: where, and which removal first does it (on a fresh copy)
        fresh, _ = load(source, cache_dir, removable=True)
        fresh.calibrate(dm.calibration_batch())
        record["nonfinite"] = {"all_removed": report, "first": first_nonfinite_removal(fresh, check)}
        first = record["nonfinite"]["first"]
        print(f"[lnfree] every norm of {source} removed without fine-tuning: {describe(report)}; freezing the "
              f"sites one at a time in removal order, the first to make the logits non-finite is {first['site']} "
              f"(after {first['removed']} removals). Nothing exported; record: {out}")
    (out / "removed_without_finetuning.json").write_text(json.dumps(record, indent=1))
    return model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source")
    p.add_argument("out_dir")
    p.add_argument("--blocks", type=int, default=16, help="calibration blocks")
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR)
    a = p.parse_args(argv)
    with torch.no_grad():
        remove_now(a.source, a.out_dir, a.blocks, a.block_size, a.cache_dir)


if __name__ == "__main__":
    main()
