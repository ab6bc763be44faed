"""Loading the authors' SoFlow weights into our modules.

Our DiT and SongUNet use the authors' module, parameter and buffer names, so the mapping is
mostly about unwrapping: their checkpoint dicts (``{'model': ..., 'ema_model': ...,
'optimizer': ..., 'finished_steps': ...}``, possibly with other entries, tensors among them,
beside the weights), and prefixes left by wrappers (``network.``, DDP's ``module.``,
torch.compile's ``_orig_mod.``). Their DiT checkpoints trained without label dropout
(``cfg_drop_rate`` 0, the B/4 unconditional release) have no null row in the label table:
``label_table_rows`` tells, so the model can be built to match.

``load_official_training_state`` continues one of their training runs from its ``ckpts/<step>.pt``:
model, optimizer moments and step counts, EMA weights and the step count, into our model (plain or
FSDP2-sharded), optimizer and ``EMA``.
"""

from __future__ import annotations

import os
import pickle
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

_PREFIXES = ("network.", "module.", "_orig_mod.")
_CHECKPOINT_KEYS = ("ema_model", "ema", "model", "state_dict")


def _keys(state: Mapping, limit: int = 12) -> str:
    """The first ``limit`` keys, each with its value's type: enough to tell what the dict is."""
    items = [f"{k!s} ({type(v).__name__})" for k, v in list(state.items())[:limit]]
    more = f", ... ({len(state)} in all)" if len(state) > limit else ""
    return ", ".join(items) + more


def _unwrap_checkpoint(state: Mapping, which: str | None, where: str = "checkpoint") -> Mapping:
    """The flat state dict (every value a tensor) inside ``state``.

    ``which`` picks an entry. Without it, a dict is the state dict only when all its values are
    tensors: a checkpoint may keep a tensor (a step counter, a buffer) next to its nested weights, and
    that must not make it look flat. Otherwise the first non-empty known entry (EMA first) is
    unwrapped the same way; a dict with neither is an error listing its keys.
    """
    if not isinstance(state, Mapping):
        raise ValueError(f"{where} is a {type(state).__name__}, not a state dict")
    if which is not None:
        if which not in state:
            raise KeyError(f"{where} has no entry {which!r}; it has: {', '.join(map(str, state))}")
        return _unwrap_checkpoint(state[which], None, f"{where} entry {which!r}")
    if not state:
        raise ValueError(f"{where} is empty: no weights to load")
    others = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    if not others:
        return state
    for key in _CHECKPOINT_KEYS:
        # an empty entry (a checkpoint saved without EMA weights) holds nothing to load: try the next
        if isinstance(state.get(key), Mapping) and state[key]:
            return _unwrap_checkpoint(state[key], None, f"{where} entry {key!r}")
    raise ValueError(
        f"{where} is not a state dict (values that are not tensors: {_keys(others)}) nor a known checkpoint "
        f"layout (an entry {', '.join(map(repr, _CHECKPOINT_KEYS))} holding one); pass which= to pick an "
        f"entry. Top-level keys: {_keys(state)}"
    )


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                changed = True
    return key


def convert_official_state_dict(state: Mapping, which: str | None = None) -> dict[str, torch.Tensor]:
    """The authors' network weights with our key names (same names, wrappers removed).

    Args:
        state: a state dict, or their checkpoint dict (``{'model': ..., 'ema_model': ...}``).
        which: the checkpoint entry to take; by default the EMA weights when present.
    """
    sd = _unwrap_checkpoint(state, which)
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        new = _strip_prefixes(key)
        if new in out:
            raise ValueError(f"two checkpoint keys map to {new!r} after removing wrapper prefixes")
        out[new] = value
    return out


def label_table_rows(state: Mapping, which: str | None = None) -> int | None:
    """Rows of the DiT label table in the authors' weights (num_classes, plus one for the null
    label when they trained with label dropout); None when there is no table (the U-Net)."""
    table = convert_official_state_dict(state, which).get("y_embedder.embedding_table.weight")
    return None if table is None else int(table.shape[0])


