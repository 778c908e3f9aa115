"""Resuming a run: what a resume may change, the check of a checkpoint against the config before any compute, and
the command that resumes a run.

Why: check_resume opens the checkpoint given as ckpt_path and compares it with the config before any data or
weights are read: model shape, tokens per step, schedule, every config field that changes results (the checkpoint
holds its run's config) and every data file (size and content hash, recorded at the start); a change is refused,
naming the field or file, unless it is one that a resume applies for real (RESUME_APPLIED; recorded with both
values and the step).
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

from ..errors import UserError
from ..families import NORM_KINDS, family
from ..io import CKPT_MODEL_CONFIG, RUN_INFO, read_checkpoint
from ..references import TEMPORARY


class ResumeError(UserError):
    pass


# -- what a resume may change ----------------------------------------------------------------------------
# top-level keys that do not change what a run computes (where it writes, whether it resumes or pushes)
NOT_RESULTS = ("paths", "ckpt_path", "overwrite", "skip_if_done", "push_to_hub", "hub_private",
               "resume_allow_data_change")
# what a resume may change freely (a key, or a group and all of its keys): how the same computation runs, what is
# measured, logged, kept or exported, and names. Every other field changes results and is compared.
RESUME_FREE = (*NOT_RESULTS, "export", "task_name", "experiment", "logger", "cluster",
               "model.name", "schedule.name", "data.name", "finetune.name", "hardware.name",
               "model.pretrain_steps", "model.pretrain_keep",  # read by lnfree.pretrain (steps: via trainer.max_steps)
               "model.compile", "model.gradient_checkpointing", "hardware.accelerator", "hardware.strategy",
               "hardware.fsdp_activation_checkpointing",
               "trainer.val_every", "trainer.log_every", "trainer.ckpt_every", "trainer.keep_checkpoints",
               "trainer.keep_at_end", "trainer.validate_before", "trainer.progress_bar", "trainer.max_loss",
               "data.on_bad_row")  # a resume skips the row that stopped a `fail` run: it reads what `skip` reads
# what a resume applies for real, recorded with both values and the step: more (or fewer) steps on the same
# learning-rate horizon (optim.decay_steps, or trainer.max_steps when it is null: the steps already run followed it)
RESUME_APPLIED = ("trainer.max_steps", "optim.decay_steps")
DATA_FIELDS = ("data.files", "data.val_files")  # applied too when resume_allow_data_change=true


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _free(key: str) -> bool:
    return any(key == f or key.startswith(f + ".") for f in RESUME_FREE)


def config_changes(saved: dict, config: dict, step: int, allow_data_change: bool = False) -> tuple[list[str], dict]:
    """(the changes a resume refuses, one line each; those it applies, {field: [checkpoint's, resume's]}) between the
    resolved config a checkpoint at optimizer step `step` holds and the resume's."""
    old, new = _flat(saved), _flat(config)
    refused, applied = [], {}
    for key in sorted(old.keys() | new.keys()):
        if (key in old and key in new and old[key] == new[key]) or _free(key):
            continue
        if key in RESUME_APPLIED or (allow_data_change and key in DATA_FIELDS):
            applied[key] = [old.get(key), new.get(key)]
        else:
            refused.append(f"{key}: checkpoint {old.get(key, '(not set)')!r} vs config {new.get(key, '(not set)')!r}")
    if applied.keys() & {"trainer.max_steps", "optim.decay_steps"}:
        horizon = [c.get("optim.decay_steps") or c.get("trainer.max_steps") for c in (old, new)]
        if horizon[0] != horizon[1]:
            refused.append(f"learning-rate horizon (optim.decay_steps, or trainer.max_steps when null): checkpoint "
                           f"{horizon[0]} vs config {horizon[1]}; the steps already run followed the checkpoint's, so "
                           f"to change trainer.max_steps keep optim.decay_steps={horizon[0]}")
        if new.get("trainer.max_steps", 0) <= step:
            refused.append(f"trainer.max_steps={new.get('trainer.max_steps')}: the checkpoint is at step {step} "
                           "already")
    return refused, applied


def data_changes(saved: dict, now: dict) -> list[str]:
    """Each data file (streams.data_identity) that is new, gone or changed since the checkpoint's run started."""
    lines = []
    for name in sorted(saved.keys() | now.keys()):
        a, b = saved.get(name), now.get(name)
        if a == b:
            continue
        if a is None or b is None:
            lines.append(f"{name}: {'not read' if a is None else 'read'} by the checkpoint's run, "
                         f"{'not read' if b is None else 'read'} now")
            continue
        how = [f"{k} {str(a.get(k))[:12]} -> {str(b.get(k))[:12]}" for k in sorted(a.keys() | b.keys())
               if a.get(k) != b.get(k)]
        lines.append(f"{name} changed: {', '.join(how)}")
    return lines


