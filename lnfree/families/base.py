"""What a model family must tell lnfree, and the removable-model behaviour every family shares.

A *family* adapter (one file per family: gpt2.py, llama.py, neox.py) names, for Hugging Face's class of that
family: its blocks, the norm of each site kind, the modules that read the attention-input norm (and which of
their output columns are values), the final norm, and how its stock HF form and its folded (norm-free) form are
built. Everything else (sites, removal, statistics, calibration, export checks) is written once, here and in
lnfree/model.py, against this interface.

Site kinds, in removal order (docs/method.md, 'Norm sites'; docs/families.md):
    pre_mlp  the MLP-input norm            (GPT-2 ln_2, Llama post_attention_layernorm, NeoX post_attention_layernorm)
    attn_qk  the attention-input norm, as read by the queries and keys
    attn_v   the attention-input norm, as read by the values        (GPT-2 ln_1, Llama/NeoX input_layernorm)
    final    the final norm                 (GPT-2 ln_f, Llama model.norm, NeoX final_layer_norm)
GPT-2 names its sites by its module names (ln2, ln1qk, ln1v, lnf), which stay aliases of the generic kinds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UserError
from ..norm import BOS, EOT, IGNORED, ORDINARY, NormSite, RemovableLayerNorm, SplitLayerNorm, TokenContext, recording

KINDS = ("pre_mlp", "attn_qk", "attn_v", "final")  # generic site kinds, in schedule order
GPT2_ALIASES = {"ln2": "pre_mlp", "ln1qk": "attn_qk", "ln1v": "attn_v", "lnf": "final"}


def canonical_kind(kind: str) -> str:
    """'ln1qk' -> 'attn_qk'; a generic kind is returned as is; anything else is a KeyError."""
    kind = GPT2_ALIASES.get(kind, kind)
    if kind not in KINDS:
        raise KeyError(f"unknown site kind {kind!r}; kinds are {KINDS} (GPT-2 aliases {tuple(GPT2_ALIASES)})")
    return kind


class UnsupportedFamily(UserError):
    pass


@dataclass(frozen=True)
class Dims:
    """A config's shape under one set of names, whatever the family calls them."""

    n_layer: int
    d_model: int
    n_head: int
    n_ctx: int
    eps: float


class Family:
    """The adapter interface. Subclasses set the class attributes and implement the methods below."""

    name: str  # e.g. "llama"
    model_types: tuple[str, ...]  # config.model_type values it covers
    centre: bool  # LayerNorm (centre + beta) or RMSNorm (scale only)
    eps_field: str  # the config field holding every norm's eps (the stock export's eps trick sets it)
    site_names = dict(zip(KINDS, KINDS))  # generic kind -> the prefix of its site names
    # the config fields of (layers, width, heads, context length, vocabulary), in this order: dims() reads them,
    # and a resumed checkpoint must agree on them (besides model_type)
    shape_fields = ("num_hidden_layers", "hidden_size", "num_attention_heads", "max_position_embeddings", "vocab_size")
    # the input embeddings' parameter names (tokens, and learned positions where there are any), as
    # model.named_parameters() gives them: what optim.decay_embeddings=false keeps out of weight decay
    embedding_names: tuple[str, ...] = ()
    lora_targets: tuple[str, ...] = ()
    block_class: str = ""  # the HF class name of a block (FSDP shards each)

    # -- config --------------------------------------------------------------------------------------------
    def check(self, config) -> None:
        """Refuse a config of this model_type that uses options the adapter does not cover."""

    def dims(self, config) -> Dims:
        n_layer, d_model, n_head, n_ctx, _ = (getattr(config, f) for f in self.shape_fields)
        return Dims(n_layer, d_model, n_head, n_ctx, getattr(config, self.eps_field))

    @property
    def ctx_field(self) -> str:
        """The config field of the context length (for messages that name what to change)."""
        return self.shape_fields[3]

    def dropout_fields(self) -> tuple[str, ...]:
        raise NotImplementedError

    # -- modules ---------------------------------------------------------------------------------------------
    def stock_class(self, config):
        raise NotImplementedError

    def removable_class(self, config):
        raise NotImplementedError

    def blocks(self, model) -> list[nn.Module]:
        raise NotImplementedError

    def attn_norm(self, block) -> SplitLayerNorm:
        raise NotImplementedError

    def mlp_norm(self, block) -> RemovableLayerNorm:
        raise NotImplementedError

    def final_norm(self, model) -> RemovableLayerNorm:
        raise NotImplementedError

    # -- what interpretability reads (lnfree.analysis.interp.dla); stock and removable models alike -------------
    def embed(self, model, ids: torch.Tensor) -> torch.Tensor:
        """The residual stream's first term [batch, pos, d] (token + learned position embeddings)."""
        raise NotImplementedError

    def attn_out(self, block) -> tuple[nn.Module, torch.Tensor]:
        """The attention output projection and its weight as [d_in = heads x d_head, d_out]."""
        raise NotImplementedError

    def mlp(self, block) -> nn.Module:
        raise NotImplementedError

    def mlp_out(self, block) -> tuple[nn.Module, torch.Tensor]:
        """The MLP output projection (its input: one activation per neuron) and its weight as [d_mlp, d_out]."""
        raise NotImplementedError

    def install(self, model, ctx: TokenContext) -> None:
        """Swap the stock norms (and the attention-input readers) for removable ones, in place."""
        raise NotImplementedError

    def embedding_params(self, model) -> int:
        raise NotImplementedError

    # -- exports ----------------------------------------------------------------------------------------------
    def stock_config(self, config: dict) -> dict:
        """The stock LN-free export's config (a config dict): where the eps trick needs parameters the model lacks
        (GPT-NeoX without attention biases), the options that add them; stock_state_dict fills them."""
        return config

    def stock_state_dict(self, model, sd: dict, scale: float) -> None:
        """The eps trick, in place on a float64 copy of the state dict: each norm's weight * scale / sigma, and the
        attention-input readers' query/key rows rescaled by sigma_v / sigma_qk (exact)."""
        raise NotImplementedError

    def fold(self, model):
        """The norm-free model (float64) of an all-removed model."""
        raise NotImplementedError


