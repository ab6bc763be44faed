"""Named presets and ``build_config``: a preset, a YAML file on top, ``--key=value`` overrides on top."""

from __future__ import annotations

from soflow_fast.authors_config import from_authors, is_authors_file
from soflow_fast.config import TrainConfig, merge, parse_overrides, read_yaml


def digits() -> TrainConfig:
    """The default: scikit-learn's 8x8 handwritten digits, class-conditional, CPU-sized."""
    return merge(
        TrainConfig(),
        {
            "model": dict(
                model="DiT-T/2",
                input_size=8,
                in_channels=1,
                num_classes=10,
                patch_size=2,
                hidden_size=128,
                depth=4,
                num_heads=4,
            ),  # fmt: skip
            "data": dict(dataset="digits"),
            "optim": dict(lr=1e-3, betas=[0.9, 0.99], warmup_steps=100),
            # 1600 steps fit in 10 CPU minutes
            "run": dict(working_dir="runs/digits", total_steps=1600, batch_size=128, log_steps=50),
            "checkpoint": dict(ckpt_saving_steps=400),
            "eval": dict(eval_demo_steps=400),
            "ema": dict(ema_decays=[0.995]),  # forgets the zero-output initialisation within ~1000 steps
            "soflow": dict(cfg_scale=2.0, l_init_ratio=0.1, l_end_ratio=0.002),
        },
    )


def imagenet_b2() -> TrainConfig:
    """ImageNet 256 on SD-VAE latents (authors' HDF5), DiT-B/2, the paper's settings."""
    return merge(
        TrainConfig(),
        {
            "model": dict(model="DiT-B/2", input_size=32, in_channels=4, num_classes=1000),
            "data": dict(dataset="latents_h5", data_path="data/imagenet256_latents.h5", random_flip=False),
            "optim": dict(optimizer="AdamW", lr=1e-4, betas=[0.9, 0.99]),
            "run": dict(working_dir="runs/imagenet-b2", total_steps=400_000, batch_size=256, log_steps=100),
            "checkpoint": dict(ckpt_saving_steps=10_000),
            "eval": dict(eval_demo_steps=5_000, eval_steps=50_000, eval_num_samples=50_000),
            "ema": dict(ema_decays=[0.9999]),
        },
    )


def imagenet_xl2() -> TrainConfig:
    cfg = imagenet_b2()
    return merge(cfg, {"model.model": "DiT-XL/2", "run.working_dir": "runs/imagenet-xl2", "total_steps": 1_200_000})


def cifar10() -> TrainConfig:
    """Unconditional CIFAR-10, the authors' recipe: their U-Net (SongUNet, 55.9M parameters) conditioned on
    EDM's 6 augmentation labels, RAdam, and an EMA blended in float64 every 16 steps."""
    return merge(
        TrainConfig(),
        {
            "model": dict(model="UNet", input_size=32, in_channels=3, num_classes=0, class_dropout_prob=0.0),
            "data": dict(dataset="cifar10", data_path="data/cifar-10-batches-py", augment="edm"),
            "optim": dict(optimizer="RAdam", lr=1e-4, betas=[0.9, 0.999]),
            "run": dict(working_dir="runs/cifar10", total_steps=800_000, batch_size=1024),
            "checkpoint": dict(ckpt_saving_steps=25_000),
            "eval": dict(eval_demo_steps=1_000, eval_steps=25_000, eval_num_samples=50_000, eval_batch_size=125),
            "ema": dict(ema_decays=[0.9999], ema_every=16, ema_fp64=True),
            "soflow": dict(
                velocity_loss_ratio=0.0,
                p=0.75,
                eps=0.001,
                time_mean=[-0.9, -4.0, -0.9],
                time_std=[1.6, 1.6, 1.6],
                cfg_scale=1.0,
                mix_ratio=1.0,
                cfg_drop_rate=0.0,
                cfg_decay_time=1.0,
                l_schedule="Exponent",
                l_init_ratio=1.0,
                l_end_ratio=0.0003125,
            ),
        },
    )


PRESETS = {"digits": digits, "imagenet-b2": imagenet_b2, "imagenet-xl2": imagenet_xl2, "cifar10": cifar10}


def build_config(preset: str | None = None, config_file: str | None = None, overrides: list[str] = ()) -> TrainConfig:
    """The preset (default ``digits``), then the YAML file on top, then command-line overrides on top.

    An authors' file (one with their ``dataset_type`` key) names its own recipe, the ``imagenet-b2``
    or ``cifar10`` preset, so it takes no ``preset``.
    """
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    data = read_yaml(config_file) if config_file else {}
    if is_authors_file(data):
        if preset is not None:
            raise ValueError(
                f"{config_file} is an authors' config (dataset_type: {data['dataset_type']}), which picks its own "
                f"recipe: drop --preset={preset}"
            )
        preset, data = from_authors(data, config_file)
    cfg = PRESETS[preset or "digits"]()
    if data:
        cfg = merge(cfg, data)
    if overrides:
        cfg = merge(cfg, parse_overrides(list(overrides)))
    return cfg
