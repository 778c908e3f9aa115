"""What every analysis command shares: the models it compares (name=path, default: the built-in default's
original, vanilla and LN-free models from `make eval`), where it writes, and loading each model through lnfree.io."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ...io import load

# the models of conf/eval.yaml (name there -> name here) that the analyses compare by default
DEFAULT_MODELS = {"original": "original", "vanilla_s1": "vanilla", "lnfree_s1": "lnfree"}


def default_models(runs: str | None = None) -> list[str]:
    """name=path of DEFAULT_MODELS as conf/eval.yaml gives them (under `runs`, default conf/runs.yaml's)."""
    from hydra import compose, initialize_config_dir

    from ...paths import CONF_DIR
    from ..eval_config import seeds_written_out  # (importing it registers eval_schema, conf/eval.yaml's, with Hydra)

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = seeds_written_out(compose("eval", overrides=[f"runs={runs}"] if runs else []))
    paths = {m.name: m.path for m in cfg.models}
    return [f"{ours}={paths[theirs]}" for theirs, ours in DEFAULT_MODELS.items()]


def parser(description: str, record: str) -> argparse.ArgumentParser:
    """record: where the committed result lives (named with --out by the Makefile); without --out a command writes
    to a new dir (lnfree.records.output_dir), never over a committed result."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("models", nargs="*", help="name=path (any form lnfree.io loads; default: default_models())")
    p.add_argument("--out", help=f"output dir (default: a new dir under outputs/; committed: --out {record})")
    return p


def each_model(specs: list[str]):
    """(name, path, model, tokenizer) for every name=path spec (none: default_models()), loaded one at a time."""
    for spec in specs or default_models():
        name, path = spec.split("=", 1)
        model, tok = load(path)
        yield name, path, model.eval(), tok


def add_prompt_args(p: argparse.ArgumentParser) -> None:
    """The patching prompts' options (lnfree.analysis.interp.patching, and each control replicate's patching)."""
    p.add_argument("--prompts", type=int, default=128)
    p.add_argument("--length", type=int, default=32, help="backcopy: prompt length")


def val_data(tokenizer, data: str, **overrides):
    """The validation blocks [n, block_size] of conf/data/<data>.yaml (builtin | synthetic) in the tokenizer's ids,
    each of `overrides` (val_blocks, block_size, ...) replacing its value (lnfree.training.config.data_module)."""
    from ...training.config import data_module

    dm = data_module(tokenizer, data, **overrides)
    dm.setup()
    return dm.val_data


def write_result(out: Path, stem: str, record: dict, plot=None) -> None:
    """out/<stem>.json, and out/<stem>.png drawn by plot(record, path) where there is one; then say where."""
    (out / f"{stem}.json").write_text(json.dumps(record, indent=1))
    if plot is not None:
        plot(record, out / f"{stem}.png")
    print(f"[lnfree] written to {out}")


def synthetic_task() -> tuple[dict, int]:
    """(task settings, block_size) of conf/data/synthetic.yaml: the data the positive-control models learned."""
    from omegaconf import OmegaConf

    from ...paths import CONF_DIR

    cfg = OmegaConf.load(CONF_DIR / "data" / "synthetic.yaml")
    return OmegaConf.to_container(cfg.synthetic), int(cfg.block_size)
