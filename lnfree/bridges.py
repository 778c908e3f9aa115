"""Hand any lnfree model or export to TransformerLens or NNsight, with logits equal to the source's.

    from lnfree.bridges import to_transformer_lens, to_nnsight
    bridge = to_transformer_lens("outputs/run")          # TransformerLens TransformerBridge (run_with_cache, hooks)
    lm = to_nnsight("outputs/run/export/hf")             # nnsight TransformersModel (.trace)
    bridge = to_transformer_lens(model, tokenizer)       # an in-memory model (removable, or a stock HF model)

Any reference lnfree.io.load takes works, in every family lnfree supports (GPT-2, Llama architecture, GPT-NeoX:
docs/families.md). Both tools wrap the family's stock Hugging Face class (GPT2LMHeadModel, LlamaForCausalLM,
GPTNeoXForCausalLM, ...; `stock_model`):
- an original or vanilla model: as it is;
- an LN-free HF export: as it is, with its own config, so that the eps = 1e12 of the frozen norms is kept (a
  TransformerLens config built by hand with the default eps gives logits off by ~1e5, silently);
- a removable model / checkpoint / run: every site must be removed (or none); converted in memory exactly as
  export/hf is (lnfree.export.to_stock) and checked against the source's logits;
- a folded export: TransformerLens 4.x has no HookedTransformer (hence no `normalization_type=None` model to
  map the folded weights into) and stock GPT-2 has no unembedding bias, so the bridge uses the export/hf of the
  same run, checked against the folded logits. NNsight wraps the folded model itself (`to_nnsight`).
TransformerLens 4.3's TransformerBridge has an adapter for every family's stock class; a class it has none for
is refused naming the families it covers (`transformer_lens_families`).

Do not call TransformerLens' `enable_compatibility_mode()` on an LN-free model: it folds LayerNorm as if it
normalised, which the eps = 1e12 norms do not. Supported versions: the `interop` extra in pyproject.toml.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from torch import nn

from .errors import ModelIOError
from .families import REGISTRY, UnsupportedFamily, family
from .io import load, read_record
from .model_record import check_tokenizer
from .paths import DEFAULT_CACHE_DIR
from .references import ModelRef, resolve

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


def _is_folded(model) -> bool:
    """A folded model in memory: FoldedGPT2, or another family's HF class with its norms nn.Identity."""
    from .families.gpt2_folded import FoldedGPT2

    return isinstance(model, FoldedGPT2) or any(isinstance(m, nn.Identity) for m in model.modules())


def stock_model(model_or_ref, tokenizer=None, cache_dir: str | Path = DEFAULT_CACHE_DIR):
    """(the family's stock HF model in eval mode, tokenizer) computing the source's logits; see the module
    docstring."""
    from .export import HF_TOL, check_batch, logits_error, to_stock
    from .model import RemovableMixin

    if isinstance(model_or_ref, (str, Path, ModelRef)):
        ref = model_or_ref if isinstance(model_or_ref, ModelRef) else resolve(str(model_or_ref), cache_dir)
        if ref.kind == "folded":
            if not ref.run_dir or not (Path(ref.run_dir) / "export" / "hf").is_dir():
                raise BridgeError(f"{ref.reference!r} is a folded export without its run's export/hf: the stock "
                                  "class (which TransformerLens 4.x wraps) cannot hold the folded form; bridge the "
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
    if not isinstance(model, nn.Module):
        raise BridgeError(f"not a model: {type(model).__name__}")
    if _is_folded(model):
        raise BridgeError("an in-memory folded model cannot become a stock model; pass its run or export/hf")
    if isinstance(model, RemovableMixin):
        source, model = model.eval(), to_stock(model)
        err = logits_error(source, model, check_batch(model))
        if not err <= HF_TOL:  # the stock form's tolerance, as export/hf's own check
            raise BridgeError(f"the stock form differs from the removable model by {err:.2e}")
    try:
        fam = family(getattr(model, "config", None))
    except UnsupportedFamily as e:
        raise BridgeError(f"{type(model).__name__}: {e}") from None
    if not isinstance(model, fam.stock_class(model.config)):
        raise BridgeError(f"not a stock {fam.name} model: {type(model).__name__}")
    if tokenizer is not None:  # a tokenizer passed in must fit the model as its own would
        check_tokenizer(model.config, tokenizer, record, where=where)
    return model.eval(), tokenizer


def transformer_lens_families() -> list[str]:
    """lnfree's model_types whose stock class the installed TransformerLens has a TransformerBridge adapter for."""
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return [t for t in REGISTRY if MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(t) in SUPPORTED_ARCHITECTURES]


def to_transformer_lens(model_or_ref, tokenizer=None, cache_dir: str | Path = DEFAULT_CACHE_DIR, device="cpu"):
    """A TransformerLens TransformerBridge over the stock form (raw HF numerics, eager attention)."""
    require("transformer-lens")
    from transformer_lens import TransformerBridge
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES

    model, tok = stock_model(model_or_ref, tokenizer, cache_dir)
    fam, arch = family(model.config), type(model).__name__
    if arch not in SUPPORTED_ARCHITECTURES:
        raise BridgeError(f"TransformerLens {version('transformer-lens')} has no TransformerBridge adapter for {arch} "
                          f"(model_type={model.config.model_type!r}); of lnfree's families it bridges model_type "
                          f"{', '.join(transformer_lens_families())}. to_nnsight takes every family")
    if tok is None:  # the bridge would look the tokenizer up on the hub by the model's name
        raise BridgeError("TransformerLens' TransformerBridge needs the tokenizer: pass tokenizer=")
    name = str(model_or_ref) if isinstance(model_or_ref, (str, Path)) else f"lnfree-{fam.name}"
    return TransformerBridge.boot_transformers(name, hf_model=model, tokenizer=tok, device=device,
                                               n_ctx=fam.dims(model.config).n_ctx)


def to_nnsight(model_or_ref, tokenizer=None, cache_dir: str | Path = DEFAULT_CACHE_DIR):
    """An nnsight TransformersModel (text-generation; LanguageModel's successor in 0.8) over the stock form; a
    folded model (reference or object, any family) as nnsight.NNsight."""
    require("nnsight")
    import nnsight

    if isinstance(model_or_ref, (str, Path, ModelRef)):
        ref = model_or_ref if isinstance(model_or_ref, ModelRef) else resolve(str(model_or_ref), cache_dir)
        if ref.kind == "folded":
            return nnsight.NNsight(load(ref, cache_dir)[0].eval())
    elif isinstance(model_or_ref, nn.Module) and _is_folded(model_or_ref):
        return nnsight.NNsight(model_or_ref.eval())
    model, tok = stock_model(model_or_ref, tokenizer, cache_dir)
    if tok is None:
        raise BridgeError("nnsight's TransformersModel needs the tokenizer: pass tokenizer=")
    return nnsight.TransformersModel(model, task="text-generation", tokenizer=tok)
