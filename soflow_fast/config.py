"""The training config: one section per part, each defined beside the part that owns it.

| section | class | owner |
|---|---|---|
| ``model`` | ``ModelConfig`` (one subclass per kind) | ``soflow_fast.models`` |
| ``data`` | ``DataConfig`` (one subclass per reader) | ``soflow_fast.data`` |
| ``optim`` | ``OptimConfig`` | ``soflow_fast.optim`` |
| ``run`` | ``RunConfig`` | the trainer (here) |
| ``checkpoint`` | ``CheckpointConfig`` | ``soflow_fast.checkpoint`` |
| ``eval`` | ``EvalConfig`` | ``soflow_fast.evaluator`` |
| ``ema`` | ``EMAConfig`` | ``soflow_fast.ema`` |
| ``parallel`` | ``ParallelConfig`` | ``soflow_fast.parallel`` |
| ``soflow``, ``meanflow`` | ``SoFlowConfig``, ``MeanFlowConfig`` | the objectives |

A YAML file may be flat (the authors' style: every key at the top level) or nested by section. A flat
key is routed to the one section that owns it; ``total_steps`` drives both the run length and the
objective's l schedule. ``run.KEY`` for a key that another section owns (the layout of earlier
versions, whose ``run`` section held the checkpoint, eval, EMA and parallel keys) goes to that section.
Any key that no section owns is an error that names it. Each value is converted to the type hint of
its field (``soflow_fast.config_fields``), or is one error that names the key.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from soflow_fast.checkpoint import CheckpointConfig
from soflow_fast.cli import parse_overrides  # noqa: F401 (the config's own --key=value reader)
from soflow_fast.config_fields import Section, VariantSection, at_least, config_error, one_of, option
from soflow_fast.data import DataConfig
from soflow_fast.ema import EMAConfig
from soflow_fast.evaluator import EvalConfig
from soflow_fast.meanflow import MeanFlowConfig
from soflow_fast.models import DiTConfig, ModelConfig
from soflow_fast.objective import SoFlowConfig
from soflow_fast.optim import OptimConfig
from soflow_fast.parallel import ParallelConfig

# each objective and the config section that holds its settings: fm trains SoFlow's flow-matching term alone
OBJECTIVE_SECTIONS = {"soflow": "soflow", "meanflow": "meanflow", "fm": "soflow"}


@dataclass(kw_only=True)
class RunConfig(Section):
    """What the run is: where it lives, how long, its batch, seed and objective, how often it logs."""

    SECTION: ClassVar[str] = "run"

    working_dir: str = option("runs/digits", resume_safe=True)  # config.yaml, log.txt, ckpts/, figs/, evals/
    total_steps: int = option(2000, check=at_least(1), resume_safe=True)
    batch_size: int = option(128, check=at_least(1))  # global batch, split over ranks
    log_steps: int = option(50, check=at_least(0), resume_safe=True)  # 0 = no metrics lines
    seed: int = option(0)
    objective: str = option("soflow", check=one_of(*OBJECTIVE_SECTIONS))  # soflow; meanflow (the JVP baseline);
    # fm (plain flow matching on the soflow section's settings: F(x, t, t) trained as the velocity, a teacher)
    teacher: str | None = option(None)  # teacher mode (objective soflow): the frozen flow model whose velocities
    # are the targets: a run directory (its EMA weights), a soflow-export .safetensors, or a SiT or authors' .pt
    init_from: str | None = option(None, resume_safe=True)  # a new run's weights and EMA start from this flow
    # model (the sources of run.teacher); read at step 0 only, never by a resume
    max_steps_this_run: int | None = option(None, resume_safe=True)  # stop (with a checkpoint) after this many
    # steps
    draw_groups: int | None = option(None, check=at_least(1), resume_safe=True)  # FM/SCM split groups of the
    # global batch; None = world size. Set it to the world size of another run to reproduce that run's draws
    # on one process.

    def check(self) -> None:
        for key in ("working_dir", "teacher", "init_from"):
            if getattr(self, key) is not None:
                setattr(self, key, str(Path(getattr(self, key)).expanduser()))
        if Path(self.working_dir).exists() and not Path(self.working_dir).is_dir():
            raise ValueError(f"run.working_dir={self.working_dir} exists and is not a directory")
        if self.draw_groups is not None and self.batch_size % self.draw_groups:
            raise config_error("run.draw_groups", f"must divide run.batch_size={self.batch_size}", self.draw_groups)

    def check_with(self, cfg) -> None:
        if self.teacher is not None and self.objective != "soflow":
            raise ValueError(
                f"run.teacher is SoFlow's teacher mode: it needs run.objective=soflow, not {self.objective}"
            )
        if self.objective == "soflow" and cfg.soflow.teacher_steps and self.teacher is None:
            raise ValueError(
                f"soflow.teacher_steps={cfg.soflow.teacher_steps} integrates a teacher's ODE: set run.teacher"
            )
        if self.objective == "fm" and cfg.soflow.coefficient_type != "Euler":
            raise ValueError(
                "run.objective=fm trains F(x, t, t) as the velocity: it needs soflow.coefficient_type=Euler, got "
                f"{cfg.soflow.coefficient_type}"
            )


@dataclass(kw_only=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=DiTConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig.from_dict({}))
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    soflow: SoFlowConfig = field(default_factory=SoFlowConfig)
    meanflow: MeanFlowConfig = field(default_factory=MeanFlowConfig)

    def __post_init__(self) -> None:
        # one schedule length: the l schedule runs over the whole training run
        if self.soflow.total_steps != self.run.total_steps:
            self.soflow = dataclasses.replace(self.soflow, total_steps=self.run.total_steps)
        for name in SECTIONS:
            getattr(self, name).check_with(self)
        self._check_null_label()

    def _check_null_label(self) -> None:
        """Guidance and label dropping feed the null label, whose embedding row exists only when
        model.class_dropout_prob > 0: without it the first guided step indexes past the table."""
        if self.model.num_classes == 0 or self.model.class_dropout_prob > 0:
            return
        if self.run.objective in ("soflow", "fm") and self.soflow.cfg_scale > 1:
            need = f"soflow.cfg_scale={self.soflow.cfg_scale:g} (> 1 trains guidance)"
            off = "soflow.cfg_scale=1"
        elif self.run.objective == "meanflow" and (
            self.meanflow.cfg_drop_rate > 0 or self.meanflow.omega != 1 or self.meanflow.kappa != 0
        ):
            need = "MeanFlow's label dropping or guidance (meanflow.cfg_drop_rate > 0, omega != 1 or kappa != 0)"
            off = "meanflow.cfg_drop_rate=0, omega=1 and kappa=0"
        else:
            return
        raise ValueError(
            f"{need} uses the null label, which model.class_dropout_prob=0 leaves out of the model: "
            f"set model.class_dropout_prob > 0, or {off}"
        )

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: getattr(self, name).to_dict() for name in SECTIONS}

    def save_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


SECTIONS: dict[str, type[Section]] = typing.get_type_hints(TrainConfig)  # section name -> its (base) class


def resume_safe_keys() -> frozenset[str]:
    """``section.key`` of every setting a resumed run may change (the fields marked ``resume_safe``)."""
    out = set()
    for sec, cls in SECTIONS.items():
        classes = cls.variants().values() if issubclass(cls, VariantSection) else (cls,)
        out |= {f"{sec}.{name}" for c in classes for name in c.resume_safe()}
    return frozenset(out)


# ----------------------------------------------------------------------------------------------
# Key routing: flat (authors') keys, dotted overrides, nested sections
# ----------------------------------------------------------------------------------------------

# the same key in two sections: total_steps is shared on purpose (run length = schedule length)
_SHARED = {"total_steps": "run"}
# the authors' names for keys we spell differently
_ALIASES = {
    "model_type": "model",
    "ema_decay": "ema_decays",
    "ema_rate": "ema_decays",
    "ema_decay_rate": "ema_decays",
    "dataset_path": "data_path",
    "data_size": "input_size",
    "learning_rate": "lr",
    "eval_NFE": "eval_nfe",
    "logging_steps": "log_steps",
}


def _owners(name: str) -> list[str]:
    return [sec for sec, cls in SECTIONS.items() if name in cls.all_field_types()]


def keys_help(width: int = 100) -> str:
    """Every config key by section, for a command's --help."""
    import textwrap

    lines = [
        "Every config key is also a flag, --key=value (--section.key=value where two sections share a name, as",
        "meanflow.* and soflow.* do); --print_config shows them all with their resolved values. Keys:",
    ]
    for sec, cls in SECTIONS.items():
        lines += textwrap.wrap(
            ", ".join(cls.all_field_types()), width, initial_indent=f"  {sec}: ", subsequent_indent="    "
        )
    return "\n".join(lines)


