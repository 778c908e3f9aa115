"""Pretrain the built-in family: GPT-2-architecture models trained *with* LayerNorm on the built-in corpus.

    python -m lnfree.pretrain model=builtin_w256

Runs the ordinary train() from random init with schedule=none (conf/pretrain.yaml), then saves the result
as a Hugging Face dir (weights, config, tokenizer, pretrain_info.json) where `model.source=builtin:<name>`
finds it: lnfree/pretrained/<name> (the default model ships there) or <paths.cache_dir>/models/<name>.
Nothing pretrains implicitly: loading a built-in model that is not there is an error naming this command.

`model.pretrain_keep=val_min` (the depth family, conf/pretrain_depth.yaml) keeps the checkpoint at the validation
minimum instead of the last weights: a checkpoint is written at every validation, and the one whose step has the
lowest logged validation CE is exported. `model.pretrain_keep=tail_average` (the depth family from its second
criterion on) exports the mean of the checkpoints of the last 10% of steps instead, and records in the run dir the
validation CE of that mean and of the mean of the 10% before (lnfree/training/tail_average.py).
A run dir that holds `checkpoints/last*.ckpt` but no summary is resumed from the newest of them by step
(`ckpt_path`); one that holds a finished run is exported again without training, or, asked for more steps with the
same recipe and cosine horizon (`model.pretrain_steps=8800 optim.decay_steps=8000`), continued from its last
checkpoint at the final learning rate (the depth family's recipe 3).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from ..analysis.family import val_by_step, val_min
from ..errors import ModelIOError
from ..export import export_hf
from ..io import BUILTIN_TOKENIZER, load_tokenizer, model_from_checkpoint, read_checkpoint
from ..paths import CONF_DIR, RUN_SUMMARY
from ..references import BUILTIN_PREFIX, RANDOM, builtin_dir
from . import config as _config  # noqa: F401  (registers the schemas)
from .loggers import read_metrics
from .resume import NOT_RESULTS
from .run import ConfigError, train
from .tail_average import tail_average

INFO_FILE = "pretrain_info.json"
KEEP = ("last", "val_min", "tail_average")
LAST = re.compile(r"^last(-v\d+)?\.ckpt$")  # Lightning's save_last names: last.ckpt, last-v1.ckpt, ...


def _version(path: Path) -> int:
    """last.ckpt 0, last-v1.ckpt 1, ...: at an equal step, the later of Lightning's names."""
    v = LAST.match(path.name).group(1)
    return int(v[2:]) if v else 0


def resume_point(out: Path, cfg: DictConfig) -> str | None:
    """The checkpoint to resume an unfinished pretraining from, or the configured ckpt_path.

    The newest of checkpoints/last*.ckpt by the optimizer step it holds: Lightning writes last-v1.ckpt (not
    last.ckpt) when a last.ckpt it did not write is already there, e.g. after the run dir was moved, so last.ckpt
    may be the older. File times are not used: a copy or move may change them."""
    found = [p for p in (out / "checkpoints").glob("last*.ckpt") if LAST.match(p.name)]
    if cfg.ckpt_path is None and found and not (out / RUN_SUMMARY).exists():
        last = max(found, key=lambda p: (read_checkpoint(p).get("global_step", -1), _version(p)))
        print(f"[lnfree] resuming the pretraining in {out} from {last}")
        return str(last)
    return cfg.ckpt_path


def _trained_with(done: dict | None, keep: str) -> str:
    """The model.pretrain_keep a finished run (its summary `done`) was trained with, else `keep`. Which weights are
    kept is chosen after training, so a finished run is exported again under another choice, without training."""
    return done["config"]["model"].get("pretrain_keep", keep) if done else keep


# what a continuation may change: the number of steps (and spell out a horizon the finished run left implicit)
CONTINUABLE = {("trainer", "max_steps"), ("model", "pretrain_steps"), ("optim", "decay_steps"),
               ("model", "pretrain_keep")}


def _differences(a, b, where=()) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _differences(a.get(k), b.get(k), (*where, k))]
    return [] if a == b else [".".join(where)]


def _continuation(out: Path, done: dict | None, run_cfg: DictConfig) -> str | None:
    """The last.ckpt of the finished pretraining in `out` (its summary `done`) that `run_cfg` continues (more steps,
    the same recipe and cosine horizon: the added steps run at the final learning rate), or None if it asks for no
    more steps."""
    if done is None or done["steps"] >= run_cfg.trainer.max_steps:
        return None
    theirs = done["config"]["optim"].get("decay_steps") or done["steps"]
    mine = run_cfg.optim.decay_steps or run_cfg.trainer.max_steps
    if mine != theirs:
        raise ConfigError(f"{out} holds a pretraining of {done['steps']} steps with a cosine horizon of {theirs}: "
                          f"continuing it needs optim.decay_steps={theirs} (got {mine})")
    mine_c, theirs_c = OmegaConf.to_container(run_cfg, resolve=True), done["config"]
    diff = [d for d in _differences({k: v for k, v in theirs_c.items() if k not in NOT_RESULTS},
                                    {k: v for k, v in mine_c.items() if k not in NOT_RESULTS})
            if tuple(d.split(".")[:2]) not in CONTINUABLE]
    if diff:
        raise ConfigError(f"{out} holds a finished pretraining with another recipe ({', '.join(diff)} differ): a "
                          "continuation may change only model.pretrain_steps")
    return str(out / "checkpoints" / "last.ckpt")


