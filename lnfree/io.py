"""Model IO: every model reference is resolved here, once, and loaded safely.

    from lnfree import load
    model, tok = load("builtin:w128")                 # the built-in family (shipped, or pretrained into the cache)
    model, tok = load("gpt2-medium")                   # a hub name (users have the internet)
    model, tok = load("path/to/hf_dir")                # any GPT-2 Hugging Face dir
    model, tok = load("outputs/run/export/hf")         # HF-compatible LN-free export (checked against its record)
    model, tok = load("outputs/run/export/folded")     # folded, truly norm-free form (checked against its record)
    model, tok = load("path/to/removable_dir")         # save_removable() output: modes and sigmas kept
    model, tok = load("outputs/run")                   # a training run: its export/hf
    model, tok = load("outputs/run/checkpoints/last.ckpt")   # a Lightning checkpoint, read with weights_only
    model, tok = load(resolve("random", shape={"n_layer": 2}), tokenizer=load_tokenizer("builtin"))  # random init

Rules (why this module exists):
- Loading never trains. A built-in model that is not pretrained yet is an error naming the command that
  makes it.
- No pickle: checkpoints go through `torch.load(weights_only=True)`; weights are safetensors.
- GPT-2 only: any other architecture is refused by its config, before weights are read.
- Exports carry a record (lnfree_export.json: form, eps, sigmas, the sha256 of every file the export wrote, the
  tokenizer's identity, a logits fingerprint on fixed token ids). Loading one checks every file against its hash
  before reading weights (a damaged, edited or replaced file is named) and then recomputes the fingerprint (the
  semantic check: an edited eps). A record without the files' hashes (its "files" deleted, or written by an lnfree
  from before them) is refused: load(..., unhashed_ok=True) loads such an older export on its fingerprint alone.
  An LN-free HF-compatible export in fp16 is refused: its weights overflow fp16.
- The built-in models committed to the repository (lnfree/pretrained/, experiments/depth_family/models/) hold no
  tokenizer.json: theirs is the built-in tokenizer's, one file for all of them (`model_file`), checked against
  each record's hash like a file of their own.
- Wherever a model meets a tokenizer, `check_tokenizer` refuses a pair that does not belong together (ids past
  the vocabulary, another end-of-text id, a tokenizer other than the recorded one) before any compute.
- Nothing loads from a temporary name (a half-written export); a damaged safetensors file is named.

This is core: it imports torch, transformers and safetensors only.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from transformers import AutoConfig, PretrainedConfig

from .errors import UserError
from .families import Dims, UnsupportedFamily, family
from .families.gpt2_folded import FoldedConfig
from .folded import CONFIG_FILE as FOLDED_CONFIG
from .folded import load_folded
from .model import LNFREE_EPS, LNFREE_FILE, RemovableMixin, load_removable, make_removable, not_removable_again
from .paths import BUILTIN_TOKENIZER_DIR, DEFAULT_CACHE_DIR, RUN_SUMMARY, SHIPPED_DIR

BUILTIN_PREFIX = "builtin:"
RANDOM = "random"  # the reference of a fresh, randomly initialised GPT-2 of a given shape (nothing is read)
BUILTIN_TOKENIZER = "builtin"  # load_tokenizer's name of the built-in BPE
EXPORT_INFO = "lnfree_export.json"  # the record every export carries
FINGERPRINT_TOL = 1e-4  # relative; an edited eps is off by ~1e5, round-off across machines ~1e-6
CKPT_MODEL_CONFIG = "lnfree_model_config"  # key under which a training checkpoint keeps the GPT-2 config
RUN_INFO = "lnfree_run"  # key of what the run was (tokens per step, schedule), checked on resume
HUB_PROBE_S = 5.0  # seconds a hub endpoint has to answer before a hub name is refused
EXPORT_TMP = ".export.tmp"  # where a run builds its exports before moving them to export/
# the names lnfree itself gives what it is still writing: a run's .export.tmp/, a checkpoint's (or record's)
# .<name>.tmp-<pid>, a pretrained model's .<name>.model.tmp/ (lnfree/training/pretrain.py); a folder of the user's
# named like job.tmp is none of them
TEMPORARY = re.compile(r"^\.export\.tmp$|^\..+\.model\.tmp$|^\..+\.tmp-\d+$")


class ModelIOError(UserError):
    pass


def refuse_fp16(dtype: torch.dtype | None, what: str, remedy: str, error: type[Exception] = ModelIOError) -> None:
    """The one fp16 refusal of an LN-free HF-compatible model (its export, its loading, lm-eval on it): its norms'
    eps = 1e12 and weights of order 1e6 / sigma overflow fp16, and the logits become NaN without an error."""
    if dtype == torch.float16:
        raise error(f"{what} in float16 refused: its norms' eps = 1e12 and weights of order 1e6 / sigma overflow fp16 "
                    f"(max 65504; NaN logits). {remedy}")


# -- writes that cannot complete: named, so that a full disk does not read as a bug ------------------------
STORAGE_ERRORS = {
    errno.ENOSPC: "the disk is full (ENOSPC)",
    errno.EFBIG: "a file-size limit was hit (EFBIG: `ulimit -f`, or the filesystem's largest file)",
    errno.EDQUOT: "the disk quota is exceeded (EDQUOT)",
}


def _storage_errno(e: BaseException | None) -> int | None:
    """The errno of a full disk / size limit / quota behind `e`: its own, a chained OSError's (torch.save raises
    RuntimeError from it) or the "os error N" in the message (safetensors' Rust writer)."""
    for _ in range(8):
        if e is None:
            return None
        if isinstance(e, OSError) and e.errno in STORAGE_ERRORS:
            return e.errno
        found = re.search(r"os error (\d+)", str(e))
        if found and int(found.group(1)) in STORAGE_ERRORS:
            return int(found.group(1))
        e = e.__cause__ or e.__context__
    return None


def raise_storage_error(e: BaseException, what: str) -> None:
    """For a full disk, a file-size limit or a quota: raise an OSError of that errno that says so and names what
    was being written (the caller re-raises anything else as it was)."""
    code = _storage_errno(e)
    if code is not None:
        raise OSError(code, f"{what} not written: {STORAGE_ERRORS[code]} ({os.strerror(code)}); nothing "
                            "half-written was kept; free space or raise the limit, then run again") from e


# -- references ------------------------------------------------------------------------------------------
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


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelIOError(f"cannot read {path}: {e}") from e


def _check_family_dir(d: Path, reference: str):
    """Refuse a model of an unsupported family from its config.json alone, before any weight is read."""
    cfg = _read_json(d / "config.json")
    try:
        return family(cfg), cfg
    except UnsupportedFamily as e:
        raise ModelIOError(f"{reference!r} ({d / 'config.json'}): {e}") from None


def _check_folded_dir(d: Path, reference: str) -> None:
    """Refuse a folded model that lnfree cannot rebuild, from its config alone: another family's HF config of a
    model_type lnfree does not know, or a folded GPT-2 config with fields FoldedConfig does not have."""
    saved = _read_json(d / FOLDED_CONFIG)
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
        record = _read_json(d / EXPORT_INFO) if (d / EXPORT_INFO).exists() else {}
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


# -- checkpoints -----------------------------------------------------------------------------------------
def _safe_globals() -> list:
    """The few non-tensor types a Lightning checkpoint holds (besides dicts, lists, numbers, tensors)."""
    import collections

    return [collections.OrderedDict, collections.defaultdict, getattr, torch.Size]


def read_checkpoint(path: str | Path) -> dict:
    """A checkpoint's contents with weights_only=True: tensors and plain containers, never code."""
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (torch raises UnpicklingError, RuntimeError, EOFError ...)
        raise ModelIOError(f"refused to load checkpoint {path}: it is not a plain tensor checkpoint that "
                           f"weights_only=True accepts ({type(e).__name__}: {str(e).splitlines()[0][:300]})") from e


def config_from_dict(d: dict) -> PretrainedConfig:
    """The HF config of a supported family from its dict (config.json, a checkpoint); refuses any other family."""
    try:
        family(d)
    except UnsupportedFamily as e:
        raise ModelIOError(str(e)) from None
    d = dict(d)
    cfg = AutoConfig.for_model(d.pop("model_type"), **d)
    try:
        family(cfg)  # the family's own checks: an option its adapter cannot remove exactly, named
    except UnsupportedFamily as e:
        raise ModelIOError(str(e)) from None
    return cfg


def checkpoint_config(ckpt: dict, path: str | Path = "checkpoint") -> PretrainedConfig:
    if CKPT_MODEL_CONFIG not in ckpt or "state_dict" not in ckpt:
        raise ModelIOError(f"{path} is not an lnfree training checkpoint (no {CKPT_MODEL_CONFIG} / state_dict)")
    cfg = config_from_dict(ckpt[CKPT_MODEL_CONFIG])
    return cfg


def model_from_checkpoint(ckpt: dict, path: str | Path = "checkpoint") -> RemovableMixin:
    """The removable model (weights, modes, sigmas) from a checkpoint read by `read_checkpoint`."""
    from .lora import LORA_CONFIG_KEY, apply_lora, merged_copy

    config = checkpoint_config(ckpt, path)
    lora = getattr(config, LORA_CONFIG_KEY, None)
    model = family(config).removable_class(config)(config)
    if lora:  # a LoRA run (finetune=lora): rebuild the adapters, load, merge them into the base weights
        apply_lora(model, lora)
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(state)
    return (merged_copy(model) if lora else model).eval()


# -- export records --------------------------------------------------------------------------------------
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits [batch, pos, vocab] of any loaded form (HF models return an output object, folded a tensor)."""
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def fingerprint_ids(vocab_size: int, n_ctx: int, n: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(20250702)
    return torch.randint(0, vocab_size, (1, min(n, n_ctx)), generator=g)


@torch.no_grad()
def fingerprint(model, vocab_size: int, n_ctx: int) -> dict:
    """Logits on fixed token ids, compactly: the logsumexp per position (all of the vocabulary) and the first
    16 logits per position; and the sha256 of every embedding matrix (embedding_hashes), since the logits see
    only the rows of the 32 ids and positions they read. Computed in fp32 on CPU by whoever writes or checks a
    record."""
    ids = fingerprint_ids(vocab_size, n_ctx)
    out = logits(model, ids.to(next(model.parameters()).device)).double().cpu()[0]
    return {"ids": ids[0].tolist(), "logsumexp": out.logsumexp(-1).tolist(), "logits": out[:, :16].tolist(),
            "embeddings": embedding_hashes(model)}


def embedding_hashes(model) -> dict:
    """{module name: sha256 of its fp32 weight} of every token and position embedding and of an untied
    unembedding: every row of them, bit for bit (an exported file holds exactly these fp32 values, or bf16 ones
    that widen to them exactly)."""
    mats = {name: m.weight for name, m in model.named_modules() if isinstance(m, torch.nn.Embedding)}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else getattr(model, "lm_head", None)
    if head is not None and all(head.weight is not w for w in mats.values()):
        mats[next(n for n, m in model.named_modules() if m is head)] = head.weight
    return {name: hashlib.sha256(w.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()
            for name, w in sorted(mats.items())}


def fingerprint_error(a: dict, b: dict) -> float:
    x = torch.tensor([*a["logsumexp"], *sum(a["logits"], [])], dtype=torch.float64)
    y = torch.tensor([*b["logsumexp"], *sum(b["logits"], [])], dtype=torch.float64)
    if x.shape != y.shape:
        return float("inf")
    return float((x - y).abs().max() / y.abs().max().clamp_min(1e-30))


# -- whole-file integrity: every file a model is read from, hashed at export and checked at every load ------
MODEL_FILES = re.compile(r".+\.(safetensors|bin|pt|pth|h5|msgpack)$|config\.json$|generation_config\.json$|"
                         r"tokenizer.*|vocab\.json$|vocab\.txt$|merges\.txt$|special_tokens_map\.json$|"
                         r"added_tokens\.json$|chat_template.*|" + re.escape(FOLDED_CONFIG) + "$")
TOKENIZER_FILES = re.compile(r"tokenizer.*|vocab\.json$|vocab\.txt$|merges\.txt$|special_tokens_map\.json$|"
                             r"added_tokens\.json$|chat_template.*")


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


SHARED_TOKENIZER_FILE = BUILTIN_TOKENIZER_DIR / "tokenizer.json"  # the built-in BPE: the one copy in the repository


def model_file(d: str | Path, name: str, record: dict | None) -> Path:
    """Where file `name` of model dir `d` is read from: the dir's own; for a tokenizer.json the dir lacks but its
    record lists, the built-in tokenizer's. The built-in models are committed without their tokenizer.json (one copy
    of the built-in BPE, not one per model); whoever reads the file checks it against the record's hash, so a
    built-in tokenizer that changed, or another model missing its own tokenizer.json, is refused, not misread."""
    own = Path(d) / name
    listed = name in ((record or {}).get("files") or {})
    return SHARED_TOKENIZER_FILE if name == SHARED_TOKENIZER_FILE.name and listed and not own.exists() else own


def add_shared_files(d: str | Path) -> None:
    """Write into model dir `d` the files its record lists that it reads from elsewhere (`model_file`): a built-in
    model restored into the cache becomes a dir that stock transformers loads whole."""
    record = _read_json(Path(d) / EXPORT_INFO)
    for name in record.get("files") or {}:
        if (src := model_file(d, name, record)) != Path(d) / name:
            shutil.copy2(src, Path(d) / name)


def model_files(d: str | Path) -> list[Path]:
    """The files of a model dir that weights, config or tokenizer are read from (README.md, info files aside)."""
    return sorted(p for p in Path(d).iterdir() if p.is_file() and MODEL_FILES.fullmatch(p.name))


def tokenizer_sha256(tokenizer) -> str:
    """The tokenizer's identity: its vocabulary (token -> id, added tokens included) and end-of-text / bos ids.
    Independent of how the files are formatted, so the same tokenizer hashes alike in every transformers version."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    text = json.dumps({"vocab": vocab, "eos": tokenizer.eos_token_id, "bos": tokenizer.bos_token_id})
    return hashlib.sha256(text.encode()).hexdigest()


