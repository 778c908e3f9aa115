"""Exports of a removable model, each verified against the source model's logits before anything is written.

- `export_hf`: a directory that the family's stock class (GPT2LMHeadModel, LlamaForCausalLM, GPTNeoXForCausalLM,
  or AutoModelForCausalLM) loads with no lnfree code. For an LN-free model every norm gets eps = 1e12 and
  weight = gamma * 1e6 / sigma, so that sqrt(var + 1e12) ~ 1e6 and the module computes
  (x - mean) * gamma / sigma + beta (x * gamma / sigma for RMSNorm; relative error about var / 2e12; in fp32 an
  eps of 1e12 swallows any var below 2^16 outright). The stock block has one attention-input norm, so the QK
  path's different sigma is folded into the query and key rows of its readers (exact; Family.stock_state_dict,
  written once for every family from its adapter's declarations). A model with every site real exports as an
  ordinary stock model (the vanilla control).
- `export_folded`: every frozen site folded into the linear layer that reads it; no norm left (Family.fold;
  folded.py saves it).

Error measure everywhere: max |logits_export - logits_source| / max |logits_source| on a check batch.
Every export carries lnfree_export.json (lnfree.model_record.write_record: form, eps, sigmas, the sha256 of every file
written, the tokenizer's identity, a logits fingerprint), which lnfree.io.load checks, so an export edited or
damaged afterwards (a weight row, a swapped tokenizer.json, eps set back to 1e-5) is refused, not misread.
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import ExportError
from .families import family
from .folded import save_folded
from .io import raise_storage_error, refuse_fp16
from .model import RemovableMixin
from .model_record import logits, write_record

HF_EPS = 1e12
HF_SCALE = 1e6  # = sqrt(HF_EPS)
HF_TOL = 1e-4
FOLDED_TOL = 1e-5


def require_all_removed(model: RemovableMixin, what: str):
    real = model.real_sites()
    if real:
        shown = ", ".join(real[:6]) + (f" and {len(real) - 6} more" if len(real) > 6 else "")
        raise ExportError(f"{what} needs every norm site removed; still real: {shown}")
    special = [n for n, s in model.sites().items() if s.special_active]
    if special:
        raise ExportError(
            f"{what}: sites {special[:4]} still use special bos/eot sigmas (per-token scales cannot be "
            "exported); apply the bos/eot events first"
        )


def check_batch(model, n_batch: int = 2, n_pos: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = min(n_pos, family(model.config).dims(model.config).n_ctx)
    return torch.randint(0, model.config.vocab_size, (n_batch, t), generator=g)


@torch.no_grad()
def logits_error(reference, candidate, input_ids: torch.Tensor) -> float:
    dev = next(reference.parameters()).device
    ids = input_ids.to(dev)
    ref = eval_logits(reference, ids).double()
    cand = eval_logits(candidate.to(dev), ids).double()
    return float((cand - ref).abs().max() / ref.abs().max())


def refuse_nonfinite(model, input_ids: torch.Tensor) -> None:
    """An export of a model whose own logits are non-finite is refused as such (not as "relative error nan"),
    with where the forward first overflows (lnfree.diagnose)."""
    from .diagnose import describe, locate_nonfinite

    report = locate_nonfinite(model, input_ids.to(next(model.parameters()).device))
    if report is not None:
        raise ExportError(f"nothing exported: the model's own forward gives {describe(report)}")


def eval_logits(model, ids):
    was_training = model.training
    model.eval()  # dropout off for the comparison; the caller's mode is restored
    out = logits(model, ids)
    model.train(was_training)
    return out


# a tokenizer_config.json class name that transformers 4.x and 5.x both load (5.x writes "TokenizersBackend",
# a class 4.x does not have; GPT-2's fast tokenizer class reads the same tokenizer.json in both)
PORTABLE_TOKENIZER_CLASS = "GPT2TokenizerFast"


def save_tokenizer(tokenizer, out_dir: str | Path):
    """save_pretrained, then name a tokenizer class that transformers 4.x knows as well as 5.x."""
    tokenizer.save_pretrained(out_dir)
    f = Path(out_dir) / "tokenizer_config.json"
    cfg = json.loads(f.read_text())
    if cfg.get("tokenizer_class") in (None, "TokenizersBackend", "PreTrainedTokenizerFast"):
        cfg["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
        for key in ("backend", "is_local", "local_files_only"):  # 5.x's load-time keys: 4.x would pass them on
            cfg.pop(key, None)
        f.write_text(json.dumps(cfg, indent=2) + "\n")


@contextmanager
def staging_dir(tmp: str | Path):
    """A fresh dir to build exports in, removed if anything fails inside (a failed check, a full disk, a signal),
    so that no half-written export stays behind; a full disk or a file-size limit is named as such."""
    tmp = Path(tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise_storage_error(e, f"export {tmp}")
        raise


# -- HF-compatible -------------------------------------------------------------------------------------
@torch.no_grad()
def to_stock(model: RemovableMixin, dtype: torch.dtype | None = None):
    """The stock-HF equivalent of `model` (all sites real, or all removed), in memory: a GPT2LMHeadModel,
    LlamaForCausalLM, GPTNeoXForCausalLM, ... as the model's family says."""
    dtype = dtype or model.dtype
    refuse_fp16(dtype, "An HF-compatible export", "Export in float32 or bfloat16.", ExportError)
    fam = family(model.config)
    removed = model.removed_sites()
    if removed:
        require_all_removed(model, "HF-compatible LN-free export")
    cfg_dict = {k: v for k, v in model.config.to_dict().items() if not k.startswith("lnfree_")}
    if removed:
        cfg_dict = fam.stock_config({**cfg_dict, fam.eps_field: HF_EPS})
    cfg_dict.pop("architectures", None)
    cfg = model.config.__class__.from_dict(cfg_dict)
    stock_class = fam.stock_class(cfg)
    cfg.architectures = [stock_class.__name__]
    cfg._attn_implementation = model.config._attn_implementation
    stock = stock_class(cfg)
    sd = {k: v.detach().clone().double() for k, v in model.state_dict().items() if k in stock.state_dict()}
    if removed:  # what stock_config added (attention biases for the beta term) starts at zero, then the eps trick
        sd |= {k: torch.zeros_like(v, dtype=torch.float64) for k, v in stock.state_dict().items() if k not in sd}
        fam.stock_state_dict(model, sd, HF_SCALE)
    stock.load_state_dict({k: v.to(torch.float32) for k, v in sd.items()}, strict=False)
    stock.tie_weights()
    return stock.to(device=model.device, dtype=dtype).eval()


