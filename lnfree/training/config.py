"""Typed schemas for the Hydra configs in conf/.

`conf/train.yaml` starts its defaults list with `train_schema`, so every group option is merged into the
dataclass below: a misspelt key or a wrong type fails when the config is composed, before any compute.
One source of truth: the YAML files hold every value (each group's shared values in its base.yaml, which
the options inherit); this file holds the fields, their types and their meaning, and no defaults (MISSING),
except KindSchedule and NormKindSchedule, whose defaults fill what a removal kind's entry leaves out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, make_dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from ..errors import UserError
from ..families import FAMILIES, NORM_KINDS


@dataclass
class ModelConfig:
    name: str = MISSING
    # where the weights come from: a hub name (e.g. gpt2-medium; needs the internet once), a local HF dir,
    # "builtin:<name>" (the built-in family: shipped, or pretrained by `make family`; loading never trains) or
    # "random" (GPT2Config(**shape))
    source: str = MISSING
    tokenizer: str | None = MISSING  # HF tokenizer name/dir; default: the source's own
    revision: str | None = MISSING  # hub revision (commit, tag or branch)
    shape: dict[str, Any] = MISSING  # GPT2Config fields for source=random / builtin
    attn_implementation: str = MISSING  # sdpa | eager
    gradient_checkpointing: bool = MISSING
    compile: bool = MISSING  # torch.compile the training/validation forward (recompiles at each removal event)
    dropout: float | None = MISSING  # override resid/embd/attn dropout; null keeps the checkpoint's
    pretrain_steps: int | None = MISSING  # built-in family: optimizer steps of its pretraining
    # built-in family: which of a size's independently pretrained models; it is their pretraining seed (init and
    # data order; conf/pretrain.yaml). 0: the width family's one model per size
    replicate: int = 0
    # built-in family: the pretraining weights kept. last: after the last step; val_min: the checkpoint at the
    # validation minimum; tail_average: the mean of the checkpoints of the last 10% of steps (both need
    # trainer.ckpt_every == trainer.val_every; conf/pretrain_depth.yaml)
    pretrain_keep: str = "last"


@dataclass
class KindSchedule:
    start: int | None = None  # optimizer step of block 0's event; null = contiguous with previous kind
    gap: int = 0  # steps between consecutive blocks; 0 = all blocks at `start`


@dataclass
class RampConfig:
    """Soft removal (docs/removal_methods.md): each site's divisor moves from its live std to its sigma (frozen at
    the event) over `steps` optimizer steps, divisor = (1 - alpha) * std(x) + alpha * sigma, then the site is
    removed. steps=0: the instant removal of every published schedule."""
    steps: int = MISSING  # ramp length in optimizer steps; 0 = off
    shape: str = MISSING  # alpha over the ramp: linear | cosine (lnfree.schedule.RAMP_SHAPES)


@dataclass
class AdaptiveConfig:
    """Adaptive schedule (docs/removal_methods.md): the schedule's events keep their order and grouping (events
    planned at the same step fire together) and the first group its step; each later group fires once the mean
    training CE of the last `window` steps, all after the previous group, is within `tolerance` (relative) of
    that mean just before the previous group fired, or `max_gap` steps after it, whichever comes first."""
    enabled: bool = MISSING
    tolerance: float = MISSING  # relative: fire when smoothed CE <= (1 + tolerance) x its level before the last group
    window: int = MISSING  # steps averaged into the smoothed CE; also the least gap between two groups
    max_gap: int = MISSING  # steps after the previous group when the next fires whatever the loss


@dataclass
class DistillConfig:
    """Distillation from the original model (docs/removal_methods.md): loss = ce_weight x CE + weight x T^2 x
    KL(teacher || student) on the next-token distributions at temperature T; the teacher is a frozen copy of the
    model as loaded (step 0, norms real, no grad). weight=0: no teacher is built (today's runs)."""
    weight: float = MISSING  # lambda; 0 = off
    temperature: float = MISSING
    ce_weight: float = MISSING  # 1 = CE + lambda KL; 0 = KL alone


@dataclass
class _ScheduleFields:
    name: str = MISSING
    remove: bool = MISSING  # false: vanilla control (same run, no removal)
    # optional, off by default: end the special sigma of position 0 / end-of-text tokens; setting one turns
    # the special sigma on for every site (stages 0..L-1 are the blocks, stage L the final norm)
    bos: KindSchedule | None = MISSING
    eot: KindSchedule | None = MISSING
    aux_weight: float = MISSING  # weight of the residual-std auxiliary loss (docs/method.md#the-auxiliary-loss)
    momentum: float = MISSING  # EMA momentum of the std estimate, per optimizer step
    fit_fraction: float | None = MISSING  # rescale all events so the last is at this fraction of max_steps
    ramp: RampConfig = MISSING  # soft removal (off: steps=0)
    adaptive: AdaptiveConfig = MISSING  # loss-triggered events (off: enabled=false)
    distill: DistillConfig = MISSING  # distillation from the original model (off: weight=0)


@dataclass
class NormKindSchedule:
    """A norm kind's entry; every norm kind of lnfree.families.NORM_KINDS (pre_mlp, attn_qk, attn_v, final) has one.
    An entry with both fields null (the default, for a kind a schedule option leaves out) sets nothing: the kind
    then follows the contiguous rule with gap 0 (lnfree.schedule)."""
    start: int | None = None  # optimizer step of block 0's event; null = contiguous with previous kind
    gap: int | None = None  # steps between consecutive blocks; null or 0 = all blocks at `start`


ScheduleConfig = make_dataclass("ScheduleConfig", [(k, NormKindSchedule, field(default_factory=NormKindSchedule))
                                                   for k in NORM_KINDS], bases=(_ScheduleFields,))
# importable by name, so that pickling (Hydra's launchers send the config store to each job: submitit, SLURM)
# refers to this class rather than copying it, which loses the fields' default factories
ScheduleConfig.__module__ = __name__


@dataclass
class DataConfig:
    _target_: str = MISSING
    name: str = MISSING
    source: str = MISSING  # builtin | hf | files
    path: str | None = MISSING  # hf: dataset repo id (never a loading script)
    config_name: str | None = MISSING  # hf: dataset configuration
    revision: str | None = MISSING
    split: str = MISSING
    val_split: str | None = MISSING  # null: hold out the first val_blocks blocks of `split`
    text_field: str = MISSING
    files: list[str] = MISSING  # files: .txt / .jsonl / .json / .parquet (globs ok)
    val_files: list[str] = MISSING
    block_size: int | None = MISSING  # null: the model's context, at most MAX_DEFAULT_BLOCK (default_block_size)
    micro_batch_size: int = MISSING
    val_blocks: int = MISSING
    num_workers: int = MISSING
    shuffle_buffer: int = MISSING  # >0: shuffle documents with this buffer (same order on every rank)
    seed: int = MISSING
    on_bad_row: str = MISSING  # skip | fail: a row without text, or an undecodable file
    prepend_bos: bool = MISSING  # every block starts with end-of-text as a beginning-of-sequence token
    synthetic: dict[str, Any] | None = MISSING  # data=synthetic: the task's settings (lnfree/data/synthetic.py)


@dataclass
class HardwareConfig:
    name: str = MISSING
    accelerator: str = MISSING
    devices: Any = MISSING
    num_nodes: int = MISSING
    strategy: str = MISSING  # auto | ddp | fsdp
    precision: str = MISSING  # 32-true | bf16-mixed
    micro_batch_size: int = MISSING
    fsdp_activation_checkpointing: bool = MISSING


@dataclass
class OptimConfig:
    lr: float = MISSING
    min_lr: float = MISSING
    warmup_steps: int = MISSING
    decay_steps: int | None = MISSING  # cosine length; null = trainer.max_steps
    weight_decay: float = MISSING
    decay_embeddings: bool = MISSING  # decay the input embeddings (families' embedding_names); biases, norm gains never
    betas: list[float] = MISSING
    eps: float = MISSING
    grad_clip: float = MISSING
    tokens_per_step: int | None = MISSING  # reached by gradient accumulation; null = one micro-batch


@dataclass
class TrainerConfig:
    max_steps: int = MISSING
    val_every: int = MISSING  # optimizer steps between validations
    log_every: int = MISSING
    ckpt_every: int = MISSING  # optimizer steps between periodic checkpoints
    keep_checkpoints: int = MISSING  # periodic checkpoints kept (-1: all)
    keep_at_end: str = MISSING  # all | last (only last.ckpt) | none (only the exports): checkpoints/ after success
    validate_before: bool = MISSING  # measure validation CE before any fine-tuning
    progress_bar: bool = MISSING
    deterministic: bool = MISSING
    max_loss: float | None = MISSING  # divergence guard: stop when the training CE exceeds it (null: off)


@dataclass
class LoggerConfig:
    kind: str = MISSING  # wandb | csv | none
    project: str = MISSING
    entity: str | None = MISSING
    mode: str = MISSING  # wandb: online | offline | disabled
    group: str | None = MISSING
    tags: list[str] = MISSING


@dataclass
class PathsConfig:
    output_dir: str = MISSING
    cache_dir: str = MISSING  # built-in models and tokenizer


@dataclass
class ClusterConfig:
    """Where a multirun's jobs run (conf/cluster/): nodes and GPUs per node come from `hardware`."""
    name: str = MISSING  # none (Hydra's basic launcher: one job after another here) | slurm | local (submitit)
    partition: str | None = MISSING
    account: str | None = MISSING
    time_min: int = MISSING  # wall-clock limit per job
    cpus_per_task: int = MISSING
    mem_gb: int | None = MISSING
    array_parallelism: int = MISSING  # most jobs of one multirun running at once


@dataclass
class FinetuneConfig:
    """Which parameters train (conf/finetune/): all of them, or LoRA adapters on a frozen base (lnfree/lora.py)."""
    name: str = MISSING
    kind: str = MISSING  # full | lora
    lr_scale: float = MISSING  # LR of the trained parameters = lr_scale x optim.lr (and min_lr)
    rank: int = MISSING
    alpha: float = MISSING
    dropout: float = MISSING
    target_modules: list[str] = MISSING
    train_norms: bool = MISSING


@dataclass
class TrainConfig:
    model: ModelConfig = MISSING
    schedule: ScheduleConfig = MISSING
    data: DataConfig = MISSING
    hardware: HardwareConfig = MISSING
    optim: OptimConfig = MISSING
    trainer: TrainerConfig = MISSING
    logger: LoggerConfig = MISSING
    paths: PathsConfig = MISSING
    cluster: ClusterConfig = MISSING
    finetune: FinetuneConfig = MISSING
    experiment: str | None = None  # set by an experiment preset (the one default held here)
    task_name: str = MISSING
    seed: int = MISSING
    ckpt_path: str | None = MISSING  # resume from this Lightning checkpoint
    export: bool = MISSING  # write export/hf (and export/folded when every site is removed)
    overwrite: bool = MISSING  # allow a new run into a directory that holds another run (its files are removed)
    skip_if_done: bool = MISSING  # a finished run with the same config in the directory is returned, not rerun
    # a resume may read data files that changed since its run started (refused otherwise); recorded with the run
    resume_allow_data_change: bool = MISSING
    push_to_hub: str | None = MISSING  # <user>/<repo>: upload the exports at the end (checked before training)
    hub_private: bool = MISSING  # the pushed repo is private


def register_configs():
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)