def shape_of(config) -> Dims:
    """The shape of any loaded form's config: an HF config of a supported family, or GPT-2's FoldedConfig."""
    return config.dims() if isinstance(config, FoldedConfig) else family(config).dims(config)


def write_record(out_dir: str | Path, model, form: str, tokenizer=None, **fields) -> dict:
    """Write lnfree_export.json for an export (`model`: the exported model, fp32), after its other files: the
    sha256 of each of them is part of the record."""
    cfg = model.config
    dims = shape_of(cfg)
    vocab, n_pos = cfg.vocab_size, dims.n_ctx
    # the shape under the names TransformerLens / NNsight users look for (n_ctx is not in a folded config's HF names)
    shape = {"n_ctx": n_pos, "d_model": dims.d_model, "n_layers": dims.n_layer, "n_heads": dims.n_head,
             "d_vocab": vocab}
    record = {"form": form, **shape, **fields}
    if tokenizer is not None:
        record["tokenizer_sha256"] = tokenizer_sha256(tokenizer)
    record["files"] = {p.name: file_sha256(p) for p in model_files(out_dir)}
    record["fingerprint"] = fingerprint(model, vocab, n_pos)
    (Path(out_dir) / EXPORT_INFO).write_text(record_text(record))
    return record


def record_text(record: dict) -> str:
    """A record as written: indented, with the fingerprint on one line (numbers nobody reads one by one)."""
    rest = {k: v for k, v in record.items() if k != "fingerprint"}
    return json.dumps(rest, indent=1)[:-2] + ',\n "fingerprint": ' + json.dumps(record["fingerprint"]) + "\n}\n"


