"""Teacher mode: a frozen flow-matching model supplies SoFlow's velocity targets; flow models as sources.

A teacher is called as the student is, ``teacher(x, t, t, y, **model_kwargs)`` being its velocity at (x, t) in
SoFlow's time (t = 1 is noise; the Euler parameterisation): a model trained with ``run.objective=fm``, a SoFlow
model with Euler coefficients, or a SiT checkpoint converted by the DiT's registry entry. With
``SoFlowObjective(config, teacher=...)`` its velocities stand where SPEC.md has the sample's:

* flow matching: the target is the teacher's velocity at x_t (the marginal velocity it learned) instead of the
  conditional v_t = eps - x0. With guidance, SPEC's recipe runs on the teacher's two calls: v_T(x_t | y) in
  place of v_t and v_T(x_t | null) in place of the student's unconditional velocity, so the target is
  v_T(null) where the label was dropped and elsewhere
  ``mix_ratio (v_T(y) + g(t) (cfg_scale - 1) (v_T(y) - v_T(null))) + (1 - mix_ratio) v_pred``
  (the student's own prediction still enters the mix, as in SPEC).
* consistency: with ``teacher_steps`` = 0, x_l = x_t + u (l - t), u being that recipe on the consistency rows
  (its mix with the student's conditional velocity, no grad, as in SPEC). With ``teacher_steps`` = K >= 1, x_l
  is K Heun steps of the teacher's ODE from t to l, so l need not approach t. The ODE's velocity is the
  teacher's guided velocity (its unconditional one for rows that see the null label) without the mix, which
  would need the student at every stage and does not move the fixed point.

Calls per step (no grad): the teacher once on the whole batch (the batch twice over, conditional and null,
with guidance), then 2K - 1 times on the consistency rows (Heun's first stage reuses the velocity at x_t); the
student's own guidance pass shrinks to the mix's conditional call on the consistency rows (K = 0 only).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn as nn

from soflow_fast.network_calls import call, cat_rows, rows_of
from soflow_fast.sampling import integrate

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(like.dtype).reshape(v.shape[0], *([1] * (like.dim() - 1)))


# ----------------------------------------------------------------------------------------------
# The teacher's velocities and the targets they make
# ----------------------------------------------------------------------------------------------


def teacher_velocities(obj, x: torch.Tensor, t: torch.Tensor, y, cfg_mask: torch.Tensor | None, kw: dict | None):
    """(v_T, v_uncond): the teacher's velocity at the label each row sees, and at the null label (None
    without guidance), from one batched call. ``cfg_mask`` (True = null label) is None without guidance."""
    if cfg_mask is None:
        return call(obj.teacher, x, t, t, y, kw), None
    B = x.shape[0]
    labels = torch.cat([y, obj.null_labels(B, x.device)])
    both = call(obj.teacher, torch.cat([x, x]), torch.cat([t, t]), torch.cat([t, t]), labels, cat_rows([kw, kw]))
    v_cond, v_uncond = both[:B], both[B:]
    return torch.where(_bcast(cfg_mask, x).bool(), v_uncond, v_cond), v_uncond


def teacher_field(obj, y, cfg_mask: torch.Tensor | None, kw: dict | None) -> Velocity:
    """The velocity of the teacher's ODE for these rows: guided (g(t) as in SPEC, no mix) where the label is
    kept, unconditional where it was dropped; the plain teacher without guidance."""

    def field(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v, v_uncond = teacher_velocities(obj, x, t, y, cfg_mask, kw)
        return v if cfg_mask is None else obj.guided_velocity(v, t, v_uncond, None, cfg_mask)

    return field


@torch.no_grad()
def teacher_targets(obj, model: nn.Module, x_t: torch.Tensor, y, d, kw: dict | None):
    """(v_t, v_uncond, x_l) of ``SoFlowObjective.loss_from_draws`` from the teacher: its velocity in place of
    the sample's v_t, its null-label velocity in place of the student's (None without guidance), and the
    consistency rows' x_l (None when there are none)."""
    guided = obj.guided(y)
    mask = d.cfg_mask if guided else None
    v_t, v_uncond = teacher_velocities(obj, x_t, d.t, y, mask, kw)
    B = x_t.shape[0]
    if d.n_fm == B:
        return v_t, v_uncond, None
    sl = slice(d.n_fm, B)
    t, l = d.t[sl], d.l[sl]
    y_sl, mask_sl, kw_sl = None if y is None else y[sl], None if mask is None else mask[sl], rows_of(kw, sl)
    steps = obj.config.teacher_steps
    if steps:
        u = v_t[sl] if mask is None else obj.guided_velocity(v_t[sl], t, v_uncond[sl], None, mask_sl)
        x_l = integrate(teacher_field(obj, y_sl, mask_sl, kw_sl), x_t[sl], t, l, steps, "heun", v0=u)
        return v_t, v_uncond, x_l
    if guided:
        v_mix = obj.velocity(model, x_t[sl], t, y_sl, kw_sl) if obj.config.mix_ratio != 1 else None
        u = obj.guided_velocity(v_t[sl], t, v_uncond[sl], v_mix, mask_sl)
    else:
        u = v_t[sl]
    return v_t, v_uncond, x_t[sl] + u * _bcast(l - t, u)