register_configs()


# -- a closed schema: Hydra's `+key=value` adds a key even to a typed config, so every key is checked here --------
# The one extension point that takes free keys is a field typed Dict[str, Any]: model.shape (the HF config fields
# of a random-init or built-in model) and data.synthetic (the synthetic task's settings). Every other key must be
# a field of the schema above.
class LimitError(UserError):
    """A config that cannot run (an impossible value, an unknown key), refused before anything is read."""


class UnknownKeyError(LimitError):
    pass


def _schema_type(tp):
    """The dataclass a field's type holds (Optional[X] -> X), or None for a leaf or a free-key dict."""
    import dataclasses
    import typing

    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Union and len(args) == 1:
        tp = args[0]
    return tp if dataclasses.is_dataclass(tp) else None


def unknown_keys(node: dict, schema=None, prefix: str = "") -> list[tuple[str, list[str]]]:
    """(dotted key, the valid keys beside it) of every key in a composed config (a plain dict) that the schema
    (TrainConfig by default) does not define."""
    import dataclasses
    import typing

    schema = schema or TrainConfig
    hints = typing.get_type_hints(schema)
    known = [f.name for f in dataclasses.fields(schema)]
    found = []
    for key, value in node.items():
        if key not in hints:
            found.append((f"{prefix}{key}", [f"{prefix}{k}" for k in known]))
            continue
        sub = _schema_type(hints[key])
        if sub is not None and isinstance(value, dict):
            found += unknown_keys(value, sub, f"{prefix}{key}.")
    return found


