"""The SoFlow training objective: flow matching plus solution consistency, guidance baked in.

Conventions (see SPEC.md): t = 0 is data, t = 1 is noise. The network F(x, t, s, y) defines the
solution function f(x_t, t, s) = a(t, s) x_t + b(t, s) F(x_t, t, s). Field names of
``SoFlowConfig`` are the authors' YAML keys so their files load unchanged; ``PRESETS`` holds named
settings.

Teacher mode (``SoFlowObjective(config, teacher=module)``, the trainer's ``--teacher``): a frozen
flow-matching model, ``teacher(x, t, t, y)`` its velocity, supplies the flow-matching target (its velocity
at x_t, guided with its own conditional and null-label calls when guidance trains) and the consistency
step's x_l (one Euler step of that velocity, or ``teacher_steps`` Heun steps of its ODE from t to l);
see ``soflow_fast.teacher``. Without a teacher the loss is SPEC's, unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from soflow_fast import ops
from soflow_fast.config_fields import Section, at_least, finite, in_range, one_of, option
from soflow_fast.draws import Draws, mean_over_groups
from soflow_fast.network_calls import call, cat_rows, dropout_active, rows_of, same_masks_after
from soflow_fast.teacher import teacher_targets

__all__ = [
    "COEFFICIENT_TYPES",
    "L_SCHEDULES",
    "NOISING_TYPES",
    "PRESETS",
    "Draws",
    "SoFlowConfig",
    "SoFlowObjective",
    "mean_over_groups",
]

NOISING_TYPES = ("Linear", "Trig")
COEFFICIENT_TYPES = ("Euler", "Trig")
L_SCHEDULES = ("Const", "Linear", "Cosine", "Exponent")
SCM_TIMES = ("logit_normal", "uniform", "mixed", "to_data")


@dataclass(kw_only=True)
class SoFlowConfig(Section):
    """Objective hyper-parameters; defaults are the authors' ImageNet 256 (DiT) settings."""

    SECTION: ClassVar[str] = "soflow"

    noising_type: str = option("Linear", check=one_of(*NOISING_TYPES))  # Linear: x_t = (1-t) x0 + t eps;
    # Trig: cos/sin(pi t / 2)
    coefficient_type: str = option("Euler", check=one_of(*COEFFICIENT_TYPES))  # Euler: f = x + (s-t) F;
    # Trig: f = cos x + sin F of pi/2 (s-t)
    velocity_loss_ratio: float = option(0.75, check=in_range(0, 1))  # share of each batch that trains the
    # flow-matching loss
    p: float = option(1.0, check=finite(at_least=0))  # adaptive weight exponent: w = 1 / (mse + eps)^p
    eps: float = option(0.01, check=finite(above=0))  # adaptive weight floor
    time_mean: tuple[float, float, float] = option((-0.2, -1.0, 0.2), check=finite())  # logit-normal means:
    # FM t, SCM s, SCM t
    time_std: tuple[float, float, float] = option((1.0, 0.8, 0.8), check=finite(above=0))  # logit-normal stds,
    # same order
    cfg_scale: float = option(3.0, check=finite(at_least=0))  # guidance scale baked in at training time; <= 1
    # turns guidance off
    mix_ratio: float = option(0.25, check=in_range(0, 1))  # share of the guided target kept; the rest is the
    # model's own prediction
    cfg_drop_rate: float = option(0.1, check=in_range(0, 1))  # probability that a sample sees the null label
    cfg_decay_time: float = option(0.8, check=finite(at_least=0))  # guidance fades out for t above this; >= 1
    # keeps it everywhere
    scm_times: str = option("logit_normal", check=one_of(*SCM_TIMES))  # how the consistency rows draw (t, s):
    # the authors' two logit-normal draws; "uniform": t ~ U(0, 1) with a share scm_t_one at t = 1 (the pair
    # that one-step sampling asks for), s ~ U(0, t); "mixed": each row draws uniform with probability
    # scm_uniform, else logit-normal; "to_data": uniform's t with s = 0, every row a jump to the data (the
    # pairs the re-noising sampler calls)
    scm_t_one: float = option(0.2, check=in_range(0, 1))  # the share of the uniform (or to_data) rows at t = 1
    scm_uniform: float = option(0.5, check=in_range(0, 1))  # with scm_times=mixed: the chance that a row draws
    # uniform times
    l_schedule: str = option("Exponent", check=one_of(*L_SCHEDULES))  # how the middle time l approaches t
    l_init_ratio: float = option(0.1, check=in_range(0, 1))  # r(0): (t - l) / (t - s) at the first step
    l_end_ratio: float = option(0.002, check=in_range(0, 1))  # r(K): at the last step
    total_steps: int = option(400_000, check=at_least(1))  # K in the l schedule
    teacher_steps: int = option(0, check=at_least(0))  # teacher mode: x_l from this many Heun steps of the
    # teacher's ODE from t to l; 0 = one Euler step x_t + u (l - t)

    def check(self) -> None:
        if self.l_schedule == "Exponent" and (self.l_init_ratio <= 0 or self.l_end_ratio <= 0):
            raise ValueError("soflow.l_init_ratio and l_end_ratio must be > 0 for l_schedule 'Exponent'")


