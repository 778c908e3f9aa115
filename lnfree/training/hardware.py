"""Hardware config -> Lightning strategy, precision and gradient accumulation."""

from __future__ import annotations

import torch


class HardwareError(ValueError):
    pass


def world_size(hw) -> int:
    devices = hw.devices
    if isinstance(devices, (list, tuple)):
        n = len(devices)
    elif devices in ("auto", -1, "-1"):
        n = torch.cuda.device_count() if hw.accelerator in ("gpu", "cuda") else 1
    else:
        n = int(devices)
    return max(1, n) * hw.num_nodes


def grad_accumulation(tokens_per_step: int | None, micro_batch: int, block_size: int, world: int) -> int:
    """Micro-batches per optimizer step so that one step sees `tokens_per_step` tokens (about 2^19 in
    the published runs), whatever the hardware's micro-batch and device count."""
    per_micro = micro_batch * block_size * world
    if tokens_per_step is None:
        return 1
    if tokens_per_step < per_micro or tokens_per_step % per_micro:
        raise HardwareError(
            f"optim.tokens_per_step={tokens_per_step} is not a multiple of micro_batch x block_size x devices "
            f"= {micro_batch} x {block_size} x {world} = {per_micro}"
        )
    return tokens_per_step // per_micro


def make_strategy(hw):
    """'auto' / 'ddp' as Lightning strings; 'fsdp' as an FSDPStrategy that shards GPT-2 blocks and keeps
    fp32 master weights and fp32 buffers (the frozen sigmas) under bf16-mixed: parameters are cast to bf16
    for compute only, gradients are reduced in fp32."""
    if hw.strategy in ("auto", "ddp", "single_device"):
        if hw.strategy == "ddp" and world_size(hw) == 1:
            return "auto"
        return hw.strategy
    if hw.strategy != "fsdp":
        raise HardwareError(f"unknown hardware.strategy {hw.strategy!r}; use auto, ddp or fsdp")
    if hw.accelerator == "cpu":
        raise HardwareError("hardware.strategy=fsdp needs GPUs (Lightning's FSDP refuses CPU); use hardware=cpu")
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import MixedPrecision
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    mp = None
    if hw.precision == "bf16-mixed":
        mp = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, buffer_dtype=torch.float32)
    return FSDPStrategy(
        auto_wrap_policy={GPT2Block},
        activation_checkpointing_policy={GPT2Block} if hw.fsdp_activation_checkpointing else None,
        mixed_precision=mp,
        state_dict_type="full",
        use_orig_params=True,
    )
