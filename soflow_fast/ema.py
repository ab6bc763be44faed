"""Exponential moving averages of model weights, fused across tensors and decay rates.

Each step calls ``ema.update(model)``, which computes ``ema = decay * ema + (1 - decay) * param`` for
every parameter in one pass of the ``soflow_fast._C`` extension (C++/OpenMP on CPU, one
multi-tensor launch on CUDA). Without the extension, or for tensors it cannot take, the same update
runs through ``torch._foreach_lerp_`` after a one-time notice.

Under FSDP2 the parameters are DTensors sharded over ranks; the EMA keeps DTensor shadows with the
same placements and updates only the local shards, so an update needs no communication and
``state_dict()`` hands DTensors to ``torch.distributed.checkpoint`` as they are.

Example::

    ema = EMA(model, decays=(0.9999, 0.999))
    for batch in loader:
        ...
        optimizer.step()
        ema.update(model)
    with ema.swapped(model, decay=0.9999):
        samples = sample(model)
"""

from __future__ import annotations

import contextlib
import numbers
import os
import warnings
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from soflow_fast.config_fields import Section, at_least, in_range, option

try:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # torch built without distributed support
    DTensor = None
    distribute_tensor = None
    FSDPModule = None

try:
    from soflow_fast import _C
except ImportError as _error:
    _C = None
    _C_IMPORT_ERROR: ImportError | None = _error
else:
    _C_IMPORT_ERROR = None

__all__ = ["EMA", "EMAConfig", "copy_", "ema_update_", "ema_update_multi_", "extension_available"]

# Wrapper modules that insert a level into parameter names without changing the model: dropping
# them keeps EMA keys identical for a plain, compiled, or activation-checkpointed model.
_WRAPPER_NAMES = frozenset({"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"})

_noticed: set[str] = set()


def _notice_once(reason: str) -> None:
    if reason not in _noticed:
        _noticed.add(reason)
        warnings.warn(f"soflow_fast.ema: {reason}; using torch._foreach_lerp_ instead", RuntimeWarning, stacklevel=3)


def extension_available(device: torch.device | str = "cpu") -> bool:
    """Whether soflow_fast._C can update tensors on ``device``."""
    device = torch.device(device)
    if _C is None:
        return False
    return device.type == "cpu" or (device.type == "cuda" and _C.cuda_built())


# What the EMA kernels take as parameters; other dtypes (fp16 models) go through torch.
_EXT_PARAM_DTYPES = (torch.float32, torch.bfloat16)


def _use_extension(tensors: Sequence[torch.Tensor], use_extension: bool | None, check_dtypes: bool = False) -> bool:
    if use_extension is False or not tensors:
        return False
    if use_extension is None and os.environ.get("SOFLOW_EMA_EXTENSION", "1") == "0":
        _notice_once("SOFLOW_EMA_EXTENSION=0 is set")
        return False
    device = tensors[0].device
    odd = next((t.dtype for t in tensors if t.dtype not in _EXT_PARAM_DTYPES), None) if check_dtypes else None
    if extension_available(device) and (odd is None or use_extension):  # forced: let _C say what is wrong
        return True
    if _C is None:
        reason = f"the C++ extension soflow_fast._C is not built ({_C_IMPORT_ERROR})"
    elif odd is not None:
        reason = f"soflow_fast._C takes float32 or bfloat16 parameters, not {odd}"
    else:
        reason = f"soflow_fast._C has no kernels for {device.type} tensors"
    if use_extension:
        raise RuntimeError(reason)
    _notice_once(reason)
    return False


def _local(t: torch.Tensor) -> torch.Tensor:
    """The shard this rank holds: no communication, and writes to it change the DTensor."""
    return t.to_local() if DTensor is not None and isinstance(t, DTensor) else t


# ---------------------------------------------------------------------------------------- functional ops


def _lerp_fallback(emas: Sequence[torch.Tensor], params: Sequence[torch.Tensor], decay: float, fp64: bool) -> None:
    # torch.lerp wants one dtype per pair, so bf16 parameters (and fp64 math) go through temporaries.
    weight = 1.0 - decay
    fast = [i for i, (e, p) in enumerate(zip(emas, params, strict=True)) if e.dtype == p.dtype and not fp64]
    if fast:
        torch._foreach_lerp_([emas[i] for i in fast], [params[i] for i in fast], weight)
    slow = sorted(set(range(len(emas))) - set(fast))
    if slow:
        acc = torch.float64 if fp64 else torch.float32
        wide = [emas[i].to(torch.promote_types(emas[i].dtype, acc)) for i in slow]
        torch._foreach_lerp_(wide, [params[i].to(wide[j].dtype) for j, i in enumerate(slow)], weight)
        torch._foreach_copy_([emas[i] for i in slow], wide)


