"""Fine-tune a GPT-2 while removing its norms on a schedule.

    python -m lnfree.train                                   # the built-in default, on CPU
    python -m lnfree.train model=gpt2_medium schedule=fast hardware=gpu
    python -m lnfree.train -m schedule=none,fast             # a sweep: one job (and W&B run) each

`train(cfg)` is a plain function (tests call it with a composed config): check_config (everything that needs no
weights and no data; the model reference is resolved once, there), claim_output_dir (the run-dir policy),
build (assembly), fit and finalize (exports, summary, model cards, hub push). A run writes into its output dir:
checkpoints/ (periodic, last, on-exception), csv/metrics.csv, summary.json, export/hf/ (stock-loadable) and
export/folded/ (when every site is removed).
"""

from __future__ import annotations

import json
import math
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from ..data.streams import BAD_ROW_POLICIES, DATA_FAULTS, data_identity
from ..errors import UserError, user_errors_as_messages
from ..export import export_folded, export_hf, logits_error, staging_dir
from ..families import family
from ..hub import check_push, push_exports
from ..io import model_from_checkpoint, raise_storage_error, read_checkpoint
from ..lora import MERGE_TOL, apply_lora, has_lora, lora_settings, merged_copy, trainable_parameters
from ..model import non_embedding_params
from ..model_card import write_model_cards
from ..paths import CONF_DIR, RUN_SUMMARY
from ..records import read_json
from ..references import EXPORT_TMP
from ..schedule import adaptive_settings, distill_weight, normal_form, ramp_steps, special_kinds, validate
from . import config as _config  # noqa: F401  (registers the schemas)
from .callbacks import LNRemovalCallback, Throughput, event_site
from .checkpoints import CheckpointOnException, DivergenceGuard, SafeCheckpointIO
from .config import check_limits, default_block_size
from .console import quiet_third_party, run_console
from .hardware import grad_accumulation, make_strategy, world_size
from .loggers import finish_wandb, log_run_artifacts, make_loggers, run_name
from .model_source import ModelSource, load_model, model_label, open_source
from .module import LNFreeModule, frozen_teacher
from .progress import StepLines, StepProgressBar
from .resume import NOT_RESULTS, check_resume
from .run_dir import RunDirError, acquire_run_lock, check_output_dir, guarded_run, remove_leftovers, write_hydra_files

DATA_FILES = "data_files.json"  # in the run dir: the identity of every data file, at the start and at each resume


class ConfigError(UserError):
    pass


class ExportFailed(RuntimeError):
    pass


@dataclass(frozen=True)
class Plan:
    """What check_config found, before any weight or data is read."""

    source: ModelSource  # the model reference, resolved once, with its tokenizer and config
    events: list  # the removal schedule
    accum: int  # gradient accumulation
    step_tokens: int  # tokens per optimizer step
    n_layer: int  # the model's depth
    config: dict  # the config, resolved: saved in every checkpoint, so that a resume is compared with it
    data_files: dict  # the identity of every local data file (streams.data_identity), compared at a resume
    resumes: list  # this run's resumes so far, this one last: [{"step", "changed"}] (check_resume)


