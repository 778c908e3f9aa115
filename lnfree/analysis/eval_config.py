"""The typed schema of `conf/eval.yaml` (python -m lnfree.eval): which models, which datasets, how.

Values live in conf/eval.yaml; the list items (ModelSpec, DatasetSpec) take their defaults from here, since
a YAML list cannot give defaults to the entries a user writes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from ..errors import UserError

SOURCES = ("builtin", "hf", "files", "owt_nanogpt")


class EvalError(UserError):
    pass


@dataclass
class ModelSpec:
    name: str = MISSING
    path: str = MISSING  # hub name | builtin:<name> | HF dir | export dir | run dir | .ckpt


@dataclass
class FilterSpec:
    """Drop chunks containing any token never seen in `docs` documents of a reference (fine-tuning) set."""
    source: str = "hf"
    path: Optional[str] = None
    config_name: Optional[str] = None
    split: str = "train"
    text_field: str = "text"
    files: List[str] = field(default_factory=list)
    docs: int = 1_000_000


@dataclass
class DatasetSpec:
    name: str = MISSING
    source: str = "builtin"  # builtin | hf | files | owt_nanogpt
    path: Optional[str] = None
    config_name: Optional[str] = None
    revision: Optional[str] = None
    split: str = "validation"
    text_field: str = "text"
    files: List[str] = field(default_factory=list)
    filter: Optional[FilterSpec] = None


@dataclass
class PairSpec:
    """A paired comparison: mean CE of `a` minus `b` on the same tokens; a[i] and b[i] share seed i."""
    name: str = MISSING
    a: List[str] = MISSING  # model names (one per seed)
    b: List[str] = MISSING


@dataclass
class EvalConfig:
    runs: str = MISSING  # conf/runs.yaml: where make eval trains the runs that `models` names as ${runs}/<run>
    models: List[ModelSpec] = MISSING
    datasets: List[DatasetSpec] = MISSING
    pairs: List[PairSpec] = MISSING  # paired gaps with bootstrap CIs, per seed and over seeds
    tokenizer: Optional[str] = MISSING  # null: the first model that carries one
    tokens: int = MISSING  # per dataset
    context: int = MISSING
    batch: int = MISSING
    precision: str = MISSING  # bf16 (autocast) | fp32
    device: str = MISSING
    bootstrap: int = MISSING
    seed: int = MISSING
    cache_dir: str = MISSING
    output_dir: Optional[str] = None  # None: the job's own new dir; experiments/ only when named on the command line


ConfigStore.instance().store(name="eval_schema", node=EvalConfig)