@torch.no_grad()
def ema_update_(
    emas: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    decay: float,
    fp64: bool = False,
    *,
    use_extension: bool | None = None,
) -> None:
    """In place: ``emas[i] = decay * emas[i] + (1 - decay) * params[i]``.

    Args:
        emas: float32/float64 tensors (local shards, not DTensors).
        params: float32/bfloat16 tensors of the same shapes.
        decay: in [0, 1].
        fp64: compute the blend in double precision.
        use_extension: None picks soflow_fast._C when it can; False forces the torch fallback;
            True raises if the extension cannot run.
    """
    if _use_extension(params, use_extension, check_dtypes=True):
        _C.ema_update_(list(emas), list(params), float(decay), fp64)
    else:
        _lerp_fallback(emas, params, float(decay), fp64)


@torch.no_grad()
def ema_update_multi_(
    emas_per_decay: Sequence[Sequence[torch.Tensor]],
    params: Sequence[torch.Tensor],
    decays: Sequence[float],
    fp64: bool = False,
    *,
    use_extension: bool | None = None,
) -> None:
    """``ema_update_`` for several decay rates; the extension reads each parameter once for all of them."""
    if _use_extension(params, use_extension, check_dtypes=True):
        _C.ema_update_multi_([list(e) for e in emas_per_decay], list(params), [float(d) for d in decays], fp64)
    else:
        if len(emas_per_decay) != len(decays):
            raise ValueError(f"got {len(emas_per_decay)} EMA lists but {len(decays)} decays")
        for emas, decay in zip(emas_per_decay, decays, strict=True):
            _lerp_fallback(emas, params, float(decay), fp64)


@torch.no_grad()
def copy_(dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor], *, use_extension: bool | None = None) -> None:
    """In place: ``dst[i].copy_(src[i])`` for every i, as one parallel pass when the extension is built."""
    if _use_extension(src, use_extension):
        _C.copy_(list(dst), list(src))
    elif dst:
        torch._foreach_copy_(list(dst), list(src))


# ---------------------------------------------------------------------------------------- the EMA class


def _clean_name(name: str) -> str:
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_NAMES)


def _slots(model: nn.Module, kind: str) -> list[tuple[str, nn.Module, str]]:
    """(clean name, owning module, attribute) per parameter or buffer, tied tensors once.

    Looking tensors up through their owner every step, rather than keeping the tensor objects,
    follows FSDP2 when it swaps sharded and unsharded parameters on the same module.
    """
    slots, seen = [], set()
    for module_name, module in model.named_modules():
        store = module._parameters if kind == "param" else module._buffers
        for attr, tensor in store.items():
            if tensor is None or id(tensor) in seen:
                continue
            if kind == "buffer" and attr in module._non_persistent_buffers_set:
                continue
            seen.add(id(tensor))
            slots.append((_clean_name(f"{module_name}.{attr}" if module_name else attr), module, attr))
    return slots