def check_config(cfg: DictConfig) -> Plan:
    """Every check that needs no weights and no data."""
    check_limits(cfg)  # impossible numbers first: nothing else is read before they are refused
    # the tokenizer (small files: no data, no weights) is checked against the model here and used by the run;
    # a random-init model takes its vocabulary from it
    source = open_source(cfg.model, cfg.paths.cache_dir)
    mcfg = source.config
    fam = family(mcfg)
    dims = fam.dims(mcfg)
    if cfg.data.block_size is None:  # the model's context (capped): set in the config, so the run records it
        cfg.data.block_size = default_block_size(dims.n_ctx)
    if cfg.data.block_size > dims.n_ctx:
        raise ConfigError(f"data.block_size={cfg.data.block_size} exceeds the model's context "
                          f"{fam.ctx_field}={dims.n_ctx}")
    events = validate(cfg.schedule, dims.n_layer, cfg.trainer.max_steps)
    accum = grad_accumulation(cfg.optim.tokens_per_step, cfg.data.micro_batch_size, cfg.data.block_size,
                              world_size(cfg.hardware))
    step_tokens, resolved = tokens_per_step(cfg, accum), OmegaConf.to_container(cfg, resolve=True)
    d = cfg.data
    data_files = data_identity(d.source, d.split, d.val_split, d.files, d.val_files)  # sizes and hashes, no rows
    resumes = []
    if cfg.ckpt_path:
        if not Path(cfg.ckpt_path).exists():
            raise ConfigError(f"ckpt_path {cfg.ckpt_path!r} does not exist")
        # opened with weights_only (a checkpoint holding code is refused, unrun) and compared with the config
        resumes = check_resume(cfg.ckpt_path, mcfg, step_tokens, events, resolved, data_files,
                               cfg.resume_allow_data_change)
    plan = Plan(source, events, accum, step_tokens, dims.n_layer, resolved, data_files, resumes)
    make_strategy(cfg.hardware)  # raises for an impossible strategy
    if distill_weight(cfg.schedule) > 0 and cfg.hardware.strategy == "fsdp":
        raise ConfigError("schedule.distill.weight > 0 with hardware.strategy=fsdp is not supported: the teacher "
                          "would be a whole, unsharded copy of the model on every rank, which is what FSDP is there "
                          "to avoid; use hardware.strategy=ddp (or finetune=lora) with distillation")
    if cfg.push_to_hub:
        if not cfg.export:
            raise ConfigError("push_to_hub needs export=true (it uploads the exports)")
        check_push(cfg.push_to_hub)
    if cfg.data.on_bad_row not in BAD_ROW_POLICIES:
        raise ConfigError(f"data.on_bad_row={cfg.data.on_bad_row!r}; use one of {BAD_ROW_POLICIES}")
    return plan


def tokens_per_step(cfg, accum: int) -> int:
    return cfg.data.micro_batch_size * cfg.data.block_size * world_size(cfg.hardware) * accum


def experiment_name(cfg) -> str:
    """model-schedule[-finetune]-s<seed>, plus a multirun's other overrides (e.g. trainer.max_steps=64); the model
    as model_label names it (model.source is in that name, so not among the overrides)."""
    from hydra.core.hydra_config import HydraConfig

    extra = ""
    if HydraConfig.initialized():
        named = ("model=", "model.source=", "schedule=", "seed=", "finetune=", "paths.", "hydra.", "overwrite=",
                 "skip_if_done=", "logger", "trainer.progress_bar=")  # the last two: how it logs, not what it is
        extra = ",".join(o for o in HydraConfig.get().overrides.task if not o.startswith(named))
    return run_name(model_label(cfg.model), cfg.schedule.name, cfg.seed, cfg.finetune.name, extra)


# -- the run: checked, its directory claimed, built, fitted, finalized -----------------------------------
@guarded_run  # releases the run-dir lock however train() ends; SIGTERM / SIGINT exit 143 / 130
def train(cfg: DictConfig) -> dict:
    """Run one fine-tuning job; returns the summary (also written to summary.json)."""
    t0 = time.time()
    quiet_third_party()
    plan = check_config(cfg)
    out = Path(cfg.paths.output_dir)
    done = _finished_run(out, cfg) if cfg.skip_if_done else None
    if done is not None:
        print(f"[lnfree] {out} already holds this run, finished (skip_if_done=true): not run again")
        return done
    first = claim_output_dir(out, cfg)
    datamodule = open_data(cfg, plan, out)  # before anything is written: a data error leaves no run dir
    if first:
        record_data_files(out, plan)
    with run_console(out):
        run = build(cfg, plan, out, datamodule)
        try:
            val_before, val_after = fit(cfg, run)
            return finalize(cfg, plan, run, val_before, val_after, t0) if run.trainer.is_global_zero else None
        finally:
            finish_wandb()


def claim_output_dir(out: Path, cfg) -> bool:
    """The run-dir policy: one run per directory, what a killed run left half-written removed, and a directory
    holding another run refused unless this run resumes it or overwrite=true. Nothing is written into `out` before
    that (Hydra's .hydra/ files included). Returns whether this process holds the lock (the run's first process)."""
    lock = acquire_run_lock(out)  # before the output-dir check (two runs started together)
    remove_leftovers(out)  # .export.tmp, .<ckpt>.tmp-<pid>
    check_output_dir(out, cfg.ckpt_path, cfg.overwrite)
    out.mkdir(parents=True, exist_ok=True)
    if lock is not None:
        write_hydra_files(out, cfg)
    return lock is not None


