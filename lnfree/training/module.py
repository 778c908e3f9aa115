"""LightningModule: cross-entropy fine-tuning of a removable GPT-2, with the optional auxiliary loss.

Loss = CE + aux_weight * mean_t (s_t - tau)^2, with s_t the per-token std of the final residual stream
(the input of ln_f) and tau the detached mean of s_t over ordinary tokens (not position 0, not end-of-text):
it pulls the outlier residual norms toward the typical norm, which is what ln_f used to do
(docs/method.md, 'The auxiliary loss'). CE and the auxiliary term are logged apart; validation is CE only.

Optional distillation (schedule.distill, off by default; docs/removal_methods.md): the CE term becomes
ce_weight * CE + weight * distill_kl(student, teacher), the teacher being a frozen copy of the model as loaded
(step 0, every norm real, eval mode, no grad), run on the same batch. It is held outside the module's children
(a tuple), so it is not in the checkpoints, the optimizer or DDP's buckets; a resumed run rebuilds it from the
same source, which gives the same weights.
The removal itself (events, frozen sigmas) is the callback's job (callbacks.py).
"""

from __future__ import annotations

import copy
import math

import lightning as L
import torch
import torch.nn.functional as F

from ..io import CKPT_MODEL_CONFIG, RUN_INFO
from ..model import RemovableMixin, next_token_ce


def lr_lambda(step: int, warmup: int, decay_steps: int, lr: float, min_lr: float) -> float:
    """Multiplier of the peak LR: linear warm-up, then cosine to min_lr at decay_steps, then flat."""
    if step < warmup:
        return (step + 1) / warmup
    if step >= decay_steps:
        return min_lr / lr
    progress = (step - warmup) / max(1, decay_steps - warmup)
    return (min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))) / lr


def residual_std_aux(h: torch.Tensor, ids: torch.Tensor, eot_id: int | None) -> torch.Tensor:
    """mean_t (s_t - tau)^2 for the final residual h [batch, pos, d]."""
    s = torch.sqrt(h.float().var(-1, unbiased=False) + 1e-5)  # [batch, pos]
    ordinary = torch.ones_like(s, dtype=torch.bool)
    ordinary[:, 0] = False
    if eot_id is not None:
        ordinary &= ids != eot_id
    tau = (s * ordinary).sum() / ordinary.sum().clamp_min(1)
    return ((s - tau.detach()) ** 2).mean()


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 x KL(p_teacher || p_student) of the next-token distributions at temperature T, averaged over tokens
    (logits [batch, pos, vocab]; in fp32). T^2 keeps the gradient's scale independent of T (Hinton et al. 2015)."""
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1).flatten(0, -2)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1).flatten(0, -2)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean") * temperature**2


def frozen_teacher(model: RemovableMixin) -> RemovableMixin:
    """The distillation teacher: a copy of `model` as it is now (take it before any site is removed and before LoRA
    adapters), in eval mode with no parameter requiring grad."""
    if model.removed_sites() or any(s.is_ramping for s in model.sites().values()):
        raise ValueError("the distillation teacher must have every norm real")
    teacher = copy.deepcopy(model).eval()
    teacher.requires_grad_(False)
    return teacher


def fsdp_policy(precision: str):
    """bf16 compute with fp32 master weights and fp32 gradient reduction under bf16-mixed; None (plain fp32)
    otherwise. FSDP2 never casts buffers, so the frozen sigmas stay fp32."""
    if "bf16" not in str(precision):
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


