"""Resuming a run: which checkpoint, what a resume may change, and the run's ``config.yaml``.

A resume continues the same run. Settings that change what the run trains (the model, the data, the
seed, the batch, the objective and its hyper-parameters, the l schedule's length) are refused,
naming each changed key, unless the user passes ``--allow_config_change``; settings that change how
it runs, logs and saves (the fields each section marks ``resume_safe``) are taken and logged. Some
changes cannot be resumed at all: another model size (the weights do not fit), other EMA decays (the
averages do not exist) and data whose class labels moved (the labels would mean other classes).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import yaml

from soflow_fast.checkpoint import read_marker
from soflow_fast.config import OBJECTIVE_SECTIONS, TrainConfig, normalize, resume_safe_keys


def config_changes(saved: dict[str, dict], current: TrainConfig) -> tuple[list, list]:
    """(changes a resume refuses, changes it takes), each a list of (dotted key, saved value, new value),
    comparing a checkpoint's ``to_dict()`` with ``current`` over the sections that define the run."""
    now, saved, safe = current.to_dict(), normalize(saved), resume_safe_keys()
    refused, taken = [], []
    objective = OBJECTIVE_SECTIONS[now["run"]["objective"]]  # the section of the run's objective
    for section in [s for s in now if s not in ("soflow", "meanflow")] + [objective]:
        old_sec, new_sec = saved.get(section, {}), now[section]
        for key, new in new_sec.items():
            old = old_sec.get(key, new)  # a key the checkpoint predates: nothing to compare
            if old != new:  # both sides as to_dict() writes them (tuples as lists), the saved one via JSON
                (taken if f"{section}.{key}" in safe else refused).append((f"{section}.{key}", old, new))
    return refused, taken


def check_resume(
    path: Path,
    marker: dict,
    cfg: TrainConfig,
    classes: list[str] | None,
    num_samples: int,
    allow_config_change: bool,
) -> tuple[list[str], bool]:
    """Raise ValueError when ``cfg`` cannot resume the checkpoint at ``path`` on data of ``num_samples``.

    Returns the lines to log, and whether the data stream's saved position applies (it does not when
    the data gained or lost samples and ``allow_config_change`` continues on them from its start).
    """
    saved_model = marker.get("model", {})
    for key, value in cfg.to_dict()["model"].items():
        if key in saved_model and saved_model[key] != value:
            raise ValueError(
                f"checkpoint {path} is from another model: model.{key} was {saved_model[key]!r}, this run has {value!r}"
            )
    saved_decays = marker.get("ema_decays")
    if saved_decays is not None and tuple(saved_decays) != cfg.ema.ema_decays:
        raise ValueError(
            f"checkpoint {path} keeps EMA weights for ema.ema_decays={tuple(saved_decays)}, this run asks for "
            f"{cfg.ema.ema_decays}: resume with the same decays, or start a new run.working_dir"
        )
    _check_classes(path, marker.get("classes"), classes)
    lines, same_data = [], True
    saved_n = marker.get("num_samples")
    if saved_n is not None and saved_n != num_samples:
        change = f"the data had {saved_n} samples when checkpoint {path} was saved and has {num_samples} now"
        if not allow_config_change:
            raise ValueError(
                f"{change} ({num_samples - saved_n:+d}): files were added or removed, so the saved position in "
                "the data stream does not carry over. Restore the data as it was to resume exactly, or pass "
                "--allow_config_change to go on with the changed data (its stream starts over from the beginning)"
            )
        lines.append(f"--allow_config_change: {change}; the data stream starts over")
        same_data = False
    saved_cfg = marker.get("config")
    if saved_cfg is None:  # markers written before they recorded the config: nothing more to compare
        return lines + [f"checkpoint {path} records no config: the settings of this resume are not compared"], same_data
    refused, taken = config_changes(saved_cfg, cfg)
    refused = [c for c in refused if not c[0].startswith("model.") and c[0] != "ema.ema_decays"]  # checked above
    if refused:
        listed = ", ".join(f"{k} {old!r} -> {new!r}" for k, old, new in refused)
        if not allow_config_change:
            raise ValueError(
                f"checkpoint {path} was trained with other settings ({listed}): resuming with them would change "
                "what the run trains. Resume with the saved settings, pass --allow_config_change to continue with "
                "the new ones (config.yaml is rewritten and the old one kept beside it), or start a new "
                "--working_dir"
            )
        lines.append(f"--allow_config_change: resuming with changed settings: {listed}")
    if taken:
        lines.append("resuming with: " + ", ".join(f"{k} {old!r} -> {new!r}" for k, old, new in taken))
    return lines, same_data