def load_official_state_dict(model: nn.Module, state: Mapping, which: str | None = None) -> nn.Module:
    """Load the authors' weights into ``model``; any missing, unexpected or mis-shaped key is an error.

    Args:
        model: our DiT or SongUNet (or any module using the authors' names).
        state: their state dict or checkpoint dict; keys may carry ``network.`` / ``module.`` prefixes.
        which: checkpoint entry ('model' or 'ema_model'); default prefers 'ema_model'.
    Returns:
        the model, loaded in place.
    """
    sd = convert_official_state_dict(state, which)
    _check_state_dict(sd, model.state_dict())
    model.load_state_dict(sd, strict=True)
    return model


def _check_state_dict(sd: Mapping, own: Mapping, what: str = "the authors' state dict") -> None:
    """Missing, unexpected or mis-shaped keys of ``sd`` against ``own`` (global shapes): one error
    naming the first offender."""
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing:
        raise KeyError(f"missing key in {what}: {missing[0]!r} ({len(missing)} missing in all)")
    if unexpected:
        raise KeyError(f"unexpected key in {what}: {unexpected[0]!r} ({len(unexpected)} in all)")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(own[k].shape):
            shapes = f"checkpoint {tuple(v.shape)}, model {tuple(own[k].shape)}"
            raise ValueError(f"shape mismatch for {k!r} in {what}: {shapes}")


# ---------------------------------------------------------------------------------------------------
# Continuing the authors' training runs from their ckpts/<step>.pt
# ---------------------------------------------------------------------------------------------------

# Tensors that are frozen nn.Parameters in the authors' modules but buffers in ours. Their dit.py has
# ``self.pos_embed = nn.Parameter(..., requires_grad=False)``: it is in ``network.parameters()``, so in
# their optimizer's parameter list (never with state, it gets no gradient), and in none of ours.
OFFICIAL_FROZEN_PARAMS = frozenset({"pos_embed"})

# Wrapper modules that insert a level into names without changing the model (as in soflow_fast.ema and
# torch.distributed.checkpoint's FQNs).
_WRAPPER_PARTS = frozenset({"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"})

# Per-parameter state of the optimizers their train.py uses (AdamW on ImageNet, RAdam on CIFAR-10).
_ADAM_STATE = frozenset({"step", "exp_avg", "exp_avg_sq"})
_STATE_KEYS = {"Adam": _ADAM_STATE, "AdamW": _ADAM_STATE, "RAdam": _ADAM_STATE}

# Param-group settings compared between their checkpoint and our optimizer (ours are kept).
# (decoupled_weight_decay tells Adam from AdamW: the optimizer type, checked on its own)
_HYPERPARAMETERS = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize")


def _fqn(name: str) -> str:
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_PARTS)


