"""MeanFlow (Geng et al. 2025), the JVP baseline, trained on the same DiT as SoFlow.

Conventions are SoFlow's (see SPEC.md): t = 0 is data, t = 1 is noise, z_t = (1 - t) x0 + t eps
and v = eps - x0. MeanFlow's network u(z, t, h = t - r) is the average velocity over [r, t]; the
DiT embeds t and the interval t - s, so F(z, t, s = r) is that network with no change, and the
jump from t to r is x_r = x_t - (t - r) u. ``soflow_fast.sampling.sample`` therefore works with a
``MeanFlowObjective`` unchanged: one step is x0 = eps - u(eps, t = 1, h = 1).

Two limits of forward-mode AD shape this file:
- Only the math SDPA kernel has a forward-mode formula (flash and memory-efficient have none), so
  the JVP runs under ``sdpa_kernel(SDPBackend.MATH)`` with the DiT's flash-attn path switched off
  and the fused Triton ops forced onto their PyTorch references. The DiT's attention is written
  out there with an fp32 softmax: under bf16 autocast on CUDA the math kernel's graph ends in a
  softmax backward with a bf16 input and an fp32 gradient, which CUDA implements for fp16 only
  (seen on an H100, torch 2.11: "expected input and grad types to match").
- ``torch.func.jvp`` does not go through DDP or FSDP2 wrappers (a PyTorch limitation). Call the
  loss on the plain module (``model.module`` under DDP; under FSDP2, a module that was never passed
  to ``fully_shard``) and all-reduce its gradients by hand after backward, as the authors' PyTorch
  port does.

The trainer compiles MeanFlow's whole ``loss_from_draws`` (guidance, JVP and loss) as one graph
(``soflow_fast.compiled.CompiledLoss``): compiling only the model inside an eager JVP compiles
nothing, and compiling the JVP alone with an eager backward failed on torch 2.13 ("ZeroTensors are
immutable"). On torch 2.14 (CPU, inductor and aot_eager) the whole loss traces as one graph with no
break, and its loss and gradients match eager.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from soflow_fast import ops
from soflow_fast.config_fields import Section, finite, in_range, one_of, option

NOISING_TYPES = ("Linear",)


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class MeanFlowConfig(Section):
    """MeanFlow hyper-parameters; defaults are the paper's ImageNet 256 (DiT) settings."""

    SECTION: ClassVar[str] = "meanflow"

    noising_type: str = option("Linear", check=one_of(*NOISING_TYPES))  # z_t = (1 - t) x0 + t eps, v = eps - x0;
    # the only path implemented
    time_mean: float = option(-0.4, check=finite())  # logit-normal mean, shared by the two draws that become t, r
    time_std: float = option(1.0, check=finite(above=0))  # logit-normal std, same
    ratio_r_neq_t: float = option(0.25, check=in_range(0, 1))  # share of the batch (its last rows) with r < t;
    # the rest is plain flow matching
    p: float = option(1.0, check=finite(at_least=0))  # adaptive weight exponent: w = 1 / (loss + eps)^p; 0 is
    # the plain squared error
    eps: float = option(0.01, check=finite(above=0))  # adaptive weight offset (the paper's c)
    omega: float = option(1.0, check=finite(above=0))  # guidance: weight of the sample velocity v in the target
    # the effective guidance scale is omega / (1 - kappa): kappa = 1 would make it infinite
    kappa: float = option(0.5, check=in_range(0, 1, open_high=True))  # guidance: weight of the conditional
    # prediction; 1 - omega - kappa goes to the unconditional
    cfg_drop_rate: float = option(0.1, check=in_range(0, 1))  # probability that a sample sees the null label


# Shared instances: take a copy (dataclasses.replace) before changing a field.
PRESETS: dict[str, MeanFlowConfig] = {
    "imagenet": MeanFlowConfig(),
    # low-dimensional data with continuous conditions (no guidance: num_classes=None skips it);
    # chosen with the same search as SoFlow's "toy" preset, see docs/compare/README.md
    "toy": MeanFlowConfig(p=0.5, time_std=1.6),
}


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) matching like's rank and dtype."""
    return v.to(like.dtype).reshape(v.shape[0], *([1] * (like.dim() - 1)))