def _check_classes(path: Path, saved: list[str] | None, classes: list[str] | None) -> None:
    if saved is None or classes is None or saved == classes:
        return
    first = next(
        (i for i, (a, b) in enumerate(zip(saved, classes, strict=False)) if a != b), min(len(saved), len(classes))
    )
    was = saved[first] if first < len(saved) else "(none)"
    now = classes[first] if first < len(classes) else "(none)"
    raise ValueError(
        f"checkpoint {path} was trained with {len(saved)} classes, the data now has {len(classes)}, and label "
        f"{first} meant {was!r} but now means {now!r}: resuming would train the labels on other classes; restore "
        "the data's classes or start a new run.working_dir"
    )


def resume(checkpointer, cfg: TrainConfig, data, step_fn, state, world: int, allow_config_change: bool, logger) -> None:
    """Continue from the newest intact checkpoint of the run (or the authors' newest ``ckpts/<step>.pt``
    in their layout), setting ``state.step``; a new run when there is neither.

    Args:
        checkpointer: the run's ``Checkpointer``, whose ``states`` are loaded.
        data: the run's ``TrainData`` (its classes and size are checked against the checkpoint's).
        step_fn: the ``TrainStep`` (the optimiser and schedule take the config's settings after loading).
        state: the trainer's ``TrainState``.
        world: this run's world size.
    """
    with warnings.catch_warnings(record=True) as skipped:
        warnings.simplefilter("always")
        path = checkpointer.latest_verified()  # the newest checkpoint whose files are intact
    for w in skipped:
        logger.info(f"warning: {w.message}")
    if path is None:
        _start_or_continue_theirs(checkpointer, cfg, step_fn, state, logger)
        return
    marker = read_marker(path)  # what the checkpoint was saved with
    lines, same_data = check_resume(path, marker, cfg, data.classes, len(data.dataset), allow_config_change)
    for line in lines:
        logger.info(line)
    states = dict(checkpointer.states)
    if not same_data:
        del states["data"]  # the stream position of other data: start the stream afresh
    checkpointer.load(path, states)
    logger.info(f"resumed from {path} at step {state.step} (saved by {marker.get('world_size')} rank(s), now {world})")
    _apply_optim_config(cfg, step_fn, logger)


def _start_or_continue_theirs(checkpointer, cfg: TrainConfig, step_fn, state, logger) -> None:
    """A new run, unless the working dir holds the authors' ``ckpts/<step>.pt`` files (their trainer's
    layout): then the newest continues, with its model, EMA, optimiser and step."""
    from soflow_fast.interop import load_official_training_state

    theirs = sorted((p for p in checkpointer.dir.glob("*.pt") if p.stem.isdigit()), key=lambda p: int(p.stem))
    if not theirs:
        logger.info(f"starting a new run in {checkpointer.dir.parent}")
        if cfg.run.init_from is not None:  # here only: a resume never re-initialises
            from soflow_fast.teacher import init_from

            init_from(cfg, step_fn.model, step_fn.ema, say=logger.info)
        return
    if cfg.run.init_from is not None:
        logger.info(f"run.init_from={cfg.run.init_from} is not used: the authors' checkpoint below is continued")
    with warnings.catch_warnings(record=True) as caught:  # their lr/betas where they differ from ours
        warnings.simplefilter("always")
        loaded = load_official_training_state(theirs[-1], step_fn.model, step_fn.optimizer, step_fn.ema)
    for w in caught:
        logger.info(f"warning: {w.message}")
    state.step = loaded.finished_steps
    step_fn.scheduler.last_epoch = state.step
    _apply_optim_config(cfg, step_fn, logger)
    logger.info(
        f"continuing the authors' checkpoint {theirs[-1]} at step {state.step} ({loaded.optimizer} state, "
        "EMA and weights); the data stream starts afresh"
    )


def _apply_optim_config(cfg: TrainConfig, step_fn, logger) -> None:
    """The config's optimiser settings win over the checkpoint's (moments and step counts are kept)."""
    changed = cfg.optim.apply(step_fn.optimizer, step_fn.scheduler)
    if changed:
        logger.info("optimiser settings from the config, not the checkpoint: " + ", ".join(changed))


def marker_meta(cfg: TrainConfig, world: int, data) -> dict:
    """What a checkpoint's marker records for ``check_resume``: the config, the world size it was saved
    at, the EMA decays, the data's classes and size."""
    as_dict = cfg.to_dict()
    return {
        "config": as_dict,
        "model": as_dict["model"],
        "world_size": world,
        "ema_decays": list(cfg.ema.ema_decays),
        "classes": data.classes,
        "num_samples": len(data.dataset),
    }


def write_config(work_dir: Path, cfg: TrainConfig, step: int) -> None:
    """config.yaml describes the checkpoints; one that this run changes (a resume's, or the authors'
    trainer's copy of its YAML file in their working dir) is kept as config.<step>.yaml."""
    path = Path(work_dir) / "config.yaml"
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    if path.is_file() and path.read_text() != text:
        kept, n = path.with_name(f"config.{step:08d}.yaml"), 0
        while kept.exists():  # several resumes at one step: each earlier config stays
            n += 1
            kept = path.with_name(f"config.{step:08d}.{n}.yaml")
        path.replace(kept)
    path.write_text(text)