def check_resume(ckpt_path: str, model_config, tokens_per_step: int, events, config: dict | None = None,
                 data_files: dict | None = None, allow_data_change: bool = False) -> list[dict]:
    """Open the checkpoint (weights_only) and compare it with the config (the resolved `config` and the identity
    of its `data_files`, when given) before any compute; returns the run's resumes so far, this one last:
    [{"step", "changed": {field: [checkpoint's, resume's]}}], a changed data file under "data files"."""
    if TEMPORARY.match(Path(ckpt_path).name):
        raise ResumeError(f"ckpt_path {ckpt_path} is a temporary name (a checkpoint being written, or left "
                          "half-written by a killed run): resume from a finished checkpoint (step*.ckpt, last.ckpt)")
    ckpt = read_checkpoint(ckpt_path)
    if CKPT_MODEL_CONFIG not in ckpt:
        raise ResumeError(f"ckpt_path {ckpt_path} is not an lnfree training checkpoint")
    saved = ckpt[CKPT_MODEL_CONFIG]
    fam = family(model_config)
    fields = ("model_type", *fam.shape_fields)
    diffs = [f"model.{k}: checkpoint {saved.get(k)} vs config {getattr(model_config, k)}"
             for k in fields if saved.get(k) != getattr(model_config, k)]
    info = ckpt.get(RUN_INFO, {})
    if info.get("tokens_per_step") not in (None, tokens_per_step):
        diffs.append(f"tokens per step: checkpoint {info['tokens_per_step']} vs config {tokens_per_step} "
                     "(micro-batch x block size x devices x accumulation)")
    # named as the run records them (callbacks.event_site): by the family's site names (GPT-2: ln2.0 ... lnf)
    planned = [[fam.site_name(e.kind, e.block) if e.kind in NORM_KINDS else e.name, e.step] for e in events]
    if info.get("events") is not None and [[n, s] for n, s in info["events"]] != planned:
        diffs.append(f"removal schedule: checkpoint {info['events']} vs config {planned}")
    step, changed = ckpt.get("global_step", 0), {}
    if config is not None and "config" in info:
        refused, changed = config_changes(info["config"], config, step, allow_data_change)
        diffs += refused
    if data_files is not None and "data_files" in info and (moved := data_changes(info["data_files"], data_files)):
        if allow_data_change:
            changed["data files"] = moved
        else:
            diffs += moved + ["(a resume reads the data its run started on; if the change is meant, pass "
                              "resume_allow_data_change=true, and the run records it)"]
    if "config" not in info and config is not None:
        print(f"[lnfree] warning: {ckpt_path} predates checkpoints that hold their run's config and data files: only "
              "the model shape, tokens per step and removal schedule were compared", file=sys.stderr, flush=True)
    if diffs:
        raise ResumeError(f"ckpt_path {ckpt_path} does not match this config; nothing was run (a resume continues "
                          "the checkpoint's run: to change what it computes, start a new run in another "
                          "directory):\n  " + "\n  ".join(diffs))
    return [*info.get("resumes", []), {"step": step, "changed": changed}]


# -- the resume command ----------------------------------------------------------------------------------
def resume_command(out: Path, ckpt: Path | str) -> str:
    """The exact command that resumes this run from `ckpt` (the original overrides, plus where and from what)."""
    entry, overrides = ["lnfree.train"], []
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            hc = HydraConfig.get()
            overrides = [o for o in hc.overrides.task
                         if o.split("=", 1)[0].lstrip("+~") not in ("ckpt_path", "hydra.run.dir", "overwrite")]
            # the command that ran: lnfree.train or lnfree.pretrain (Hydra's job name is the script's), and its
            # config when not the script's own (python -m lnfree.pretrain --config-name pretrain_depth)
            if hc.job.name in ("train", "pretrain"):
                entry = [f"lnfree.{hc.job.name}"]
                if hc.job.config_name and hc.job.config_name != hc.job.name:
                    entry += ["--config-name", hc.job.config_name]
    except ImportError:
        pass
    args = [sys.executable.rsplit("/", 1)[-1], "-m", *entry, *overrides,
            f"hydra.run.dir={hydra_value(str(out.resolve()))}", f"ckpt_path={hydra_value(str(Path(ckpt).resolve()))}"]
    return " ".join(shlex.quote(a) for a in args)  # then quoted for the shell


def hydra_value(v: str) -> str:
    """`v` as a Hydra override value that reads back as `v`: plain when Hydra's grammar takes it as it is, else
    single-quoted (a comma would make a sweep, a space, a quote or a non-ASCII letter would not parse), with a
    quote, and a backslash before a quote or at the end, escaped."""
    if re.fullmatch(r"[A-Za-z0-9_/.\-+@~%]+", v):
        return v
    return "'" + re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), v) + "'"