# Named objective settings. Shared instances: take a copy (dataclasses.replace) before changing a
# field. "imagenet" is the authors' DiT setting (the defaults). "toy" is the recipe for low-dimensional
# data (2-D sets, action chunks, 64-pixel digits with an MLP) chosen by rank in a multi-seed search over
# seven data sets and two networks and checked on two held-out sets (docs/compare/recipe/): no guidance
# (the conditions there are continuous), the adaptive weight's gentler p = 0.5 and eps = 0.1, a quarter
# of the batch on flow matching, long l steps (r from 0.5 down to 0.01), and a quarter of the
# consistency rows on uniform times, the rest on the logit-normal ones. Train it with Adam at 3e-3,
# batch 1024, a linear warm-up over the first tenth of the steps and a cosine decay after
# (functional.recommended_defaults); set total_steps to the run length so the l schedule spans it.
# "toy-teacher" is teacher mode's setting for such data, the best of the search's teacher stage: x_l
# from 4 Heun steps of the teacher's ODE, so l can jump far from t (r from 0.9 down to 0.5), with the
# logit-normal times only; it was trained with a flow-matching teacher for the first half of the steps
# and the student, started from the teacher's weights, for the second (Adam 3e-3, cosine, no warm-up).
_LOW_DIMENSIONAL = dict(cfg_scale=1.0, p=0.5, eps=0.1, velocity_loss_ratio=0.25, time_mean=(-0.2, -2.0, 1.0))
PRESETS: dict[str, SoFlowConfig] = {
    "imagenet": SoFlowConfig(),
    "toy": SoFlowConfig(
        **_LOW_DIMENSIONAL,
        scm_times="mixed",
        scm_uniform=0.25,
        scm_t_one=0.0,
        l_init_ratio=0.5,
        l_end_ratio=0.01,
        total_steps=3000,
    ),
    "toy-teacher": SoFlowConfig(
        **_LOW_DIMENSIONAL, teacher_steps=4, l_init_ratio=0.9, l_end_ratio=0.5, total_steps=1500
    ),
}

_CFG_DECAY_K = 0.025
_MIN_GAP = 1e-4  # keeps t > s and t > l so the difference quotient never divides by zero


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) matching like's rank and dtype."""
    return v.to(like.dtype).reshape(v.shape[0], *([1] * (like.dim() - 1)))


# ----------------------------------------------------------------------------------------------
# Objective
# ----------------------------------------------------------------------------------------------


