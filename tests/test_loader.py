"""soflow_fast.data.loader: the global sample stream sharded over ranks, the same at any world size, and
resumable mid-epoch from its state (also through DCP)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from soflow_fast.data import (
    ArrayDataset,
    GlobalStreamSampler,
    ShardedLoader,
    build_dataset,
    build_loader,
    mix_seeds,
)
from tests.utils import raises_naming


def _indexed(n: int) -> ArrayDataset:
    """A dataset whose image i is the constant i, so batches reveal which indices they hold."""
    return ArrayDataset(torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1), torch.arange(n) % 7)


def _global_steps(n: int, world: int, local: int, steps: int, *, seed: int = 0, state=None) -> list[list[int]]:
    """Per step, the sorted multiset of indices seen by all ranks together."""
    ds = _indexed(n)
    loaders = [ShardedLoader(ds, local, rank=r, world_size=world, seed=seed) for r in range(world)]
    if state is not None:
        for ld in loaders:
            ld.load_state_dict(state)
    out = []
    for _ in range(steps):
        out.append(sorted(int(v) for ld in loaders for v in ld.next_batch()[0].flatten()))
    return out


def test_rank_shards_are_disjoint_and_cover_the_global_batch():
    sampler = GlobalStreamSampler(50, seed=3)
    world, local = 4, 3
    for _ in range(10):  # 12 per step over 50 samples: includes steps straddling an epoch end
        shards = [sampler.window(world * local, r, world) for r in range(world)]
        positions = torch.cat([s[1] for s in shards])
        assert len(set(positions.tolist())) == world * local  # no stream entry is taken twice
        whole_idx, whole_pos = sampler.window(world * local, 0, 1)
        assert sorted(positions.tolist()) == whole_pos.tolist()
        assert sorted(torch.cat([s[0] for s in shards]).tolist()) == sorted(whole_idx.tolist())
        sampler.advance(world * local)


def test_two_ranks_see_the_same_samples_as_one_rank_with_double_batch():
    a = _global_steps(37, world=2, local=4, steps=12)
    b = _global_steps(37, world=1, local=8, steps=12)
    c = _global_steps(37, world=4, local=2, steps=12)
    assert a == b == c
    assert len({tuple(s) for s in a}) == 12  # the steps differ from each other: it is not a constant


def test_each_epoch_is_a_permutation_and_rollover_reshuffles_deterministically():
    n = 23
    flat = [i for step in _global_steps(n, world=1, local=n, steps=3, seed=1) for i in step]
    assert flat == list(range(n)) * 3  # every epoch visits every sample once
    s1, s2, other = GlobalStreamSampler(n, seed=1), GlobalStreamSampler(n, seed=1), GlobalStreamSampler(n, seed=2)
    assert not torch.equal(s1.permutation(0), s1.permutation(1))
    assert torch.equal(s1.permutation(1), s2.permutation(1))
    assert not torch.equal(s1.permutation(1), other.permutation(1))
    # The epoch-1 order seen through the loader is exactly permutation(1).
    ld = ShardedLoader(_indexed(n), n, seed=1)
    ld.next_batch()
    assert ld.epoch == 1
    assert ld.next_batch()[0].flatten().long().tolist() == s1.permutation(1).tolist()
    assert ld.epoch == 2 and ld.samples_seen == 2 * n


def test_resume_mid_epoch_gives_the_identical_continuation():
    ds = _indexed(41)
    ref = ShardedLoader(ds, 6, rank=1, world_size=2, seed=7, hflip=True)
    for _ in range(5):
        ref.next_batch()
    state = ref.state_dict()
    assert all(type(v) is int for v in state.values())
    assert state["epoch"] == 1 and state["position"] == 5 * 12 - 41
    expected = [ref.next_batch() for _ in range(6)]
    resumed = ShardedLoader(ds, 6, rank=1, world_size=2, seed=123, hflip=True)  # the saved seed wins
    resumed.load_state_dict(state)
    for x, y in expected:
        rx, ry = resumed.next_batch()
        assert torch.equal(rx, x) and torch.equal(ry, y)


def test_resume_at_a_different_world_size_continues_the_global_stream():
    n = 29
    ds = _indexed(n)
    first = ShardedLoader(ds, 8, rank=0, world_size=1, seed=4)
    for _ in range(3):
        first.next_batch()
    state = first.state_dict()
    reference = _global_steps(n, world=1, local=8, steps=9, seed=4)[3:]
    assert _global_steps(n, world=2, local=4, steps=6, state=state) == reference
    assert _global_steps(n, world=4, local=2, steps=6, state=state) == reference
    # Without the state, a fresh loader would replay the start of the stream instead.
    assert _global_steps(n, world=2, local=4, steps=6, seed=4) != reference


def test_state_from_another_dataset_is_rejected():
    ld = ShardedLoader(_indexed(10), 2)
    with raises_naming(ValueError, "12 samples", "has 10"):
        ld.load_state_dict(ShardedLoader(_indexed(12), 2).state_dict())
    with raises_naming(ValueError, "['position', 'seed', 'num_samples']"):
        ld.load_state_dict({"epoch": 0})


def test_flips_are_per_sample_and_world_size_invariant():
    img = torch.arange(4, dtype=torch.float32).view(1, 1, 1, 4).repeat(16, 1, 1, 1)
    ds = ArrayDataset(img + 10 * torch.arange(16, dtype=torch.float32).view(16, 1, 1, 1))
    single = ShardedLoader(ds, 8, seed=2, hflip=True).next_batch()[0]
    pair = [ShardedLoader(ds, 4, rank=r, world_size=2, seed=2, hflip=True).next_batch()[0] for r in range(2)]
    assert torch.equal(torch.stack(pair, 1).flatten(0, 1), single)
    flipped = single[..., 0] > single[..., -1]
    assert 0 < int(flipped.sum()) < 8  # some flipped, some not
    plain = ShardedLoader(ds, 8, seed=2).next_batch()[0]
    assert torch.equal(plain.flip(-1)[flipped.flatten()], single[flipped.flatten()])


def test_mix_seeds_is_stable_and_separates_domains():
    a = mix_seeds(0, torch.arange(1000))
    assert a.dtype == torch.int64 and (a >= 0).all() and len(set(a.tolist())) == 1000
    assert torch.equal(a, mix_seeds(0, np.arange(1000)))
    assert not torch.equal(a, mix_seeds(0, torch.arange(1000), tag=1))
    assert not torch.equal(a, mix_seeds(1, torch.arange(1000)))
    assert mix_seeds(5, 3).shape == ()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_dcp_round_trip_of_the_loader_state(tmp_path):
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    ds = _indexed(30)
    ld = ShardedLoader(ds, 4, seed=8)
    for _ in range(9):
        ld.next_batch()
    dcp.save({"data": ld}, checkpoint_id=str(tmp_path / "ckpt"))
    expected = ld.next_batch()[0]
    fresh = ShardedLoader(ds, 4, seed=8)
    dcp.load({"data": fresh}, checkpoint_id=str(tmp_path / "ckpt"))
    assert fresh.state_dict() == {**ld.state_dict(), "epoch": 1, "position": 6}
    assert torch.equal(fresh.next_batch()[0], expected)


def test_digits_loader_is_fast_enough_for_cpu_training():
    import time

    ld = build_loader(build_dataset("digits"), 256, seed=0)
    ld.next_batch()
    start = time.perf_counter()
    for _ in range(200):
        ld.next_batch()
    per_step = (time.perf_counter() - start) / 200
    assert per_step < 2e-3, f"{per_step * 1e3:.2f} ms per digits batch; the data path must stay negligible"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_staged_cuda_loader_matches_cpu():
    ds = build_dataset("digits")
    cpu = build_loader(ds, 32, seed=6, hflip=True)
    gpu = build_loader(ds, 32, seed=6, hflip=True, device="cuda")
    assert gpu.dataset.images.is_cuda  # staged once, not copied per step
    for _ in range(3):
        (xc, yc), (xg, yg) = cpu.next_batch(), gpu.next_batch()
        assert xg.is_cuda and yg.is_cuda
        assert torch.equal(xg.cpu(), xc) and torch.equal(yg.cpu(), yc)
