"""Norms whose per-token scale can be swapped for a frozen scalar, one path at a time.

A LayerNorm is  LN(x) = (x - mean(x)) / sqrt(var(x) + eps) * gamma + beta;  an RMSNorm (Llama) is
RMS(x) = x / sqrt(mean(x^2) + eps) * gamma: no centring, no beta. One class covers both (`centre`): only the
division by the per-token std (the rms for RMSNorm) is non-linear. A *site* (one normalisation path) is either
real, or "removed": it divides by a constant sigma that was frozen from a running estimate of the mean per-token
std at the moment of removal.

Design notes (why, not what):
- All state lives in buffers (mode, running estimate, frozen sigma) so it round-trips through state_dict.
  The mode is mirrored in a Python bool so that forward can branch without a host sync; the mirror is
  refreshed whenever a state dict is loaded.
- Statistics are *accumulated* (sum and count, on device) during training forwards and folded into the
  running estimate once per optimizer step by `commit()`. Accumulating a mean instead of updating an EMA in
  forward makes gradient-checkpoint recomputation and gradient accumulation harmless (a recompute adds the
  same value to both sum and count), avoids `.item()`, and gives one place to average across ranks.
- Sigma buffers are kept in fp32 whatever dtype the module is cast to.
- Optional special sigmas (off by default) for position 0 ("bos") and end-of-text tokens ("eot"): a
  per-token category picks which frozen scalar a token is divided by, until a later event ends it.
- Optional soft removal (schedule.ramp, off by default): a site can be *ramping* between real and removed: its
  sigma is frozen (finite) but it is not removed yet, and it divides by (1 - alpha) * std(x) + alpha * sigma.
  "Ramping" is read from the persistent buffers (sigma finite, removed false), so checkpoints need no new key;
  alpha itself is a non-persistent buffer that the removal callback sets every step from the step count, and a
  ramp always ends hard-removed, so exports only ever see real or removed sites.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Token categories for the statistics and the special sigmas. IGNORED marks padding.
ORDINARY, BOS, EOT, IGNORED = 0, 1, 2, 3
N_SIGMAS = 3  # ordinary, bos, eot


@dataclass
class TokenContext:
    """Per-forward token information shared by every site of one model (set by the model's forward).

    category: [batch, pos] long tensor of ORDINARY/BOS/EOT/IGNORED, or None when every token is ordinary
    (no padding mask and no special sigma enabled), which is the fast path used in training.
    """

    category: torch.Tensor | None = None
    record: bool = False  # force statistics recording (calibration), even in eval / no-grad


class NormSite(nn.Module):
    """State of one normalisation path (e.g. the query/key path of block 3's ln_1)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("removed", torch.zeros((), dtype=torch.bool))
        # running estimate of the mean per-token std; NaN = no estimate yet
        self.register_buffer("running", torch.full((N_SIGMAS,), float("nan")))
        # frozen sigma at removal [ordinary, bos, eot]; NaN while real
        self.register_buffer("sigma", torch.full((N_SIGMAS,), float("nan")))
        # whether the bos / eot tokens still use their own frozen sigma
        self.register_buffer("special", torch.zeros(2, dtype=torch.bool))
        # per-step accumulators [sum, count] x category (incl. IGNORED); transient, not checkpointed:
        # checkpoints are written at optimizer-step boundaries, right after commit() emptied them
        self.register_buffer("acc", torch.zeros(2, 4), persistent=False)
        # soft removal: weight of the frozen sigma in the divisor while ramping; set by the callback every step
        self.register_buffer("alpha", torch.zeros(()), persistent=False)
        self._refresh_mirror()

    # -- mode mirror (Python bools, so forward never syncs) ---------------------------------------
    def _refresh_mirror(self):
        self.is_removed = bool(self.removed)
        self.is_ramping = not self.is_removed and not bool(self.sigma[0].isnan())
        self.special_active = bool(self.special.any())

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._refresh_mirror()

    def _apply(self, fn, recurse=True):
        # keep sigma state in fp32 under .to(bfloat16) / .half(): sigmas are the method's only constants
        fp32 = {name: getattr(self, name) for name in ("running", "sigma", "acc", "alpha")}
        super()._apply(fn, recurse)
        for name, old in fp32.items():  # follow the device move, undo any dtype cast
            setattr(self, name, old.to(device=getattr(self, name).device, dtype=torch.float32))
        return self

    # -- statistics ----------------------------------------------------------------------------------
    def record(self, std: torch.Tensor, category: torch.Tensor | None):
        """Add per-token stds [batch, pos] (detached) to the step accumulators; no host sync."""
        std = std.detach().float()
        if category is None:
            self.acc[0, ORDINARY] += std.sum()
            self.acc[1, ORDINARY] += std.numel()
        else:
            cat = category.reshape(-1)
            self.acc[0].index_add_(0, cat, std.reshape(-1))
            self.acc[1].index_add_(0, cat, torch.ones_like(std.reshape(-1)))

    @torch.no_grad()
    def commit(self, acc: torch.Tensor, momentum: float):
        """Fold one step's accumulated (sum, count) into the running estimate (EMA), on device. Momentum 1 keeps
        the estimate at its calibration (an overflowing step then cannot move it: 1 * s + 0 * inf would be NaN)."""
        if momentum == 1.0 and not self.running.isnan().all():
            self.acc.zero_()
            return
        total, count = acc[0, :N_SIGMAS], acc[1, :N_SIGMAS]
        seen = count > 0
        mean = total / count.clamp_min(1)
        ema = torch.where(self.running.isnan(), mean, momentum * self.running + (1 - momentum) * mean)
        self.running.copy_(torch.where(seen, ema, self.running))
        self.acc.zero_()

    # -- events --------------------------------------------------------------------------------------
    @torch.no_grad()
    def freeze(self, special_bos: bool = False, special_eot: bool = False) -> float:
        """Remove the site: freeze the running estimate(s). Returns the ordinary sigma (one host sync)."""
        value = self._freeze_sigma(special_bos, special_eot)
        self.removed.fill_(True)
        self._refresh_mirror()
        return value

    @torch.no_grad()
    def start_ramp(self, special_bos: bool = False, special_eot: bool = False) -> float:
        """Soft removal: freeze sigma now (as `freeze` would) but keep dividing by the live std until the ramp's
        alpha rises; `finish_ramp` then removes the site. Returns the ordinary sigma."""
        value = self._freeze_sigma(special_bos, special_eot)
        self.alpha.zero_()
        self._refresh_mirror()
        return value

    @torch.no_grad()
    def set_alpha(self, alpha: float):
        """The ramp's weight of the frozen sigma, in [0, 1] (a Python float: no host sync)."""
        if not self.is_ramping:
            raise RuntimeError("set_alpha on a site that is not ramping")
        self.alpha.fill_(alpha)

    @torch.no_grad()
    def finish_ramp(self):
        """End of the ramp: the site is removed, exactly as if `freeze` had frozen this sigma."""
        if not self.is_ramping:
            raise RuntimeError("finish_ramp on a site that is not ramping")
        self.removed.fill_(True)
        self.alpha.zero_()
        self._refresh_mirror()

    def _freeze_sigma(self, special_bos: bool, special_eot: bool) -> float:
        if self.is_removed or self.is_ramping:
            raise RuntimeError("site already removed" if self.is_removed else "site already ramping")
        est = self.running.clone()
        value = float(est[ORDINARY])  # the one host sync of an event
        if not (value > 0 and value < float("inf")):  # NaN: never estimated (calibrate() first) or diverged
            raise FloatingPointError(f"refusing to freeze a sigma of {value}: the running std estimate is "
                                     "non-finite or non-positive (never calibrated, or the run has diverged); "
                                     "nothing was frozen")
        want = torch.tensor([special_bos, special_eot], device=est.device)
        # a special category never seen falls back to the ordinary sigma
        want &= ~est[1:].isnan()
        est[1:] = torch.where(want, est[1:], est[ORDINARY])
        self.sigma.copy_(est)
        self.special.copy_(want)
        return value

    @torch.no_grad()
    def end_special(self, which: int):
        """bos/eot event: tokens of that category use the ordinary sigma from now on."""
        self.special[which - 1] = False
        self._refresh_mirror()

    def divisor(self, category: torch.Tensor | None) -> torch.Tensor:
        """Frozen sigma per token: a scalar, or [batch, pos, 1] when special sigmas are active."""
        if category is None or not self.special_active:
            return self.sigma[ORDINARY]
        sig = torch.where(self.special, self.sigma[1:], self.sigma[ORDINARY])  # [2]
        per_cat = torch.cat([self.sigma[:1], sig, self.sigma[:1]])  # ordinary, bos, eot, ignored
        return per_cat[category].unsqueeze(-1)

    def ramp_divisor(self, std: torch.Tensor, category: torch.Tensor | None) -> torch.Tensor:
        """(1 - alpha) * std + alpha * sigma, for per-token stds [batch, pos, 1] (fp32)."""
        return torch.lerp(std, self.divisor(category).to(std.dtype), self.alpha.to(std.dtype))


def _wants_stats(module: nn.Module, ctx: TokenContext) -> bool:
    return ctx.record or (module.training and torch.is_grad_enabled())


def _real_rms(x, weight, eps, sites, ctx: TokenContext):
    """Real RMSNorm, computed as Hugging Face's LlamaRMSNorm does (in fp32, cast back before the scale)."""
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # [batch, pos, 1]
    for site in sites:
        site.record(rstd.squeeze(-1).reciprocal(), ctx.category)
    return weight * (xf * rstd).to(x.dtype)


def _real(x, weight, bias, eps, sites, ctx: TokenContext, centre: bool = True):
    """Real LayerNorm (or RMSNorm when not `centre`); feeds the per-token std to every site in `sites` when
    statistics are wanted."""
    if not centre:
        return _real_rms(x, weight, eps, sites, ctx)
    if not sites:
        return F.layer_norm(x, x.shape[-1:], weight, bias, eps)
    # native_layer_norm returns the per-token rstd it already computed: the statistics cost nothing extra
    out, _, rstd = torch.native_layer_norm(x, x.shape[-1:], weight, bias, eps)
    std = rstd.squeeze(-1).reciprocal()
    for site in sites:
        site.record(std, ctx.category)
    return out


def _ramped(x, weight, bias, eps, site: NormSite, ctx: TokenContext, centre: bool = True):
    """A ramping site: the real norm with its per-token std replaced by (1 - alpha) * std + alpha * sigma. The std
    is the real norm's (sqrt(var + eps), or the rms), computed in fp32 as _real_rms does; statistics recorded."""
    xf = x.float()
    centred = xf - xf.mean(-1, keepdim=True) if centre else xf
    std = torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + eps)  # [batch, pos, 1]
    if _wants_stats(site, ctx):
        site.record(std.squeeze(-1), ctx.category)
    out = (centred / site.ramp_divisor(std, ctx.category)).to(x.dtype) * weight.to(x.dtype)
    return out if bias is None else out + bias.to(x.dtype)


def _frozen(x, weight, bias, site: NormSite, ctx: TokenContext, centre: bool = True):
    """(x - mean(x)) / sigma * gamma + beta with a frozen sigma (x / sigma * gamma for RMSNorm): affine in x."""
    scale = weight / site.divisor(ctx.category)  # [d], or [batch, pos, d] with special sigmas
    if not centre:
        return x * scale.to(x.dtype)
    return torch.addcmul(bias, x - x.mean(-1, keepdim=True), scale.to(x.dtype))


class NormParams(nn.Module):
    """What every removable norm shares with nn.LayerNorm: gamma (`weight`), beta (`bias`), eps, and the
    model's token context. Same parameter names, so Hugging Face state dicts load unchanged.
    centre=False makes it an RMSNorm: no centring and no beta (`bias` is None)."""

    def __init__(self, n_embd: int, eps: float, ctx: TokenContext, centre: bool = True):
        super().__init__()
        self.normalized_shape = (n_embd,)
        self.eps = eps
        self.centre = centre
        self.weight = nn.Parameter(torch.ones(n_embd))
        self.bias = nn.Parameter(torch.zeros(n_embd)) if centre else None
        self.ctx = ctx


class RemovableLayerNorm(NormParams):
    """Drop-in for nn.LayerNorm (or an RMSNorm, centre=False) with one removable site: the MLP-input and final
    norms (GPT-2's ln_2 and ln_f)."""

    def __init__(self, n_embd: int, eps: float, ctx: TokenContext, centre: bool = True):
        super().__init__(n_embd, eps, ctx, centre)
        self.site = NormSite()

    def forward(self, x):  # [batch, pos, d] -> [batch, pos, d]
        if self.site.is_removed:
            return _frozen(x, self.weight, self.bias, self.site, self.ctx, self.centre)
        if self.site.is_ramping:
            return _ramped(x, self.weight, self.bias, self.eps, self.site, self.ctx, self.centre)
        sites = [self.site] if _wants_stats(self, self.ctx) else []
        return _real(x, self.weight, self.bias, self.eps, sites, self.ctx, self.centre)


class SplitLayerNorm(NormParams):
    """The attention-input norm (GPT-2's ln_1) with separate query/key and value paths sharing gamma and beta.

    While both paths are real the output is the usual LayerNorm, [batch, pos, d]. Once one is frozen the two
    paths differ only by a per-token factor: x_path = u * f_path + beta with u = (x - mean(x)) * gamma and
    f = 1/sigma (frozen) or rstd (real). The output is then [batch, pos, d + 2] = [u, f_qk, f_v], and GPT-2's
    SplitQKVProjection (lnfree.families.gpt2) applies the factors after ONE matmul of u (Q, K, V are linear in x_path):
        x_path @ W + b = f_path * (u @ W) + (beta @ W + b).
    Keeping the split inside (ln_1, c_attn) leaves Hugging Face's attention (SDPA/eager, masks, KV cache)
    untouched, and the split costs no second matmul. For an RMSNorm (centre=False) u = x * gamma and there is
    no beta; the readers (families.gpt2.SplitQKVProjection, SplitInputLinear for the other families) apply f.
    """

    def __init__(self, n_embd: int, eps: float, ctx: TokenContext, centre: bool = True):
        super().__init__(n_embd, eps, ctx, centre)
        self.qk = NormSite()
        self.v = NormSite()

    def _factor(self, centred, site: NormSite, stats: bool):  # [batch, pos, d] -> [batch, pos, 1]
        if site.is_removed:
            return (1 / site.divisor(self.ctx.category)).to(centred.dtype).expand(*centred.shape[:-1], 1)
        rstd = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + self.eps)
        if stats:
            site.record(rstd.squeeze(-1).reciprocal(), self.ctx.category)
        if site.is_ramping:  # soft removal: 1 / ((1 - alpha) * std + alpha * sigma), in fp32
            return site.ramp_divisor(rstd.float().reciprocal(), self.ctx.category).reciprocal().to(centred.dtype)
        return rstd

    def forward(self, x):  # [batch, pos, d] -> [batch, pos, d] or [batch, pos, d + 2]
        stats = _wants_stats(self, self.ctx)
        qk, v = self.qk, self.v
        if not (qk.is_removed or qk.is_ramping or v.is_removed or v.is_ramping):
            return _real(x, self.weight, self.bias, self.eps, [qk, v] if stats else [], self.ctx, self.centre)
        centred = x - x.mean(-1, keepdim=True) if self.centre else x
        factors = [self._factor(centred, site, stats) for site in (qk, v)]
        return torch.cat([centred * self.weight.to(x.dtype), *factors], dim=-1)

    def paths(self, out):  # forward's output -> (x_qk, x_v), each [batch, pos, d]: for hooks and tests
        if out.shape[-1] == self.weight.shape[0]:
            return out, out
        u, f_qk, f_v = out.split([self.weight.shape[0], 1, 1], dim=-1)
        beta = 0 if self.bias is None else self.bias
        return u * f_qk + beta, u * f_v + beta