def read_record(reference: str | ModelRef, cache_dir: str | Path = DEFAULT_CACHE_DIR) -> dict | None:
    """The export record that speaks for a reference: an export's own, a checkpoint's run's export/hf, else None."""
    ref = reference if isinstance(reference, ModelRef) else resolve(reference, cache_dir)
    d = Path(ref.location)
    if ref.kind == "ckpt":
        d = Path(ref.run_dir) / "export" / "hf" if ref.run_dir else d
    elif ref.kind in ("hub", RANDOM):
        return None
    f = d / EXPORT_INFO
    return _read_json(f) if f.is_file() else None


def check_files(d: Path, record: dict, only: re.Pattern | None = None, unhashed_ok: bool = False) -> None:
    """Every file the record lists is there with its recorded sha256, and no unrecorded model file sits beside
    them (`only`: check just the files whose names match, e.g. a checkpoint's tokenizer). A record without
    "files" is refused: every export this version writes has them, so their absence means an edited record (the
    fingerprint alone sees 32 token ids, not every weight) or an export from before whole-file hashes, which
    unhashed_ok=True accepts with a warning."""
    recorded = record.get("files")
    if recorded is None:
        if not unhashed_ok:
            raise ModelIOError(f"{d / EXPORT_INFO} has no whole-file hashes (\"files\"): its record was edited, or the "
                               "export predates them. Re-export it; to load an older export you trust on its logits "
                               "fingerprint alone: lnfree.load(path, unhashed_ok=True)")
        warnings.warn(f"{d / EXPORT_INFO} predates whole-file hashes: only its logits fingerprint is checked (it sees "
                      "32 token ids at positions 0-31); re-export to have every file checked", stacklevel=3)
        return
    wanted = (lambda name: only is None or only.fullmatch(name))  # noqa: E731
    for name, digest in recorded.items():
        if not wanted(name):
            continue
        path = model_file(d, name, record)
        shared = "" if path == d / name else f" (read from {path}: {d} holds no {name} of its own)"
        if not path.is_file():
            raise ModelIOError(f"export {d}: {name} is missing{shared} (the record {EXPORT_INFO} lists it); re-export")
        if file_sha256(path) != digest:
            raise ModelIOError(f"export {d}: {name}{shared} is not the file that was exported (its sha256 differs "
                               f"from the record {EXPORT_INFO}): it was edited, replaced or damaged after export")
    extra = [p.name for p in model_files(d) if p.name not in recorded and wanted(p.name)]
    if extra:
        raise ModelIOError(f"export {d}: {extra} are not part of the export (not in {EXPORT_INFO}) but would be read "
                           "with it; remove them or re-export")


