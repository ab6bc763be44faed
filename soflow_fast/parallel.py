"""The parallel plan: its config, the process group, and model wiring (activation checkpointing ->
per-block compile -> FSDP2).

Order follows torchtitan: checkpoint wrappers first (so compile sees the recomputation), compile
each block (blocks share one graph, so it compiles once), then ``fully_shard`` per block, the
modules kept in fp32 (time embedders) and the head, and the root last. Which modules those are is
the model kind's to say (``soflow_fast.models.registry``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.distributed as dist
import torch.nn as nn

from soflow_fast.config_fields import Section, one_of, option

FUSED_OPS = ("all", "layer_norms", "losses")  # "all" and the groups of soflow_fast.ops.FUSED_GROUPS


@dataclass(kw_only=True)
class ParallelConfig(Section):
    """How the step runs on the devices: compile, FSDP, precision, CUDA graphs, fused ops. A resume may
    change any of them."""

    SECTION: ClassVar[str] = "parallel"

    compile: bool | None = option(None, resume_safe=True)  # None = what is fastest on the device (on for CUDA,
    # off on CPU)
    compile_scope: str | None = option(None, check=one_of("blocks", "loss"), resume_safe=True)  # "blocks" (per
    # block; FSDP-compatible) or "loss" (the whole SoFlow loss as one graph: one process, no FSDP); None =
    # blocks for SoFlow, loss for MeanFlow (its only scope)
    fsdp: bool | None = option(None, resume_safe=True)  # None = on when world size > 1 or on CUDA
    activation_checkpointing: bool = option(False, resume_safe=True)
    mixed_precision: str = option("auto", check=one_of("auto", "bf16", "fp32"), resume_safe=True)  # auto = bf16
    # on CUDA, fp32 on CPU
    use_fused_kernels: bool = option(False, resume_safe=True)  # the fused Triton ops on CUDA (soflow_fast.ops)
    fused_ops: str = option("all", check=one_of(*FUSED_OPS), resume_safe=True)  # the ops
    # use_fused_kernels turns on: all, layer_norms (the two adaLN LayerNorm ops of every DiT block) or losses
    # (SoFlow's consistency and velocity losses)
    cuda_graphs: str | None = option(None, check=one_of("loss", "step"), resume_safe=True)  # CUDA: "loss" replays
    # the whole-loss compile's forward and backward as CUDA graphs (torch.compile mode="reduce-overhead");
    # "step" captures the whole step (loss, backward, clipping, optimiser; one process, no FSDP) in one CUDA
    # graph; the draws and the EMA run eagerly around it
    sync_debug: bool = option(False, resume_safe=True)  # CUDA: steps between logging steps run under
    # torch.cuda.set_sync_debug_mode("error") (after SYNC_DEBUG_WARMUP steps), so a host sync is an error

    def check_with(self, cfg) -> None:
        if cfg.run.objective == "meanflow" and self.compile_scope == "blocks":
            raise ValueError("parallel.compile_scope=blocks does not apply to run.objective=meanflow (whole loss only)")

    def set_fused_ops(self, device: torch.device, say=print) -> None:
        """Turn the fused ops on for this process as configured (they run on CUDA tensors only)."""
        if self.use_fused_kernels:
            from soflow_fast import ops

            ops.set_use_fused_kernels(self.fused_ops)
            if device.type != "cuda":
                say("parallel.use_fused_kernels: the fused Triton ops run on CUDA only; reference ops here")
        elif self.fused_ops != "all":
            say(f"parallel.fused_ops={self.fused_ops} has no effect without parallel.use_fused_kernels=true")


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Join (or, under plain ``python``, create) the process group: nccl on CUDA, gloo on CPU.

    Under a launcher (torchrun sets ``RANK``) the group meets through its env:// rendezvous; a plain
    ``python train.py`` is a world of one whose store lives in the process, so it needs no port.
    """
    launched = "RANK" in os.environ
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda:
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        backend, device_id = ("nccl", dev) if use_cuda else ("gloo", None)
        if launched:
            dist.init_process_group(backend, device_id=device_id)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, device_id=device_id)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)


NVIDIA_DEVICE_FILES = ("/dev/nvidia0", "/proc/driver/nvidia/version")


def unused_gpu_note(device_files: tuple[str, ...] = NVIDIA_DEVICE_FILES) -> str | None:
    """One line when this machine has an NVIDIA GPU that torch cannot use (a CPU build of torch, or a
    driver it does not work with), else None."""
    if torch.cuda.is_available() or not any(os.path.exists(f) for f in device_files):
        return None
    if torch.version.cuda is None:
        return (
            f"note: this machine has an NVIDIA GPU, but torch {torch.__version__} is a CPU build, so training runs "
            "on the CPU: install a CUDA build of torch (https://pytorch.org/get-started/locally/) to use the GPU"
        )
    return (
        f"note: this machine has an NVIDIA GPU, but torch {torch.__version__} (CUDA {torch.version.cuda}) cannot use "
        "it (check the driver with nvidia-smi): training runs on the CPU"
    )


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def resolve_precision(setting: str, device: torch.device) -> torch.dtype:
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[setting]


def parallelize(
    model: nn.Module,
    kind,
    *,
    device: torch.device,
    world_size: int,
    compile: bool,
    fsdp: bool,
    activation_checkpointing: bool,
    param_dtype: torch.dtype,
) -> nn.Module:
    """Wire ``model`` for training, in place, with what its kind (a ``ModelConfig``) says it is made of.
    Returns the same module."""
    slots = kind.blocks(model)
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        # a network with dropout must see the same masks when a block is recomputed
        keep_rng = any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())
        for container, key in slots:
            container[key] = checkpoint_wrapper(container[key], preserve_rng_state=keep_rng)
    blocks = [container[key] for container, key in slots]
    if compile:
        if kind.COMPILE_DYNAMIC is False:
            # blocks that share one forward but differ in shape recompile it: room for each of them
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(blocks))
        for block in blocks:
            block.compile(fullgraph=True, dynamic=kind.COMPILE_DYNAMIC)
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        # the time embedders stay fp32: bf16 would round t to 8 bits before the sinusoid
        fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
        for module in kind.fp32_modules(model):
            fully_shard(module, mp_policy=fp32)
        for i, block in enumerate(blocks):
            # the last block's parameters are needed right away in backward: keep them gathered
            fully_shard(block, mp_policy=mp, reshard_after_forward=i < len(blocks) - 1)
        for module in kind.head_modules(model):
            fully_shard(module, mp_policy=mp)
        # the root must not cast its inputs: t and s reach the embedders in fp32
        root_mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
        fully_shard(model, mp_policy=root_mp)
        model.compute_dtype = param_dtype
    # without FSDP, the trainer runs bf16 through autocast and the parameters stay fp32
    return model
