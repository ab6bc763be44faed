"""The authors' YAML files (zlab-princeton/SoFlow's ``cifar.yaml`` and ``imagenet.yaml``), read as they are.

Their files are flat, and ``dataset_type`` names a recipe that their trainer hard-codes:

- ``Imagenet``: 4-channel VAE latents (``dataset_path`` is the folder holding ``imagenet_latent.hdf5``),
  1,000 classes with a null label when ``cfg_drop_rate`` > 0, AdamW. Here: the ``imagenet-b2`` preset.
- ``CIFAR10``: 3-channel images (``dataset_path`` is the folder holding ``cifar-10-batches-py``),
  unconditional, EDM augmentation whose labels the U-Net embeds, RAdam, and an EMA blended in float64
  every 16 steps with decay**16. Here: the ``cifar10`` preset.

Every other key of theirs is one of ours or an alias of one (``config._ALIASES``: ``learning_rate``,
``ema_decay_rate``, ``data_size``, ``eval_NFE``, ``logging_steps`` ...), so it goes through the same
routing and checks as our own keys. Their evaluation always writes FID-50K sample files, so
``eval.eval_num_samples`` is 50,000.
"""

from __future__ import annotations

from typing import Any

from soflow_fast.models import ModelConfig

RECIPES = {"Imagenet": "imagenet-b2", "CIFAR10": "cifar10"}  # their dataset_type -> our preset

# Their trainer's defaults (``Learner.__init__`` in their train.py), which a key their file leaves out
# takes, as their trainer would: not this engine's preset value.
AUTHORS_DEFAULTS: dict[str, Any] = {
    "working_dir": "./your_working_dir",
    "noising_type": "Linear",
    "coefficient_type": "Euler",
    "model_type": "DiT-B-4",
    "data_size": 32,
    "dataset_path": "./imagenet_latent",
    "velocity_loss_ratio": 0.75,
    "p": 1.0,
    "eps": 0.01,
    "time_mean": [-0.2, -1.0, 0.2],
    "time_std": [1.0, 0.8, 0.8],
    "cfg_scale": 1.0,
    "mix_ratio": 1.0,
    "cfg_drop_rate": 0.0,
    "cfg_decay_time": 1.0,
    "l_schedule": "Exponent",
    "l_init_ratio": 0.1,
    "l_end_ratio": 0.002,
    "total_steps": 400_000,
    "ema_decay_rate": 0.9999,
    "learning_rate": 1e-4,
    "betas": [0.9, 0.99],
    "weight_decay": 0.0,
    "batch_size": 256,
    "num_workers": 12,
    "prefetch_factor": 6,
    "eval_steps": 25_000,
    "eval_batch_size": 125,
    "eval_NFE": 1,
    "eval_demo_steps": 1000,
    "eval_demo_shape": [4, 8],
    "logging_steps": 100,
    "ckpt_saving_steps": 200_000,
    "seed": 42,
}
# the same setting under another of their names: a file that gives one of them gives the setting
_SAME = {"ema_decay_rate": ("ema_decay", "ema_rate")}
_TRIG = {"Triangular": "Trig"}  # their YAML comments spell the trigonometric schedules 'Triangular'


def is_authors_file(data: dict[str, Any]) -> bool:
    """Whether a config mapping is written in the authors' format (their recipe key is present)."""
    return "dataset_type" in data


def from_authors(data: dict[str, Any], source: str = "config") -> tuple[str, dict[str, Any]]:
    """``(preset, updates)``: the preset their ``dataset_type`` names and the keys to merge on top of it: the
    file's keys, and their trainer's defaults (``AUTHORS_DEFAULTS``) for the keys it leaves out.

    Their trainer's own checks are kept: a U-Net only for CIFAR-10, no guidance for CIFAR-10, and
    guidance (``cfg_scale`` > 1) exactly when labels are dropped (``cfg_drop_rate`` > 0) for ImageNet.
    """
    data = dict(data)
    kind = data.pop("dataset_type")
    for key, value in AUTHORS_DEFAULTS.items():
        if key not in data and not any(other in data for other in _SAME.get(key, ())):
            data[key] = value
    if kind not in RECIPES:
        raise ValueError(f"{source}: dataset_type must be one of {', '.join(RECIPES)}, got {kind!r}")
    for key in ("noising_type", "coefficient_type"):
        if key in data:
            data[key] = _TRIG.get(data[key], data[key])
    cfg_scale, drop = float(data.get("cfg_scale", 1.0)), float(data.get("cfg_drop_rate", 0.0))
    if kind == "Imagenet":
        if "model_type" in data and "labels" not in ModelConfig.variant_of(data["model_type"])[0].CONDITIONS:
            raise ValueError(
                f"{source}: model_type {data['model_type']} is not class-conditional, so not for Imagenet (their "
                "recipe trains 1,000 classes)"
            )
        if (cfg_scale == 1.0) != (drop == 0.0) or cfg_scale < 1.0:
            raise ValueError(
                f"{source}: cfg_scale {cfg_scale:g} with cfg_drop_rate {drop:g}: guidance (cfg_scale > 1) trains "
                "the null label, so it needs cfg_drop_rate > 0, and cfg_scale 1 needs cfg_drop_rate 0"
            )
        # their DiT's label table has the null row exactly when labels are dropped
        data["model.class_dropout_prob"] = drop
    elif cfg_scale != 1.0:
        raise ValueError(f"{source}: CIFAR10 is unconditional: cfg_scale must be 1.0, got {cfg_scale:g}")
    data.setdefault("eval.eval_num_samples", 50_000)
    return RECIPES[kind], data


def deliberate_differences(cfg, device_type: str) -> str:
    """One line: where a run of an authors' file differs from their trainer on purpose."""
    parts = [
        "checkpoints are sharded (ckpts/step_*/, torch.distributed.checkpoint); a ckpts/<step>.pt of theirs "
        "in the working dir is resumed from",
        "the data order is this engine's seeded stream, not DistributedSampler epochs",
    ]
    if device_type == "cuda" and cfg.parallel.mixed_precision in ("auto", "bf16"):
        parts.append("bf16 parameters/autocast on CUDA (theirs: fp32 with TF32; --mixed_precision=fp32 for theirs)")
    if cfg.model.sample_shape()[0] == 4 and not cfg.eval.vae:
        parts.append("grids and eval npz hold latents unless --vae=<a local AutoencoderKL folder> (no downloads)")
    return "authors' config: differs from their trainer by design: " + "; ".join(parts)
