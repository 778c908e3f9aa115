"""The record every export carries, lnfree_export.json: what is written into it, how it is read, and the checks
made against it. It holds the export's form, eps and sigmas, its shape, the sha256 of every file the export
wrote (`write_record`, after the export's other files), the tokenizer's identity (`tokenizer_sha256`) and a
logits fingerprint on fixed token ids with the sha256 of every embedding matrix (`fingerprint`); loading
(lnfree/io.py) checks every file against its hash before reading weights (`check_files`: a damaged, edited or
replaced file is named) and then recomputes the fingerprint (the semantic check: an edited eps).

Rules:
- The built-in models committed to the repository (lnfree/pretrained/, experiments/depth_family/models/) hold no
  tokenizer.json: theirs is the built-in tokenizer's, one file for all of them (`model_file`), checked against
  each record's hash like a file of their own.
- Wherever a model meets a tokenizer, `check_tokenizer` refuses a pair that does not belong together (ids past
  the vocabulary, another end-of-text id, a tokenizer other than the recorded one) before any compute.

This is core: it imports torch, transformers and safetensors only.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import warnings
from pathlib import Path

import torch

from .errors import ModelIOError
from .families import Dims, family
from .families.gpt2_folded import FoldedConfig
from .folded import CONFIG_FILE as FOLDED_CONFIG
from .paths import BUILTIN_TOKENIZER_DIR

EXPORT_INFO = "lnfree_export.json"  # the record every export carries
FINGERPRINT_TOL = 1e-4  # relative; an edited eps is off by ~1e5, round-off across machines ~1e-6


def read_model_json(path: Path) -> dict:
    """A JSON file of a model dir (config.json, its record), or a ModelIOError naming it."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelIOError(f"cannot read {path}: {e}") from e


# -- the logits fingerprint ------------------------------------------------------------------------------
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
    record = read_model_json(Path(d) / EXPORT_INFO)
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
