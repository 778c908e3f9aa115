"""Typed schemas for the Hydra configs in conf/.

`conf/train.yaml` starts its defaults list with `train_schema`, so every group option is merged into the
dataclass below: a misspelt key or a wrong type fails when the config is composed, before any compute.
The YAML files hold the values; this file holds the fields, their types and their meaning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class ModelConfig:
    name: str = MISSING
    # where the weights come from: a hub name (e.g. gpt2-medium; needs the internet once), a local HF dir,
    # "builtin:<name>" (the built-in family, pretrained on first use) or "random" (GPT2Config(**shape))
    source: str = MISSING
    tokenizer: Optional[str] = None  # HF tokenizer name/dir; default: the source's own
    revision: Optional[str] = None  # hub revision (commit, tag or branch)
    shape: Dict[str, Any] = field(default_factory=dict)  # GPT2Config fields for source=random / builtin
    attn_implementation: str = "sdpa"  # sdpa | eager
    gradient_checkpointing: bool = False
    dropout: Optional[float] = None  # override resid/embd/attn dropout; null keeps the checkpoint's
    pretrain_steps: Optional[int] = None  # built-in family: optimizer steps of its pretraining


@dataclass
class KindSchedule:
    start: Optional[int] = None  # optimizer step of block 0's event; null = contiguous with previous kind
    gap: int = 0  # steps between consecutive blocks; 0 = all blocks at `start`


@dataclass
class ScheduleConfig:
    name: str = MISSING
    remove: bool = True  # false: vanilla control (same run, no removal)
    ln2: KindSchedule = field(default_factory=lambda: KindSchedule(start=0))
    ln1qk: KindSchedule = field(default_factory=KindSchedule)
    ln1v: KindSchedule = field(default_factory=KindSchedule)
    lnf: KindSchedule = field(default_factory=KindSchedule)
    # optional, off by default: end the special sigma of position 0 / end-of-text tokens; setting one turns
    # the special sigma on for every site (stages 0..L-1 are the blocks, stage L the final norm)
    bos: Optional[KindSchedule] = None
    eot: Optional[KindSchedule] = None
    aux_weight: float = 0.0  # weight of the residual-std auxiliary loss (METHOD.md section 5)
    momentum: float = 0.9  # EMA momentum of the std estimate, per optimizer step
    fit_fraction: Optional[float] = None  # rescale all events so the last is at this fraction of max_steps


@dataclass
class DataConfig:
    _target_: str = "lnfree.data.TextDataModule"
    name: str = MISSING
    source: str = "builtin"  # builtin | hf | files
    path: Optional[str] = None  # hf: dataset repo id (never a loading script)
    config_name: Optional[str] = None  # hf: dataset configuration
    revision: Optional[str] = None
    split: str = "train"
    val_split: Optional[str] = None  # null: hold out the first val_blocks blocks of `split`
    text_field: str = "text"
    files: List[str] = field(default_factory=list)  # files: .txt / .jsonl / .json / .parquet (globs ok)
    val_files: List[str] = field(default_factory=list)
    block_size: int = 256
    micro_batch_size: int = 8
    val_blocks: int = 64
    num_workers: int = 0
    shuffle_buffer: int = 0  # >0: shuffle documents with this buffer (same order on every rank)
    seed: int = 0


@dataclass
class HardwareConfig:
    name: str = MISSING
    accelerator: str = "cpu"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | fsdp
    precision: str = "32-true"  # 32-true | bf16-mixed
    micro_batch_size: int = 8
    fsdp_activation_checkpointing: bool = False


@dataclass
class OptimConfig:
    lr: float = 6e-4
    min_lr: float = 3e-4
    warmup_steps: int = 10
    decay_steps: Optional[int] = None  # cosine length; null = trainer.max_steps
    weight_decay: float = 0.01
    decay_embeddings: bool = True  # apply weight decay to wte/wpe (biases and norm gains never decay)
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0
    tokens_per_step: Optional[int] = None  # reached by gradient accumulation; null = one micro-batch


@dataclass
class TrainerConfig:
    max_steps: int = 100
    val_every: int = 50  # optimizer steps between validations
    log_every: int = 5
    ckpt_every: int = 50  # optimizer steps between periodic checkpoints
    keep_checkpoints: int = -1  # periodic checkpoints kept (-1: all)
    validate_before: bool = True  # measure validation CE before any fine-tuning
    progress_bar: bool = True
    deterministic: bool = False


@dataclass
class LoggerConfig:
    kind: str = "csv"  # wandb | csv | none
    project: str = "lnfree"
    entity: Optional[str] = None
    mode: str = "online"  # wandb: online | offline | disabled
    group: Optional[str] = None
    tags: List[str] = field(default_factory=list)


@dataclass
class PathsConfig:
    output_dir: str = MISSING
    cache_dir: str = MISSING  # built-in models and tokenizer


@dataclass
class TrainConfig:
    model: ModelConfig = MISSING
    schedule: ScheduleConfig = MISSING
    data: DataConfig = MISSING
    hardware: HardwareConfig = MISSING
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    experiment: Optional[str] = None  # name of the experiment preset, if any
    task_name: str = "train"
    seed: int = 1234
    ckpt_path: Optional[str] = None  # resume from this Lightning checkpoint
    export: bool = True  # write export/hf (and export/folded when every site is removed)


def register_configs():
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)


register_configs()
