"""Training configuration: dataclasses, named presets, YAML files and ``--key=value`` overrides.

A YAML file may be flat (the authors' style: every key at the top level) or nested by section
(``model:``, ``data:``, ``optim:``, ``run:``, ``soflow:``, ``meanflow:``). A flat key is routed to
the one section that owns it; ``total_steps`` drives both the run length and the objective's l
schedule. Any key that no section owns is an error that names it. Each value is converted to the
type hint of its field (``soflow_fast.config_types``), or is one error that names the key.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from soflow_fast.config_types import coerce, field_types
from soflow_fast.meanflow import MeanFlowConfig
from soflow_fast.models.dit import canonical_model_name
from soflow_fast.objective import SoFlowConfig

DATASETS = ("digits", "npz", "image_folder", "cifar10", "latents_h5")
OPTIMIZERS = ("AdamW", "Adam", "RAdam")
PRECISIONS = ("auto", "bf16", "fp32")
OBJECTIVES = ("soflow", "meanflow")
COMPILE_SCOPES = ("blocks", "loss")
CUDA_GRAPHS = ("loss", "step")
FUSED_OPS = ("all", "layer_norms", "losses")  # "all" and soflow_fast.ops.FUSED_GROUPS
DATA_OPTIONS = {  # DataConfig reader options -> the datasets that read them
    "layout": ("npz",),
    "x_key": ("npz", "latents_h5"),
    "y_key": ("npz", "latents_h5"),
    "channels": ("image_folder",),
    "in_memory": ("image_folder", "latents_h5"),
    "second_half": ("latents_h5",),
    "scale_factor": ("latents_h5",),
    "skip_bad_files": ("image_folder",),
}
SIZE_OVERRIDES = ("patch_size", "hidden_size", "depth", "num_heads")  # ModelConfig fields a named size sets
DIT_ONLY = SIZE_OVERRIDES
UNET_ONLY = ("model_channels", "channel_mult", "num_blocks", "attn_resolutions", "dropout", "augment_dim")
AUGMENTS = ("edm",)  # data.augment: EDM's geometric pipe with the authors' CIFAR-10 settings


def _one_of(key: str, value: Any, allowed: tuple[Any, ...], *, none_ok: bool = False) -> None:
    """A ValueError unless ``value`` is one of ``allowed`` (or None, with ``none_ok``: the default choice)."""
    if not (value in allowed or (none_ok and value is None)):
        raise ValueError(f"{key} must be one of {', '.join(map(str, allowed))}; got {value!r}")


@dataclass(kw_only=True)
class ModelConfig:
    """The network: a DiT size (optionally overridden field by field) or the authors' CIFAR-10 U-Net."""

    model: str = "DiT-T/2"  # a size from soflow_fast.models.DIT_SIZES (the authors' "DiT-B-4" spelling works),
    # or "UNet" (soflow_fast.models.SongUNet, unconditional)
    input_size: int = 8  # spatial size of the data (latent size for latent data)
    in_channels: int = 1
    num_classes: int = 10  # 0 = unconditional
    class_dropout_prob: float = 0.1  # > 0 adds the null-label row that guidance trains
    patch_size: int | None = None  # DiT: overrides of the named size
    hidden_size: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float = 4.0
    model_channels: int | None = None  # UNet: overrides of SongUNet's CIFAR-10 defaults (128, [2, 2, 2], 4,
    channel_mult: tuple[int, ...] | None = None  # [16], 0.3, 6 augmentation labels)
    num_blocks: int | None = None
    attn_resolutions: tuple[int, ...] | None = None
    dropout: float | None = None
    augment_dim: int | None = None

    def __post_init__(self) -> None:
        if self.model != "UNet":
            self.model = canonical_model_name(self.model)
        for name in ("input_size", "in_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_classes < 0:
            raise ValueError(f"model.num_classes must be >= 0, got {self.num_classes}")
        if not 0 <= self.class_dropout_prob <= 1:
            raise ValueError(f"model.class_dropout_prob must be in [0, 1], got {self.class_dropout_prob}")
        other = DIT_ONLY if self.is_unet else UNET_ONLY
        for name in other:
            if getattr(self, name) is not None:
                kind = "DiT" if self.is_unet else "UNet"
                raise ValueError(f"model.{name} applies to a {kind}, not to model.model={self.model}")
        if self.is_unet and self.num_classes:
            raise ValueError(f"model.model=UNet is unconditional: set model.num_classes=0 (got {self.num_classes})")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")

    @property
    def is_unet(self) -> bool:
        return self.model == "UNet"

    def build_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``soflow_fast.models.build_model(self.model, ...)``."""
        if self.is_unet:
            kw = {name: getattr(self, name) for name in UNET_ONLY if getattr(self, name) is not None}
            kw = {k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()}
            return dict(input_size=self.input_size, in_channels=self.in_channels, **kw)
        from soflow_fast.models.dit import DIT_SIZES

        patch, hidden, depth, heads = DIT_SIZES[self.model]
        return dict(
            input_size=self.input_size,
            patch_size=self.patch_size or patch,
            in_channels=self.in_channels,
            hidden_size=self.hidden_size or hidden,
            depth=self.depth or depth,
            num_heads=self.num_heads or heads,
            mlp_ratio=self.mlp_ratio,
            num_classes=self.num_classes,
            class_dropout_prob=self.class_dropout_prob,
        )

    def build(self):
        """The network this config describes (on the CPU, freshly initialised)."""
        from soflow_fast.models import DiT, build_unet

        return build_unet(**self.build_kwargs()) if self.is_unet else DiT(**self.build_kwargs())


@dataclass(kw_only=True)
class DataConfig:
    dataset: str = "digits"  # one of DATASETS; digits is bundled with scikit-learn, nothing to download
    data_path: str | None = None  # file or folder for the other datasets
    image_size: int | None = None  # resize target for image folders
    num_workers: int = 0  # loader workers for the image folder; in-memory sets index tensors directly
    random_flip: bool = False  # horizontal flips (keyed by stream position, so resumable)
    augment: str | None = None  # "edm": EDM's geometric augmentation (x-flip 1/2; scaling, anisotropic scaling and
    # translation each with p = 0.12), drawn per step for the global batch; its 6 labels reach the network
    prefetch_factor: int | None = None  # batches each loader worker prepares ahead (with num_workers > 0)
    # Reader options, each read by the datasets DATA_OPTIONS names; None = the reader's default.
    layout: str | None = None  # npz: "auto", "NCHW" or "NHWC" (where the channel axis of 4-D images is)
    x_key: str | None = None  # npz: the image array; latents_h5: the moments dataset
    y_key: str | None = None  # npz / latents_h5: the label array
    channels: int | None = None  # image_folder: 3 (RGB, the default) or 1 (grayscale)
    in_memory: bool | None = None  # image_folder / latents_h5: decode or read everything into RAM once
    second_half: str | None = None  # latents_h5: what moment channels [C:] hold, "std" (default) or "logvar"
    scale_factor: float | None = None  # latents_h5: the VAE's latent scale (default 0.18215, SD-VAE)
    skip_bad_files: bool | None = None  # image_folder: leave unreadable images out (counted in the log) instead
    # of refusing the folder

    def __post_init__(self) -> None:
        _one_of("data.dataset", self.dataset, DATASETS)
        if self.dataset != "digits" and not self.data_path:
            raise ValueError(f"data.data_path is required for dataset {self.dataset!r}")
        for name, readers in DATA_OPTIONS.items():
            if getattr(self, name) is not None and self.dataset not in readers:
                raise ValueError(
                    f"data.{name} applies to dataset {' and '.join(readers)} only, not to data.dataset={self.dataset}"
                )
        _one_of("data.layout", self.layout, ("auto", "NCHW", "NHWC"), none_ok=True)
        _one_of("data.channels", self.channels, (1, 3), none_ok=True)
        _one_of("data.second_half", self.second_half, ("std", "logvar"), none_ok=True)
        if self.scale_factor is not None and not (self.scale_factor > 0 and math.isfinite(self.scale_factor)):
            raise ValueError(f"data.scale_factor must be finite and > 0, got {self.scale_factor}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.prefetch_factor is not None and self.prefetch_factor < 1:
            raise ValueError(f"data.prefetch_factor must be >= 1, got {self.prefetch_factor}")
        _one_of("data.augment", self.augment, AUGMENTS, none_ok=True)
        if self.augment and self.random_flip:
            raise ValueError("data.augment=edm flips images itself (and labels the flip): set data.random_flip=false")

    def reader_kwargs(self) -> dict[str, Any]:
        """The options that are set, as keyword arguments of ``soflow_fast.data.build_dataset``."""
        renamed = {"latents_h5": {"x_key": "moments_key", "y_key": "labels_key"}}.get(self.dataset, {})
        return {
            renamed.get(name, name): getattr(self, name) for name in DATA_OPTIONS if getattr(self, name) is not None
        }


@dataclass(kw_only=True)
class OptimConfig:
    optimizer: str = "AdamW"
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    adam_eps: float = 1e-8
    grad_clip: float = 0.0  # max global grad norm; 0 = off
    warmup_steps: int = 0  # linear learning-rate warm-up

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)
        _one_of("optim.optimizer", self.optimizer, OPTIMIZERS)
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"optim.lr must be finite and > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        if self.grad_clip < 0 or self.warmup_steps < 0 or self.weight_decay < 0:
            raise ValueError("optim.grad_clip, optim.warmup_steps and optim.weight_decay must be >= 0")


@dataclass(kw_only=True)
class RunConfig:
    working_dir: str = "runs/digits"  # config.yaml, log.txt, ckpts/, figs/, evals/ go here
    total_steps: int = 2000
    batch_size: int = 128  # global batch, split over ranks
    ckpt_saving_steps: int = 500
    keep_checkpoints: int = 0  # complete checkpoints kept (the oldest removed first); 0 keeps every one
    eval_demo_steps: int = 500  # 1- and 2-step sample grids (figs/)
    eval_demo_shape: tuple[int, int] | None = None  # grid rows x columns; None = a row per class (up to 10) x 8
    eval_steps: int = 0  # npz of samples for the ADM evaluator (evals/); 0 = off
    eval_num_samples: int = 1000
    eval_batch_size: int | None = None  # eval samples per forward (one chunk, one rank); None = batch_size
    eval_nfe: int = 1  # network calls per eval sample: 1 = one-step, N = the N-step sampler (the authors' eval_NFE)
    vae: str | None = None  # a local diffusers AutoencoderKL folder: grids and eval npz of latents are decoded
    eval_reference: str | None = None  # an ADM reference batch (npz): FID and friends of every eval npz, logged
    inception: str | None = None  # the local Inception weights file (torch-fidelity's) that eval_reference needs
    log_steps: int = 50
    seed: int = 0
    ema_decays: tuple[float, ...] = (0.9999,)  # per training step
    ema_every: int = 1  # update the EMA every this many steps, with decay**ema_every (the authors' CIFAR-10: 16)
    ema_fp64: bool = False  # blend the EMA in float64 (the authors' CIFAR-10 recipe)
    objective: str = "soflow"  # or "meanflow": the JVP baseline (no FSDP: JVP does not pass its wrappers)
    compile: bool | None = None  # None = what is fastest on the device (on for CUDA, off on CPU)
    compile_scope: str | None = None  # "blocks" (per DiT block; FSDP-compatible) or "loss" (the whole SoFlow
    # loss as one graph: one process, no FSDP); None = blocks for SoFlow, loss for MeanFlow (its only scope)
    fsdp: bool | None = None  # None = on when world size > 1
    activation_checkpointing: bool = False
    mixed_precision: str = "auto"  # auto = bf16 on CUDA, fp32 on CPU
    use_fused_kernels: bool = False  # Triton fused adaLN ops on CUDA (soflow_fast.ops)
    fused_ops: str = "all"  # the ops use_fused_kernels turns on: all, layer_norms (the two adaLN LayerNorm
    # ops of every DiT block) or losses (SoFlow's consistency and velocity losses)
    max_steps_this_run: int | None = None  # stop (with a checkpoint) after this many steps
    draw_groups: int | None = None  # FM/SCM split groups of the global batch; None = world size. Set it to
    # the world size of another run to reproduce that run's draws on one process.
    cuda_graphs: str | None = None  # CUDA: "loss" replays the whole-loss compile's forward and backward as CUDA graphs
    # (torch.compile mode="reduce-overhead"); "step" captures the whole step (loss, backward, clipping, optimiser;
    # one process, no FSDP) in one CUDA graph; the draws and the EMA run eagerly around it
    sync_debug: bool = False  # CUDA: steps between logging steps run under torch.cuda.set_sync_debug_mode("error")
    # (after SYNC_DEBUG_WARMUP steps), so a host sync in the step is an error naming its line

    def __post_init__(self) -> None:
        self.ema_decays = tuple(float(d) for d in self.ema_decays)
        self.working_dir = str(Path(self.working_dir).expanduser())
        if Path(self.working_dir).exists() and not Path(self.working_dir).is_dir():
            raise ValueError(f"run.working_dir={self.working_dir} exists and is not a directory")
        for name in ("total_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"run.{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "ckpt_saving_steps",
            "keep_checkpoints",
            "eval_demo_steps",
            "eval_steps",
            "log_steps",
            "eval_num_samples",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"run.{name} must be >= 0, got {getattr(self, name)}")
        if self.ema_every < 1:
            raise ValueError(f"run.ema_every must be >= 1, got {self.ema_every}")
        if self.eval_demo_shape is not None and min(self.eval_demo_shape) < 1:
            raise ValueError(f"run.eval_demo_shape must be two numbers >= 1, got {list(self.eval_demo_shape)}")
        if not all(0 < d < 1 for d in self.ema_decays):
            raise ValueError(f"run.ema_decays must be in (0, 1), got {self.ema_decays}")
        _one_of("run.mixed_precision", self.mixed_precision, PRECISIONS)
        if self.draw_groups is not None and (self.draw_groups < 1 or self.batch_size % self.draw_groups):
            raise ValueError(f"run.draw_groups must be >= 1 and divide run.batch_size, got {self.draw_groups}")
        _one_of("run.objective", self.objective, OBJECTIVES)
        if (self.eval_batch_size is not None and self.eval_batch_size < 1) or self.eval_nfe < 1:
            raise ValueError(
                f"run.eval_batch_size and run.eval_nfe must be >= 1, got {self.eval_batch_size}, {self.eval_nfe}"
            )
        if self.eval_reference and not (self.inception and self.eval_steps):
            raise ValueError("run.eval_reference needs run.inception (a local weights file) and run.eval_steps > 0")
        _one_of("run.compile_scope", self.compile_scope, COMPILE_SCOPES, none_ok=True)
        _one_of("run.fused_ops", self.fused_ops, FUSED_OPS)
        _one_of("run.cuda_graphs", self.cuda_graphs, CUDA_GRAPHS, none_ok=True)
        if self.objective == "meanflow" and self.compile_scope == "blocks":
            raise ValueError("run.compile_scope=blocks does not apply to run.objective=meanflow (whole loss only)")


@dataclass(kw_only=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    soflow: SoFlowConfig = field(default_factory=SoFlowConfig)
    meanflow: MeanFlowConfig = field(default_factory=MeanFlowConfig)

    def __post_init__(self) -> None:
        # one schedule length: the l schedule runs over the whole training run
        if self.soflow.total_steps != self.run.total_steps:
            self.soflow = dataclasses.replace(self.soflow, total_steps=self.run.total_steps)
        self._check_null_label()
        m = self.model
        if m.is_unet and not self.data.augment and (m.augment_dim is None or m.augment_dim > 0):
            # an unused layer gets no gradient and so no optimiser state, which a resume then misses
            raise ValueError(
                f"model.augment_dim={6 if m.augment_dim is None else m.augment_dim} embeds augmentation labels, "
                "but data.augment is off, so that layer would never train: set model.augment_dim=0, or "
                "data.augment=edm"
            )

    def _check_null_label(self) -> None:
        """Guidance and label dropping feed the null label, whose embedding row exists only when
        model.class_dropout_prob > 0: without it the first guided step indexes past the table."""
        if self.model.num_classes == 0 or self.model.class_dropout_prob > 0:
            return
        if self.run.objective == "soflow" and self.soflow.cfg_scale > 1:
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
        out = {}
        for name in SECTIONS:
            sec = dataclasses.asdict(getattr(self, name))
            out[name] = {k: list(v) if isinstance(v, tuple) else v for k, v in sec.items()}
        return out

    def save_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


SECTIONS: dict[str, type] = typing.get_type_hints(TrainConfig)  # section name -> its dataclass


# ----------------------------------------------------------------------------------------------
# Key routing: flat (authors') keys and dotted overrides
# ----------------------------------------------------------------------------------------------

_OWNERS: dict[str, list[str]] = {}
for _sec, _cls in SECTIONS.items():
    for _name in field_types(_cls):
        _OWNERS.setdefault(_name, []).append(_sec)
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


def keys_help(width: int = 100) -> str:
    """Every config key by section, for a command's --help."""
    import textwrap

    lines = [
        "Every config key is also a flag, --key=value (--section.key=value where two sections share a name, as",
        "meanflow.* and soflow.* do); --print_config shows them all with their resolved values. Keys:",
    ]
    for sec, cls in SECTIONS.items():
        lines += textwrap.wrap(
            ", ".join(field_types(cls)), width, initial_indent=f"  {sec}: ", subsequent_indent="    "
        )
    return "\n".join(lines)


def _route(key: str) -> tuple[str, str]:
    if "." in key:
        sec, name = key.split(".", 1)
        if sec not in SECTIONS:
            raise ValueError(f"unknown config section {sec!r} in key {key!r}; sections: {', '.join(SECTIONS)}")
        name = _ALIASES.get(name, name)
        if name not in field_types(SECTIONS[sec]):
            raise ValueError(f"unknown config key {key!r}")
        return sec, name
    name = _ALIASES.get(key, key)
    owners = _OWNERS.get(name)
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
        sec, name = _route(key)
        per_section[sec][name] = coerce(f"{sec}.{name}", value, field_types(SECTIONS[sec])[name])
    if "model" in per_section["model"]:
        # A named network brings its own sizes: the base's overrides of another one (the digits
        # preset's, say) do not carry over unless these updates set them too.
        for name in SIZE_OVERRIDES + UNET_ONLY:
            per_section["model"].setdefault(name, None)
    kwargs = {}
    for sec in SECTIONS:
        cur = dataclasses.asdict(getattr(base, sec))
        cur.update(per_section[sec])
        kwargs[sec] = SECTIONS[sec](**cur)
    if "total_steps" in per_section["soflow"] and "total_steps" not in per_section["run"]:
        kwargs["run"] = dataclasses.replace(kwargs["run"], total_steps=per_section["soflow"]["total_steps"])
    return TrainConfig(**kwargs)


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


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``["--lr=1e-4", "--run.seed", "3"]`` -> {"lr": 1e-4, "run.seed": 3} (values parsed as YAML)."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ValueError(f"expected --key=value, got {arg!r}")
        key = arg[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ValueError(f"missing value for --{key}")
            i += 1
            raw = args[i]
        try:
            out[key.replace("-", "_")] = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as e:
            raise ValueError(f"--{key}: {raw!r} is not a valid value ({getattr(e, 'problem', None) or e})") from None
        i += 1
    return out
