"""Model loading: whatever a model reference names (lnfree/references.py resolves it) is loaded here, safely,
and checked against its record (lnfree/model_record.py) before it is used.

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

Rules:
- No pickle: checkpoints go through `torch.load(weights_only=True)`; weights are safetensors.
- An export is checked against its record (lnfree_export.json): every file against its hash before weights are
  read, then the logits fingerprint. A record without the files' hashes (its "files" deleted, or written by an
  lnfree from before them) is refused: load(..., unhashed_ok=True) loads such an older export on its
  fingerprint alone. An LN-free HF-compatible export in fp16 is refused: its weights overflow fp16.
- A damaged safetensors file is named.

This is core: it imports torch, transformers and safetensors only.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig

from .errors import ModelIOError
from .families import UnsupportedFamily, family
from .folded import load_folded
from .model import RemovableMixin, load_removable, make_removable, not_removable_again
from .model_record import (
    EXPORT_INFO,
    FINGERPRINT_TOL,
    SHARED_TOKENIZER_FILE,
    TOKENIZER_FILES,
    check_files,
    check_tokenizer,
    fingerprint,
    fingerprint_error,
    model_file,
    read_model_json,
    shape_of,
)
from .paths import BUILTIN_TOKENIZER_DIR, DEFAULT_CACHE_DIR
from .references import RANDOM, ModelRef, hub_unreachable, resolve

BUILTIN_TOKENIZER = "builtin"  # load_tokenizer's name of the built-in BPE
CKPT_MODEL_CONFIG = "lnfree_model_config"  # key under which a training checkpoint keeps the GPT-2 config
RUN_INFO = "lnfree_run"  # key of what the run was (tokens per step, schedule), checked on resume


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


# -- checks made when an export is loaded ----------------------------------------------------------------
def read_record(reference: str | ModelRef, cache_dir: str | Path = DEFAULT_CACHE_DIR) -> dict | None:
    """The export record that speaks for a reference: an export's own, a checkpoint's run's export/hf, else None."""
    ref = reference if isinstance(reference, ModelRef) else resolve(reference, cache_dir)
    d = Path(ref.location)
    if ref.kind == "ckpt":
        d = Path(ref.run_dir) / "export" / "hf" if ref.run_dir else d
    elif ref.kind in ("hub", RANDOM):
        return None
    f = d / EXPORT_INFO
    return read_model_json(f) if f.is_file() else None


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


def verify_record(ref: ModelRef, model) -> None:
    """Refuse an export that no longer is what its record says."""
    d = Path(ref.location)
    if not (d / EXPORT_INFO).exists():
        if ref.kind == "folded":
            raise ModelIOError(f"folded export {d} has no {EXPORT_INFO}: it cannot be verified; re-export it")
        return  # a plain HF dir: nothing recorded, nothing to check
    record = read_model_json(d / EXPORT_INFO)
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


# -- loading ---------------------------------------------------------------------------------------------
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
