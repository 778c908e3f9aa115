"""The removable-norm GPT-2: a GPT2LMHeadModel whose every norm path can be frozen to a constant scale.

Sites, in removal order (docs/method.md, 'Norm sites'): for each block i `ln2.i` (MLP input), `ln1qk.i` (attention
input, query/key path), `ln1v.i` (attention input, value path), then `lnf`. The class subclasses Hugging
Face's GPT2LMHeadModel and only swaps modules (ln_1, ln_2, ln_f and c_attn), so generation, KV cache,
attention masks, SDPA/eager attention, gradient checkpointing and output_hidden_states are Hugging Face's own.
This file holds no training code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from transformers import GPT2Config, GPT2LMHeadModel, PretrainedConfig

from .norm import (
    BOS,
    EOT,
    IGNORED,
    ORDINARY,
    NormSite,
    RemovableLayerNorm,
    SplitLayerNorm,
    SplitQKVProjection,
    TokenContext,
    recording,
)

# Removal kinds in schedule order; `lnf` is a single event, the others one per block.
NORM_KINDS = ("ln2", "ln1qk", "ln1v", "lnf")
SPECIAL_KINDS = ("eot", "bos")  # optional: end the special sigma of end-of-text tokens / position 0
LNFREE_FILE = "lnfree.json"


def check_gpt2_config(config: PretrainedConfig):
    if getattr(config, "model_type", None) != "gpt2":
        raise ValueError(
            f"lnfree removes the norms of GPT-2-architecture models only; got model_type="
            f"{getattr(config, 'model_type', None)!r} ({type(config).__name__})"
        )
    if getattr(config, "add_cross_attention", False):
        raise ValueError("GPT-2 with cross-attention is not supported")


class RemovableGPT2LMHeadModel(GPT2LMHeadModel):
    """GPT-2 with removable norms. Extra config fields (saved with the model):
    lnfree_special_bos / lnfree_special_eot: give position 0 / end-of-text tokens their own frozen sigma
    until a `bos` / `eot` event (default False, as in the published runs).
    """

    def __init__(self, config: GPT2Config):
        check_gpt2_config(config)
        super().__init__(config)
        # transformers 5 maps no loss to GPT-2's class name and warns at every call with labels= (stock GPT-2 too);
        # the loss it then falls back to is this one
        self.loss_type = "ForCausalLM"
        self.token_context = TokenContext()
        d, eps, ctx = config.n_embd, config.layer_norm_epsilon, self.token_context
        for block in self.transformer.h:
            block.ln_1 = SplitLayerNorm(d, eps, ctx)
            block.attn.c_attn = SplitQKVProjection(d, block.ln_1)
            block.ln_2 = RemovableLayerNorm(d, eps, ctx)
        self.transformer.ln_f = RemovableLayerNorm(d, eps, ctx)
        self.post_init()

    # -- forward: only adds the token categories the sites need, then defers to Hugging Face --------
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        self.token_context.category = self._token_categories(input_ids, attention_mask, position_ids, kwargs)
        return super().forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs
        )

    def _token_categories(self, input_ids, attention_mask, position_ids, kwargs):
        bos = getattr(self.config, "lnfree_special_bos", False)
        eot = getattr(self.config, "lnfree_special_eot", False)
        if attention_mask is None and not (bos or eot):
            return None  # fast path: every token ordinary
        ref = input_ids if input_ids is not None else kwargs["inputs_embeds"][..., 0]
        n_new = ref.shape[1]
        cat = torch.full(ref.shape, ORDINARY, dtype=torch.long, device=ref.device)
        if bos:
            if position_ids is None:
                cache = kwargs.get("cache", kwargs.get("past_key_values"))
                past = cache.get_seq_length() if cache is not None else 0
                position_ids = torch.arange(past, past + n_new, device=ref.device).unsqueeze(0)
            cat = torch.where(position_ids == 0, BOS, cat)
        if eot and input_ids is not None:
            cat = torch.where(input_ids == self.config.eos_token_id, EOT, cat)
        if attention_mask is not None and attention_mask.ndim == 2:
            cat = torch.where(attention_mask[:, -n_new:] == 0, IGNORED, cat)
        return cat

    # -- sites -----------------------------------------------------------------------------------------
    def sites(self) -> dict[str, NormSite]:
        """Every site by name, in removal order: ln2.0 .. ln2.L-1, ln1qk.*, ln1v.*, lnf."""
        h = self.transformer.h
        out = {f"ln2.{i}": b.ln_2.site for i, b in enumerate(h)}
        out |= {f"ln1qk.{i}": b.ln_1.qk for i, b in enumerate(h)}
        out |= {f"ln1v.{i}": b.ln_1.v for i, b in enumerate(h)}
        out["lnf"] = self.transformer.ln_f.site
        return out

    def site(self, kind: str, block: int | None = None) -> NormSite:
        name = site_name(kind, block)
        sites = self.sites()
        if name not in sites:
            raise KeyError(f"no site {name!r}; sites are {NORM_KINDS} x blocks 0..{self.config.n_layer - 1}")
        return sites[name]

    def remove(self, kind: str, block: int | None = None) -> float:
        """Freeze a site to its current std estimate; returns the frozen sigma. A non-finite or non-positive
        estimate is refused (FloatingPointError naming the site) and leaves the site real."""
        try:
            return self.site(kind, block).freeze(
                special_bos=getattr(self.config, "lnfree_special_bos", False),
                special_eot=getattr(self.config, "lnfree_special_eot", False),
            )
        except FloatingPointError as e:
            raise FloatingPointError(f"site {site_name(kind, block)}: {e}") from None

    def end_special(self, kind: str, block: int):
        """`bos`/`eot` event for stage `block` (0..L-1 the blocks, L the final norm)."""
        which = {"bos": BOS, "eot": EOT}[kind]
        names = ["lnf"] if block == self.config.n_layer else [f"{k}.{block}" for k in ("ln2", "ln1qk", "ln1v")]
        for name in names:
            self.sites()[name].end_special(which)

    def removed_sites(self) -> list[str]:
        return [name for name, s in self.sites().items() if s.is_removed]

    def real_sites(self) -> list[str]:
        return [name for name, s in self.sites().items() if not s.is_removed]

    def sigmas(self) -> dict[str, float | None]:
        """Frozen ordinary sigma per site (None while real). One host sync: not for the hot path."""
        return {name: (float(s.sigma[ORDINARY]) if s.is_removed else None) for name, s in self.sites().items()}

    # -- statistics --------------------------------------------------------------------------------
    @torch.no_grad()
    def commit_norm_stats(self, momentum: float, all_reduce=None):
        """Once per optimizer step: fold the step's accumulated stds into every running estimate.

        all_reduce: optional callable summing a tensor across ranks in place (multi-GPU), so that every
        rank keeps the same estimate and freezes the same sigma. One collective for all sites.
        """
        sites = list(self.sites().values())
        acc = torch.stack([s.acc for s in sites])  # [n_sites, 2, 4]
        if all_reduce is not None:
            all_reduce(acc)
        for site, a in zip(sites, acc):
            site.commit(a, momentum)

    @torch.no_grad()
    def calibrate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """Initialise every real site's estimate from one batch (replaces per-model lookup tables)."""
        with recording(self.token_context):
            self(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        self.commit_norm_stats(momentum=0.0)


def next_token_ce(logits: torch.Tensor, ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """CE of predicting ids[:, 1:] from logits[:, :-1]; end-of-text tokens are ordinary targets. The training
    loss, and the CE every evaluation reports."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(),
                                             reduction=reduction)


def parse_site_name(name: str) -> tuple[str, int | None]:
    """'ln1qk.3' -> ('ln1qk', 3); 'lnf' -> ('lnf', None). The inverse of site_name."""
    kind, _, block = name.partition(".")
    return kind, (int(block) if block else None)


def non_embedding_params(model) -> int:
    """Parameters outside the token and position embeddings (wte is tied to the unembedding in GPT-2)."""
    t = model.transformer
    return sum(p.numel() for p in model.parameters()) - t.wte.weight.numel() - t.wpe.weight.numel()


def site_name(kind: str, block: int | None = None) -> str:
    if kind == "lnf":
        return "lnf"
    if kind not in NORM_KINDS or block is None:
        raise KeyError(f"unknown site kind {kind!r} / block {block!r}; kinds are {NORM_KINDS}")
    return f"{kind}.{block}"


# -- construction, save, load --------------------------------------------------------------------------
def make_removable(source, **config_overrides) -> RemovableGPT2LMHeadModel:
    """A removable model (all sites real) from a GPT2LMHeadModel or a GPT2Config (random init). A path or hub
    name is a model reference: `lnfree.load(reference, removable=True)` checks it, then comes here."""
    if isinstance(source, (str, Path)):
        raise TypeError(f"make_removable takes a GPT2LMHeadModel or a GPT2Config, not the reference {str(source)!r}: "
                        "load it with lnfree.load(reference, removable=True), which checks it first")
    if isinstance(source, PretrainedConfig):
        check_gpt2_config(source)
        cfg = GPT2Config.from_dict({**source.to_dict(), **config_overrides})
        cfg._attn_implementation = source._attn_implementation or "sdpa"
        return RemovableGPT2LMHeadModel(cfg)
    if not isinstance(source, GPT2LMHeadModel):
        raise TypeError(f"cannot make a removable GPT-2 from {type(source).__name__}")
    cfg = GPT2Config.from_dict({**source.config.to_dict(), **config_overrides})
    cfg._attn_implementation = source.config._attn_implementation
    model = RemovableGPT2LMHeadModel(cfg).to(dtype=source.dtype)
    missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)
    site_buffers = {"removed", "running", "sigma", "special"}
    bad = [k for k in missing if k.rsplit(".", 1)[-1] not in site_buffers]
    if bad or unexpected:
        raise RuntimeError(f"weights do not match a GPT-2 layout: missing {bad}, unexpected {unexpected}")
    return model.to(source.device)


def save_removable(model: RemovableGPT2LMHeadModel, out_dir: str | Path, tokenizer=None):
    """Weights plus every mode and sigma (safetensors), the HF config, and a human-readable site table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out)
    save_model(model, str(out / "removable.safetensors"))
    (out / LNFREE_FILE).write_text(json.dumps({"sigmas": model.sigmas()}, indent=1))
    if tokenizer is not None:
        tokenizer.save_pretrained(out)


def load_removable(path: str | Path, device="cpu") -> RemovableGPT2LMHeadModel:
    config = GPT2Config.from_pretrained(path)
    model = RemovableGPT2LMHeadModel(config)
    # load_model goes through load_state_dict (copying into the CPU model), which refreshes every site's mode mirror
    load_model(model, str(Path(path) / "removable.safetensors"))
    return model.to(device)
