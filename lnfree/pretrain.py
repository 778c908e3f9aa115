"""Pretrain the built-in family: GPT-2-architecture models trained *with* LayerNorm on the built-in corpus.

    python -m lnfree.pretrain model=builtin_4x256

Runs the ordinary train() from random init with schedule=none (conf/pretrain.yaml), then saves the result
as a Hugging Face dir (weights, config, tokenizer, pretrain_info.json) where `model.source=builtin:<name>`
finds it: lnfree/pretrained/<name> (the default model ships there) or <paths.cache_dir>/models/<name>.
Fine-tuning a built-in model that is not there yet pretrains it first (a few minutes on 2 CPU cores).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from . import config as _config  # noqa: F401  (registers the schemas)
from .sources import BUILTIN_PREFIX, SourceError, builtin_dir
from .train import train

INFO_FILE = "pretrain_info.json"


def pretrain(cfg: DictConfig) -> Path:
    if not cfg.model.source.startswith(BUILTIN_PREFIX):
        raise SourceError(f"pretrain is for the built-in family (model=builtin_*), not {cfg.model.source!r}")
    dest = builtin_dir(cfg.model.source[len(BUILTIN_PREFIX):], cfg.paths.cache_dir, committed=False)
    run_cfg = cfg.copy()
    with open_dict(run_cfg):
        run_cfg.model.source, run_cfg.model.tokenizer = "random", "builtin"
    summary = train(run_cfg)
    hf_dir = Path(summary["output_dir"]) / "export" / "hf"
    hf_cfg = json.loads((hf_dir / "config.json").read_text())
    n_emb = (hf_cfg["vocab_size"] + hf_cfg["n_positions"]) * hf_cfg["n_embd"]  # wte (tied) + wpe
    info = {
        "name": cfg.model.name,
        "shape": OmegaConf.to_container(cfg.model.shape),
        "n_params": summary["n_params"],
        "n_params_non_embedding": summary["n_params"] - n_emb,
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


def ensure_builtin(model_cfg, cache_dir) -> Path:
    """Pretrain a built-in model that is neither shipped nor cached (in a subprocess: its own Hydra app)."""
    name = model_cfg.source[len(BUILTIN_PREFIX):]
    dest = builtin_dir(name, cache_dir)
    if dest.exists():
        return dest
    print(f"[lnfree] built-in model {model_cfg.name} not found: pretraining it now ({model_cfg.pretrain_steps} "
          f"steps; a few minutes on CPU) into {dest}")
    cache = Path(cache_dir).expanduser()
    subprocess.run([sys.executable, "-m", "lnfree.pretrain", f"model={model_cfg.name}",
                    f"paths.cache_dir={cache}", f"hydra.run.dir={cache}/pretrain_runs/{name}",
                    "trainer.progress_bar=false"], check=True)
    return dest


@hydra.main(version_base="1.3", config_path="../conf", config_name="pretrain")
def main(cfg: DictConfig):
    pretrain(cfg)


if __name__ == "__main__":
    main()
