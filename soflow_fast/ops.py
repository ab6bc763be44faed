"""The one dispatch point for the ops that the DiT and the objective share with the fused kernels.

Each op runs the fused Triton kernel (``soflow_fast.kernels``) when the switch enables its group
and its inputs are on CUDA, and the PyTorch reference (``<name>_ref``, also under
``ops.reference``) otherwise. Both paths have the semantics of the reference.

One switch, ``set_use_fused_kernels(enabled, *, any_device=False)``, decides for the whole process:
- ``enabled``: True / "all" (every op), False / "none" (none), or a group of ``FUSED_GROUPS``
  ("layer_norms": the two LayerNorm ops, "losses": the two losses). It starts off unless
  ``SOFLOW_USE_FUSED_KERNELS`` is ``1`` or a group name. The trainer sets it from the config's
  ``parallel.use_fused_kernels`` and ``parallel.fused_ops``.
- ``any_device=True`` sends the enabled ops to the kernels on any device: on a host without CUDA
  the kernels then run on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``, set
  for you before the kernels are first imported). Meant for tests.
- ``with ops.set_use_fused_kernels(...):`` sets it for the block and restores the previous
  setting after. A compiled function guards on the setting: changing it recompiles.
Inputs the kernels do not cover (a dtype other than fp32/bf16/fp16, a LayerNorm input that is not
(B, N, D) with D <= 16384, an empty batch, mixed devices or shapes) take the reference path
whatever the switch says.

The kernels are imported on first use of the Triton path, never at import time: Triton decides
between compiling and interpreting when a kernel is defined, and a test process may import this
module before it has chosen.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
import os
import types
from collections.abc import Collection, Iterator

import torch
import torch.nn.functional as F

USE_FUSED_ENV = "SOFLOW_USE_FUSED_KERNELS"

# Wider LayerNorm rows would not fit the kernels' one-row register tile.
MAX_LN_WIDTH = 16384
_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_HAS_TRITON = importlib.util.find_spec("triton") is not None

# The ops in each group that set_use_fused_kernels can turn on by itself.
FUSED_GROUPS = {
    "layer_norms": ("modulated_layer_norm", "gated_residual_modulated_layer_norm"),
    "losses": ("euler_consistency_loss", "adaptive_velocity_loss"),
}


def _groups(enabled: bool | str | Collection[str]) -> frozenset[str]:
    """The groups a switch value turns on: True / "all" / "1" every group, False / "none" / "0" / ""
    none, one group's name, or a collection of group names (what ``fused_groups`` returns)."""
    if isinstance(enabled, bool):
        return frozenset(FUSED_GROUPS) if enabled else frozenset()
    if isinstance(enabled, (set, frozenset, tuple, list)):
        unknown = sorted(set(enabled) - set(FUSED_GROUPS))
        if unknown:
            raise ValueError(f"fused kernels: unknown groups {unknown}; expected some of {', '.join(FUSED_GROUPS)}")
        return frozenset(enabled)
    if not isinstance(enabled, str):
        raise TypeError(f"fused kernels: expected a bool or a group name, got {type(enabled).__name__}")
    value = enabled.strip().lower()
    if value in ("1", "all", "true"):
        return frozenset(FUSED_GROUPS)
    if value in ("0", "none", "false", ""):
        return frozenset()
    if value in FUSED_GROUPS:
        return frozenset((value,))
    raise ValueError(f"fused kernels: expected all, none or one of {', '.join(FUSED_GROUPS)}; got {enabled!r}")


_fused_groups: frozenset[str] = _groups(os.environ.get(USE_FUSED_ENV, "0"))
_any_device = False
_kernels: types.ModuleType | None = None


# ----------------------------------------------------------------------------------------------
# The switch
# ----------------------------------------------------------------------------------------------


