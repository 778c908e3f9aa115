"""Hardware config -> Lightning strategy, precision and gradient accumulation."""

from __future__ import annotations

import torch

from ..errors import UserError


class HardwareError(UserError):
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
    """'auto' / 'ddp' as Lightning strings; 'fsdp' as Lightning's ModelParallelStrategy, i.e. FSDP2
    (`fully_shard`), one code path for GPUs (NCCL) and CPU processes (gloo). The sharding itself (every block of
    the model's family, then the root; bf16 compute with fp32 master weights and reduction under bf16-mixed) is
    LNFreeModule.configure_model. Checkpoints are saved whole (one file, rank 0), so lnfree.io reads them like
    any other and a sharded run exports like a single-process one."""
    if hw.strategy in ("auto", "ddp", "single_device"):
        if hw.strategy == "ddp" and world_size(hw) == 1:
            return "auto"
        return hw.strategy
    if hw.strategy != "fsdp":
        raise HardwareError(f"unknown hardware.strategy {hw.strategy!r}; use auto, ddp or fsdp")
    if hw.fsdp_activation_checkpointing:
        raise HardwareError("hardware.fsdp_activation_checkpointing is not supported with FSDP2 yet; use "
                            "model.gradient_checkpointing=true")
    from lightning.pytorch.strategies import ModelParallelStrategy

    return ModelParallelStrategy(data_parallel_size=world_size(hw), tensor_parallel_size=1,
                                 save_distributed_checkpoint=False,
                                 process_group_backend="gloo" if hw.accelerator == "cpu" else None)