def record_data_files(out: Path, plan: Plan) -> None:
    """<run>/data_files.json: [{"step", "files"}], the identity of every data file when the run started, and again
    at each resume that found them changed (resume_allow_data_change=true)."""
    f = out / DATA_FILES
    starts = json.loads(f.read_text()) if plan.resumes and f.exists() else []
    if not starts or starts[-1]["files"] != plan.data_files:
        starts.append({"step": plan.resumes[-1]["step"] if plan.resumes else 0, "files": plan.data_files})
        f.write_text(json.dumps(starts, indent=1))


@dataclass
class Run:
    """A run assembled by `build`: what `fit` and `finalize` work on."""

    out: Path
    name: str
    resolved: dict  # the config with every interpolation resolved (the summary's and the loggers' record)
    datamodule: Any
    module: LNFreeModule
    trainer: L.Trainer
    removal: LNRemovalCallback
    throughput: Throughput
    loggers: list
    n_trainable: int

    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"


def open_data(cfg: DictConfig, plan: Plan, out: Path):
    """The run's data module, read and checked now (its validation blocks and first training block): bad data
    fails before the model is loaded and before the run writes anything. Seeds everything first (the data order,
    then the model's init)."""
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data, tokenizer=plan.source.tokenizer, faults_file=str(out / DATA_FAULTS),
                             _convert_="all")
    datamodule.setup("fit")
    return datamodule


def build(cfg: DictConfig, plan: Plan, out: Path, datamodule) -> Run:
    """Assembly: the model, the Lightning module, loggers, callbacks and trainer, around the data of open_data."""
    print(f"[lnfree] writing to {out.resolve()}")
    model, n_trainable, teacher = _model(cfg, plan)
    run_info = {"tokens_per_step": plan.step_tokens, "events": [[event_site(model, e)[0], e.step] for e in plan.events],
                "config": plan.config, "data_files": plan.data_files, "resumes": plan.resumes}
    module = LNFreeModule(model, cfg.optim, aux_weight=cfg.schedule.aux_weight, max_steps=cfg.trainer.max_steps,
                          compile=cfg.model.compile, lr_scale=cfg.finetune.lr_scale, run_info=run_info,
                          teacher=teacher, distill_weight=distill_weight(cfg.schedule),
                          distill_temperature=cfg.schedule.distill.temperature,
                          ce_weight=cfg.schedule.distill.ce_weight)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    name = experiment_name(cfg)
    loggers = make_loggers(cfg.logger, str(out), name, resolved, resumed=bool(cfg.ckpt_path))
    removal = LNRemovalCallback(plan.events, momentum=cfg.schedule.momentum, ramp_steps=ramp_steps(cfg.schedule),
                                ramp_shape=cfg.schedule.ramp.shape, adaptive=adaptive_settings(cfg.schedule))
    throughput = Throughput(plan.step_tokens)
    trainer = _trainer(cfg, plan.accum, out, loggers, _callbacks(cfg, out, removal, throughput))
    return Run(out, name, resolved, datamodule, module, trainer, removal, throughput, loggers, n_trainable)


def _model(cfg: DictConfig, plan: Plan):
    """(the removable model to fine-tune, its number of trained parameters, the distillation teacher or None)."""
    model = load_model(plan.source, cfg.model)
    special = special_kinds(cfg.schedule)
    model.config.lnfree_special_bos, model.config.lnfree_special_eot = special["bos"], special["eot"]
    # the teacher: the model as loaded, before LoRA adapters (with LoRA it is a second copy of the frozen base)
    teacher = frozen_teacher(model) if distill_weight(cfg.schedule) > 0 else None
    if cfg.finetune.kind == "lora":
        apply_lora(model, lora_settings(cfg.finetune))
    n_trainable, n_total = trainable_parameters(model)
    print(f"[lnfree] finetune={cfg.finetune.name}: {n_trainable:,} of {n_total:,} parameters train; each "
          f"checkpoint about {_gb(checkpoint_bytes(n_total, n_trainable))} (trainer.keep_checkpoints, "
          "trainer.keep_at_end)")
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, n_trainable, teacher


