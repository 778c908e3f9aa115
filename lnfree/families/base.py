"""What a model family must tell lnfree, and the removable-model behaviour every family shares.

A *family* adapter (one file per family: gpt2.py, llama.py, neox.py) declares, for Hugging Face's class of that
family: its blocks, the norm of each site kind, the modules that read each norm (and which output rows of the
attention-input readers are values), the final norm, the weight layout, the embeddings, the eps and context-length
fields. Everything else (installing the removable norms, sites, removal, statistics, calibration, the exports' eps
trick and fold) is written once, here and in lnfree/model.py, against these declarations.

Site kinds, in removal order (docs/method.md, 'Norm sites'; docs/families.md):
    pre_mlp  the MLP-input norm            (GPT-2 ln_2, Llama post_attention_layernorm, NeoX post_attention_layernorm)
    attn_qk  the attention-input norm, as read by the queries and keys
    attn_v   the attention-input norm, as read by the values        (GPT-2 ln_1, Llama/NeoX input_layernorm)
    final    the final norm                 (GPT-2 ln_f, Llama model.norm, NeoX final_layer_norm)
A family names its sites after the kinds (Family.site_names): GPT-2 after its modules (ln2.i, ln1qk.i, ln1v.i, lnf),
the others by the kinds themselves (pre_mlp.i, ..., final). Schedules and events name the kinds, never a family's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UserError
from ..norm import (
    BOS,
    EOT,
    IGNORED,
    ORDINARY,
    NormSite,
    RemovableLayerNorm,
    SplitInputLinear,
    SplitLayerNorm,
    TokenContext,
    recording,
)

NORM_KINDS = ("pre_mlp", "attn_qk", "attn_v", "final")  # the site kinds of every family, in removal order


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
    """The adapter interface: a subclass declares its HF class's names (the attributes below) and implements
    dropout_fields, stock_class, removable_class and value_rows; everything else is written once, here."""

    name: str  # e.g. "llama"
    model_types: tuple[str, ...]  # config.model_type values it covers
    centre: bool  # LayerNorm (centre + beta) or RMSNorm (scale only)
    eps_field: str  # the config field holding every norm's eps (the stock export's eps trick sets it)
    site_names = dict(zip(NORM_KINDS, NORM_KINDS))  # norm kind -> the prefix of its sites' names
    # the config fields of (layers, width, heads, context length, vocabulary), in this order: dims() reads them,
    # and a resumed checkpoint must agree on them (besides model_type)
    shape_fields = ("num_hidden_layers", "hidden_size", "num_attention_heads", "max_position_embeddings", "vocab_size")
    # the input embeddings' parameter names (tokens, then learned positions where there are any), as
    # model.named_parameters() gives them: what optim.decay_embeddings=false keeps out of weight decay
    embedding_names: tuple[str, ...] = ()
    lora_targets: tuple[str, ...] = ()
    block_class: str = ""  # the HF class name of a block (FSDP shards each)
    # module paths: of the block list and the final norm in the model; of the rest inside a block
    blocks_path: str
    final_norm_path: str
    attn_norm_name: str
    mlp_norm_name: str
    attn_readers: tuple[str, ...]  # the linear layers that read the attention-input norm (queries, keys, values)
    mlp_readers: tuple[str, ...]  # the linear layers that read the MLP-input norm
    mlp_name: str = "mlp"
    attn_out_name: str  # the attention output projection
    mlp_out_name: str  # the MLP output projection
    unembedding = "lm_head"  # reads the final norm; an nn.Linear in every family
    conv1d = False  # the blocks' linear layers store their weight [in, out] (GPT-2's Conv1D), not nn.Linear's [out, in]

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

    # -- site names ------------------------------------------------------------------------------------------
    def norm_kind(self, kind: str) -> str:
        """The norm kind (NORM_KINDS) that `kind` names: a norm kind itself, or the prefix of this family's site names
        for one (GPT-2: ln2 -> pre_mlp), so that a site's name, parsed (lnfree.model.parse_site_name), names the site
        again; KeyError for anything else."""
        if kind in NORM_KINDS:
            return kind
        by_prefix = {prefix: k for k, prefix in self.site_names.items()}
        if kind not in by_prefix:
            named = "" if tuple(by_prefix) == NORM_KINDS else f" ({self.name} names their sites {tuple(by_prefix)})"
            raise KeyError(f"unknown site kind {kind!r}; kinds are {NORM_KINDS}{named}")
        return by_prefix[kind]

    def site_name(self, kind: str, block: int | None = None) -> str:
        """The name of a site in this family: site_name('attn_qk', 3) is 'ln1qk.3' for GPT-2, 'attn_qk.3' for the
        others; the final norm's is 'lnf' / 'final' (no block). `kind` as norm_kind takes it."""
        generic = self.norm_kind(kind)
        if generic != "final" and block is None:
            raise KeyError(f"site kind {kind!r} needs a block")
        prefix = self.site_names[generic]
        return prefix if generic == "final" else f"{prefix}.{block}"

    def value_rows(self, config, reader: str, n_out: int) -> torch.Tensor:
        """[n_out] bool: which output rows of the attention-input reader `reader` (a name in attn_readers) are
        values; the others are queries and keys."""
        raise NotImplementedError

    # -- modules ---------------------------------------------------------------------------------------------
    def stock_class(self, config):
        raise NotImplementedError

    def removable_class(self, config):
        raise NotImplementedError

    def blocks(self, model) -> list[nn.Module]:
        return list(model.get_submodule(self.blocks_path))

    def attn_norm(self, block) -> SplitLayerNorm:
        return block.get_submodule(self.attn_norm_name)

    def mlp_norm(self, block) -> RemovableLayerNorm:
        return block.get_submodule(self.mlp_norm_name)

    def final_norm(self, model) -> RemovableLayerNorm:
        return model.get_submodule(self.final_norm_path)

    def install(self, model, ctx: TokenContext) -> None:
        """Swap the stock norms (and the attention-input readers) for removable ones, in place."""
        dims = self.dims(model.config)
        d, eps = dims.d_model, dims.eps
        for block in self.blocks(model):
            ln = SplitLayerNorm(d, eps, ctx, centre=self.centre)
            set_submodule(block, self.attn_norm_name, ln)
            for name in self.attn_readers:
                set_submodule(block, name, self.split_reader(block.get_submodule(name), ln, name, model.config))
            set_submodule(block, self.mlp_norm_name, RemovableLayerNorm(d, eps, ctx, centre=self.centre))
        set_submodule(model, self.final_norm_path, RemovableLayerNorm(d, eps, ctx, centre=self.centre))

    def split_reader(self, linear: nn.Module, ln: SplitLayerNorm, name: str, config) -> nn.Module:
        """The attention-input reader `linear` made to accept SplitLayerNorm's split output."""
        return SplitInputLinear(linear, ln, self.value_rows(config, name, linear.out_features))

    def embedding_params(self, model) -> int:
        """The input embeddings' parameters, and the unembedding's where it is not tied to them."""
        n = sum(model.get_parameter(name).numel() for name in self.embedding_names)
        return n if model.config.tie_word_embeddings else n + model.get_output_embeddings().weight.numel()

    # -- what interpretability reads (lnfree.analysis.interp.dla); stock and removable models alike -------------
    def embed(self, model, ids: torch.Tensor) -> torch.Tensor:
        """The residual stream's first term [batch, pos, d]: the token embedding, plus the learned position
        embedding where the family has one (rotary positions add nothing to the residual)."""
        tokens, *positions = (model.get_submodule(name.removesuffix(".weight")) for name in self.embedding_names)
        x = tokens(ids)
        for pos in positions:
            x = x + pos(torch.arange(ids.shape[1], device=ids.device))
        return x

    def attn_out(self, block) -> tuple[nn.Module, torch.Tensor]:
        """The attention output projection and its weight as [d_in = heads x d_head, d_out]."""
        proj = block.get_submodule(self.attn_out_name)
        return proj, proj.weight if self.conv1d else proj.weight.T

    def mlp(self, block) -> nn.Module:
        return block.get_submodule(self.mlp_name)

    def mlp_out(self, block) -> tuple[nn.Module, torch.Tensor]:
        """The MLP output projection (its input: one activation per neuron) and its weight as [d_mlp, d_out]."""
        proj = block.get_submodule(self.mlp_out_name)
        return proj, proj.weight if self.conv1d else proj.weight.T

    # -- exports: the eps trick and the fold, each written once for every family --------------------------------
    def stock_config(self, config: dict) -> dict:
        """The stock LN-free export's config (a config dict): where the eps trick needs parameters the model lacks
        (GPT-NeoX without attention biases), the options that add them (lnfree.export starts them at zero)."""
        return config

    def linear_weight(self, sd: dict, name: str) -> torch.Tensor:
        """The weight of the linear layer `name` (a state-dict prefix) in sd as [out, in]: a view, edits land in sd."""
        w = sd[name + ".weight"]
        return w.T if self.conv1d and name != self.unembedding else w

    def stock_state_dict(self, model, sd: dict, scale: float) -> None:
        """The eps trick, in place on a float64 copy of the stock form's state dict: each norm's weight * scale /
        sigma, and the attention-input readers' query/key rows rescaled by sigma_v / sigma_qk (exact)."""
        for i, block in enumerate(self.blocks(model)):
            p, ln = f"{self.blocks_path}.{i}.", self.attn_norm(block)
            s_qk, s_v = sigma(ln.qk), sigma(ln.v)
            sd[p + self.attn_norm_name + ".weight"] *= scale / s_v
            # the one norm now divides by s_v: the query/key rows of its readers take r = s_v / s_qk, and (with a
            # beta) their bias the beta term:  (x_v-form) W_qk^T r + b' == (x_qk-form) W_qk^T + b   exactly
            r = s_v / s_qk
            for name in self.attn_readers:
                w = self.linear_weight(sd, p + name)
                qk = ~self.value_rows(model.config, name, w.shape[0])
                if self.centre:
                    sd[p + name + ".bias"][qk] += (1 - r) * (w @ sd[p + self.attn_norm_name + ".bias"])[qk]
                w[qk] *= r
            sd[p + self.mlp_norm_name + ".weight"] *= scale / sigma(self.mlp_norm(block).site)
        sd[self.final_norm_path + ".weight"] *= scale / sigma(self.final_norm(model).site)

    @torch.no_grad()
    def fold_state_dict(self, model) -> dict[str, torch.Tensor]:
        """The model's state dict in float64 with every norm folded into the layers that read it (fold_reader);
        the attention-input readers' query/key rows take sigma_qk, their value rows sigma_v."""
        sd = {k: v.double() for k, v in model.state_dict().items()}
        sd[self.unembedding + ".weight"] = model.get_output_embeddings().weight.double()  # untied from here on
        for i, block in enumerate(self.blocks(model)):
            p, ln = f"{self.blocks_path}.{i}.", self.attn_norm(block)
            for name in self.attn_readers:
                v_rows = self.value_rows(model.config, name, self.linear_weight(sd, p + name).shape[0])
                self.fold_reader(sd, p + name, ln, torch.where(v_rows, sigma(ln.v), sigma(ln.qk)))
            for name in self.mlp_readers:
                self.fold_reader(sd, p + name, self.mlp_norm(block), sigma(self.mlp_norm(block).site))
        self.fold_reader(sd, self.unembedding, self.final_norm(model), sigma(self.final_norm(model).site))
        return sd

    def fold_reader(self, sd: dict, name: str, norm, sig: torch.Tensor) -> None:
        """Fold the frozen norm (x - mean) / sig * gamma + beta (RMSNorm: x / sig * gamma) into the linear layer
        `name` that reads it, x_hat W^T + b, in sd (new tensors; sig a scalar or one per output row):
            W' = W diag(gamma) / sig  P   (P = I - 11^T/d, the centring projector; none for RMSNorm)
            b' = b + W beta               (RMSNorm: b unchanged)"""
        w = self.linear_weight(sd, name)
        gamma = norm.weight.double()
        wg = w * (gamma[None, :] / sig[:, None] if sig.ndim else gamma / sig)
        if self.centre:
            sd[name + ".bias"] = w @ norm.bias.double() + sd.get(name + ".bias", 0)
            wg = wg - wg.mean(1, keepdim=True)
        sd[name + ".weight"] = wg.T if self.conv1d and name != self.unembedding else wg

    def folded_model(self, config):
        """The family's HF class with every norm an identity and an untied unembedding (with a bias where the norms
        have a beta: the final norm's lands there), as lnfree.folded saves and loads it."""
        cfg = config.__class__.from_dict(self.stock_config({**config.to_dict(), "tie_word_embeddings": False}))
        cfg._attn_implementation = config._attn_implementation or "sdpa"
        model = self.stock_class(cfg)(cfg)
        for block in self.blocks(model):
            set_submodule(block, self.attn_norm_name, nn.Identity())
            set_submodule(block, self.mlp_norm_name, nn.Identity())
        set_submodule(model, self.final_norm_path, nn.Identity())
        if self.centre:
            dims = self.dims(cfg)
            set_submodule(model, self.unembedding, nn.Linear(dims.d_model, cfg.vocab_size, bias=True))
        return model

    @torch.no_grad()
    def fold(self, model):
        """The norm-free model (float64) of an all-removed model. Parameters the folded form has and the model
        lacks (the attention biases stock_config adds) are zero."""
        folded = self.folded_model(model.config).double()
        sd = self.fold_state_dict(model)
        folded.load_state_dict({k: sd[k] if k in sd else torch.zeros_like(v) for k, v in folded.state_dict().items()})
        return folded


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """root.<path> = module, for a dotted path."""
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


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
        """The name of a site: site_name('attn_qk', 3) is 'ln1qk.3' for GPT-2, 'attn_qk.3' else (Family.site_name)."""
        return self.family.site_name(kind, block)

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
