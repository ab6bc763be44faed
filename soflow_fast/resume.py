"""What a resume may change: the checks between a checkpoint's marker and the config of the run resuming it.

A resume continues the same run. Settings that change what the run trains (the model, the data, the
seed, the batch, the objective and its hyper-parameters, the l schedule's length) are refused,
naming each changed key, unless the user passes ``--allow_config_change``; settings that change how
it runs, logs and saves (``RESUME_SAFE``) are taken and logged. Some changes cannot be
resumed at all: another model size (the weights do not fit), other EMA decays (the averages do not
exist) and data whose class labels moved (the labels would mean other classes).
"""

from __future__ import annotations

from pathlib import Path

from soflow_fast.config import TrainConfig

# What a resumed run may change and still be the same run: how it runs, logs and saves, and the
# optimiser's settings (applied over the checkpoint's). Every other setting of the model, the data,
# the run and the active objective changes what the weights are trained on or towards.
RESUME_SAFE = frozenset(
    {f"run.{k}" for k in ("working_dir", "total_steps", "ckpt_saving_steps", "keep_checkpoints", "eval_demo_steps",
                          "eval_steps",
                          "eval_num_samples", "log_steps", "compile", "compile_scope", "fsdp",
                          "activation_checkpointing", "mixed_precision", "use_fused_kernels", "fused_ops",
                          "max_steps_this_run", "draw_groups", "sync_debug", "cuda_graphs", "vae",
                          "eval_reference", "inception", "eval_batch_size", "eval_nfe", "eval_demo_shape")}
    | {f"optim.{k}" for k in ("lr", "betas", "weight_decay", "adam_eps", "grad_clip", "warmup_steps")}
    | {"data.num_workers", "data.prefetch_factor", "data.in_memory"}
)  # fmt: skip


def config_changes(saved: dict[str, dict], current: TrainConfig) -> tuple[list, list]:
    """(changes a resume refuses, changes it takes), each a list of (dotted key, saved value, new value),
    comparing a checkpoint's ``to_dict()`` with ``current`` over the sections that define the run."""
    now = current.to_dict()
    refused, taken = [], []
    objective = now["run"]["objective"]
    for section in ("model", "data", "optim", "run", objective):
        old_sec, new_sec = saved.get(section, {}), now[section]
        for key, new in new_sec.items():
            old = old_sec.get(key, new)  # a key the checkpoint predates: nothing to compare
            if old != new:  # both sides as to_dict() writes them (tuples as lists), the saved one via JSON
                (taken if f"{section}.{key}" in RESUME_SAFE else refused).append((f"{section}.{key}", old, new))
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
    if saved_decays is not None and tuple(saved_decays) != cfg.run.ema_decays:
        raise ValueError(
            f"checkpoint {path} keeps EMA weights for run.ema_decays={tuple(saved_decays)}, this run asks for "
            f"{cfg.run.ema_decays}: resume with the same decays, or start a new run.working_dir"
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
    refused = [c for c in refused if not c[0].startswith("model.") and c[0] != "run.ema_decays"]  # checked above
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