def export_hf(model: RemovableMixin, out_dir: str | Path, tokenizer=None, input_ids=None,
              dtype: torch.dtype | None = None, tol: float = HF_TOL) -> float:
    """Verify, then write a stock-loadable HF dir (safetensors + config [+ tokenizer]). Returns the error."""
    stock = to_stock(model, dtype)
    ids = check_batch(model) if input_ids is None else input_ids
    refuse_nonfinite(model, ids)
    err = logits_error(model, stock, ids)
    if not err <= tol:
        raise ExportError(f"HF-compatible export differs from the model: relative error {err:.2e} > {tol:.0e}")
    out = Path(out_dir)
    stock.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        save_tokenizer(tokenizer, out)
    write_record(out, stock.float().cpu(), "hf_lnfree" if model.removed_sites() else "hf", tokenizer,
                 **{family(model.config).eps_field: getattr(stock.config, family(model.config).eps_field)},
                 relative_error=err, sigmas=model.sigmas())
    return err


@torch.no_grad()
def from_lnfree_stock(stock, eps: float = 1e-5) -> RemovableMixin:
    """The all-removed removable model that computes a stock LN-free model: an HF-compatible LN-free export,
    lnfree's or the paper authors' published checkpoints (every norm's eps = 1e12 and weight = gamma * 1e6 / sigma).
    Only gamma / sigma is in such a model, so every sigma becomes 1 and every norm weight is divided by 1e6 (exact
    up to the trick's own relative error, var / 2e12). Its `fold`, `export_folded` and `export_hf` then work as for
    a model removed here. `eps`: the rebuilt norms' eps (unused while every site is removed)."""
    from .model import is_lnfree_stock
    from .norm import NormParams

    fam = family(stock.config)
    if not isinstance(stock, fam.stock_class(stock.config)) or not is_lnfree_stock(stock.config):
        raise ExportError(f"from_lnfree_stock takes a stock LN-free model (every norm eps = {HF_EPS:g}); got a "
                          f"{type(stock).__name__} with {fam.eps_field}={getattr(stock.config, fam.eps_field):g}")
    cfg = stock.config.__class__.from_dict({**stock.config.to_dict(), fam.eps_field: eps})
    cfg._attn_implementation = stock.config._attn_implementation
    model = fam.removable_class(cfg)(cfg).to(dtype=torch.float32)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in stock.state_dict().items()}, strict=False)
    site_buffers = {"removed", "running", "sigma", "special"}
    bad = [k for k in missing if k.rsplit(".", 1)[-1] not in site_buffers]
    if bad or unexpected:
        raise ExportError(f"weights do not match a {fam.name} layout: missing {bad}, unexpected {unexpected}")
    for m in model.modules():
        if isinstance(m, NormParams):
            m.weight.div_(HF_SCALE)
    for site in model.sites().values():
        site.running.fill_(1.0)
        site.freeze(special_bos=False, special_eot=False)
    return model.to(stock.device).eval()


# -- folded ------------------------------------------------------------------------------------------
@torch.no_grad()
def fold(model: RemovableMixin):
    """The truly norm-free form of an all-removed model (computed in float64, returned in fp32)."""
    require_all_removed(model, "folded export")
    return family(model.config).fold(model).float().eval()


def export_folded(model: RemovableMixin, out_dir: str | Path, tokenizer=None, input_ids=None,
                  tol: float = FOLDED_TOL) -> float:
    """Verify, then write the folded model (safetensors + JSON config [+ tokenizer]). Returns the error."""
    folded = fold(model)
    ids = check_batch(model) if input_ids is None else input_ids
    refuse_nonfinite(model, ids)
    err = logits_error(model, folded, ids)
    if not err <= tol:
        raise ExportError(f"folded export differs from the model: relative error {err:.2e} > {tol:.0e}")
    save_folded(folded.cpu(), out_dir)
    if tokenizer is not None:
        save_tokenizer(tokenizer, out_dir)
    write_record(out_dir, folded.cpu(), "folded", tokenizer, relative_error=err, sigmas=model.sigmas())
    return err