def pretrain(cfg: DictConfig) -> Path:
    if not cfg.model.source.startswith(BUILTIN_PREFIX):
        raise ModelIOError(f"pretrain is for the built-in family (model=builtin_*), not {cfg.model.source!r}")
    keep = cfg.model.pretrain_keep
    if keep not in KEEP:
        raise ConfigError(f"model.pretrain_keep must be one of {KEEP}, got {keep!r}")
    if keep != "last" and cfg.trainer.ckpt_every != cfg.trainer.val_every:
        raise ConfigError(f"model.pretrain_keep={keep} needs a checkpoint at every validation: trainer.ckpt_every "
                          f"({cfg.trainer.ckpt_every}) must equal trainer.val_every ({cfg.trainer.val_every})")
    if keep != "last" and (cfg.trainer.keep_checkpoints != -1 or cfg.trainer.keep_at_end != "all"):
        raise ConfigError(f"model.pretrain_keep={keep} reads the periodic checkpoints after training: it needs "
                          "trainer.keep_checkpoints=-1 and trainer.keep_at_end=all")
    dest = builtin_dir(cfg.model.source[len(BUILTIN_PREFIX):], cfg.paths.cache_dir, shipped=False)
    out = Path(cfg.paths.output_dir)
    run_cfg = cfg.copy()
    with open_dict(run_cfg):
        run_cfg.model.source, run_cfg.model.tokenizer = RANDOM, BUILTIN_TOKENIZER
        run_cfg.ckpt_path = resume_point(out, cfg)
        done = json.loads((out / RUN_SUMMARY).read_text()) if (out / RUN_SUMMARY).exists() else None
        run_cfg.model.pretrain_keep = _trained_with(done, keep)
        if (resume := _continuation(out, done, run_cfg)) is not None:  # the summary moves aside: the run goes on
            (out / RUN_SUMMARY).rename(out / f"summary_step{done['steps']:06d}.json")
            print(f"[lnfree] continuing the pretraining in {out} from step {done['steps']} to {cfg.trainer.max_steps}")
            run_cfg.ckpt_path = resume
        elif done is not None:
            run_cfg.skip_if_done = True  # a finished run (same config) is not trained again
    summary = train(run_cfg)
    hf_dir = Path(summary["output_dir"]) / "export" / "hf"
    kept_step, kept_ce, kept_model = summary["steps"], summary["val_ce"], None
    if keep == "val_min":
        kept_step, kept_ce = val_min(out, summary["steps"])
    elif keep == "tail_average":
        logged = val_by_step(read_metrics(out).get("val/ce", []), summary["steps"])
        kept_model, record = tail_average(out, summary["steps"], cfg.trainer.ckpt_every, validation_blocks(run_cfg),
                                          cfg.data.micro_batch_size, logged, cfg.optim.decay_steps)
        kept_step, kept_ce = record["window"], record["val_ce"]
    info = {
        "name": cfg.model.name,
        "shape": OmegaConf.to_container(cfg.model.shape),
        "n_params": summary["n_params"],
        "n_params_non_embedding": summary["n_params_non_embedding"],
        "steps": summary["steps"],
        "tokens": summary["tokens_seen"],
        "wall_time_s": summary["wall_time_s"],
        "val_ce": kept_ce,
        "kept": keep,
        "kept_step": kept_step,
        "val_ce_last": summary["val_ce"],
        "seed": cfg.seed,
        "hardware": OmegaConf.to_container(cfg.hardware),
    }
    if keep == "tail_average":
        info["tail_average"] = record  # both windows' CE: the convergence verdict travels with the weights
    tmp = dest.with_name(f".{dest.name}.model.tmp")  # a TEMPORARY name (lnfree/references.py): never loaded
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(hf_dir, tmp)
    if kept_step != summary["steps"]:  # the exported weights are the last; write the kept ones instead
        if kept_model is None:
            ckpt = out / "checkpoints" / f"step{kept_step:06d}.ckpt"
            kept_model = model_from_checkpoint(read_checkpoint(ckpt), ckpt)
        export_hf(kept_model, tmp)
        (tmp / "README.md").unlink(missing_ok=True)  # the model card describes the last weights
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=1))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)  # appears whole or not at all
    print(f"[lnfree] pretrained {cfg.model.name}: val CE {info['val_ce']:.3f} in {info['wall_time_s']:.0f} s -> {dest}")
    return dest


def validation_blocks(cfg: DictConfig):
    """The run's validation blocks, built as training built them (its data config, the built-in tokenizer)."""
    datamodule = instantiate(cfg.data, tokenizer=load_tokenizer(BUILTIN_TOKENIZER), _convert_="all")
    datamodule.setup("fit")
    return datamodule.val_data


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="pretrain")
def main(cfg: DictConfig):
    pretrain(cfg)


if __name__ == "__main__":
    main()