def _callbacks(cfg: DictConfig, out: Path, removal, throughput) -> list:
    ckpt_dir = out / "checkpoints"
    callbacks = [
        DivergenceGuard(cfg.trainer.max_loss, ckpt_dir),
        removal,
        throughput,
        ModelCheckpoint(dirpath=ckpt_dir, filename="step{step:06d}", auto_insert_metric_name=False,
                        every_n_train_steps=cfg.trainer.ckpt_every, save_top_k=cfg.trainer.keep_checkpoints,
                        monitor="train/tokens_seen", mode="max", save_last=True),
        CheckpointOnException(ckpt_dir, out, cfg.ckpt_path),
    ]
    # a bar, or with bars off a plain line at least every 10% of the steps
    callbacks.append(StepProgressBar(throughput) if cfg.trainer.progress_bar else StepLines(throughput))
    return callbacks


def _trainer(cfg: DictConfig, accum: int, out: Path, loggers: list, callbacks: list) -> L.Trainer:
    return L.Trainer(
        accelerator=cfg.hardware.accelerator, devices=cfg.hardware.devices, num_nodes=cfg.hardware.num_nodes,
        strategy=make_strategy(cfg.hardware), precision=cfg.hardware.precision,
        max_steps=cfg.trainer.max_steps, accumulate_grad_batches=accum,
        gradient_clip_val=cfg.optim.grad_clip or None, gradient_clip_algorithm="norm",
        val_check_interval=cfg.trainer.val_every * accum, check_val_every_n_epoch=None,
        log_every_n_steps=cfg.trainer.log_every, logger=loggers or False, callbacks=callbacks,
        enable_progress_bar=cfg.trainer.progress_bar, deterministic=cfg.trainer.deterministic,
        default_root_dir=str(out), enable_model_summary=False, num_sanity_val_steps=0,
        plugins=[SafeCheckpointIO()],
    )