def set_use_fused_kernels(
    enabled: bool | str | Collection[str], *, any_device: bool = False
) -> contextlib.AbstractContextManager[None]:
    """Choose the ops that take the fused kernels, for the whole process, at once.

    Args:
        enabled: True (every op), False (none), or a group name from ``FUSED_GROUPS`` or a
            collection of them (their ops only); also "all", "none", "1", "0".
        any_device: also send the enabled ops' tensors that are not on CUDA to the kernels (the
            Triton interpreter on a host without CUDA); by default only CUDA tensors go.
    Returns:
        A context manager that restores the previous setting when its block exits, for
        ``with ops.set_use_fused_kernels(...):``; a plain call can ignore it.
    """
    global _fused_groups, _any_device
    previous = (_fused_groups, _any_device)
    _fused_groups, _any_device = _groups(enabled), bool(any_device)
    return _restore_on_exit(previous)


@contextlib.contextmanager
def _restore_on_exit(previous: tuple[frozenset[str], bool]) -> Iterator[None]:
    global _fused_groups, _any_device
    try:
        yield
    finally:
        _fused_groups, _any_device = previous


def fused_kernels_enabled(group: str | None = None) -> bool:
    """Whether the switch fuses any op (``group`` None) or the ops of ``group``."""
    if group is not None and group not in FUSED_GROUPS:
        raise ValueError(f"unknown fused-op group {group!r}; expected one of {', '.join(FUSED_GROUPS)}")
    return bool(_fused_groups) if group is None else group in _fused_groups


def fused_groups() -> frozenset[str]:
    """The groups the switch fuses (a value ``set_use_fused_kernels`` takes back)."""
    return _fused_groups


def _load_kernels() -> types.ModuleType:
    if not torch.cuda.is_available():
        # Without a GPU the interpreter is the only way Triton runs; it must be chosen before the
        # kernel modules are executed.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return importlib.import_module("soflow_fast.kernels")


# Dynamo runs this for real at trace time and treats it as a constant, so the lazy import also
# works when the first Triton-path call happens inside torch.compile(fullgraph=True).
@torch.compiler.assume_constant_result
def _ensure_kernels() -> bool:
    global _kernels
    if _kernels is None:
        _kernels = _load_kernels()
    return True


def load_kernels() -> types.ModuleType:
    """Import (once) and return ``soflow_fast.kernels``; without CUDA, under the Triton interpreter."""
    _ensure_kernels()
    return _kernels


def _use_triton(group: str, *tensors: torch.Tensor) -> bool:
    device = tensors[0].device
    for t in tensors:
        if t.dtype not in _FUSED_DTYPES or t.numel() == 0 or t.device != device:
            return False
    return group in _fused_groups and _HAS_TRITON and (device.type == "cuda" or _any_device)


def _ln_fusable(x: torch.Tensor, *vectors: torch.Tensor) -> bool:
    if x.dim() != 3 or x.shape[-1] > MAX_LN_WIDTH:
        return False
    return all(v.shape == (x.shape[0], x.shape[-1]) for v in vectors)


def _per_sample(batch: int, *vectors: torch.Tensor) -> bool:
    return all(v.numel() == batch for v in vectors)


# ----------------------------------------------------------------------------------------------
# Reference implementations (the spec). ``upcast`` computes in fp32, as the tests' ground truth;
# without it PyTorch computes in the inputs' dtypes under its usual type promotion.
# ----------------------------------------------------------------------------------------------