class LNFreeModule(L.LightningModule):
    def __init__(self, model: RemovableMixin, optim, aux_weight: float = 0.0, max_steps: int = 1,
                 run_info: dict | None = None, compile: bool = False, lr_scale: float = 1.0,
                 teacher: RemovableMixin | None = None, distill_weight: float = 0.0, distill_temperature: float = 1.0,
                 ce_weight: float = 1.0):
        super().__init__()
        self.model = model
        self._use_compile = compile  # (not self.compile: that is nn.Module.compile)
        self._sharded = False  # configure_model may be called more than once
        self._compiled: list = []  # the torch.compile wrapper, made at first use (after any FSDP sharding); a list
        # so that it is not a registered submodule: checkpoints keep the model's own parameter names
        self.optim = optim
        self.aux_weight = aux_weight
        self.max_steps = max_steps
        self.lr_scale = lr_scale  # finetune.lr_scale: e.g. LoRA adapters train at a higher LR than full fine-tuning
        self.run_info = run_info or {}  # saved in every checkpoint and compared with the config on resume
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long))
        if distill_weight > 0 and teacher is None:
            raise ValueError("distill_weight > 0 needs a teacher (frozen_teacher(model) before any removal)")
        self._teacher = (teacher,) if distill_weight > 0 else ()  # a tuple: not a child module (see the docstring)
        self.distill_weight, self.distill_temperature, self.ce_weight = distill_weight, distill_temperature, ce_weight
        self._final_resid = None
        # the auxiliary loss needs ln_f's input; a forward pre-hook reads it without touching the model code
        model.family.final_norm(model).register_forward_pre_hook(self._grab_final_residual)

    def _grab_final_residual(self, module, args):
        if self.training and self.aux_weight > 0:
            self._final_resid = args[0]

    def forward(self, ids):
        return self._runner()(input_ids=ids, use_cache=False).logits

    def _runner(self):
        """The model, or its torch.compile wrapper (model.compile=true). Removal events flip Python-level modes
        that the compiled graph is guarded on, so each event recompiles (as do train/eval and grad-mode switches);
        the recompile limit is raised to 4 x (sites + 2) so that a long schedule does not fall back to eager."""
        if not self._use_compile:
            return self.model
        if not self._compiled:
            import torch._dynamo

            cfg = torch._dynamo.config
            limit = 4 * (len(self.model.sites()) + 2)
            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(cfg, name):
                    setattr(cfg, name, max(getattr(cfg, name), limit))
            self._compiled.append(torch.compile(self.model))
        return self._compiled[0]

    def on_fit_start(self):
        for teacher in self._teacher:  # the training device and dtype (bf16-mixed: autocast covers its forward)
            teacher.to(device=self.device, dtype=next(self.model.parameters()).dtype)

    def teacher_logits(self, ids) -> torch.Tensor:
        with torch.no_grad():
            return self._teacher[0](input_ids=ids, use_cache=False).logits

    def training_step(self, ids, batch_idx):
        logits = self(ids)
        ce = next_token_ce(logits, ids)
        loss = ce if self.ce_weight == 1 else self.ce_weight * ce
        self.log("train/ce", ce, prog_bar=True)
        if self.distill_weight > 0:
            kl = distill_kl(logits, self.teacher_logits(ids), self.distill_temperature)
            loss = loss + self.distill_weight * kl
            self.log("train/kl", kl)
        if self.aux_weight > 0:
            aux = residual_std_aux(self._final_resid, ids, self.model.config.eos_token_id)
            self._final_resid = None
            loss = loss + self.aux_weight * aux
            self.log("train/aux", aux)
        self.tokens_seen += ids.numel() * self.trainer.world_size
        self.log("train/loss", loss)
        self.log("train/tokens_seen", self.tokens_seen.float(), reduce_fx="max")
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return {"loss": loss, "ce": ce.detach()}  # ce: for the divergence guard (training/checkpoints.py)

    def validation_step(self, ids, batch_idx):
        ce = next_token_ce(self(ids), ids)
        self.log("val/ce", ce, prog_bar=True, sync_dist=True, batch_size=ids.shape[0])

    def configure_model(self):
        """Under hardware.strategy=fsdp (Lightning's ModelParallelStrategy: FSDP2, on GPUs or CPU processes):
        shard every block of the model's family (GPT2Block, LlamaDecoderLayer, GPTNeoXLayer), then the rest. Norm-site
        buffers (running std, frozen sigmas) are not parameters, so FSDP2 leaves them whole and fp32 on every rank,
        where the removal callback all-reduces them."""
        from lightning.pytorch.strategies import ModelParallelStrategy

        if self._sharded or not isinstance(self.trainer.strategy, ModelParallelStrategy):
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        policy = fsdp_policy(self.trainer.precision)
        kw = {"mesh": mesh, **({"mp_policy": policy} if policy is not None else {})}
        for block in self.model.family.blocks(self.model):
            fully_shard(block, **kw)
        fully_shard(self.model, **kw)
        self._sharded = True

    def on_save_checkpoint(self, checkpoint):
        # a checkpoint is loadable on its own (lnfree.io.load): keep the model's config with it
        checkpoint[CKPT_MODEL_CONFIG] = self.model.config.to_dict()
        checkpoint[RUN_INFO] = self.run_info

    def configure_optimizers(self):
        o = self.optim
        decay, no_decay = [], []
        embeddings = set(self.model.family.embedding_names)  # the adapter names them (GPT-2's wte/wpe, ...)
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            is_embedding = name in embeddings
            if p.ndim >= 2 and (o.decay_embeddings or not is_embedding):
                decay.append(p)
            else:  # biases, norm gains (and embeddings when decay_embeddings is off)
                no_decay.append(p)
        groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        lr, min_lr = o.lr * self.lr_scale, o.min_lr * self.lr_scale
        opt = torch.optim.AdamW(groups, lr=lr, betas=tuple(o.betas), eps=o.eps,
                                fused=self.device.type == "cuda" or None)
        decay_steps = o.decay_steps or self.max_steps
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_lambda(s, o.warmup_steps, decay_steps, lr, min_lr))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
