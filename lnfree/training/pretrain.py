"""Pretrain the built-in family: GPT-2-architecture models trained *with* LayerNorm on the built-in corpus.

    python -m lnfree.pretrain model=builtin_w256

Runs the ordinary train() from random init with schedule=none (conf/pretrain.yaml), then saves the result
as a Hugging Face dir (weights, config, tokenizer, pretrain_info.json) where `model.source=builtin:<name>`
finds it: lnfree/pretrained/<name> (the default model ships there) or <paths.cache_dir>/models/<name>.
Nothing pretrains implicitly: loading a built-in model that is not there is an error naming this command.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from ..io import BUILTIN_PREFIX, ModelIOError, builtin_dir
from ..paths import CONF_DIR
from . import config as _config  # noqa: F401  (registers the schemas)
from .train import train

INFO_FILE = "pretrain_info.json"


def pretrain(cfg: DictConfig) -> Path:
    if not cfg.model.source.startswith(BUILTIN_PREFIX):
        raise ModelIOError(f"pretrain is for the built-in family (model=builtin_*), not {cfg.model.source!r}")
    dest = builtin_dir(cfg.model.source[len(BUILTIN_PREFIX):], cfg.paths.cache_dir, shipped=False)
    run_cfg = cfg.copy()
    with open_dict(run_cfg):
        run_cfg.model.source, run_cfg.model.tokenizer = "random", "builtin"
    summary = train(run_cfg)
    hf_dir = Path(summary["output_dir"]) / "export" / "hf"
    info = {
        "name": cfg.model.name,
        "shape": OmegaConf.to_container(cfg.model.shape),
        "n_params": summary["n_params"],
        "n_params_non_embedding": summary["n_params_non_embedding"],
        "steps": summary["steps"],
        "tokens": summary["tokens_seen"],
        "wall_time_s": summary["wall_time_s"],
        "val_ce": summary["val_ce"],
        "hardware": OmegaConf.to_container(cfg.hardware),
    }
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(hf_dir, tmp)
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=1))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)  # appears whole or not at all
    print(f"[lnfree] pretrained {cfg.model.name}: val CE {info['val_ce']:.3f} in {info['wall_time_s']:.0f} s -> {dest}")
    return dest


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="pretrain")
def main(cfg: DictConfig):
    pretrain(cfg)


if __name__ == "__main__":
    main()