def sigma(site: NormSite) -> torch.Tensor:
    return site.sigma[ORDINARY].double()


class RemovableMixin:
    """Sites, removal, statistics and calibration of a removable model; mixed in before the HF class."""

    family: Family

    def _setup_removable(self):
        # transformers 5 maps no loss to some class names and warns at every call with labels=; this is the loss
        self.loss_type = "ForCausalLM"
        self.token_context = TokenContext()
        self.family.install(self, self.token_context)

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
    def site_name(self, kind: str, block: int | None = None) -> str:
        """The name of a site in this family: site_name('attn_qk', 3) is 'ln1qk.3' for GPT-2, 'attn_qk.3' else.
        A kind may be generic or a GPT-2 alias in every family."""
        try:
            generic = canonical_kind(kind)
        except KeyError:
            generic = None
        if generic is None or (generic != "final" and block is None):
            raise KeyError(f"unknown site kind {kind!r} / block {block!r}; kinds are {KINDS} "
                           f"(GPT-2 aliases {tuple(GPT2_ALIASES)})")
        prefix = self.family.site_names[generic]
        return prefix if generic == "final" else f"{prefix}.{block}"

    def sites(self) -> dict[str, NormSite]:
        """Every site by name, in removal order: pre_mlp.*, attn_qk.*, attn_v.*, final."""
        f, n = self.family, self.family.site_names
        blocks = f.blocks(self)
        out = {f"{n['pre_mlp']}.{i}": f.mlp_norm(b).site for i, b in enumerate(blocks)}
        out |= {f"{n['attn_qk']}.{i}": f.attn_norm(b).qk for i, b in enumerate(blocks)}
        out |= {f"{n['attn_v']}.{i}": f.attn_norm(b).v for i, b in enumerate(blocks)}
        out[n["final"]] = f.final_norm(self).site
        return out

    def site(self, kind: str, block: int | None = None) -> NormSite:
        name = self.site_name(kind, block)
        sites = self.sites()
        if name not in sites:
            names = tuple(self.family.site_names.values())
            raise KeyError(f"no site {name!r}; sites are {names} x blocks 0..{len(self.family.blocks(self)) - 1}")
        return sites[name]

    def remove(self, kind: str, block: int | None = None) -> float:
        """Freeze a site to its current std estimate; returns the frozen sigma. A non-finite or non-positive
        estimate is refused (FloatingPointError naming the site) and leaves the site real."""
        return self._set_sigma(kind, block, ramp=False)

    def start_ramp(self, kind: str, block: int | None = None) -> float:
        """Soft removal (schedule.ramp): freeze the site's sigma as `remove` would, but keep the site real until its
        ramp ends (NormSite.start_ramp; the removal callback sets alpha and ends the ramp). Returns the sigma."""
        return self._set_sigma(kind, block, ramp=True)

    def _set_sigma(self, kind: str, block: int | None, ramp: bool) -> float:
        site = self.site(kind, block)
        try:
            return (site.start_ramp if ramp else site.freeze)(
                special_bos=getattr(self.config, "lnfree_special_bos", False),
                special_eot=getattr(self.config, "lnfree_special_eot", False),
            )
        except FloatingPointError as e:
            raise FloatingPointError(f"site {self.site_name(kind, block)}: {e}") from None

    def end_special(self, kind: str, block: int):
        """`bos`/`eot` event for stage `block` (0..L-1 the blocks, L the final norm)."""
        which = {"bos": BOS, "eot": EOT}[kind]
        n_layer = len(self.family.blocks(self))
        kinds = ["final"] if block == n_layer else ["pre_mlp", "attn_qk", "attn_v"]
        for k in kinds:
            self.site(k, None if k == "final" else block).end_special(which)

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
        """Initialise every real site's estimate from one batch (replaces per-model lookup tables). Always in eval
        mode (no dropout: the estimate is what the model computes at inference), the model's mode restored after."""
        was_training = self.training
        self.eval()
        try:
            with recording(self.token_context):
                self(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        finally:
            self.train(was_training)
        self.commit_norm_stats(momentum=0.0)
