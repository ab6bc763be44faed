"""A resumable, rank-sharded, infinite batch stream.

The global sample stream is the concatenation ``perm(0) ++ perm(1) ++ ...`` where ``perm(e)`` is a
permutation of the dataset that depends only on ``(seed, e)``. Each training step consumes the next
``B = world_size * local_batch_size`` entries of that stream, and rank ``r`` takes entries
``r, r + W, r + 2W, ...`` of the step's window (the same striding as ``DistributedSampler``).
Neither the stream nor the window depends on the world size, so:

- the union of the ranks' local batches is exactly the step's global batch, with no overlap;
- any (W, b) with the same product W * b sees the same set of samples at every step;
- the checkpointed position ``(epoch, position)`` counts GLOBAL samples, so a run saved at one
  world size resumes at another and continues the same stream.

A step may straddle an epoch boundary; it then takes the tail of one permutation and the head of
the next (no samples are dropped, and a sample can appear twice in that one step).

Per-sample randomness (VAE posterior noise, horizontal flips) is keyed by a hash of the seed and
the sample's position in the global stream, never by a stateful generator, so it too is identical
across world sizes and after a resume, and a checkpoint needs no RNG state for the data.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

__all__ = ["GlobalStreamSampler", "ShardedLoader", "build_loader", "mix_seeds"]

# Distinct hash domains, so that the shuffle, the per-sample dataset noise and the flips never
# reuse the same random bits.
_TAG_PERMUTATION = 1
_TAG_SAMPLE = 2
_TAG_FLIP = 3

_MASK64 = (1 << 64) - 1
_MASK63 = (1 << 63) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on a uint64 array: a cheap, well-mixed, stateless hash."""
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x += np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def mix_seeds(seed: int, values: Tensor | np.ndarray | int, tag: int = 0) -> Tensor:
    """Hash (seed, tag, value) to one non-negative 63-bit seed per value.

    Args:
        seed: the run's data seed.
        values: integers to key on (e.g. global stream positions); any shape.
        tag: a domain separator so that different consumers draw unrelated bits.
    Returns:
        int64 tensor of ``values``' shape, each entry in [0, 2**63).
    """
    if isinstance(values, Tensor):
        values = values.cpu().numpy()
    values = np.asarray(values, dtype=np.int64)
    # 1-D throughout: NumPy turns 0-d results into scalars, which torch.from_numpy rejects.
    return torch.from_numpy(_mix(seed, values.reshape(-1), tag).reshape(values.shape))


def mix_seed(seed: int, value: int, tag: int = 0) -> int:
    """``mix_seeds`` for one integer, as a Python int (no tensor to read back)."""
    return int(_mix(seed, np.array([value], dtype=np.int64), tag)[0])


def _mix(seed: int, flat: np.ndarray, tag: int) -> np.ndarray:
    base = _splitmix64(np.array([(seed & _MASK64) ^ ((tag * 0x632BE59BD9B4E019) & _MASK64)], dtype=np.uint64))
    mixed = _splitmix64(flat.astype(np.uint64) ^ base)
    return (mixed & np.uint64(_MASK63)).astype(np.int64)