def check_keys(cfg) -> None:
    """Refuse, before anything is read, every key the typed config does not define, naming the nearest valid key."""
    import difflib

    from omegaconf import OmegaConf

    from ..schedule import site_prefix_hint

    found = unknown_keys(OmegaConf.to_container(cfg, resolve=False))
    if not found:
        return
    lines = []
    for key, valid in found:
        group, _, rest = key.partition(".")
        hint = site_prefix_hint(rest.partition(".")[0]) if group == "schedule" else None  # GPT-2's ln2, ...
        near = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
        lines.append(f"{key} ({hint or (f'did you mean {near[0]}?' if near else 'valid here: ' + ', '.join(valid))})")
    raise UnknownKeyError("unknown config key(s), nothing was run: " + "; ".join(lines) + ". A `+key=value` "
                          "override adds a key no code reads; every field is in docs/reference/configuration.md")


# -- limits: every numeric field checked before any data or weights are read ----------------------------

def _positive(x):
    return x > 0


def _non_negative(x):
    return x >= 0


def _unit_open(x):  # [0, 1)
    return 0 <= x < 1


LIMITS = {  # key: (test, what it must be); a None value (optional field) is always allowed
    "trainer.max_steps": (_positive, "> 0"),
    "trainer.val_every": (_positive, "> 0"),
    "trainer.log_every": (_positive, "> 0"),
    "trainer.ckpt_every": (_positive, "> 0"),
    "trainer.keep_checkpoints": (lambda x: x >= -1, ">= -1 (-1 keeps all)"),
    "trainer.max_loss": (_positive, "> 0 (or null: only non-finite losses stop the run)"),
    "optim.lr": (_positive, "> 0"),
    "optim.min_lr": (_non_negative, ">= 0"),
    "optim.warmup_steps": (_non_negative, ">= 0"),
    "optim.decay_steps": (_positive, "> 0 (or null: trainer.max_steps)"),
    "optim.weight_decay": (_non_negative, ">= 0"),
    "optim.eps": (_positive, "> 0"),
    "optim.grad_clip": (_non_negative, ">= 0 (0: no clipping)"),
    "optim.tokens_per_step": (_positive, "> 0 (or null: one micro-batch)"),
    "schedule.momentum": (lambda x: 0 <= x <= 1, "in [0, 1] (1: sigma stays at its calibration)"),
    "schedule.aux_weight": (_non_negative, ">= 0"),
    "schedule.fit_fraction": (lambda x: 0 < x < 1, "in (0, 1) (or null)"),
    "schedule.ramp.steps": (_non_negative, ">= 0 (0: instant removal)"),
    "schedule.adaptive.tolerance": (_non_negative, ">= 0"),
    "schedule.adaptive.window": (_positive, "> 0"),
    "schedule.adaptive.max_gap": (_positive, "> 0"),
    "schedule.distill.weight": (_non_negative, ">= 0 (0: no distillation)"),
    "schedule.distill.temperature": (_positive, "> 0"),
    "schedule.distill.ce_weight": (_non_negative, ">= 0"),
    "data.block_size": (lambda x: x >= 2, ">= 2"),
    "data.micro_batch_size": (_positive, "> 0"),
    "data.val_blocks": (_positive, "> 0"),
    "data.num_workers": (_non_negative, ">= 0"),
    "data.shuffle_buffer": (_non_negative, ">= 0"),
    "hardware.micro_batch_size": (_positive, "> 0"),
    "hardware.num_nodes": (_positive, "> 0"),
    "model.dropout": (_unit_open, "in [0, 1) (or null)"),
    "finetune.lr_scale": (_positive, "> 0"),
    "finetune.rank": (_positive, "> 0"),
    "finetune.alpha": (_positive, "> 0"),
    "finetune.dropout": (_unit_open, "in [0, 1)"),
}
FINETUNE_KINDS = ("full", "lora")
KEEP_AT_END = ("all", "last", "none")
LORA_TARGETS = tuple(dict.fromkeys(t for f in FAMILIES for t in f.lora_targets))  # each family's (lnfree.families)