class SoFlowObjective:
    """SoFlow losses, velocity and solution for any module with the signature ``(x, t, s, y)``.

    Args:
        config: the objective's hyper-parameters.
        num_classes: number of real classes; the null label is index num_classes. None means
            an unconditional model (no labels, no guidance).
        teacher: a flow model called as the network is, ``teacher(x, t, t, y)`` its velocity (teacher mode,
            see ``soflow_fast.teacher``); it is put in eval mode and its parameters stop requiring grad.
    """

    # the logs of ``loss_from_draws``, in the order the trainer reports them
    log_keys = ("loss", "fm_loss", "fm_mse", "fm_weight", "scm_loss", "scm_mse", "scm_weight")

    def __init__(self, config: SoFlowConfig | None = None, num_classes: int | None = None, teacher=None):
        self.config = config or SoFlowConfig()
        self.num_classes = num_classes
        self.teacher = teacher
        if self.config.teacher_steps and teacher is None:
            raise ValueError(
                f"soflow.teacher_steps={self.config.teacher_steps} integrates a teacher's ODE: pass teacher="
            )
        if isinstance(teacher, nn.Module):
            teacher.eval().requires_grad_(False)

    # -- noising x_t = alpha(t) x0 + beta(t) eps ------------------------------------------------

    def alpha_beta(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(alpha, beta, d alpha/dt, d beta/dt) at t."""
        if self.config.noising_type == "Linear":
            return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
        h = math.pi / 2
        return torch.cos(h * t), torch.sin(h * t), -h * torch.sin(h * t), h * torch.cos(h * t)

    def interpolate(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, v_t) with v_t = d x_t / dt."""
        a, b, da, db = self.alpha_beta(t)
        x_t = _bcast(a, x0) * x0 + _bcast(b, x0) * noise
        v_t = _bcast(da, x0) * x0 + _bcast(db, x0) * noise
        return x_t, v_t

    # -- parameterisation f = a(t, s) x + b(t, s) F ---------------------------------------------

    def coefficients(self, t: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.config.coefficient_type == "Euler":
            return torch.ones_like(t), s - t
        h = math.pi / 2
        return torch.cos(h * (s - t)), torch.sin(h * (s - t))

    def coefficient_rates(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(da/ds, db/ds) at s = t."""
        if self.config.coefficient_type == "Euler":
            return torch.zeros_like(t), torch.ones_like(t)
        return torch.zeros_like(t), torch.full_like(t, math.pi / 2)

    def solution(self, model: nn.Module, x_t, t, s, y=None, model_kwargs: dict | None = None) -> torch.Tensor:
        """f(x_t, t, s | y): the jump from time t to time s in one network call.

        ``model_kwargs`` (here and in every entry point below) is passed to each network call, its
        per-row tensors sliced along with the batch: ``{"augment_labels": a}`` for the U-Net.
        """
        a, b = self.coefficients(t, s)
        return _bcast(a, x_t) * x_t + _bcast(b, x_t) * call(model, x_t, t, s, y, model_kwargs)

    def velocity_from_network(self, x_t: torch.Tensor, t: torch.Tensor, net: torch.Tensor) -> torch.Tensor:
        da, db = self.coefficient_rates(t)
        return _bcast(da, x_t) * x_t + _bcast(db, x_t) * net

    def velocity(self, model: nn.Module, x_t, t, y=None, model_kwargs: dict | None = None) -> torch.Tensor:
        """v(x_t, t | y) = d/ds f(x_t, t, s) at s = t."""
        return self.velocity_from_network(x_t, t, call(model, x_t, t, t, y, model_kwargs))

    # -- guidance -------------------------------------------------------------------------------

    def guided(self, labels: torch.Tensor | None) -> bool:
        return labels is not None and self.num_classes is not None and self.config.cfg_scale > 1

    def null_labels(self, n: int, device: torch.device) -> torch.Tensor:
        return torch.full((n,), self.num_classes, dtype=torch.long, device=device)

    def mask_labels(self, y: torch.Tensor, cfg_mask: torch.Tensor) -> torch.Tensor:
        return torch.where(cfg_mask, torch.full_like(y, self.num_classes), y)

    def guidance_decay(self, t: torch.Tensor) -> torch.Tensor:
        """g(t): 1 up to cfg_decay_time, then a smooth fall to 0 at t = 1."""
        dt = self.config.cfg_decay_time
        if dt >= 1:
            return torch.ones_like(t)
        d = ((1 - t) / (1 - dt)).clamp(0, 1 - 1e-6)
        fade = 1 - torch.exp(-_CFG_DECAY_K * d / (1 - d))
        return torch.where(t <= dt, torch.ones_like(t), fade)

    def guided_velocity(
        self,
        v_t: torch.Tensor,
        t: torch.Tensor,
        v_uncond: torch.Tensor,
        v_mix: torch.Tensor | None,
        cfg_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Training target: v_t where the label was dropped, the guided (and mixed) velocity elsewhere."""
        cfg = self.config
        g = _bcast(self.guidance_decay(t), v_t)
        v_g = v_t + g * (cfg.cfg_scale - 1) * (v_t - v_uncond)
        if v_mix is not None:
            v_g = cfg.mix_ratio * v_g + (1 - cfg.mix_ratio) * v_mix
        return torch.where(_bcast(cfg_mask, v_t).bool(), v_t, v_g)

    # -- loss terms shared by the component and the batched paths -------------------------------

    def _velocity_terms(self, v_pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor):
        """(loss, mean delta^2, mean w) with w = 1 / (|db/ds| (mse + eps)^p), through the ops dispatch."""
        _, dbds = self.coefficient_rates(t)
        return ops.adaptive_velocity_loss(v_pred, target.detach(), dbds, self.config.p, self.config.eps)

    def _consistency_terms(self, nn_t, x_t, t, s, x_l, nn_l, l):
        """The division-free consistency surrogate (its gradient is the weighted consistency
        gradient), with mean dq^2 and mean w, through the ops dispatch."""
        cfg = self.config
        return ops.euler_consistency_loss(
            nn_t, x_t, x_l.detach(), nn_l.detach(), t, l, s, cfg.p, cfg.eps, trig=cfg.coefficient_type == "Trig"
        )

    # -- component losses (the authors' structure, one network call per term) --------------------

    def _no_teacher(self, name: str) -> None:
        if self.teacher is not None:
            raise ValueError(f"{name} is the authors' per-term loss, which has no teacher: use loss()")

    def velocity_loss(self, model, x0, noise, t, y=None, cfg_mask=None, model_kwargs: dict | None = None):
        """Flow-matching loss on (x0, noise, t). Returns (loss, mean delta^2, mean weight)."""
        self._no_teacher("velocity_loss")
        x_t, v_t = self.interpolate(x0, noise, t)
        kw = model_kwargs
        if self.guided(y):
            if cfg_mask is None:
                raise ValueError("guided velocity_loss needs cfg_mask (True = sees the null label)")
            v_pred = self.velocity(model, x_t, t, self.mask_labels(y, cfg_mask), kw)
            with torch.no_grad():
                v_uncond = self.velocity(model, x_t, t, self.null_labels(x0.shape[0], x0.device), kw)
                target = self.guided_velocity(v_t, t, v_uncond, v_pred.detach(), cfg_mask)
        else:
            v_pred = self.velocity(model, x_t, t, y, kw)
            target = v_t
        return self._velocity_terms(v_pred, target, t)

    def consistency_loss(self, model, x0, noise, t, l, s, y=None, cfg_mask=None, model_kwargs: dict | None = None):
        """Solution-consistency loss on (x0, noise) with times t > l > s.

        With dropout active, the target pass f(x_l, l, s) and the pass with grad f(x_t, t, s) draw
        the same masks (the RNG is put back between them), as the authors do: with fresh masks the
        difference quotient (f_t - f_l) / (t - l) would grow like 1 / (t - l).

        Returns (surrogate loss, mean dq^2, mean weight).
        """
        self._no_teacher("consistency_loss")
        x_t, v_t = self.interpolate(x0, noise, t)
        kw = model_kwargs
        with torch.no_grad():
            if self.guided(y):
                if cfg_mask is None:
                    raise ValueError("guided consistency_loss needs cfg_mask (True = sees the null label)")
                y_in = self.mask_labels(y, cfg_mask)
                v_uncond = self.velocity(model, x_t, t, self.null_labels(x0.shape[0], x0.device), kw)
                v_mix = self.velocity(model, x_t, t, y, kw) if self.config.mix_ratio != 1 else None
                u = self.guided_velocity(v_t, t, v_uncond, v_mix, cfg_mask)
            else:
                y_in, u = y, v_t
            x_l = x_t + u * _bcast(l - t, x_t)
        with same_masks_after(dropout_active(model), x0.device), torch.no_grad():
            nn_l = call(model, x_l, l, s, y_in, kw)
        nn_t = call(model, x_t, t, s, y_in, kw)
        return self._consistency_terms(nn_t, x_t, t, s, x_l, nn_l, l)

    # -- time sampling --------------------------------------------------------------------------

    def middle_time(self, t: torch.Tensor, s: torch.Tensor, step: int, total_steps: int | None = None) -> torch.Tensor:
        """l = t + (s - t) r(k, K), before clamping."""
        cfg = self.config
        K = cfg.total_steps if total_steps is None else total_steps
        q = min(max(step / K, 0.0), 1.0)
        r0, r1 = cfg.l_init_ratio, cfg.l_end_ratio
        if cfg.l_schedule == "Const":
            r = r1
        elif cfg.l_schedule == "Linear":
            r = r0 + (r1 - r0) * q
        elif cfg.l_schedule == "Cosine":
            r = r1 + (r0 - r1) * (1 + math.cos(math.pi * q)) / 2
        else:
            r = r0 * (r1 / r0) ** q
        return t + (s - t) * r

    def _logit_normal(self, n: int, which: int, device, generator) -> torch.Tensor:
        z = torch.randn(n, device=device, generator=generator)
        return torch.sigmoid(z * self.config.time_std[which] + self.config.time_mean[which])

    def _uniform_times(self, n: int, device, generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, t): t ~ U(0, 1) with a share scm_t_one moved to t = 1, s ~ U(0, t)."""
        t = torch.rand(n, device=device, generator=generator)
        t = torch.where(torch.rand(n, device=device, generator=generator) < self.config.scm_t_one, 1.0, t)
        return t * torch.rand(n, device=device, generator=generator), t

    def _scm_times(self, n: int, device, generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, t) draws of the consistency rows, before t > s is enforced."""
        mode = self.config.scm_times
        if mode in ("uniform", "to_data"):
            s, t = self._uniform_times(n, device, generator)
            return (torch.zeros_like(s) if mode == "to_data" else s), t
        s, t = self._logit_normal(n, 1, device, generator), self._logit_normal(n, 2, device, generator)
        if mode == "mixed":  # drawn after the logit-normal pair, so scm_uniform = 0 keeps those draws
            s_u, t_u = self._uniform_times(n, device, generator)
            uniform = torch.rand(n, device=device, generator=generator) < self.config.scm_uniform
            s, t = torch.where(uniform, s_u, s), torch.where(uniform, t_u, t)
        return s, t

    def draw(
        self,
        x0: torch.Tensor,
        y=None,
        step: int = 0,
        generator: torch.Generator | None = None,
        groups: int = 1,
    ) -> Draws:
        """All random quantities of one step for a batch shaped like x0 (see ``draw_batch``)."""
        return self.draw_batch(x0.shape, x0.device, x0.dtype, y is not None, step, generator, groups)

    def draw_batch(
        self,
        shape: tuple[int, ...],
        device: torch.device | str,
        dtype: torch.dtype,
        labelled: bool,
        step: int = 0,
        generator: torch.Generator | None = None,
        groups: int = 1,
    ) -> Draws:
        """Draws for a global batch of ``shape``, split the authors' way inside each of ``groups``.

        ``labelled`` says whether the batch has labels; label drops are drawn only when guidance
        trains (labels, a class-conditional objective and cfg_scale > 1). Row i belongs to group
        i % groups (the rank that takes it, in a strided split of the global batch) at local index
        i // groups; the first int(velocity_loss_ratio * B / groups) local rows of every group train
        flow matching, the rest consistency. ``Draws.group(g)`` returns group g's rows in that
        prefix layout. Every rank draws the same global batch from the same generator state, so a
        run's randomness does not depend on the world size. Everything is drawn on ``device``.
        """
        B = shape[0]
        if B % groups:
            raise ValueError(f"batch {B} is not divisible into {groups} groups")
        guided = labelled and self.num_classes is not None and self.config.cfg_scale > 1
        n_local = B // groups
        n_fm_local = int(self.config.velocity_loss_ratio * n_local)
        noise = torch.randn(shape, device=device, generator=generator, dtype=dtype)
        t_fm = self._logit_normal(B, 0, device, generator)
        time1, time2 = self._scm_times(B, device, generator)
        cfg_mask = torch.rand(B, device=device, generator=generator) < self.config.cfg_drop_rate if guided else None
        t_scm = time2.clamp_min(_MIN_GAP)
        s_scm = torch.minimum(time1, t_scm - _MIN_GAP)
        l_scm = torch.minimum(self.middle_time(t_scm, s_scm, step), t_scm - _MIN_GAP)
        is_fm = torch.arange(B, device=device) // groups < n_fm_local  # built on the device: no copy to wait for
        return Draws(
            n_fm=n_fm_local * groups,
            noise=noise,
            t=torch.where(is_fm, t_fm, t_scm),
            s=torch.where(is_fm, t_fm, s_scm),
            l=torch.where(is_fm, t_fm, l_scm),
            cfg_mask=cfg_mask,
            groups=groups,
        )

    # -- the batched training entry point -------------------------------------------------------

    def loss(
        self,
        model,
        x0: torch.Tensor,
        y=None,
        step: int = 0,
        generator: torch.Generator | None = None,
        groups: int = 1,
        model_kwargs: dict | None = None,
    ):
        """Training loss of one batch. Returns (loss, logs) with every log a 0-dim tensor on device.

        ``groups`` > 1 reproduces, in one process, a strided split of this batch over that many
        ranks: the loss is the mean of the groups' losses, as gradient averaging would give.
        """
        d = self.draw(x0, y, step, generator, groups)
        return mean_over_groups(self.loss_from_draws, model, x0, y, d, model_kwargs)

    def loss_from_draws(self, model, x0: torch.Tensor, y, d: Draws, model_kwargs: dict | None = None):
        """The batched loss of one group of rows (FM rows first): at most three network calls, whatever the batch split.

        One no-grad pass for the guidance velocities (unconditional for every row, conditional
        for the consistency rows when mixing), one no-grad pass for the consistency targets, and
        one grad pass over the whole batch (FM rows at (t, t), consistency rows at (t, s)). In teacher
        mode the teacher's calls (``soflow_fast.teacher.teacher_targets``) give v_t, the unconditional
        velocity and x_l instead of the guidance pass.
        The training protocol that ``soflow_fast.step.TrainStep`` runs, shared with MeanFlow's objective.
        """
        cfg = self.config
        if d.groups != 1:
            raise ValueError("loss_from_draws takes one group's rows: pass draws.group(rank)")
        B, n_fm = x0.shape[0], d.n_fm
        n_scm = B - n_fm
        sl = slice(n_fm, B)  # the consistency rows
        kw = model_kwargs
        x_t, v_t = self.interpolate(x0, d.noise, d.t)
        guided = self.guided(y)
        y_in = self.mask_labels(y, d.cfg_mask) if guided else y
        mix_scm = guided and cfg.mix_ratio != 1 and n_scm > 0

        with torch.no_grad():
            if self.teacher is not None:
                v_t, v_uncond, x_l = teacher_targets(self, model, x_t, y, d, kw)
            elif guided:
                xs, ts, ys, kws = [x_t], [d.t], [self.null_labels(B, x0.device)], [kw]
                if mix_scm:
                    xs.append(x_t[sl])
                    ts.append(d.t[sl])
                    ys.append(y[sl])
                    kws.append(rows_of(kw, sl))
                x_g, t_g = torch.cat(xs), torch.cat(ts)
                v_g = self.velocity_from_network(x_g, t_g, call(model, x_g, t_g, t_g, torch.cat(ys), cat_rows(kws)))
                v_uncond = v_g[:B]
            if n_scm and self.teacher is None:
                if guided:
                    v_mix = v_g[B:] if mix_scm else None
                    u = self.guided_velocity(v_t[sl], d.t[sl], v_uncond[sl], v_mix, d.cfg_mask[sl])
                else:
                    u = v_t[sl]
                x_l = x_t[sl] + u * _bcast(d.l[sl] - d.t[sl], u)

        # Dropout: a consistency row's target f(x_l, l, s) must be computed with the masks that row
        # gets in the grad pass, or the difference quotient (f_t - f_l) / (t - l) grows like
        # 1 / (t - l). The grad pass runs every row, FM rows first. A dropout mask depends on the
        # RNG state and the activation's shape, not on its values, so with dropout active the target
        # pass runs on the grad pass's full batch (the FM rows fed their own grad-pass inputs, their
        # outputs dropped) and the RNG is put back after it: every dropout layer then draws, row for
        # row, the same masks in both passes. (This holds in eager mode; without dropout the target
        # pass covers the consistency rows only.)
        same_masks = n_scm > 0 and dropout_active(model)
        if n_scm:
            with same_masks_after(same_masks, x0.device), torch.no_grad():
                if same_masks and n_fm:
                    x_in, t_in = torch.cat([x_t[:n_fm], x_l]), torch.cat([d.t[:n_fm], d.l[sl]])
                    nn_l = call(model, x_in, t_in, d.s, y_in, kw)[sl]
                else:
                    nn_l = call(model, x_l, d.l[sl], d.s[sl], None if y_in is None else y_in[sl], rows_of(kw, sl))

        net = call(model, x_t, d.t, d.s, y_in, kw)  # the one pass with grad
        total = x0.new_zeros(())
        logs = {}
        if n_fm:
            fm = slice(0, n_fm)
            v_pred = self.velocity_from_network(x_t[fm], d.t[fm], net[fm])
            if guided:
                target = self.guided_velocity(v_t[fm], d.t[fm], v_uncond[fm], v_pred.detach(), d.cfg_mask[fm])
            else:
                target = v_t[fm]
            fm_loss, fm_mse, fm_w = self._velocity_terms(v_pred, target, d.t[fm])
            total = total + fm_loss * (n_fm / B)
            logs.update(fm_loss=fm_loss.detach(), fm_mse=fm_mse, fm_weight=fm_w)
        if n_scm:
            scm_loss, scm_mse, scm_w = self._consistency_terms(net[sl], x_t[sl], d.t[sl], d.s[sl], x_l, nn_l, d.l[sl])
            total = total + scm_loss * (n_scm / B)
            logs.update(scm_loss=scm_loss.detach(), scm_mse=scm_mse, scm_weight=scm_w)
        logs["loss"] = total.detach()
        return total, logs
