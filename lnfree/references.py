"""What a model reference names and where it is: every reference lnfree takes (builtin:<name>, a hub name, an HF
dir, an export, a removable dir, a training run, a .ckpt, "random") is resolved here, once, into a `ModelRef`
(its kind, location and run), without reading any weights; anything lnfree cannot load is refused here with a
ModelIOError that says what to do. lnfree/io.py loads what a reference names.

Rules:
- Loading never trains. A built-in model that is not pretrained yet is an error naming the command that
  makes it.
- GPT-2 only: any other architecture is refused by its config, before weights are read.
- Nothing loads from a temporary name (a half-written export).

This is core: it imports torch, transformers and safetensors only.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from .errors import ModelIOError
from .families import UnsupportedFamily, family
from .families.gpt2_folded import FoldedConfig
from .folded import CONFIG_FILE as FOLDED_CONFIG
from .model import LNFREE_EPS, LNFREE_FILE
from .model_record import EXPORT_INFO, read_model_json
from .paths import DEFAULT_CACHE_DIR, RUN_SUMMARY, SHIPPED_DIR

BUILTIN_PREFIX = "builtin:"
RANDOM = "random"  # the reference of a fresh, randomly initialised GPT-2 of a given shape (nothing is read)
HUB_PROBE_S = 5.0  # seconds a hub endpoint has to answer before a hub name is refused
EXPORT_TMP = ".export.tmp"  # where a run builds its exports before moving them to export/
# the names lnfree itself gives what it is still writing: a run's .export.tmp/, a checkpoint's (or record's)
# .<name>.tmp-<pid>, a pretrained model's .<name>.model.tmp/ (lnfree/training/pretrain_run.py); a folder of the user's
# named like job.tmp is none of them
TEMPORARY = re.compile(r"^\.export\.tmp$|^\..+\.model\.tmp$|^\..+\.tmp-\d+$")


@dataclass(frozen=True)
class ModelRef:
    """A resolved model reference. kind: hub | hf | hf_lnfree | folded | removable | ckpt | random."""

    reference: str  # as the user wrote it
    kind: str
    location: str  # a local path, or the hub name
    run_dir: str | None = None  # the training run it belongs to, when it is one's export or checkpoint
    shape: tuple = ()  # random: the GPT2Config fields of the model, as (name, value) pairs


def hub_offline() -> bool:
    import huggingface_hub.constants as c

    return bool(c.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def hub_unreachable(timeout: float = HUB_PROBE_S) -> str | None:
    """Why the Hugging Face hub cannot be used now (offline mode, or its endpoint does not answer within
    `timeout` seconds), or None. One connection attempt: without it, a machine with no network waits through
    huggingface_hub's retries (23-46 s measured) before an 85-line traceback."""
    import huggingface_hub.constants as c

    if hub_offline():
        return "the hub is offline (HF_HUB_OFFLINE=1)"
    url = urlparse(c.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return None
    except OSError as e:
        return f"{c.ENDPOINT} does not answer ({e})"


def _hub_cache_dir(name: str) -> Path | None:
    """The local snapshot of a hub model downloaded earlier (config.json present), or None."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(name, "config.json")
    except Exception:  # noqa: BLE001  (an invalid repo id is simply not cached)
        return None
    return Path(found).parent if isinstance(found, str) else None


def builtin_dir(name: str, cache_dir: str | Path = DEFAULT_CACHE_DIR, shipped: bool = True) -> Path:
    """A built-in model's dir: shipped with lnfree (lnfree/pretrained/<name>) or in the cache."""
    if shipped and (SHIPPED_DIR / name).exists():
        return SHIPPED_DIR / name
    return Path(cache_dir).expanduser() / "models" / name


def find_run_dir(path: str | Path) -> Path | None:
    """The training run a model path belongs to (a run dir, its export/* or a checkpoint), if any."""
    p = Path(path).expanduser()
    for cand in (p, p.parent, p.parent.parent):
        if (cand / RUN_SUMMARY).exists():
            return cand
    return None


def pretrain_command(name: str) -> str:
    """The command that makes built-in model `name` (the depth family's replicates: <size>_s<seed>)."""
    replicate = re.fullmatch(r"(l\d+w\d+)_s(\d+)", name)
    if replicate:
        size, seed = replicate.groups()
        return f"python -m lnfree.pretrain --config-name pretrain_depth model=builtin_{size} model.replicate={seed}"
    return f"python -m lnfree.pretrain model=builtin_{name}"


def _check_family_dir(d: Path, reference: str):
    """Refuse a model of an unsupported family from its config.json alone, before any weight is read."""
    cfg = read_model_json(d / "config.json")
    try:
        return family(cfg), cfg
    except UnsupportedFamily as e:
        raise ModelIOError(f"{reference!r} ({d / 'config.json'}): {e}") from None


def _check_folded_dir(d: Path, reference: str) -> None:
    """Refuse a folded model that lnfree cannot rebuild, from its config alone: another family's HF config of a
    model_type lnfree does not know, or a folded GPT-2 config with fields FoldedConfig does not have."""
    saved = read_model_json(d / FOLDED_CONFIG)
    where = f"{reference!r} ({d / FOLDED_CONFIG})"
    if not isinstance(saved, dict):
        raise ModelIOError(f"{where}: not a folded model's config (a JSON object)")
    if "hf_config" in saved:
        try:
            family(saved["hf_config"] if isinstance(saved["hf_config"], dict) else {})
        except UnsupportedFamily as e:
            raise ModelIOError(f"{where}: {e}") from None
        return
    unknown = sorted(set(saved) - set(FoldedConfig.__dataclass_fields__))
    if unknown:
        raise ModelIOError(f"{where}: fields {unknown} are not a folded GPT-2's (written by another version?)")


def _classify_dir(d: Path, reference: str) -> ModelRef:
    run = find_run_dir(d)
    run_dir = str(run) if run else None
    if (d / FOLDED_CONFIG).exists():
        _check_folded_dir(d, reference)
        return ModelRef(reference, "folded", str(d), run_dir)
    if (d / "config.json").exists():
        fam, cfg = _check_family_dir(d, reference)
        if (d / LNFREE_FILE).exists():
            return ModelRef(reference, "removable", str(d), run_dir)
        record = read_model_json(d / EXPORT_INFO) if (d / EXPORT_INFO).exists() else {}
        eps = cfg.get(fam.eps_field, 1e-5)
        lnfree = record.get("form") == "hf_lnfree" or eps >= LNFREE_EPS
        return ModelRef(reference, "hf_lnfree" if lnfree else "hf", str(d), run_dir)
    if (d / "export" / "hf").is_dir():
        return _classify_dir(d / "export" / "hf", reference)
    raise ModelIOError(f"{reference!r} is a directory but not a model: no config.json, {FOLDED_CONFIG} or "
                       "export/hf/ inside")


def resolve(reference: str, cache_dir: str | Path = DEFAULT_CACHE_DIR, shape=None) -> ModelRef:
    """What `reference` is, without loading weights; a clear ModelIOError for anything lnfree cannot load.
    "random" is a fresh random-init GPT-2 of `shape` (GPT2Config fields, required; unused by every other
    reference), whose vocabulary is that of the tokenizer it is loaded with."""
    reference = str(reference)
    if reference == RANDOM:
        if shape is None:  # e.g. `random` given to eval: nothing to evaluate, not GPT-2 small's shape by default
            raise ModelIOError("'random' is a fresh random-init model and needs its shape: resolve('random', "
                               "shape={...}), in training model.shape (a local dir named random: ./random)")
        return ModelRef(reference, RANDOM, RANDOM, shape=tuple(dict(shape).items()))
    if reference.startswith(BUILTIN_PREFIX):
        name = reference[len(BUILTIN_PREFIX):]
        d = builtin_dir(name, cache_dir)
        if not d.exists():
            raise ModelIOError(f"built-in model {reference!r} is not pretrained yet (looked in {SHIPPED_DIR / name} "
                               f"and {d}); make it with `{pretrain_command(name)}`")
        return _classify_dir(d, reference)
    p = Path(reference).expanduser()
    temporary = [part for part in p.parts if TEMPORARY.match(part)]
    if temporary:  # a run killed while writing leaves these; what is in them may be half of something
        raise ModelIOError(f"{reference!r} is under {temporary[0]!r}, a temporary name (an export or checkpoint being "
                           "written, or left half-written by a killed run): load the finished export/ or .ckpt")
    if p.is_file():
        if p.suffix != ".ckpt":
            raise ModelIOError(f"{reference!r} is a file but not a Lightning checkpoint (.ckpt); give a model "
                               "directory, a run directory or a .ckpt")
        return ModelRef(reference, "ckpt", str(p), str(p.parent.parent))  # <run>/checkpoints/<name>.ckpt
    if p.is_dir():
        return _classify_dir(p, reference)
    if reference.startswith((".", "/", "~")) or reference.endswith(".ckpt") or os.sep in reference.rstrip(os.sep)[:1]:
        raise ModelIOError(f"model path {reference!r} does not exist")
    why = hub_unreachable()
    if why is None:
        return ModelRef(reference, "hub", reference)
    cached = _hub_cache_dir(reference)
    if cached is not None:  # downloaded before: the local copy, without the network
        return _classify_dir(cached, reference)
    raise ModelIOError(f"model {reference!r} is not a local path and not in the local hub cache, and {why}, so it "
                       "cannot be downloaded. Ways forward: a local GPT-2 dir, training run or .ckpt (for training: "
                       "model.source=/path/to/dir); builtin:<name>; a random-init model (model=gpt2_small_random or "
                       "gpt2_medium_random); or run once where the hub is reachable (the download is cached)")