def check_safetensors(d: Path) -> None:
    """Open every safetensors file's header, so that a truncated or empty file is named (safetensors' own error
    does not say which file)."""
    from safetensors import safe_open

    for f in sorted(Path(d).glob("*.safetensors")):
        try:
            with safe_open(str(f), "pt"):
                pass
        except Exception as e:  # noqa: BLE001  (SafetensorError, OSError)
            raise ModelIOError(f"weights file {f} is damaged ({f.stat().st_size} bytes; {type(e).__name__}: "
                               f"{str(e).splitlines()[0][:200]}): truncated, empty or not safetensors") from e


def check_tokenizer(config, tokenizer, record: dict | None = None, where: str = "model",
                    untrained: bool = False) -> None:
    """Refuse a tokenizer that does not belong to a model (`config`: anything with vocab_size), before compute.

    - every id the tokenizer can emit (its vocabulary, added and special tokens such as end-of-text or a pad
      token included) must be < the model's vocab_size, or the embedding lookup fails (IndexError);
    - the model's vocabulary may exceed the tokenizer's only by padding (at most max(128, 1% of vocab_size)
      unused rows, e.g. GPT-2's 50257 -> 50304); a tokenizer much smaller than the model's vocabulary (44 tokens
      for a 4096-token model) is another tokenizer, unless the model's record names exactly this one;
    - where the model's record names its tokenizer (tokenizer_sha256), it must be this one.
    An untrained (random-init) model was trained with no tokenizer: only the first rule applies (a larger
    vocabulary than the tokenizer's, e.g. GPT-2 small's shape with the built-in BPE for a benchmark, is fine)."""
    vocab = int(config.vocab_size)
    ids = [*tokenizer.get_vocab().values(), *tokenizer.all_special_ids]
    n, top = len(tokenizer), max(ids, default=-1)
    recorded = (record or {}).get("tokenizer_sha256")
    same = recorded is not None and recorded == tokenizer_sha256(tokenizer)
    problem = None
    if top >= vocab:
        problem = (f"the tokenizer emits ids up to {top} but the model has vocab_size={vocab} (ids >= {vocab} have no "
                   "embedding row)")
    elif recorded is not None and not same:
        problem = f"the tokenizer is not the one recorded with the model ({EXPORT_INFO}: tokenizer_sha256)"
    elif vocab - n > max(128, vocab // 100) and not same and not untrained:
        problem = (f"the tokenizer has {n} tokens but the model's vocabulary has {vocab} rows: it is not the tokenizer "
                   "this model was trained with")
    if problem:
        raise ModelIOError(f"{where}: tokenizer and model do not match: {problem}. Use the model's own tokenizer "
                           "(model.tokenizer=null / the tokenizer saved with it)")


def verify_record(ref: ModelRef, model) -> None:
    """Refuse an export that no longer is what its record says."""
    d = Path(ref.location)
    if not (d / EXPORT_INFO).exists():
        if ref.kind == "folded":
            raise ModelIOError(f"folded export {d} has no {EXPORT_INFO}: it cannot be verified; re-export it")
        return  # a plain HF dir: nothing recorded, nothing to check
    record = _read_json(d / EXPORT_INFO)
    form = "folded" if ref.kind == "folded" else ref.kind
    if record.get("form") != form:
        raise ModelIOError(f"export {d} is recorded as {record.get('form')!r} but its files are a {form!r} model: "
                           "it was altered")
    field = family(model.config).eps_field if ref.kind in ("hf", "hf_lnfree") else None
    if field in record:  # layer_norm_epsilon (GPT-2), rms_norm_eps (Llama), layer_norm_eps (NeoX)
        eps = getattr(model.config, field)
        if eps != record[field]:
            raise ModelIOError(f"export {d}: config.json has {field}={eps:g} but the export was written "
                               f"with {record[field]:g}; the LN-free trick needs the recorded value")
    if "fingerprint" not in record:
        raise ModelIOError(f"export {d}: {EXPORT_INFO} has no fingerprint; re-export it")
    got = fingerprint(model, model.config.vocab_size, shape_of(model.config).n_ctx)
    recorded = record["fingerprint"].get("embeddings")  # absent from records written before it was added
    changed = [name for name in recorded or {} if got["embeddings"].get(name) != recorded[name]]
    if changed:
        raise ModelIOError(f"export {d}: the weights of {changed} differ from the record's hashes ({EXPORT_INFO}: "
                           "fingerprint.embeddings): an embedding was changed after export")
    err = fingerprint_error(got, record["fingerprint"])
    if not err <= FINGERPRINT_TOL:
        raise ModelIOError(f"export {d}: logits on the recorded token ids differ from the record (relative error "
                           f"{err:.2e} > {FINGERPRINT_TOL:.0e}): the weights or config were changed after export")


def set_dropout(model, p: float):
    """Every dropout of a (removable) model, config included (HF's SDPA path reads attn_dropout.p; Llama's
    attention reads a float `attention_dropout`)."""
    for k in family(model.config).dropout_fields():
        setattr(model.config, k, p)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p
        elif isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = p


# -- loading ---------------------------------------------------------------------------------------------
def load_tokenizer(source: ModelRef | str, unhashed_ok: bool = False, gguf_file: str | None = None):
    """The one tokenizer loader. A resolved model reference: the tokenizer stored with the model (or its run's
    export), its files checked against the model's record, or None where it carries none (a random-init model).
    A name: "builtin" (the built-in BPE), a tokenizer dir or a hub name; with gguf_file, the tokenizer described
    by that GGUF file in the dir (lnfree.gguf_import)."""
    from transformers import AutoTokenizer

    if not isinstance(source, ModelRef):
        if gguf_file is not None:
            return AutoTokenizer.from_pretrained(str(source), gguf_file=gguf_file)
        return AutoTokenizer.from_pretrained(_tokenizer_location(str(source)))
    ref = source
    where = Path(ref.location)
    if ref.kind == "ckpt":
        where = Path(ref.run_dir) / "export" / "hf"
    if ref.kind == "hub":
        return AutoTokenizer.from_pretrained(ref.location)
    if ref.kind == RANDOM or not (where / "tokenizer_config.json").exists():
        return None
    record = read_record(ref)
    if record is not None:  # the tokenizer files are the exported ones (small: cheap to hash every time)
        check_files(where, record, only=TOKENIZER_FILES, unhashed_ok=unhashed_ok)
    tokenizer_json = model_file(where, SHARED_TOKENIZER_FILE.name, record)
    shared = {} if tokenizer_json == where / tokenizer_json.name else {"tokenizer_file": str(tokenizer_json)}
    return AutoTokenizer.from_pretrained(str(where), **shared)  # the dir's tokenizer_config.json either way


def _tokenizer_location(name: str) -> str:
    """Where a tokenizer name is loaded from: refused at once when it needs the hub and the hub cannot answer."""
    if name == BUILTIN_TOKENIZER:
        if not BUILTIN_TOKENIZER_DIR.exists():
            raise FileNotFoundError(f"built-in tokenizer {BUILTIN_TOKENIZER_DIR} missing; run "
                                    "`python -m lnfree.data.corpus`")
        return str(BUILTIN_TOKENIZER_DIR)
    if not Path(name).expanduser().is_dir() and (why := hub_unreachable()):
        raise ModelIOError(f"tokenizer {name!r} is not a local dir and {why}")
    return name


def _random_config(ref: ModelRef, tokenizer=None) -> PretrainedConfig:
    """A random-init model's config: its shape (whose model_type, default gpt2, names the family), with the
    tokenizer's vocabulary and end-of-text id."""
    special = {}
    if tokenizer is not None:
        special = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.eos_token_id,
                   "eos_token_id": tokenizer.eos_token_id}
    fields = {**special, **dict(ref.shape)}
    return config_from_dict({"model_type": "gpt2", **fields})  # refuses an unsupported family, naming the supported