class GlobalStreamSampler:
    """Index arithmetic for the infinite, epoch-shuffled global sample stream.

    Args:
        num_samples: dataset length N.
        seed: the permutation of epoch e is a function of (seed, e) only.
        shuffle: False streams 0..N-1 in order every epoch (evaluation, debugging).
    """

    def __init__(self, num_samples: int, *, seed: int = 0, shuffle: bool = True) -> None:
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.epoch = 0
        self.position = 0  # global samples already consumed within `epoch`
        self._perms: dict[int, Tensor] = {}

    def permutation(self, epoch: int) -> Tensor:
        """The dataset order of ``epoch``: a (N,) int64 tensor."""
        perm = self._perms.get(epoch)
        if perm is None:
            if self.shuffle:
                g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, _TAG_PERMUTATION))
                perm = torch.randperm(self.num_samples, generator=g)
            else:
                perm = torch.arange(self.num_samples)
            # Only the current and the next epoch are ever read again; older ones would pin
            # O(N) memory each on long runs over tiny datasets.
            for stale in [e for e in self._perms if e < self.epoch]:
                del self._perms[stale]
            self._perms[epoch] = perm
        return perm

    def window(self, global_batch_size: int, rank: int, world_size: int) -> tuple[Tensor, Tensor]:
        """This rank's share of the next step, without advancing.

        Returns:
            indices: (global_batch_size // world_size,) int64 dataset indices.
            stream: the same shape, each sample's absolute position in the global stream
                (epoch * N + offset), which keys its per-sample randomness.
        """
        n = self.num_samples
        # k: offsets from the start of the current epoch; may run past N into later epochs.
        start, stop = self.position + rank, self.position + global_batch_size
        k = torch.arange(start, stop, world_size, dtype=torch.int64)
        # the epochs of the first and last offsets, in host ints (k is start, start + world_size, ...)
        first = self.epoch + start // n
        last = self.epoch + (start + (len(k) - 1) * world_size) // n
        if first == last:  # the common case: the whole window lies in one epoch
            indices = self.permutation(first)[k - (first - self.epoch) * n]
        else:
            epochs = self.epoch + torch.div(k, n, rounding_mode="floor")
            within = k - (epochs - self.epoch) * n
            indices = torch.empty_like(k)
            for e in range(first, last + 1):
                mask = epochs == e
                indices[mask] = self.permutation(e)[within[mask]]
        return indices, k + self.epoch * n

    def advance(self, global_batch_size: int) -> None:
        """Move past one step of ``global_batch_size`` samples."""
        total = self.position + global_batch_size
        self.epoch += total // self.num_samples
        self.position = total % self.num_samples

    def clone(self) -> GlobalStreamSampler:
        """An independent sampler at the same position (shares the read-only permutation cache)."""
        other = GlobalStreamSampler(self.num_samples, seed=self.seed, shuffle=self.shuffle)
        other.epoch, other.position = self.epoch, self.position
        other._perms = dict(self._perms)
        return other

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "shuffle": int(self.shuffle),
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = [k for k in ("epoch", "position", "seed", "num_samples") if k not in state]
        if missing:
            raise ValueError(f"data loader state is missing {missing}; got keys {sorted(state)}")
        num_samples = int(state["num_samples"])
        if num_samples != self.num_samples:
            raise ValueError(
                f"data loader state was saved for a dataset of {num_samples} samples, but this dataset has "
                f"{self.num_samples}; the saved stream position is meaningless for a different dataset"
            )
        position = int(state["position"])
        if not 0 <= position < num_samples:
            raise ValueError(f"data loader state has position {position}, outside [0, {num_samples})")
        # The saved seed wins over the constructor's: resuming means continuing the saved stream.
        self.seed = int(state["seed"])
        self.shuffle = bool(int(state.get("shuffle", int(self.shuffle))))
        self.epoch = int(state["epoch"])
        self.position = position
        self._perms = {}


# ---------------------------------------------------------------------------------------------
# Fetching
# ---------------------------------------------------------------------------------------------


def _stack_items(dataset: Dataset, indices: Tensor, seeds: Tensor | None) -> tuple[Tensor, Tensor]:
    """Fallback batch fetch for datasets that only implement ``__getitem__``."""
    del seeds  # item-wise datasets draw any randomness from torch's global RNG
    xs, ys = [], []
    for i in indices.tolist():
        x, y = dataset[i]
        xs.append(x)
        ys.append(y)
    return torch.stack(xs), torch.as_tensor(ys, dtype=torch.int64)


