"""What every analysis command shares: the models it compares (name=path, default: the built-in default's
original, vanilla and LN-free models from `make eval`), where it writes, and loading each model through lnfree.io."""

from __future__ import annotations

import argparse

from ...io import load

# the models of conf/eval.yaml (name there -> name here) that the analyses compare by default
DEFAULT_MODELS = {"original": "original", "vanilla_s1": "vanilla", "lnfree_s1": "lnfree"}


def default_models(runs: str | None = None) -> list[str]:
    """name=path of DEFAULT_MODELS as conf/eval.yaml gives them (under `runs`, default conf/runs.yaml's)."""
    from hydra import compose, initialize_config_dir

    from ...paths import CONF_DIR
    from .. import eval_config  # noqa: F401  (registers conf/eval.yaml's schema, eval_schema, with Hydra)

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("eval", overrides=[f"runs={runs}"] if runs else [])
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


def synthetic_task() -> tuple[dict, int]:
    """(task settings, block_size) of conf/data/synthetic.yaml: the data the positive-control models learned."""
    from omegaconf import OmegaConf

    from ...paths import CONF_DIR

    cfg = OmegaConf.load(CONF_DIR / "data" / "synthetic.yaml")
    return OmegaConf.to_container(cfg.synthetic), int(cfg.block_size)
