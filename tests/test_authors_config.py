"""The authors' YAML files load unchanged: every key they write, with their meaning.

``tests/assets/authors/{cifar,imagenet}.yaml`` are written in the authors' format (their keys,
their values, a comment on each line where they have one); the run of the CIFAR-10 recipe itself is
in ``tests/test_cifar_recipe.py``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from soflow_fast.authors_config import from_authors
from soflow_fast.presets import build_config
from tests.utils import raises_naming

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "tests" / "assets" / "authors"
CIFAR, IMAGENET = ASSETS / "cifar.yaml", ASSETS / "imagenet.yaml"


def _authors(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _common(cfg, theirs: dict) -> None:
    """The keys both recipes share, each where their trainer uses it."""
    assert cfg.run.working_dir == str(Path(theirs["working_dir"]))
    assert cfg.model.input_size == theirs["data_size"]
    assert cfg.data.data_path == theirs["dataset_path"]
    for key in ("velocity_loss_ratio", "p", "eps", "cfg_scale", "mix_ratio", "cfg_drop_rate", "cfg_decay_time"):
        assert getattr(cfg.soflow, key) == theirs[key], key
    for key in ("noising_type", "coefficient_type", "l_schedule", "l_init_ratio", "l_end_ratio"):
        assert getattr(cfg.soflow, key) == theirs[key], key
    assert list(cfg.soflow.time_mean) == theirs["time_mean"] and list(cfg.soflow.time_std) == theirs["time_std"]
    assert cfg.run.total_steps == cfg.soflow.total_steps == theirs["total_steps"]
    assert cfg.ema.ema_decays == (theirs["ema_decay_rate"],)
    assert cfg.optim.lr == theirs["learning_rate"]
    assert list(cfg.optim.betas) == theirs["betas"] and cfg.optim.weight_decay == theirs["weight_decay"]
    assert cfg.run.batch_size == theirs["batch_size"]
    assert (cfg.data.num_workers, cfg.data.prefetch_factor) == (theirs["num_workers"], theirs["prefetch_factor"])
    assert cfg.eval.eval_steps == theirs["eval_steps"] and cfg.eval.eval_num_samples == 50_000  # their FID-50K files
    assert (cfg.eval.eval_batch_size, cfg.eval.eval_nfe) == (theirs["eval_batch_size"], theirs["eval_NFE"])
    assert cfg.eval.eval_demo_steps == theirs["eval_demo_steps"]
    assert list(cfg.eval.eval_demo_shape) == theirs["eval_demo_shape"]
    assert cfg.checkpoint.ckpt_saving_steps == theirs["ckpt_saving_steps"]
    assert cfg.run.log_steps == theirs["logging_steps"] and cfg.run.seed == theirs["seed"]


def test_cifar_file_is_their_cifar10_recipe():
    theirs = _authors(CIFAR)
    cfg = build_config(None, str(CIFAR))
    _common(cfg, theirs)
    m = cfg.model
    assert (m.model, m.in_channels, m.num_classes, m.class_dropout_prob) == ("UNet", 3, 0, 0.0)
    assert cfg.data.dataset == "cifar10" and cfg.data.augment == "edm" and not cfg.data.random_flip
    assert cfg.optim.optimizer == "RAdam"
    assert (cfg.ema.ema_every, cfg.ema.ema_fp64) == (16, True)  # 0.9999**16 every 16 steps, in float64
    built = cfg.model.build()
    assert sum(p.numel() for p in built.parameters()) == 55_932_419  # their 55.9M U-Net


def test_imagenet_file_is_their_imagenet_recipe():
    theirs = _authors(IMAGENET)
    cfg = build_config(None, str(IMAGENET))
    _common(cfg, theirs)
    m = cfg.model
    assert (m.model, m.in_channels, m.num_classes) == ("DiT-B/4", 4, 1000)
    assert m.class_dropout_prob == theirs["cfg_drop_rate"]  # their label table has the null row when dropping
    assert cfg.data.dataset == "latents_h5" and cfg.data.augment is None
    assert cfg.optim.optimizer == "AdamW" and (cfg.ema.ema_every, cfg.ema.ema_fp64) == (1, False)


def test_overrides_go_on_top_and_take_their_names_too():
    cfg = build_config(None, str(IMAGENET), ["--learning_rate=3e-4", "--batch_size=64", "--model_type=DiT-B-2"])
    assert (cfg.optim.lr, cfg.run.batch_size, cfg.model.model) == (3e-4, 64, "DiT-B/2")


def test_triangular_spelling_and_their_checks(tmp_path):
    theirs = _authors(CIFAR)
    preset, updates = from_authors({**theirs, "noising_type": "Triangular", "coefficient_type": "Triangular"})
    assert preset == "cifar10" and (updates["noising_type"], updates["coefficient_type"]) == ("Trig", "Trig")
    bad = [  # the authors' keys each check names
        ({**theirs, "cfg_scale": 2.0}, ("CIFAR10", "cfg_scale", "got 2")),
        ({**_authors(IMAGENET), "cfg_drop_rate": 0.0}, ("cfg_scale 3", "cfg_drop_rate 0")),
        ({**_authors(IMAGENET), "model_type": "UNet"}, ("UNet",)),
        ({**theirs, "dataset_type": "MNIST"}, ("dataset_type", "Imagenet, CIFAR10", "'MNIST'")),
    ]
    for data, names in bad:
        with raises_naming(ValueError, *names):
            from_authors(data)
    f = tmp_path / "c.yaml"
    f.write_text(CIFAR.read_text() + "unknown_key: 1\n")
    with raises_naming(ValueError, "'unknown_key'"):
        build_config(None, str(f))
    with pytest.raises(ValueError, match="drop --preset=digits"):
        build_config("digits", str(CIFAR))


@pytest.mark.parametrize("path", [CIFAR, IMAGENET], ids=["cifar", "imagenet"])
def test_print_config_shows_their_values_without_reading_data(path, tmp_path):
    """``train.py --config F --print_config``: the resolved config as YAML, exit 0, nothing read or written
    (their dataset_path does not exist here)."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "soflow_fast" / "train.py"), "--config", str(path), "--print_config"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    shown = yaml.safe_load(out.stdout)
    theirs = _authors(path)
    assert shown["run"]["seed"] == theirs["seed"] and shown["optim"]["lr"] == theirs["learning_rate"]
    assert shown["model"]["model"] == {"UNet": "UNet", "DiT-B-4": "DiT-B/4"}[theirs["model_type"]]
    assert shown["data"]["data_path"] == theirs["dataset_path"] and shown["eval"]["eval_nfe"] == theirs["eval_NFE"]
    assert list(tmp_path.iterdir()) == []  # no working dir, no lock, no log