def _reshard(model: nn.Module) -> None:
    """Put every FSDP2-sharded module of ``model`` into its sharded state.

    A module with ``reshard_after_forward=False`` keeps its parameters gathered after a forward
    (FSDP2 registers the full tensors on the module until the next backward or reshard). The EMA
    reads and writes parameters through their owners, so it first asks for the sharded ones.
    """
    if FSDPModule is None:
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _assign(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst <- src across the sharded/unsharded combinations that copying EMA weights meets."""
    dst_dt = DTensor is not None and isinstance(dst, DTensor)
    src_dt = DTensor is not None and isinstance(src, DTensor)
    if dst_dt and src_dt and dst.placements == src.placements and dst.device_mesh == src.device_mesh:
        dst.to_local().copy_(src.to_local())
    elif dst_dt:
        # Every rank holds the full value, so each slices out its own shard (src_data_rank=None).
        full = src.full_tensor() if src_dt else src
        shard = distribute_tensor(full.to(dst.dtype), dst.device_mesh, dst.placements, src_data_rank=None)
        dst.to_local().copy_(shard.to_local())
    else:
        dst.copy_(src.full_tensor() if src_dt else src)  # full_tensor() is a collective: all ranks call it


@dataclass(kw_only=True)
class EMAConfig(Section):
    """The training run's moving averages of the weights (the grids, evals and exports sample them)."""

    SECTION: ClassVar[str] = "ema"

    ema_decays: tuple[float, ...] = option((0.9999,), check=in_range(0, 1, open_low=True, open_high=True))  # per
    # training step; the first is the one sampled
    ema_every: int = option(1, check=at_least(1))  # update every this many steps, with decay**ema_every (the
    # authors' CIFAR-10: 16)
    ema_fp64: bool = option(False)  # blend in float64 (the authors' CIFAR-10 recipe)

    def build(self, model: nn.Module) -> EMA:
        return EMA(model, decays=self.ema_decays, every=self.ema_every, fp64=self.ema_fp64)


class EMA:
    """Moving averages of a model's parameters at one or more decay rates.

    Args:
        model: the model to track; the averages start as copies of its current weights.
        decays: one decay rate or several, e.g. ``(0.9999, 0.999)``; the other methods pick one
            with ``decay=`` (default: the first).
        dtype: storage dtype of the averages (float32, or float64 for exact accumulation).
        fp64: compute every update in double precision, whatever ``dtype``.
        every: update only on every ``every``-th call of :meth:`update`, with each decay raised to the
            power ``every`` (decays are per call: the authors' CIFAR-10 EMA, 0.9999 per step applied as
            0.9999**16 every 16 steps).
        use_extension: None = soflow_fast._C when it can run, else torch with a notice;
            False = always torch; True = raise when the extension cannot run.

    Buffers (non-persistent ones excluded) are copied, not averaged, and shared by all decay rates.
    """

    def __init__(
        self,
        model: nn.Module,
        decays: float | Sequence[float] = 0.9999,
        *,
        dtype: torch.dtype = torch.float32,
        fp64: bool = False,
        every: int = 1,
        use_extension: bool | None = None,
    ) -> None:
        self.decays = (float(decays),) if isinstance(decays, numbers.Real) else tuple(float(d) for d in decays)
        if not self.decays or any(not 0.0 <= d <= 1.0 for d in self.decays):
            raise ValueError(f"decays must be one or more numbers in [0, 1], got {decays!r}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.dtype, self.fp64, self.every, self.use_extension = dtype, fp64, every, use_extension
        self._blend_decays = tuple(d**every for d in self.decays)  # what one update blends with
        self.num_updates = 0  # averaging steps taken
        self._calls = 0  # update() calls, for `every`
        self._bind(model)
        with torch.no_grad():
            params = [getattr(m, a) for _, m, a in self._param_slots]
            # .to(copy=True) keeps DTensor placements, so shadows shard exactly like the parameters.
            self.shadows: list[dict[str, torch.Tensor]] = [
                {
                    n: p.detach().to(dtype=dtype, copy=True)
                    for (n, _, _), p in zip(self._param_slots, params, strict=True)
                }
                for _ in self.decays
            ]
            self.buffers: dict[str, torch.Tensor] = {
                n: getattr(m, a).detach().clone() for n, m, a in self._buffer_slots
            }
        self._cache_locals()

    # -- model binding

    def _bind(self, model: nn.Module) -> None:
        self._param_slots = _slots(model, "param")
        self._buffer_slots = _slots(model, "buffer")
        self._model = weakref.ref(model)

    def _check_model(self, model: nn.Module) -> None:
        """Re-bind to ``model`` when it is another object than last time, if its names match."""
        if self._model() is model:
            return
        params, buffers = _slots(model, "param"), _slots(model, "buffer")
        old = [n for n, _, _ in self._param_slots + self._buffer_slots]
        new = [n for n, _, _ in params + buffers]
        if new != old:
            raise ValueError(
                f"model does not match this EMA: missing {sorted(set(old) - set(new))[:5]}, "
                f"unexpected {sorted(set(new) - set(old))[:5]}"
            )
        self._param_slots, self._buffer_slots, self._model = params, buffers, weakref.ref(model)

    def _cache_locals(self) -> None:
        # Shadows never move once created (loading copies into them), so their shards are fetched once.
        self._shadow_locals = [[_local(t) for t in shadow.values()] for shadow in self.shadows]
        self._buffer_locals = [_local(t) for t in self.buffers.values()]

    # -- training

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Blend the model's current parameters into every average; copy its buffers."""
        self._calls += 1
        if (self._calls - 1) % self.every:
            return
        self._check_model(model)
        params = [_local(getattr(m, a)) for _, m, a in self._param_slots]
        if len(self.decays) == 1:
            decay = self._blend_decays[0]
            ema_update_(self._shadow_locals[0], params, decay, self.fp64, use_extension=self.use_extension)
        else:
            decays = self._blend_decays
            ema_update_multi_(self._shadow_locals, params, decays, self.fp64, use_extension=self.use_extension)
        if self._buffer_slots:
            copy_(
                self._buffer_locals,
                [_local(getattr(m, a)) for _, m, a in self._buffer_slots],
                use_extension=self.use_extension,
            )
        self.num_updates += 1

    # -- using the averages

    def _index(self, decay: float | None) -> int:
        if decay is None:
            return 0
        for k, d in enumerate(self.decays):
            if abs(d - float(decay)) <= 1e-12:
                return k
        raise ValueError(f"this EMA tracks decays {self.decays}, not {decay}")

    def shadow(self, decay: float | None = None) -> dict[str, torch.Tensor]:
        """Averaged parameters for one decay rate (default: the first), keyed by clean parameter name."""
        return self.shadows[self._index(decay)]

    @torch.no_grad()
    def copy_to(self, model: nn.Module, decay: float | None = None) -> None:
        """Overwrite the model's parameters (and buffers) with the averages for ``decay``.

        The model may be sharded like the EMA, sharded differently, or not sharded at all (e.g. a
        single-GPU sampling copy); the latter gathers full tensors, so every rank must call this.
        """
        shadow = self.shadow(decay)
        _reshard(model)
        targets = {n: getattr(m, a) for n, m, a in _slots(model, "param")}
        buffers = {n: getattr(m, a) for n, m, a in _slots(model, "buffer")}
        missing = sorted((set(shadow) - set(targets)) | (set(self.buffers) - set(buffers)))
        if missing:
            raise ValueError(f"copy_to: the model has no parameters or buffers named {missing[:5]}")
        for name, value in shadow.items():
            _assign(targets[name], value)
        for name, value in self.buffers.items():
            _assign(buffers[name], value)

    @contextlib.contextmanager
    def swapped(self, model: nn.Module, decay: float | None = None) -> Iterator[nn.Module]:
        """Temporarily put the averages for ``decay`` into the model (e.g. for sampling); restores on exit.

        The model may run forwards inside the block: whatever FSDP2 state they leave, the weights are
        restored into the sharded parameters they were saved from.
        """
        _reshard(model)
        slots = _slots(model, "param") + _slots(model, "buffer")
        with torch.no_grad():
            saved = [_local(getattr(m, a)).clone() for _, m, a in slots]
        try:
            self.copy_to(model, decay)
            yield model
        finally:
            _reshard(model)
            with torch.no_grad():
                for (_, m, a), value in zip(slots, saved, strict=True):
                    _local(getattr(m, a)).copy_(value)

    # -- checkpointing

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (DTensors when sharded), returned by reference so DCP can load in place."""
        state = {
            "num_updates": torch.tensor(self.num_updates, dtype=torch.int64),
            "calls": torch.tensor(self._calls, dtype=torch.int64),
            "decays": torch.tensor(self.decays, dtype=torch.float64),
        }
        for k, shadow in enumerate(self.shadows):
            state.update({f"shadow.{k}.{n}": t for n, t in shadow.items()})
        state.update({f"buffers.{n}": t for n, t in self.buffers.items()})
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore from :meth:`state_dict` output; values may be full tensors or DTensors."""
        decays = tuple(float(d) for d in torch.as_tensor(state["decays"]).tolist())
        if len(decays) != len(self.decays) or any(abs(a - b) > 1e-12 for a, b in zip(decays, self.decays, strict=True)):
            raise ValueError(f"checkpoint has EMA decays {decays} but this EMA was built with {self.decays}")
        expected = set(self.state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise KeyError(f"EMA state_dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
        targets = [(f"shadow.{k}.{n}", t) for k, s in enumerate(self.shadows) for n, t in s.items()]
        targets += [(f"buffers.{n}", t) for n, t in self.buffers.items()]
        for key, target in targets:
            value = state[key]
            if value is target:  # DCP already loaded into our own tensor
                continue
            if tuple(value.shape) != tuple(target.shape):
                shapes = f"{tuple(value.shape)}, expected {tuple(target.shape)}"
                raise ValueError(f"EMA state_dict: {key} has shape {shapes}")
            _assign(target, value)
        self.num_updates = int(state["num_updates"])
        self._calls = int(state["calls"])