def route(key: str) -> tuple[str, str]:
    """(section, field) of a flat or dotted key."""
    if "." in key:
        sec, name = key.split(".", 1)
        if sec not in SECTIONS:
            raise ValueError(f"unknown config section {sec!r} in key {key!r}; sections: {', '.join(SECTIONS)}")
        name = _ALIASES.get(name, name)
        if name in SECTIONS[sec].all_field_types():
            return sec, name
        moved = [o for o in _owners(name) if o not in ("soflow", "meanflow")]
        if sec == "run" and len(moved) == 1:  # a key of the run section before it was split
            return moved[0], name
        raise ValueError(f"unknown config key {key!r}")
    name = _ALIASES.get(key, key)
    owners = _owners(name)
    if not owners:
        raise ValueError(f"unknown config key {key!r}")
    if len(owners) > 1:
        if name in _SHARED:
            return _SHARED[name], name
        if set(owners) == {"soflow", "meanflow"}:
            return "soflow", name  # the authors' flat keys are SoFlow's; MeanFlow's are written meanflow.KEY
        raise ValueError(f"config key {key!r} is ambiguous: write it as one of {[f'{o}.{name}' for o in owners]}")
    return owners[0], name


def merge(base: TrainConfig, updates: dict[str, Any]) -> TrainConfig:
    """A new config with ``updates`` applied; keys may be flat, dotted, or nested section dicts."""
    items: list[tuple[str, Any]] = []
    for key, value in updates.items():
        if key in SECTIONS and isinstance(value, dict):
            items += [(f"{key}.{k}", v) for k, v in value.items()]
        else:
            items.append((key, value))
    per_section: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for key, value in items:
        sec, name = route(key)
        per_section[sec][name] = value
    sections = {}
    for sec, cls in SECTIONS.items():
        current = getattr(base, sec).to_dict()
        if issubclass(cls, VariantSection) and cls.VARIANT_KEY in per_section[sec]:
            # another kind (a named network, say) brings its own options: the base's do not carry over
            # unless these updates set them too
            current = {k: v for k, v in current.items() if k in _shared(cls)}
        current.update(per_section[sec])
        sections[sec] = cls.from_dict(current)
    if "total_steps" in per_section["soflow"] and "total_steps" not in per_section["run"]:
        sections["run"] = dataclasses.replace(sections["run"], total_steps=sections["soflow"].total_steps)
    return TrainConfig(**sections)


def _shared(cls: type[VariantSection]) -> set[str]:
    """The fields every variant of a family has."""
    return {f.name for f in dataclasses.fields(cls)}


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML config file; a missing file or one that is not a mapping is one error."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{p} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{p}: a config file must hold a mapping of keys, got {type(data).__name__}")
    return data


def load_yaml(path: str | Path, base: TrainConfig | None = None) -> TrainConfig:
    """``base`` (default: the dataclass defaults) with the file's keys on top."""
    return merge(base or TrainConfig(), read_yaml(path))


def normalize(saved: dict[str, dict]) -> dict[str, dict]:
    """A config dict as ``to_dict`` writes it (from a checkpoint's marker, say) in this version's
    sections: keys that an earlier layout kept elsewhere move to their section."""
    out: dict[str, dict] = {}
    for sec, values in saved.items():
        if not isinstance(values, dict):
            continue
        for name, value in values.items():
            try:
                new_sec, new_name = route(f"{sec}.{name}")
            except ValueError:
                continue  # a key this version no longer has
            out.setdefault(new_sec, {})[new_name] = value
    return out