def official_param_order(
    ckpt_model_sd: Mapping, param_names: Sequence[str], optimizer_state: Mapping | None = None
) -> list[str]:
    """The authors' ``network.parameters()`` order, i.e. what their optimizer's integer indices mean.

    ``Module.state_dict()`` walks modules in pre-order, each module's parameters then its buffers,
    and ``parameters()`` walks the same modules, so the keys of their ``'model'`` state dict (wrapper
    prefixes removed) that are parameters give the parameter order. Which keys are parameters is read
    off our model (``param_names``), plus ``OFFICIAL_FROZEN_PARAMS`` (their frozen ``pos_embed``,
    a buffer here).

    Args:
        ckpt_model_sd: their ``'model'`` state dict (``network.``-prefixed keys), or their checkpoint dict.
        param_names: our model's parameter names (FQNs).
        optimizer_state: their ``'optimizer'`` entry; when given, its one param group must list as many
            parameters as the order holds, else a ValueError.
    Returns:
        their parameter names, in our naming, position i being their optimizer's index i.
    """
    keys = list(convert_official_state_dict(ckpt_model_sd))
    ours, theirs = set(param_names), set(keys)
    absent = [n for n in param_names if n not in theirs]
    if absent:
        raise KeyError(f"parameter {absent[0]!r} of the model is not in the authors' state dict ({len(absent)} in all)")
    order = [k for k in keys if k in ours or k in OFFICIAL_FROZEN_PARAMS]
    if optimizer_state is None:
        return order
    groups = optimizer_state.get("param_groups") if isinstance(optimizer_state, Mapping) else None
    if not isinstance(groups, Sequence) or not all(isinstance(g, Mapping) and "params" in g for g in groups):
        raise ValueError("the authors' optimizer state has no 'param_groups' list of groups with 'params'")
    if len(groups) != 1:
        raise ValueError(
            f"the authors' optimizer state has {len(groups)} param groups; their train.py builds one over "
            "network.parameters(), the only layout whose parameter order follows the model's key order"
        )
    indices = list(groups[0]["params"])
    if sorted(indices) != list(range(len(indices))):
        raise ValueError(f"the authors' param group numbers its parameters {indices[:8]}..., not 0..{len(indices) - 1}")
    if len(indices) != len(order):
        frozen = sorted(set(order) - ours)
        raise ValueError(
            f"the authors' optimizer param group lists {len(indices)} parameters, but their 'model' state dict "
            f"holds {len(order)} parameters of this model (their frozen {', '.join(frozen) or 'none'} included): "
            "the optimizer state is not this model's"
        )
    return order


def optimizer_kind(group: Mapping, state_keys: Iterable[str] | None = None) -> str:
    """Which torch optimizer saved a param group, from the settings torch saves with it (and, for
    torch versions whose RAdam saved no ``decoupled_weight_decay``, the keys of one parameter's
    state): 'Adam', 'AdamW', 'Adam or AdamW' (torch versions that saved no ``decoupled_weight_decay``
    for them), 'RAdam', 'NAdam' or 'unknown'."""
    if "momentum_decay" in group:
        return "NAdam"
    if "amsgrad" in group:  # Adam and AdamW; RAdam and NAdam have no amsgrad
        decoupled = group.get("decoupled_weight_decay")
        return "Adam or AdamW" if decoupled is None else ("AdamW" if decoupled else "Adam")
    if "decoupled_weight_decay" in group:
        return "RAdam"
    # betas, no amsgrad, and Adam's three state tensors: RAdam (Adamax keeps exp_inf instead)
    if "betas" in group and state_keys is not None and set(state_keys) == _ADAM_STATE:
        return "RAdam"
    return "unknown"


def _own_kind(optimizer: torch.optim.Optimizer) -> str:
    for cls in (torch.optim.AdamW, torch.optim.RAdam, torch.optim.NAdam, torch.optim.Adam):
        if isinstance(optimizer, cls):
            return cls.__name__
    return type(optimizer).__name__


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return tuple(_plain(v) for v in value) if isinstance(value, (list, tuple)) else value


@dataclass(frozen=True)
class OfficialTrainingState:
    """What ``load_official_training_state`` read besides the tensors it loaded.

    Attributes:
        finished_steps: optimizer steps their run had taken; the next step to run has this index.
        finished_epochs: epochs their run had finished.
        optimizer: the optimizer their param group says wrote it (``optimizer_kind``).
        their_hyperparameters: their param group's settings (lr, betas, ...), not applied.
        differing_hyperparameters: name -> (theirs, ours) for the settings where our optimizer,
            which keeps its own, differs.
    """

    finished_steps: int
    finished_epochs: int
    optimizer: str
    their_hyperparameters: dict[str, Any] = field(default_factory=dict)
    differing_hyperparameters: dict[str, tuple[Any, Any]] = field(default_factory=dict)