class _BatchFetcher(Dataset):
    """Presents whole batches as single items, so DataLoader workers fetch a batch per request."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __getitem__(self, desc: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        indices, seeds = desc
        return _fetch(self.dataset, indices, seeds)


def _fetch(dataset: Dataset, indices: Tensor, seeds: Tensor | None) -> tuple[Tensor, Tensor]:
    get_batch = getattr(dataset, "get_batch", None)
    if get_batch is not None:
        return get_batch(indices, seeds)
    return _stack_items(dataset, indices, seeds)


class _DescriptorStream:
    """Iterable of (indices, seeds) batch descriptors, walking its own copy of the sampler.

    Workers prefetch ahead of what training has consumed, so this copy runs ahead while the
    loader's own sampler only advances when a batch is handed out: the checkpointed position
    is always the consumed one.
    """

    def __init__(self, sampler: GlobalStreamSampler, global_batch: int, rank: int, world: int) -> None:
        self.sampler, self.global_batch, self.rank, self.world = sampler, global_batch, rank, world

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        while True:
            indices, stream = self.sampler.window(self.global_batch, self.rank, self.world)
            yield indices, mix_seeds(self.sampler.seed, stream, _TAG_SAMPLE)
            self.sampler.advance(self.global_batch)


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ShardedLoader:
    """Infinite per-rank batch iterator with a checkpointable global stream position.

    In-memory datasets (those with ``get_batch``) are indexed directly in the calling process,
    optionally after staging the whole dataset on ``device`` once; item-wise datasets (image
    folders) may use ``num_workers`` DataLoader processes that each build whole batches.

    Args:
        dataset: a map-style dataset returning ``(x [C,H,W] float32, y int64)``; optionally with
            ``get_batch(indices, seeds) -> (x [b,C,H,W], y [b])`` and ``num_classes``.
        local_batch_size: samples per step on this rank.
        rank, world_size: default to torch.distributed's when initialised, else 0 and 1.
        seed: the data seed (shuffle order and per-sample noise); the same on every rank.
        shuffle: epoch-wise shuffling of the global stream.
        hflip: random horizontal flips, keyed per sample (same flips at any world size).
        device: where batches are delivered; None keeps them where the dataset produces them.
        num_workers: DataLoader worker processes for datasets without ``get_batch``
            (and for those with it, if asked); 0 fetches in the calling process.
        stage_on_device: copy an in-memory dataset to ``device`` once and index it there
            (no per-step host-to-device copy of images). None: only when it is at most 2 GiB.
        prefetch_factor: batches in flight per worker.
    """

    def __init__(
        self,
        dataset: Dataset,
        local_batch_size: int,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        hflip: bool = False,
        device: torch.device | str | None = None,
        num_workers: int = 0,
        stage_on_device: bool | None = None,
        prefetch_factor: int = 2,
    ) -> None:
        dist_rank, dist_world = _dist_rank_world()
        self.rank = dist_rank if rank is None else int(rank)
        self.world_size = dist_world if world_size is None else int(world_size)
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={self.rank}, world_size={self.world_size}")
        if local_batch_size < 1:
            raise ValueError(f"local_batch_size must be >= 1, got {local_batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.local_batch_size = int(local_batch_size)
        self.global_batch_size = self.local_batch_size * self.world_size
        self.hflip = bool(hflip)
        self.device = torch.device(device) if device is not None else None
        self.num_workers = int(num_workers)
        self.prefetch_factor = int(prefetch_factor)
        self.sampler = GlobalStreamSampler(len(dataset), seed=seed, shuffle=shuffle)

        if stage_on_device is None:
            nbytes = getattr(dataset, "nbytes", None)
            stage_on_device = nbytes is not None and nbytes <= 2 << 30
        staged = stage_on_device and self.device is not None and hasattr(dataset, "to")
        self.dataset = dataset.to(self.device) if staged else dataset
        self._staged = staged
        self._uses_seeds = bool(getattr(dataset, "uses_seeds", True))
        self._iter: Iterator[tuple[Tensor, Tensor]] | None = None

    # --- the stream --------------------------------------------------------------------------

    @property
    def seed(self) -> int:
        return self.sampler.seed

    @property
    def num_classes(self) -> int:
        return int(getattr(self.dataset, "num_classes", 0))

    def next_batch(self) -> tuple[Tensor, Tensor | None]:
        """The next local batch: ``x`` (b, C, H, W) float32 and ``y`` (b,) int64, or None if unlabeled."""
        indices, stream = self.sampler.window(self.global_batch_size, self.rank, self.world_size)
        if self.num_workers > 0:
            if self._iter is None:
                self._iter = self._start_workers()
            x, y = next(self._iter)
        else:
            # Deterministic datasets ignore the seeds; skip hashing them on the hot path.
            seeds = mix_seeds(self.sampler.seed, stream, _TAG_SAMPLE) if self._uses_seeds else None
            if self._staged:
                indices = self._to_device(indices)
            x, y = _fetch(self.dataset, indices, seeds)
        self.sampler.advance(self.global_batch_size)

        x, y = self._to_device(x), self._to_device(y)
        if self.hflip:
            flip = (mix_seeds(self.sampler.seed, stream, _TAG_FLIP) & 1).bool()
            flip = self._to_device(flip).view(-1, 1, 1, 1)
            x = torch.where(flip, x.flip(-1), x)
        return x, (y if self.num_classes > 0 else None)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor | None]]:
        while True:
            yield self.next_batch()

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    @property
    def samples_seen(self) -> int:
        """Global samples consumed so far (all ranks together)."""
        return self.sampler.epoch * self.sampler.num_samples + self.sampler.position

    # --- Stateful protocol (torch.distributed.checkpoint) ------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Plain ints; identical on every rank, and valid to load at any world size."""
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
        self._iter = None  # prefetched batches belong to the old position

    # --- helpers -----------------------------------------------------------------------------

    def _to_device(self, t: Tensor) -> Tensor:
        if self.device is None or t.device == self.device:
            return t
        if self.device.type == "cuda" and t.device.type == "cpu":
            # A pageable copy would make the host wait for the whole queued step; a pinned one
            # is asynchronous, and the caching host allocator keeps the buffer alive until done.
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def _start_workers(self) -> Iterator[tuple[Tensor, Tensor]]:
        stream = _DescriptorStream(self.sampler.clone(), self.global_batch_size, self.rank, self.world_size)
        loader = DataLoader(
            _BatchFetcher(self.dataset),
            batch_size=None,
            sampler=stream,
            num_workers=self.num_workers,
            pin_memory=self.device is not None and self.device.type == "cuda",
            prefetch_factor=self.prefetch_factor,
            collate_fn=_identity,
        )
        return iter(loader)


def _identity(batch: Any) -> Any:
    return batch


# The training loader's factory name; it takes ShardedLoader's arguments unchanged.
build_loader = ShardedLoader