def fit(cfg: DictConfig, run: Run) -> tuple[float | None, float]:
    """Fitting: (validation CE before (trainer.validate_before; not on a resumed run), validation CE after)."""
    val_before = None
    if cfg.trainer.validate_before and not cfg.ckpt_path:
        val_before = _validate(run)
    run.trainer.fit(run.module, datamodule=run.datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
    if run.trainer.interrupted:  # Lightning handled a Ctrl-C (CheckpointOnException printed how to resume)
        raise KeyboardInterrupt(f"training interrupted at step {run.trainer.global_step}")
    return val_before, _validate(run)


def _validate(run: Run) -> float:
    return run.trainer.validate(run.module, datamodule=run.datamodule, verbose=False)[0]["val/ce"]


def finalize(cfg: DictConfig, plan: Plan, run: Run, val_before, val_after: float, t0: float) -> dict:
    """On rank 0 after fitting: the final model, its exports, summary.json, the model cards, the loggers'
    artifacts, the hub push, the checkpoints kept and the training-curve figure. An export error is raised
    after the summary (which records it) is written."""
    out = run.out
    final, merge_error = _final_model(run.trainer, run.module, cfg, run.ckpt_dir, run.datamodule)
    exports, export_error = {}, None
    try:
        if cfg.export:
            exports, export_error = export_run(final, plan.source.tokenizer, out, run.datamodule)
    except Exception as e:  # noqa: BLE001  (the summary is written first, then the error is raised)
        export_error = f"{type(e).__name__}: {e}"
    summary = _summary(plan, run, final, val_before, val_after, merge_error, exports, export_error, t0)
    (out / RUN_SUMMARY).write_text(json.dumps(summary, indent=1, default=_json_default))
    write_model_cards(out / "export", json.loads(json.dumps(summary, default=_json_default)))
    log_run_artifacts(run.loggers, out, run.name)
    if cfg.push_to_hub and exports:
        print(f"[lnfree] pushed the exports to {push_exports(out, cfg.push_to_hub, cfg.hub_private)}")
    if not export_error:
        apply_keep_at_end(run.ckpt_dir, cfg.trainer.keep_at_end)
    figure = _plot_run(out, run.name)
    print(f"[lnfree] val CE {_fmt(val_before)} -> {val_after:.4f}; {len(final.removed_sites())}/"
          f"{len(final.sites())} sites removed" + (f"; training curves: {figure}" if figure else ""))
    print(_closing_line(out, exports))
    if export_error:
        raise ExportFailed(f"export failed (recorded in {out / RUN_SUMMARY}): {export_error}")
    return summary


def _summary(plan: Plan, run: Run, final, val_before, val_after, merge_error, exports, export_error,
             t0: float) -> dict:
    fam = family(final.config)
    return {
        "model": model_label(run.resolved["model"]),  # what the run, its card and its figures call the model
        "family": fam.name,  # lnfree.families; the hf export's class is hf_class
        "hf_class": fam.stock_class(final.config).__name__,
        "val_ce": val_after,
        "val_ce_before": val_before,
        "n_params": sum(p.numel() for p in final.parameters()),
        "n_params_non_embedding": non_embedding_params(final),
        "n_layer": plan.n_layer,
        "steps": run.trainer.global_step,
        "tokens_per_step": plan.step_tokens,
        "tokens_seen": int(run.module.tokens_seen),
        "finetune": run.resolved["finetune"]["kind"],
        "trainable_params": run.n_trainable,
        "lora_merge_error": merge_error,
        "all_removed": not final.real_sites(),
        "removed_sites": final.removed_sites(),
        "events": run.removal.applied,
        "sigmas": final.sigmas(),
        "world_size": run.trainer.world_size,
        "rank_checks": run.removal.rank_checks,  # event steps where every rank held the same sigmas
        "exports": exports,
        "export_error": export_error,
        "data_faults": run.datamodule.faults_seen(),
        "resumes": plan.resumes,  # each resume's step and what it changed: {field: [before, after]}
        "wall_time_s": round(time.time() - t0, 1),
        "train_tokens_per_s": run.throughput.tokens_per_s,
        "output_dir": str(run.out.resolve()),
        "config": run.resolved,
    }


def checkpoint_bytes(n_params: int, n_trainable: int) -> int:
    """A checkpoint's size: fp32 weights plus AdamW's two fp32 moments of each trained parameter."""
    return 4 * n_params + 8 * n_trainable


def _gb(n_bytes: int) -> str:
    return f"{n_bytes / 1e9:.2f} GB" if n_bytes >= 1e8 else f"{n_bytes / 1e6:.1f} MB"


def apply_keep_at_end(ckpt_dir: Path, keep: str) -> None:
    """trainer.keep_at_end after a finished run: all, last (last.ckpt only) or none (the exports hold the weights)."""
    if keep == "all" or not ckpt_dir.is_dir():
        return
    drop = [f for f in ckpt_dir.iterdir() if keep == "none" or f.name != "last.ckpt"]
    freed = sum(f.stat().st_size for f in drop if f.is_file())
    for f in drop:
        shutil.rmtree(f) if f.is_dir() else f.unlink()
    if keep == "none":
        ckpt_dir.rmdir()
    print(f"[lnfree] trainer.keep_at_end={keep}: removed {len(drop)} checkpoint file(s), {_gb(freed)}")


def _closing_line(out: Path, exports: dict) -> str:
    """The run's last line: where its results are."""
    forms = {"hf": "stock transformers", "folded": "norm-free, lnfree.load"}
    where = [f"{out / RUN_SUMMARY}"] + [f"{e['path']} ({forms[form]})" for form, e in exports.items()]
    missing = [] if exports else ["no export (export=false, or sites still real)"]
    return "[lnfree] done: " + "; ".join(where + missing)


def _plot_run(out: Path, name: str) -> Path | None:
    """<run>/training_curves.png: train and validation CE with the removal events (None without a CSV log)."""
    from ..analysis.plots import plot_training_curves

    path = out / "training_curves.png"
    try:
        with warnings.catch_warnings():  # matplotlib's tight_layout notes on a crowded legend
            warnings.simplefilter("ignore", UserWarning)
            return path if plot_training_curves({name: str(out)}, path) and path.exists() else None
    except (OSError, ValueError) as e:  # a figure is never worth a failed run
        print(f"[lnfree] no training-curve figure: {e}")
        return None


def _finished_run(out: Path, cfg) -> dict | None:
    """The summary of a finished run in `out` with this same config (paths aside), or None: lets an
    interrupted sweep be rerun with only its missing jobs."""
    f = out / RUN_SUMMARY
    if not f.exists():
        return None
    summary = read_json(f, ("config",))  # half-written (a run killed while finishing): refused, file and line named
    mine = OmegaConf.to_container(cfg, resolve=True)
    ignored = NOT_RESULTS
    strip = lambda c: {k: v for k, v in c.items() if k not in ignored}  # noqa: E731
    if "finetune" not in summary.get("config", {}) and mine["finetune"]["kind"] == "full":
        mine.pop("finetune")  # a run from before the finetune group existed was a full fine-tune
    theirs = dict(summary.get("config", {}))
    for c in (theirs, mine):  # one spelling of each schedule: defaults filled (schedule.normal_form)
        if isinstance(c.get("schedule"), dict):
            c["schedule"] = normal_form(c["schedule"])
    if strip(theirs) != strip(mine):
        raise RunDirError(f"{out} holds a finished run with a different config; skip_if_done reruns nothing there: "
                          "choose another directory or pass overwrite=true")
    return summary


def _fmt(x):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    return str(o)


def _final_model(trainer, module, cfg, ckpt_dir, datamodule):
    """(the trained removable model, whole, on CPU in fp32, LoRA adapters merged; the merge's relative logits
    error or None). Under FSDP, whose in-memory parameters are sharded, from the last checkpoint (the loader
    merges adapters itself)."""
    if cfg.hardware.strategy == "fsdp":
        path = ckpt_dir / "last.ckpt"
        return model_from_checkpoint(read_checkpoint(path), path), None
    model = module.model.to("cpu", torch.float32).eval()
    if not has_lora(model):
        return model, None
    merged = merged_copy(model).eval()
    error = logits_error(model, merged, datamodule.val_data[:4].cpu())
    if not error <= MERGE_TOL:
        raise ExportFailed(f"merging the LoRA adapters changed the logits by {error:.2e} (relative; allowed "
                           f"{MERGE_TOL:.0e})")
    return merged, error


def export_run(model, tokenizer, out: Path, datamodule) -> tuple[dict, str | None]:
    """(the exports written, what failed or None): export/hf always (plain GPT-2 for a vanilla run, the LN-free
    trick when every site is removed) and export/folded when every site is removed; each checked on real
    validation text before writing. Both are written into a temporary dir that replaces export/ once they are
    done, so export/ never mixes two runs or holds half an export; a form that fails is left out (and named),
    never taking the other, valid one with it."""
    check = datamodule.val_data[:4].cpu()
    if model.removed_sites() and model.real_sites():
        print(f"[lnfree] not exporting: sites still real: {model.real_sites()}")
        return {}, None
    forms = {"hf": export_hf, **({} if model.real_sites() else {"folded": export_folded})}
    final, tmp = out / "export", out / EXPORT_TMP
    errors, failed = {}, {}
    with staging_dir(tmp):  # removed if anything below fails: never half an export left behind
        for form, export in forms.items():
            try:
                errors[form] = export(model, tmp / form, tokenizer, input_ids=check)
            except Exception as e:  # noqa: BLE001  (this form is left out and named; the other one stands)
                raise_storage_error(e, f"export {tmp}")  # a full disk or a size limit: no export at all, named
                shutil.rmtree(tmp / form, ignore_errors=True)
                failed[form] = f"{type(e).__name__}: {e}"
        if not errors:
            raise ExportFailed("; ".join(f"{form}: {why}" for form, why in failed.items()))
    shutil.rmtree(final, ignore_errors=True)  # only a resumed run of this same run can have one
    tmp.rename(final)
    exports = {form: {"path": str(final / form), "relative_error": err} for form, err in errors.items()}
    return exports, ("; ".join(f"{form} export: {why}" for form, why in failed.items()) or None)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig):
    summary = None  # a sweep's job that failed with a UserError (recorded, the sweep goes on)
    with user_errors_as_messages():
        summary = train(cfg)
    return summary["val_ce"] if summary else None


if __name__ == "__main__":
    main()