def _non_finite(node, prefix: str = "") -> list[str]:
    """`key=value` of every float in the (unresolved) config that is inf or nan: no field means anything by them
    (an infinite learning rate would pass `> 0`, and `null` is how a limit is switched off)."""
    if isinstance(node, dict):
        return [b for k, v in node.items() for b in _non_finite(v, f"{prefix}{k}.")]
    if isinstance(node, list):
        return [b for i, v in enumerate(node) for b in _non_finite(v, f"{prefix[:-1]}[{i}].")]
    return [f"{prefix[:-1]}={node}"] if isinstance(node, float) and not math.isfinite(node) else []


def check_limits(cfg) -> None:
    """Every impossible number and unknown nested schedule key, refused with the field's name."""
    from omegaconf import OmegaConf

    from ..schedule import kind_problems, method_problems

    check_keys(cfg)  # a key no code reads (e.g. +trainer.max_step=10) before any value is judged
    bad = [f"{b} (must be a finite number)" for b in _non_finite(OmegaConf.to_container(cfg, resolve=False))]
    for key, (ok, what) in LIMITS.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and not ok(value):
            bad.append(f"{key}={value} (must be {what})")
    betas = OmegaConf.select(cfg, "optim.betas", default=None)
    if betas is not None and (len(betas) != 2 or not all(0 <= b < 1 for b in betas)):
        bad.append(f"optim.betas={list(betas)} (must be two numbers in [0, 1))")
    min_lr, lr = OmegaConf.select(cfg, "optim.min_lr", default=None), OmegaConf.select(cfg, "optim.lr", default=None)
    if min_lr is not None and lr is not None and lr > 0 and min_lr > lr:
        bad.append(f"optim.min_lr={min_lr} exceeds optim.lr={lr}")
    schedule = OmegaConf.select(cfg, "schedule", default=None)
    if schedule is not None:
        bad += [f"schedule.{b}" for b in kind_problems(schedule) + method_problems(schedule)]
    keep = OmegaConf.select(cfg, "trainer.keep_at_end", default=None)
    if keep is not None and keep not in KEEP_AT_END:
        bad.append(f"trainer.keep_at_end={keep!r} (must be one of {KEEP_AT_END})")
    if keep == "none" and OmegaConf.select(cfg, "export", default=True) is False:
        bad.append("trainer.keep_at_end=none with export=false would keep no weights at all")
    kind = OmegaConf.select(cfg, "finetune.kind", default=None)
    if kind is not None and kind not in FINETUNE_KINDS:
        bad.append(f"finetune.kind={kind!r} (must be one of {FINETUNE_KINDS})")
    targets = OmegaConf.select(cfg, "finetune.target_modules", default=None)
    if kind == "lora" and targets is not None:
        unknown = [t for t in targets if t not in LORA_TARGETS]
        if unknown or not targets:
            bad.append(f"finetune.target_modules={list(targets)} (must be a non-empty subset of {list(LORA_TARGETS)})")
    if bad:
        raise LimitError("impossible config value(s), nothing was run: " + "; ".join(bad))


MAX_DEFAULT_BLOCK = 1024  # a null data.block_size: the model's context up to this (as transformers' run_clm.py)


def default_block_size(n_ctx: int) -> int:
    """data.block_size when it is null: the model's context length, at most MAX_DEFAULT_BLOCK tokens."""
    return min(n_ctx, MAX_DEFAULT_BLOCK)


def data_module(tokenizer, data: str = "builtin", **overrides):
    """The data module of conf/data/<data>.yaml as training composes it (conf/train.yaml's seed and micro-batch
    size), each of `overrides` replacing its value: outside a training run too, the YAML is the one source of every
    data value. Built directly (not hydra.utils.instantiate), so a DataError reaches the caller as it is."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    from ..paths import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        values = OmegaConf.to_container(compose("train", overrides=[f"data={data}"]).data, resolve=True)
    values = {**values, **overrides}
    if values["block_size"] is None:  # training takes it from the model (default_block_size); no model here
        raise ValueError(f"data={data} has no block_size of its own (training uses the model's context): pass "
                         "block_size=")
    return get_class(values.pop("_target_"))(tokenizer, **values)
