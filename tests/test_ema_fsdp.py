"""FSDP2: an EMA over local shards (2 ranks, gloo on CPU) equals a single-process EMA.

Both ranks and a single-process reference apply the same full-size parameter changes; the ranks
apply only their own slice to their FSDP2 shards. After several updates the gathered EMA must match
the reference, a torch.distributed.checkpoint round trip must restore it, and copy_to must fill an
unsharded model with the full averages.
"""

from __future__ import annotations

import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from tests.utils import leave_worker

WORLD = 2
DECAYS = (0.9, 0.5)
STEPS = 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model() -> nn.Module:
    torch.manual_seed(0)
    # Odd first dims give uneven shards, and the 1-row layer leaves rank 1 an empty shard.
    return nn.Sequential(nn.Linear(5, 7), nn.GELU(), nn.Linear(7, 9), nn.GELU(), nn.Linear(9, 1))


def _deltas(model: nn.Module, step: int) -> dict[str, torch.Tensor]:
    """Full-size parameter changes for one step, identical on every rank."""
    g = torch.Generator().manual_seed(1000 + step)
    return {n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}


def _reference() -> list[dict[str, torch.Tensor]]:
    from soflow_fast.ema import EMA

    model = _model()
    ema = EMA(model, decays=DECAYS)
    for step in range(STEPS):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.add_(_deltas(model, step)[n])
        ema.update(model)
    return [{n: t.clone() for n, t in ema.shadow(d).items()} for d in DECAYS]


def _worker(rank: int, port: int, ckpt_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor, distribute_tensor

        from soflow_fast.ema import EMA

        mesh = init_device_mesh("cpu", (WORLD,))
        model = _model()
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        assert all(isinstance(p, DTensor) for p in model.parameters())

        ema = EMA(model, decays=DECAYS)
        assert all(isinstance(t, DTensor) for t in ema.shadow().values())
        for step in range(STEPS):
            with torch.no_grad():
                for n, p in model.named_parameters():
                    local = distribute_tensor(_deltas(model, step)[n], mesh, p.placements, src_data_rank=None)
                    p.to_local().add_(local.to_local())
            ema.update(model)

        expected = _reference()
        assert sum((t - _model().state_dict()[n]).abs().sum() for n, t in expected[0].items()) > 1.0
        for k, d in enumerate(DECAYS):
            for n, t in ema.shadow(d).items():
                full = t.full_tensor()
                start = _model().state_dict()[n]
                assert not torch.equal(full, start), f"{n}: EMA did not move"
                torch.testing.assert_close(full, expected[k][n], rtol=1e-6, atol=1e-7, msg=f"rank {rank} {n} {d}")

        # DCP round trip of the sharded EMA into a fresh one.
        dcp.save({"ema": ema}, checkpoint_id=ckpt_dir)
        fresh = EMA(model, decays=DECAYS)
        dcp.load({"ema": fresh}, checkpoint_id=ckpt_dir)
        assert fresh.num_updates == STEPS
        for k in range(len(DECAYS)):
            for n, t in ema.shadows[k].items():
                assert torch.equal(fresh.shadows[k][n].to_local(), t.to_local()), n

        # Sampling copy: an unsharded model receives the gathered averages.
        plain = _model()
        ema.copy_to(plain, decay=DECAYS[1])
        for n, p in plain.named_parameters():
            torch.testing.assert_close(p.detach(), expected[1][n], rtol=1e-6, atol=1e-7, msg=n)
    finally:
        dist.destroy_process_group()
    leave_worker()


@pytest.mark.skipif(not dist.is_available(), reason="torch built without torch.distributed")
def test_fsdp2_shard_local_ema_matches_single_process():
    with tempfile.TemporaryDirectory() as ckpt_dir:
        mp.spawn(_worker, args=(_free_port(), ckpt_dir), nprocs=WORLD, join=True)