def _read_checkpoint(source: str | os.PathLike | Mapping) -> tuple[Mapping, str]:
    if isinstance(source, Mapping):
        return source, "the checkpoint dict"
    path = os.fspath(source)
    try:
        return torch.load(path, map_location="cpu", weights_only=True), path
    except pickle.UnpicklingError as e:
        # torch's message opens with advice; the reason is its "WeightsUnpickler error: ..." line
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        why = next((line for line in lines if "WeightsUnpickler error" in line), lines[0])
        raise ValueError(
            f"{path}: torch.load(weights_only=True) refused it ({why}). The authors' train.py saves tensors, "
            "ints and an optimizer state dict (floats, tuples, bools, None), all of which weights_only reads, so "
            "this file holds other Python objects and was not written by it as it stands; if you trust the file, "
            "load it with torch.load(path, map_location='cpu', weights_only=False) and pass the dict"
        ) from e
    except RuntimeError as e:  # not a zip/legacy torch file, truncated, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: not a readable torch.save file ({first})") from e


def _is_sharded(model: nn.Module) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return any(isinstance(p, DTensor) for p in model.parameters())


def load_official_training_state(
    source: str | os.PathLike | Mapping,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema=None,
    *,
    allow_optimizer_change: bool = False,
) -> OfficialTrainingState:
    """Continue an authors' training run: load their ``ckpts/<step>.pt`` into our model, optimizer and EMA.

    Their file is ``{'model': Soflow.state_dict(), 'ema_model': ..., 'optimizer': optimizer.state_dict(),
    'finished_steps': int, 'finished_epochs': int}``, the network under ``network.``, the optimizer over
    ``network.parameters()`` in one param group keyed by integer index.

    * model: their ``'model'`` weights (full tensors; into a plain model with ``load_state_dict``, into an
      FSDP2-sharded one with ``set_model_state_dict(full_state_dict=True)``, each rank keeping its shard).
    * optimizer: their per-parameter state (step counts and moments), re-keyed from their indices to our
      parameter names by ``official_param_order`` and loaded by name (``set_optimizer_state_dict`` with a
      full, FQN-keyed state dict when sharded). Parameters without state in their file (never given a
      gradient, or their frozen ``pos_embed``) have none here either, as in their optimizer. **Their param
      groups' settings (lr, betas, eps, weight_decay, ...) are not applied**: ``optimizer`` keeps its own
      groups as the caller's config built them (an LR scheduler's ``initial_lr`` included); their settings
      are returned, and those that differ from ours are returned and named in one warning. The optimizer's
      gradients are cleared first (``set_optimizer_state_dict`` needs that when sharded).
    * optimizer type: the moments of Adam, AdamW and RAdam are the same quantities (``step``, ``exp_avg``,
      ``exp_avg_sq``) but the update rules differ; a checkpoint whose param group says another optimizer
      than ours (e.g. their CIFAR-10 RAdam into an AdamW) is a ValueError unless
      ``allow_optimizer_change=True``, which loads the moments anyway with a warning.
    * ema: their ``'ema_model'`` weights into every decay's average of our ``EMA`` (they keep one average,
      the first decay's; further decays start from it too) and its buffers; its update counters are set as
      if it had been updated at each of their ``finished_steps`` steps.

    Everything is checked before anything is loaded: a missing, unexpected or mis-shaped key in the model,
    EMA or optimizer state is one error naming the first offender. A dict passed in is neither modified nor
    aliased by what is loaded. Under FSDP2 every rank calls this with the same file.

    Args:
        source: path of their ``.pt`` (read with ``torch.load(map_location='cpu', weights_only=True)``) or the
            dict it holds.
        model: our DiT or SongUNet, plain or wired by ``soflow_fast.parallel.parallelize``.
        optimizer: our optimizer over ``model``'s parameters, as the run's config built it.
        ema: our ``soflow_fast.ema.EMA`` of ``model``, or None to skip their EMA weights.
        allow_optimizer_change: load the moments even when their optimizer is another type than ours.
    Returns:
        ``OfficialTrainingState``; ``finished_steps`` is the index of the next step to run.
    """
    ckpt, where = _read_checkpoint(source)
    copy_tensors = isinstance(source, Mapping)
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"{where} holds a {type(ckpt).__name__}, not the authors' checkpoint dict")
    required = ("model", "optimizer", "finished_steps") + (("ema_model",) if ema is not None else ())
    absent = [k for k in required if k not in ckpt]
    if absent:
        raise KeyError(
            f"{where} is not a checkpoint of the authors' train.py: it has no {absent[0]!r} entry "
            f"(its entries: {', '.join(map(str, ckpt))})"
        )

    # -- names and shapes: ours, theirs
    own_params = [(_fqn(n), p) for n, p in model.named_parameters()]
    params_by_name = dict(own_params)
    own_shapes = {_fqn(k): v for k, v in model.state_dict().items()}
    model_sd = convert_official_state_dict(ckpt, which="model")
    _check_state_dict(model_sd, own_shapes, f"{where} entry 'model'")
    ema_sd = None
    if ema is not None:
        ema_sd = convert_official_state_dict(ckpt, which="ema_model")
        _check_state_dict(ema_sd, own_shapes, f"{where} entry 'ema_model'")

    # -- optimizer: their indices -> our names, state checked against our parameters
    osd = ckpt["optimizer"]
    order = official_param_order(ckpt["model"], [n for n, _ in own_params], osd)
    their_group = {k: v for k, v in osd["param_groups"][0].items() if k != "params"}
    first_state = next(iter(osd["state"].values()), None)
    theirs_kind, ours_kind = optimizer_kind(their_group, first_state), _own_kind(optimizer)
    same = theirs_kind == ours_kind or (theirs_kind == "Adam or AdamW" and ours_kind in ("Adam", "AdamW"))
    if not same:
        held = (
            theirs_kind if theirs_kind != "unknown" else f"optimizer state of unknown type ({', '.join(their_group)})"
        )
        what = f"{where} holds {held} state and the optimizer is {ours_kind}"
        if not allow_optimizer_change:
            raise ValueError(
                f"{what}; pass allow_optimizer_change=True to load its moments anyway (Adam, AdamW and RAdam keep "
                "the same step/exp_avg/exp_avg_sq, the update rule changes), or build the optimizer their run used"
            )
        warnings.warn(f"{what}: loading its moments and step counts into {ours_kind}", RuntimeWarning, stacklevel=2)
    expected = _STATE_KEYS.get(ours_kind)
    if expected is not None and any(g.get("amsgrad") for g in optimizer.param_groups):
        expected = expected | {"max_exp_avg_sq"}
    opt_params = [p for g in optimizer.param_groups for p in g["params"]]
    name_of = {id(p): n for n, p in own_params}
    stray = next((i for i, p in enumerate(opt_params) if id(p) not in name_of), None)
    if stray is not None:
        raise ValueError(f"the optimizer's parameter {stray} is not a parameter of the model")
    in_optimizer = {name_of[id(p)] for p in opt_params}
    state: dict[str, dict[str, Any]] = {}
    for index, entry in osd["state"].items():
        if not isinstance(index, int) or not 0 <= index < len(order):
            raise ValueError(
                f"the authors' optimizer has state for parameter {index!r}, not an index below {len(order)}"
            )
        name = order[index]
        if name not in params_by_name:  # their frozen pos_embed (a buffer here): nothing to optimise
            continue
        if name not in in_optimizer:
            raise KeyError(f"the authors' optimizer has state for {name!r}, which the optimizer does not hold")
        if expected is not None and set(entry) != expected:
            raise KeyError(
                f"the authors' optimizer state for {name!r} has {sorted(entry)}; {ours_kind} keeps {sorted(expected)}"
            )
        shape = tuple(params_by_name[name].shape)
        new = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                if value.dim() > 0 and tuple(value.shape) != shape:
                    raise ValueError(
                        f"shape mismatch for optimizer state {key!r} of {name!r}: checkpoint {tuple(value.shape)}, "
                        f"model {shape}"
                    )
                # scalars (step) are shared by nothing and bumped in place: always a fresh tensor each
                value = value.clone() if copy_tensors or value.dim() == 0 else value
            elif key == "step":
                value = torch.tensor(float(value), dtype=torch.float32)
            new[key] = value
        state[name] = new

    # -- their settings are reported, ours kept
    # our configured lr is the scheduler's initial_lr when one is attached (lr is then already scaled)
    ours_group = dict(optimizer.param_groups[0])
    ours_group["lr"] = ours_group.get("initial_lr", ours_group["lr"])
    differing = {
        k: (_plain(their_group[k]), _plain(ours_group[k]))
        for k in _HYPERPARAMETERS
        if k in their_group and k in ours_group and _plain(their_group[k]) != _plain(ours_group[k])
    }
    if differing:
        listed = ", ".join(f"{k} {a} (theirs) -> {b}" for k, (a, b) in differing.items())
        warnings.warn(
            f"continuing the authors' run with this optimizer's settings, not the checkpoint's: {listed}",
            UserWarning,
            stacklevel=2,
        )

    # -- load: model, optimizer, EMA
    sharded = _is_sharded(model)
    if sharded:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        set_model_state_dict(model, dict(model_sd), options=StateDictOptions(full_state_dict=True, strict=True))
        groups = [
            {**{k: v for k, v in g.items() if k != "params"}, "params": [name_of[id(p)] for p in g["params"]]}
            for g in optimizer.param_groups
        ]
        optimizer.zero_grad(set_to_none=True)  # with gradients present, torch would not initialise the state
        # strict=False: parameters without their state stay without (below); our keys were checked above
        set_optimizer_state_dict(
            model,
            optimizer,
            {"state": state, "param_groups": groups},
            options=StateDictOptions(full_state_dict=True, strict=False),
        )
        for name, p in own_params:  # set_optimizer_state_dict first gives every parameter a zero state
            if name not in state:
                optimizer.state.pop(p, None)
    else:
        raw = {_fqn(k): k for k in model.state_dict()}  # wrapper levels (activation checkpointing) put back
        model.load_state_dict({raw[k]: v for k, v in model_sd.items()}, strict=True)
        index_of = {id(p): i for i, p in enumerate(opt_params)}
        groups = [
            {**{k: v for k, v in g.items() if k != "params"}, "params": [index_of[id(p)] for p in g["params"]]}
            for g in optimizer.param_groups
        ]
        optimizer.zero_grad(set_to_none=True)
        optimizer.load_state_dict(
            {"state": {index_of[id(params_by_name[n])]: v for n, v in state.items()}, "param_groups": groups}
        )

    finished_steps = int(ckpt["finished_steps"])
    if ema is not None:
        ema_state = {
            "num_updates": torch.tensor(-(-finished_steps // ema.every), dtype=torch.int64),
            "calls": torch.tensor(finished_steps, dtype=torch.int64),
            "decays": torch.tensor(ema.decays, dtype=torch.float64),
        }
        for k, shadow in enumerate(ema.shadows):
            ema_state.update({f"shadow.{k}.{n}": ema_sd[n] for n in shadow})
        ema_state.update({f"buffers.{n}": ema_sd[n] for n in ema.buffers})
        ema.load_state_dict(ema_state)  # copies (into each rank's shard when sharded)

    return OfficialTrainingState(
        finished_steps=finished_steps,
        finished_epochs=int(ckpt.get("finished_epochs", 0)),
        optimizer=theirs_kind,
        their_hyperparameters={k: _plain(v) for k, v in their_group.items()},
        differing_hyperparameters=differing,
    )
