"""Process-group setup and model wiring: activation checkpointing -> per-block compile -> FSDP2.

Order follows torchtitan: checkpoint wrappers first (so compile sees the recomputation), compile
each block (blocks share one graph, so it compiles once), then ``fully_shard`` per block, the
time embedders and the final layer, and the root last.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: str = "auto") -> DistInfo:
    """Join (or, under plain ``python``, create) the process group: nccl on CUDA, gloo on CPU."""
    if "RANK" not in os.environ:  # plain `python train.py`: a world of one
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda:
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def resolve_precision(setting: str, device: torch.device) -> torch.dtype:
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[setting]


def _block_slots(model: nn.Module) -> list[tuple[nn.Module, str | int]]:
    """(container, key) of every block to checkpoint, compile and shard: a DiT's ``blocks``, or the
    U-Net's encoder and decoder blocks (its ``UNetBlock`` entries; convolutions stay with the root)."""
    if hasattr(model, "blocks"):
        return [(model.blocks, i) for i in range(len(model.blocks))]
    from soflow_fast.models.unet import UNetBlock

    return [(d, k) for d in (model.enc, model.dec) for k, m in d.items() if isinstance(m, UNetBlock)]


def parallelize(
    model: nn.Module,
    *,
    device: torch.device,
    world_size: int,
    compile: bool,
    fsdp: bool,
    activation_checkpointing: bool,
    param_dtype: torch.dtype,
) -> nn.Module:
    """Wire a DiT or SongUNet for training, in place. Returns the same module."""
    slots = _block_slots(model)
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        # a network with dropout must see the same masks when a block is recomputed
        keep_rng = any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())
        for container, key in slots:
            container[key] = checkpoint_wrapper(container[key], preserve_rng_state=keep_rng)
    blocks = [container[key] for container, key in slots]
    if compile:
        unet = not hasattr(model, "blocks")
        if unet:
            # Every U-Net block runs UNetBlock.forward, one code object to dynamo, so each distinct
            # block (channels, resolution, up/down, attention) is a recompile of it: leave room for
            # all of them, and keep shapes static (Inductor fails on the dynamic shapes that a
            # recompile would otherwise bring in: tests/test_unet.py).
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(blocks))
        for block in blocks:
            block.compile(fullgraph=True, dynamic=False if unet else None)
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        # the time embedders stay fp32: bf16 would round t to 8 bits before the sinusoid
        fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
        for emb in (getattr(model, "t_embedder", None), getattr(model, "s_embedder", None)):
            if emb is not None:
                fully_shard(emb, mp_policy=fp32)
        for i, block in enumerate(blocks):
            # the last block's parameters are needed right away in backward: keep them gathered
            fully_shard(block, mp_policy=mp, reshard_after_forward=i < len(blocks) - 1)
        if hasattr(model, "final_layer"):
            fully_shard(model.final_layer, mp_policy=mp)
        # the root must not cast its inputs: t and s reach the embedders in fp32
        root_mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
        fully_shard(model, mp_policy=root_mp)
        model.compute_dtype = param_dtype
    # without FSDP, the trainer runs bf16 through autocast and the parameters stay fp32
    return model