def _maybe_float(upcast: bool, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # At least fp32: float64 stays float64.
    return tuple(t.to(torch.promote_types(t.dtype, torch.float32)) for t in tensors) if upcast else tensors


def modulated_layer_norm_ref(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6, upcast: bool = False
) -> torch.Tensor:
    """y = LayerNorm(x) * (1 + scale) + shift, no affine LN weights; x (B, N, D), shift/scale (B, D)."""
    x, shift, scale = _maybe_float(upcast, x, shift, scale)
    y = F.layer_norm(x, (x.shape[-1],), eps=eps)
    return y * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def gated_residual_modulated_layer_norm_ref(
    x: torch.Tensor,
    h: torch.Tensor,
    gate: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
    upcast: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x_new = x + gate * h, y = modulated_layer_norm(x_new, shift, scale); returns (x_new, y)."""
    x, h, gate, shift, scale = _maybe_float(upcast, x, h, gate, shift, scale)
    x_new = x + gate.unsqueeze(1) * h
    return x_new, modulated_layer_norm_ref(x_new, shift, scale, eps)


def euler_consistency_loss_ref(
    nn_t: torch.Tensor,
    x_t: torch.Tensor,
    x_l: torch.Tensor,
    nn_l: torch.Tensor,
    t: torch.Tensor,
    l: torch.Tensor,
    s: torch.Tensor,
    p: float,
    eps: float,
    trig: bool = False,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SoFlow's solution-consistency surrogate; returns (loss, mse, weight), gradient to nn_t only.

    f(x, t, s) = a x + b F with Euler a = 1, b = s - t, or Trig a = cos(pi/2 (s - t)),
    b = sin(pi/2 (s - t)). dq = (f_t - f_l) / (t - l) detached, m = mean dq^2 per sample,
    w = (m + eps)^-p, loss = mean_i sign(b_i) mean_j(nn_t dq) w_i; mse = mean m, weight = mean w.
    """
    batch = nn_t.shape[0]
    width = math.prod(nn_t.shape[1:])
    nn_t, x_t, x_l, nn_l = (v.reshape(batch, width) for v in _maybe_float(upcast, nn_t, x_t, x_l, nn_l))
    t, l, s = (v.reshape(batch, 1) for v in _maybe_float(upcast, t, l, s))
    if trig:
        a_t, b_t = torch.cos(math.pi / 2 * (s - t)), torch.sin(math.pi / 2 * (s - t))
        a_l, b_l = torch.cos(math.pi / 2 * (s - l)), torch.sin(math.pi / 2 * (s - l))
        f_t, f_l = a_t * x_t + b_t * nn_t, a_l * x_l + b_l * nn_l
    else:
        b_t = s - t
        f_t, f_l = x_t + b_t * nn_t, x_l + (s - l) * nn_l
    dq = ((f_t - f_l) / (t - l)).detach()
    m = dq.square().mean(dim=1)
    w = 1.0 / (m + eps) ** p
    loss = (torch.sign(b_t.squeeze(1)).detach() * (nn_t * dq).mean(dim=1) * w).mean()
    return loss, m.mean(), w.mean()


def adaptive_velocity_loss_ref(
    v_pred: torch.Tensor,
    target: torch.Tensor,
    dbds: torch.Tensor | float,
    p: float,
    eps: float,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SoFlow's adaptively weighted velocity loss; returns (loss, mse, weight), gradient to v_pred only.

    delta = v_pred - target, m = mean delta^2 per sample, w = 1 / (|dbds| (m + eps)^p) detached;
    loss = mean w m, mse = mean m, weight = mean w. dbds: B values or one python float.
    """
    batch = v_pred.shape[0]
    v_pred, target = _maybe_float(upcast, v_pred, target)
    delta = (v_pred - target.detach()).reshape(batch, math.prod(v_pred.shape[1:]))
    m = delta.square().mean(dim=1)
    if isinstance(dbds, torch.Tensor):
        (dbds,) = _maybe_float(upcast, dbds.reshape(batch))
        dbds = dbds.abs()
    else:
        dbds = abs(dbds)
    w = (1.0 / (dbds * (m.detach() + eps) ** p)).detach()
    return (w * m).mean(), m.detach().mean(), w.mean()


reference = types.SimpleNamespace(
    modulated_layer_norm=modulated_layer_norm_ref,
    gated_residual_modulated_layer_norm=gated_residual_modulated_layer_norm_ref,
    euler_consistency_loss=euler_consistency_loss_ref,
    adaptive_velocity_loss=adaptive_velocity_loss_ref,
)


# ----------------------------------------------------------------------------------------------
# Dispatched ops: what the DiT and the objective call
# ----------------------------------------------------------------------------------------------


def modulated_layer_norm(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
) -> torch.Tensor:
    """y = LayerNorm(x) * (1 + scale) + shift, no affine LN weights.

    Args:
        x: (B, N, D) tokens.
        shift, scale: (B, D) per-sample modulation.
    """
    if _use_triton("layer_norms", x, shift, scale) and _ln_fusable(x, shift, scale):
        _ensure_kernels()
        return _kernels.modulated_layer_norm(x, shift, scale, eps)
    return modulated_layer_norm_ref(x, shift, scale, eps)


def gated_residual_modulated_layer_norm(
    x: torch.Tensor,
    h: torch.Tensor,
    gate: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x_new = x + gate * h, y = modulated_layer_norm(x_new, shift, scale).

    Args:
        x, h: (B, N, D); gate, shift, scale: (B, D).
    Returns:
        (x_new, y), both (B, N, D).
    """
    if (
        _use_triton("layer_norms", x, h, gate, shift, scale)
        and _ln_fusable(x, gate, shift, scale)
        and h.shape == x.shape
    ):
        _ensure_kernels()
        return _kernels.gated_residual_modulated_layer_norm(x, h, gate, shift, scale, eps)
    return gated_residual_modulated_layer_norm_ref(x, h, gate, shift, scale, eps)


def euler_consistency_loss(
    nn_t: torch.Tensor,
    x_t: torch.Tensor,
    x_l: torch.Tensor,
    nn_l: torch.Tensor,
    t: torch.Tensor,
    l: torch.Tensor,
    s: torch.Tensor,
    p: float,
    eps: float,
    *,
    trig: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SoFlow's solution-consistency loss (see euler_consistency_loss_ref); fp32 (loss, mse, weight).

    Args:
        nn_t: (B, ...) network output at (x_t, t, s), the only input that receives a gradient.
        x_t, x_l, nn_l: (B, ...) like nn_t; nn_l comes from a no-grad pass.
        t, l, s: (B,) times.
        p, eps: adaptive weight power and offset.
        trig: Trig parameterisation (coefficient_type "Trig") instead of Euler.
    """
    batch = nn_t.shape[0]
    if (
        _use_triton("losses", nn_t, x_t, x_l, nn_l, t, l, s)
        and x_t.shape == x_l.shape == nn_l.shape == nn_t.shape
        and _per_sample(batch, t, l, s)
    ):
        _ensure_kernels()
        return _kernels.euler_consistency_loss(nn_t, x_t, x_l, nn_l, t, l, s, p, eps, trig)
    return euler_consistency_loss_ref(nn_t, x_t, x_l, nn_l, t, l, s, p, eps, trig=trig)


def adaptive_velocity_loss(
    v_pred: torch.Tensor,
    target: torch.Tensor,
    dbds: torch.Tensor | float,
    p: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SoFlow's adaptively weighted velocity loss (see adaptive_velocity_loss_ref); fp32 (loss, mse, weight).

    Args:
        v_pred: (B, ...) predicted velocity, the only input that receives a gradient.
        target: (B, ...) target velocity.
        dbds: |db/ds(t, t)| per sample, (B,), or one python float.
        p, eps: adaptive weight power and offset.
    """
    vectors = (dbds,) if isinstance(dbds, torch.Tensor) else ()
    if (
        _use_triton("losses", v_pred, target, *vectors)
        and target.shape == v_pred.shape
        and _per_sample(v_pred.shape[0], *vectors)
    ):
        _ensure_kernels()
        return _kernels.adaptive_velocity_loss(v_pred, target, dbds, p, eps)
    return adaptive_velocity_loss_ref(v_pred, target, dbds, p, eps)