class SplitInputLinear(nn.Linear):
    """An nn.Linear reading the attention-input norm (Llama's q_proj/k_proj/v_proj, NeoX's fused query_key_value)
    that also accepts SplitLayerNorm's [u, f_qk, f_v] input. `v_cols` [out] marks the output columns that are
    values (they take f_v; the others f_qk): all or none for a separate projection, per head for a fused one.
    Same parameter names as nn.Linear, so Hugging Face state dicts load unchanged; beta is read from the norm.
        (u * f + beta) @ W^T + b = f * (u @ W^T) + (beta @ W^T + b)   per output column.
    """

    def __init__(self, linear: nn.Linear, ln: SplitLayerNorm, v_cols: torch.Tensor):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None,
                         device=linear.weight.device, dtype=linear.weight.dtype)
        self.weight, self.bias = linear.weight, linear.bias
        self.register_buffer("v_cols", v_cols.bool(), persistent=False)  # [out]
        self._ln = (ln,)  # tuple: not registered as a child module

    def forward(self, x):  # [batch, pos, d or d + 2] -> [batch, pos, out]
        if x.shape[-1] == self.in_features:
            return F.linear(x, self.weight, self.bias)
        u, f_qk, f_v = x.split([self.in_features, 1, 1], dim=-1)
        y = F.linear(u, self.weight)  # one matmul for every path
        f = torch.where(self.v_cols, f_v, f_qk)  # [batch, pos, out]
        beta = self._ln[0].bias
        offset = self.bias if beta is None else F.linear(beta, self.weight, self.bias)
        return y * f.to(y.dtype) if offset is None else torch.addcmul(offset.to(y.dtype), y, f.to(y.dtype))


@contextlib.contextmanager
def recording(ctx: TokenContext):
    """Record statistics even in eval mode / under no_grad (used by calibration)."""
    old, ctx.record = ctx.record, True
    try:
        yield
    finally:
        ctx.record = old