def model_config(reference: str | ModelRef, cache_dir: str | Path = DEFAULT_CACHE_DIR, revision=None,
                 tokenizer=None) -> PretrainedConfig:
    """The HF config of a reference without loading weights (for checks before any compute); a family lnfree does
    not cover is refused here. `tokenizer`: the one a random-init model is made for."""
    ref = reference if isinstance(reference, ModelRef) else resolve(reference, cache_dir)
    if ref.kind == RANDOM:
        return _random_config(ref, tokenizer)
    if ref.kind == "ckpt":
        return checkpoint_config(read_checkpoint(ref.location), ref.location)
    if ref.kind == "folded":
        raise ModelIOError(f"{ref.reference!r} is a folded export: it has no model config (no norms to remove)")
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(ref.location, revision=revision)
    except OSError as e:  # a hub name that is not a repo, a revision that does not exist, an unreadable dir
        raise ModelIOError(f"cannot read the config of model {ref.reference!r}: {str(e).splitlines()[0]} Check the "
                           "name (hub names look like openai-community/gpt2-medium) and the revision, or give a local "
                           "dir") from None
    try:
        family(cfg)
    except ValueError as e:
        raise ModelIOError(f"{ref.reference!r}: {e}") from e
    return cfg


def load(reference: str | ModelRef, cache_dir: str | Path = DEFAULT_CACHE_DIR, device="cpu",
         dtype: torch.dtype | None = None, removable: bool = False, revision=None,
         attn_implementation: str | None = None, dropout: float | None = None, tokenizer=None,
         unhashed_ok: bool = False):
    """(model, tokenizer or None) for any reference; see the module docstring.

    removable=True returns a removable model ready to fine-tune (from a stock model, a removable dir, a checkpoint
    or random init); exports cannot be made removable again. dropout: overrides the model's resid/embd/attn
    dropout. tokenizer: the one to use instead of the model's own (checked against the model; a random-init model
    takes its vocabulary from it). unhashed_ok: load an export whose record has no whole-file hashes (written
    before lnfree recorded them) on its logits fingerprint alone; refused by default (check_files).
    """
    ref = reference if isinstance(reference, ModelRef) else resolve(reference, cache_dir)
    if ref.kind == "hf_lnfree":
        refuse_fp16(dtype, f"{ref.reference!r}, an LN-free HF-compatible export:",
                    "Load it in float32 or bfloat16, or use the folded export")
    if removable and ref.kind in ("hf_lnfree", "folded"):
        raise ModelIOError(not_removable_again(repr(ref.reference), ref.kind))
    record = read_record(ref)
    if ref.kind in ("hf", "hf_lnfree", "folded", "removable"):  # every file checked before any weight is read
        if record is not None:
            check_files(Path(ref.location), record, unhashed_ok=unhashed_ok)
        check_safetensors(Path(ref.location))
    if ref.kind == RANDOM:
        config = _random_config(ref, tokenizer)
        config._attn_implementation = attn_implementation
        stock = family(config).stock_class(config)
        model = (make_removable(config) if removable else stock(config)).eval()  # as every form loads
    elif ref.kind == "ckpt":
        model = model_from_checkpoint(read_checkpoint(ref.location), ref.location)
    elif ref.kind == "removable":
        model = load_removable(ref.location).eval()
    elif ref.kind == "folded":
        model = load_folded(ref.location)
        verify_record(ref, model)
    else:
        cfg = model_config(ref, revision=revision)  # refuses an unsupported hub model before its weights download
        kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
        try:
            # fp32 first: the record's fingerprint is checked in fp32, the requested dtype applied after
            model = family(cfg).stock_class(cfg).from_pretrained(ref.location, revision=revision, dtype=torch.float32,
                                                    **kw).eval()
        except OSError as e:
            raise ModelIOError(f"could not load model {ref.reference!r}: {e}") from e
        if ref.kind in ("hf", "hf_lnfree"):
            verify_record(ref, model)
    if removable and not isinstance(model, RemovableMixin):
        model = make_removable(model)
    if dropout is not None:
        set_dropout(model, dropout)
    if dtype is not None:
        model = model.to(dtype=dtype)
    tokenizer = load_tokenizer(ref, unhashed_ok) if tokenizer is None else tokenizer
    if tokenizer is not None:
        check_tokenizer(model.config, tokenizer, record, where=ref.reference, untrained=ref.kind == RANDOM)
    return model.to(device), tokenizer
