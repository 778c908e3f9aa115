"""Hand any lnfree model or export to TransformerLens or NNsight, with logits equal to the source's.

    from lnfree.bridges import to_transformer_lens, to_nnsight
    bridge = to_transformer_lens("outputs/run")          # TransformerLens TransformerBridge (run_with_cache, hooks)
    lm = to_nnsight("outputs/run/export/hf")             # nnsight TransformersModel (.trace)
    bridge = to_transformer_lens(model, tokenizer)       # an in-memory model (removable, stock GPT-2)

Any reference lnfree.io.load takes works. Both tools wrap a stock Hugging Face GPT2LMHeadModel (`stock_gpt2`):
- a GPT-2, an original or vanilla model: as it is;
- an LN-free HF export: as it is, with its own config, so that the eps = 1e12 of the frozen norms is kept (a
  TransformerLens config built by hand with the default eps 1e-5 gives logits off by ~1e5, silently);
- a removable model / checkpoint / run: every site must be removed (or none); converted in memory exactly as
  export/hf is (lnfree.export.to_stock_gpt2) and checked against the source's logits;
- a folded export: TransformerLens 4.x has no HookedTransformer (hence no `normalization_type=None` model to
  map the folded weights into) and stock GPT-2 has no unembedding bias, so the bridge uses the export/hf of the
  same run, checked against the folded logits. NNsight wraps the folded model itself (`to_nnsight`).

Do not call TransformerLens' `enable_compatibility_mode()` on an LN-free model: it folds LayerNorm as if it
normalised, which the eps = 1e12 norms do not. Supported versions: the `interop` extra in pyproject.toml.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from transformers import GPT2LMHeadModel

from .io import ModelIOError, ModelRef, check_tokenizer, load, read_record, resolve
from .paths import DEFAULT_CACHE_DIR

SUPPORTED = {"transformer-lens": ((4, 3), (4, 4)), "nnsight": ((0, 8), (0, 9))}  # [low, high) as in pyproject


class BridgeError(ModelIOError):
    pass


def require(package: str):
    """Fail with the install command when `package` is missing or outside the supported range."""
    low, high = SUPPORTED[package]
    try:
        v = version(package)
    except PackageNotFoundError:
        raise BridgeError(f"{package} is not installed: pip install 'lnfree[interop]'") from None
    parts = tuple(int(x) for x in v.split(".")[:2] if x.isdigit())
    if not low <= parts < high:
        raise BridgeError(f"{package} {v} is not supported (need >= {'.'.join(map(str, low))}, < "
                          f"{'.'.join(map(str, high))}): pip install 'lnfree[interop]'")


def stock_gpt2(model_or_ref, tokenizer=None, cache_dir: str | Path = DEFAULT_CACHE_DIR):
    """(GPT2LMHeadModel in eval mode, tokenizer) computing the source's logits; see the module docstring."""
    from .export import HF_TOL, check_batch, logits_error, to_stock_gpt2
    from .folded import FoldedGPT2
    from .model import RemovableGPT2LMHeadModel

    if isinstance(model_or_ref, (str, Path, ModelRef)):
        ref = model_or_ref if isinstance(model_or_ref, ModelRef) else resolve(str(model_or_ref), cache_dir)
        if ref.kind == "folded":
            if not ref.run_dir or not (Path(ref.run_dir) / "export" / "hf").is_dir():
                raise BridgeError(f"{ref.reference!r} is a folded export without its run's export/hf: stock GPT-2 "
                                  "(which TransformerLens 4.x wraps) cannot hold its unembedding bias; bridge the "
                                  "run's export/hf, or use to_nnsight on the folded model")
            folded, tok = load(ref, cache_dir)
            model, tok2 = load(str(Path(ref.run_dir) / "export" / "hf"), cache_dir)
            err = logits_error(folded, model, check_batch(model))
            if not err <= HF_TOL:  # the stock form's tolerance, as export/hf's own check
                raise BridgeError(f"{ref.run_dir}/export/hf differs from the folded export by {err:.2e}")
            tokenizer = tokenizer or tok or tok2
            if tokenizer is not None:
                check_tokenizer(model.config, tokenizer, read_record(ref), where=ref.reference)
            return model.eval(), tokenizer
        model, tok = load(ref, cache_dir)
        tokenizer, record, where = tokenizer or tok, read_record(ref), ref.reference
    else:
        model, record, where = model_or_ref, None, "the model given"
    if isinstance(model, FoldedGPT2):
        raise BridgeError("an in-memory folded model cannot become a stock GPT-2; pass its run or export/hf")
    if isinstance(model, RemovableGPT2LMHeadModel):
        source, model = model.eval(), to_stock_gpt2(model)
        err = logits_error(source, model, check_batch(model))
        if not err <= HF_TOL:  # the stock form's tolerance, as export/hf's own check
            raise BridgeError(f"the stock GPT-2 form differs from the removable model by {err:.2e}")
    if not isinstance(model, GPT2LMHeadModel):
        raise BridgeError(f"not a GPT-2 model: {type(model).__name__}")
    if tokenizer is not None:  # a tokenizer passed in must fit the model as its own would
        check_tokenizer(model.config, tokenizer, record, where=where)
    return model.eval(), tokenizer


def to_transformer_lens(model_or_ref, tokenizer=None, cache_dir: str | Path = DEFAULT_CACHE_DIR, device="cpu"):
    """A TransformerLens TransformerBridge over the stock form (raw HF numerics, eager attention)."""
    require("transformer-lens")
    from transformer_lens import TransformerBridge

    model, tok = stock_gpt2(model_or_ref, tokenizer, cache_dir)
    name = str(model_or_ref) if isinstance(model_or_ref, (str, Path)) else "lnfree-gpt2"
    return TransformerBridge.boot_transformers(name, hf_model=model, tokenizer=tok, device=device,
                                               n_ctx=model.config.n_positions)


def to_nnsight(model_or_ref, tokenizer=None, cache_dir: str | Path = DEFAULT_CACHE_DIR):
    """An nnsight TransformersModel (text-generation; LanguageModel's successor in 0.8) over the stock form; a
    folded model (reference or object) as nnsight.NNsight."""
    require("nnsight")
    import nnsight

    from .folded import FoldedGPT2

    if isinstance(model_or_ref, (str, Path, ModelRef)):
        ref = model_or_ref if isinstance(model_or_ref, ModelRef) else resolve(str(model_or_ref), cache_dir)
        if ref.kind == "folded":
            return nnsight.NNsight(load(ref, cache_dir)[0].eval())
    if isinstance(model_or_ref, FoldedGPT2):
        return nnsight.NNsight(model_or_ref.eval())
    model, tok = stock_gpt2(model_or_ref, tokenizer, cache_dir)
    if tok is None:
        raise BridgeError("nnsight's TransformersModel needs the tokenizer: pass tokenizer=")
    return nnsight.TransformersModel(model, task="text-generation", tokenizer=tok)