@contextlib.contextmanager
def forward_ad_safe(model: nn.Module) -> Iterator[None]:
    """Run ``model`` on the kernels that have forward-mode AD formulas, restoring its flags after."""
    modules = list(model.modules()) if isinstance(model, nn.Module) else []  # a plain function has no flags
    switched = [m for m in modules if getattr(m, "allow_flash_attn", False)]
    explicit = [m for m in modules if getattr(m, "explicit_fp32_softmax", None) is False]
    for m in switched:
        m.allow_flash_attn = False
    for m in explicit:
        m.explicit_fp32_softmax = True
    # the fused Triton ops are autograd Functions with no jvp rule
    try:
        with sdpa_kernel(SDPBackend.MATH), ops.set_use_fused_kernels(False):
            yield
    finally:
        for m in switched:
            m.allow_flash_attn = True
        for m in explicit:
            m.explicit_fp32_softmax = False


# ----------------------------------------------------------------------------------------------
# Draws
# ----------------------------------------------------------------------------------------------


@dataclass
class MeanFlowDraws:
    """Random quantities of one step. With groups == 1, rows [:n_eq] have r = t; otherwise row i
    belongs to group i % groups, and each group's first rows have r = t."""

    n_eq: int
    noise: torch.Tensor  # (B, *dims)
    t: torch.Tensor  # (B,)
    r: torch.Tensor  # (B,), r <= t
    drop: torch.Tensor | None  # (B,) bool, True = sees the null label; None for an unconditional batch
    groups: int = 1

    def group(self, g: int) -> MeanFlowDraws:
        """Rows of group g (rank g's share of a strided global batch), r = t rows first."""
        G = self.groups
        if G == 1:
            return self
        rows = slice(g, None, G)
        drop = None if self.drop is None else self.drop[rows]
        return MeanFlowDraws(self.n_eq // G, self.noise[rows], self.t[rows], self.r[rows], drop)


# ----------------------------------------------------------------------------------------------
# Objective
# ----------------------------------------------------------------------------------------------


class MeanFlowObjective:
    """MeanFlow loss and one-network-call jumps for any module with the signature ``(x, t, s, y)``.

    Args:
        config: the hyper-parameters; the paper's ImageNet defaults when None.
        num_classes: number of real classes; the null label is index num_classes. None means an
            unconditional model (no label dropping, no guidance).
    """

    # the logs of ``loss_from_draws``, in the order the trainer reports them
    log_keys = ("loss", "mse", "weight")

    def __init__(self, config: MeanFlowConfig | None = None, num_classes: int | None = None):
        self.config = config or MeanFlowConfig()
        self.num_classes = num_classes

    # -- path and jumps (the interface ``sampling.sample`` uses) --------------------------------

    def alpha_beta(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(alpha, beta, d alpha/dt, d beta/dt) at t, for z_t = alpha x0 + beta eps."""
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)

    def interpolate(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z_t, v) with v = d z_t / dt."""
        return _bcast(1 - t, x0) * x0 + _bcast(t, x0) * noise, noise - x0

    def coefficients(self, t: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) with jump x_s = a x_t + b F(x_t, t, s): a = 1, b = s - t = -h."""
        return torch.ones_like(t), s - t

    def solution(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, y=None) -> torch.Tensor:
        """x_s = x_t - (t - s) u(x_t, t, h = t - s | y), one network call."""
        return x_t - _bcast(t - s, x_t) * model(x_t, t, s, y)

    # -- labels ---------------------------------------------------------------------------------

    def conditional(self, y: torch.Tensor | None) -> bool:
        return y is not None and self.num_classes is not None

    def guided(self, y: torch.Tensor | None) -> bool:
        """Whether the target differs from v: labels present and (omega, kappa) not (1, 0)."""
        cfg = self.config
        return self.conditional(y) and (cfg.omega != 1.0 or cfg.kappa != 0.0)

    def null_labels(self, n: int, device: torch.device) -> torch.Tensor:
        return torch.full((n,), self.num_classes, dtype=torch.long, device=device)

    def mask_labels(self, y: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        return torch.where(drop, torch.full_like(y, self.num_classes), y)

    # -- randomness -----------------------------------------------------------------------------

    def draw(self, x0: torch.Tensor, y=None, generator: torch.Generator | None = None) -> MeanFlowDraws:
        """Noise, (t, r) and label drops for a batch shaped like x0."""
        return self.draw_batch(x0.shape, x0.device, x0.dtype, y is not None, generator=generator)

    def draw_batch(
        self,
        shape: tuple[int, ...],
        device: torch.device | str,
        dtype: torch.dtype,
        labelled: bool,
        step: int = 0,
        generator: torch.Generator | None = None,
        groups: int = 1,
    ) -> MeanFlowDraws:
        """Draws for a global batch of ``shape`` split into ``groups`` strided groups (see
        ``SoFlowObjective.draw_batch``). ``step`` is unused: MeanFlow has no schedule."""
        del step
        cfg = self.config
        B = shape[0]
        if B % groups:
            raise ValueError(f"batch {B} is not divisible into {groups} groups")
        noise = torch.randn(shape, device=device, dtype=dtype, generator=generator)
        a, b = torch.sigmoid(torch.randn(2, B, device=device, generator=generator) * cfg.time_std + cfg.time_mean)
        t, r = torch.maximum(a, b), torch.minimum(a, b)
        # the role of a row is fixed on the host (a prefix of each group): no data-dependent shapes
        n_eq_local = int((1.0 - cfg.ratio_r_neq_t) * (B // groups) + 1e-9)
        r = torch.where(torch.arange(B, device=device) // groups < n_eq_local, t, r)
        drop = None
        if labelled and self.num_classes is not None:
            drop = torch.rand(B, device=device, generator=generator) < cfg.cfg_drop_rate
        return MeanFlowDraws(n_eq=n_eq_local * groups, noise=noise, t=t, r=r, drop=drop, groups=groups)

    # -- the target -----------------------------------------------------------------------------

    @torch.no_grad()
    def guided_velocity(self, model: nn.Module, z_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor, y, drop):
        """v_g = omega v + (1 - omega - kappa) u(z_t, t, 0 | null) + kappa u(z_t, t, 0 | y); v where dropped.

        The unconditional and conditional predictions (whichever has a non-zero weight) come from
        one batched no-grad call at h = 0, i.e. s = t.
        """
        cfg = self.config
        w_uncond, w_cond = 1.0 - cfg.omega - cfg.kappa, cfg.kappa
        B = z_t.shape[0]
        labels = ([self.null_labels(B, z_t.device)] if w_uncond != 0 else []) + ([y] if w_cond != 0 else [])
        v_g = cfg.omega * v
        if labels:
            k = len(labels)
            zz, tt = torch.cat([z_t] * k), torch.cat([t] * k)
            preds = model(zz, tt, tt, torch.cat(labels)).chunk(k)
            if w_uncond != 0:
                v_g = v_g + w_uncond * preds[0]
            if w_cond != 0:
                v_g = v_g + w_cond * preds[-1]
        return torch.where(_bcast(drop, v).bool(), v, v_g)

    # -- loss -----------------------------------------------------------------------------------

    def loss(self, model: nn.Module, x0: torch.Tensor, y=None, step: int = 0, generator: torch.Generator | None = None):
        """Training loss of one batch. Returns (loss, logs), every log a 0-dim tensor on device.

        ``model`` must be the unwrapped module (see the module docstring). ``step`` is unused:
        MeanFlow has no schedule; it is kept so trainers can swap objectives.
        """
        return self.loss_from_draws(model, x0, y, self.draw(x0, y, generator))

    def u_and_dudt(self, model: nn.Module, z_t: torch.Tensor, t: torch.Tensor, r: torch.Tensor, y, v: torch.Tensor):
        """(u(z_t, t, r | y), d/dt u along dz/dt = v with r fixed), one forward-mode pass.

        u keeps its autograd graph to the parameters; only this pass is held to the kernels that
        have forward-mode formulas, so the guidance pass keeps the fast ones.
        """

        def u_fn(z, t_, r_):
            return model(z, t_, r_, y)

        with forward_ad_safe(model):
            return torch.func.jvp(u_fn, (z_t, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))

    def loss_from_draws(self, model: nn.Module, x0: torch.Tensor, y, d: MeanFlowDraws):
        """The loss on one group's draws: one no-grad guidance call (when guided), then one JVP pass.

        The training protocol that ``soflow_fast.step.TrainStep`` runs, shared with SoFlow's objective.
        """
        if d.groups != 1:
            raise ValueError("loss_from_draws takes one group's rows: pass draws.group(rank)")
        cfg = self.config
        t, r, drop = d.t, d.r, d.drop
        z_t, v = self.interpolate(x0, d.noise, t)
        y_in = self.mask_labels(y, drop) if self.conditional(y) else y
        v_g = self.guided_velocity(model, z_t, t, v, y, drop) if self.guided(y) else v

        u, dudt = self.u_and_dudt(model, z_t, t, r, y_in, v_g)
        u_tgt = (v_g - _bcast((t - r).clamp(0, 1), dudt) * dudt).detach()
        sq = (u - u_tgt).square().reshape(x0.shape[0], -1).sum(dim=1)  # (B,)
        w = (1.0 / (sq.detach() + cfg.eps) ** cfg.p).detach()
        total = (w * sq).mean()
        logs = {"loss": total.detach(), "mse": sq.detach().mean(), "weight": w.mean()}
        return total, logs