# ----------------------------------------------------------------------------------------------
# Flow models as sources: run.teacher and run.init_from
# ----------------------------------------------------------------------------------------------


def _read_torch_file(path: Path) -> Mapping:
    """A .pt file's content with ``weights_only=True``; SiT's training checkpoints keep their argparse
    ``args`` beside the weights, the one other object allowed (a Namespace holds plain values)."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a file of other objects, or no torch file at all: one line, no pickled code run
        raise ValueError(f"{path}: not a torch file of weights ({type(e).__name__})") from None
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: holds a {type(state).__name__}, not a checkpoint dict")
    return state


def read_flow_model(path: str | Path, model_cfg, soflow_cfg) -> tuple[nn.Module, object, str]:
    """The flow model at ``path`` on CPU: (network, its ModelConfig, a description).

    ``path`` is a run directory of this engine (the EMA weights, first decay, of its newest intact checkpoint),
    a ``soflow-export`` .safetensors, or a torch file: this engine's or the authors' SoFlow weights (their
    names; built with ``model_cfg``), or another codebase's that ``model_cfg``'s kind converts
    (``ModelConfig.foreign_state_dict``: SiT for the DiT). Its velocity must be F(x, t, t) on the noising path
    of ``soflow_cfg``: a run or file that records other coefficients or another path is refused.
    """
    from soflow_fast.export import exported_model_config, load_exported, load_run_weights
    from soflow_fast.interop import _check_state_dict, convert_official_state_dict
    from soflow_fast.objective import SoFlowConfig

    path = Path(path)
    recorded = None  # the objective settings the source records
    if path.is_dir():
        model, info = load_run_weights(path)
        cfg = info["config"]
        if cfg.run.objective not in ("fm", "soflow"):
            raise ValueError(f"{path} trained run.objective={cfg.run.objective}: a flow model is a run of fm or soflow")
        model_cfg, recorded = cfg.model, cfg.soflow
        what = f"run {path} (EMA {info['decay']:g}, step {info['step']}, objective {cfg.run.objective})"
    elif path.suffix == ".safetensors":
        import json

        model, meta = load_exported(path)
        model_cfg, recorded = exported_model_config(meta), SoFlowConfig.from_dict(json.loads(meta["soflow"]))
        what = f"exported weights {path} (step {meta.get('step')})"
    elif path.is_file():
        state = _read_torch_file(path)
        model = model_cfg.build()
        own = model.state_dict()
        try:
            sd = convert_official_state_dict(state)
        except (ValueError, KeyError) as e:
            raise ValueError(f"{path}: {e.args[0] if e.args else e}") from None
        if set(sd) == set(own):
            what = f"checkpoint {path} (this engine's names)"
        else:
            sd, what = model_cfg.foreign_state_dict(state, model), f"checkpoint {path} ({model_cfg.LABEL} adapter)"
        _check_state_dict(sd, own, str(path))
        model.load_state_dict(sd)
    else:
        raise FileNotFoundError(f"{path}: no such run directory or weights file")
    if recorded is not None:
        for key in ("coefficient_type", "noising_type"):
            want = "Euler" if key == "coefficient_type" else soflow_cfg.noising_type
            if getattr(recorded, key) != want:
                raise ValueError(
                    f"{path} was trained with soflow.{key}={getattr(recorded, key)}; a flow model here needs {want} "
                    "(F(x, t, t) the velocity of this run's noising path)"
                )
    return model.eval(), model_cfg, what


def load_teacher(cfg, device: torch.device, param_dtype: torch.dtype, sharded: bool) -> tuple[nn.Module, str]:
    """``cfg.run.teacher`` ready to call: frozen, in eval mode, on ``device``, a full replica in every process
    (never passed to FSDP: it takes no gradient, so sharding would only add an all-gather per call). Under FSDP
    its weights take the student's ``param_dtype`` (the kind's fp32 modules, its time embedders, stay fp32);
    without FSDP the step's autocast gives it the student's precision. Returns (teacher, a line for the log)."""
    teacher, kind, what = read_flow_model(cfg.run.teacher, cfg.model, cfg.soflow)
    if kind.sample_shape() != cfg.model.sample_shape() or kind.condition() != cfg.model.condition():
        raise ValueError(
            f"run.teacher: {what} generates {kind.sample_shape()} conditioned on {kind.condition()}; this run "
            f"trains {cfg.model.sample_shape()} conditioned on {cfg.model.condition()}"
        )
    if cfg.soflow.cfg_scale > 1 and cfg.model.num_classes and not kind.class_dropout_prob:
        raise ValueError(
            f"run.teacher: guidance (soflow.cfg_scale={cfg.soflow.cfg_scale:g}) calls the teacher with the null "
            f"label, which {what} has no row for (its model.class_dropout_prob is 0)"
        )
    teacher.requires_grad_(False).to(device)
    if sharded and param_dtype != torch.float32:
        teacher.to(param_dtype)
        for module in kind.fp32_modules(teacher):
            module.float()
    params = sum(p.numel() for p in teacher.parameters()) / 1e6
    return teacher, f"teacher: {what}, {params:.2f}M parameters, frozen, a full replica on every rank"


@torch.no_grad()
def init_from(cfg, model: nn.Module, ema, say=print) -> None:
    """Start a new run from ``cfg.run.init_from``: its weights into ``model`` (plain or FSDP2-sharded; every
    rank calls this) and into every EMA average, whose counters start at zero as a new run's do."""
    source, _, what = read_flow_model(cfg.run.init_from, cfg.model, cfg.soflow)
    sd = source.state_dict()
    expected = ema.state_dict()
    names = [k.split(".", 2)[2] for k in expected if k.startswith("shadow.0.")]
    names += [k.removeprefix("buffers.") for k in expected if k.startswith("buffers.")]
    missing, extra = sorted(set(names) - set(sd)), sorted(set(sd) - set(names))
    if missing or extra:
        raise ValueError(
            f"run.init_from: {what} does not fit this model: missing {missing[:3]}, unexpected {extra[:3]}"
        )
    decays = torch.tensor(ema.decays, dtype=torch.float64)
    state = {"num_updates": torch.tensor(0), "calls": torch.tensor(0), "decays": decays}
    for k in range(len(ema.decays)):
        state.update({f"shadow.{k}.{n}": sd[n] for n in ema.shadows[k]})
    state.update({f"buffers.{n}": sd[n] for n in ema.buffers})
    ema.load_state_dict(state)  # shapes checked, each rank keeping its shard
    ema.copy_to(model, ema.decays[0])
    say(f"initialised the model and its EMA from {what}")
