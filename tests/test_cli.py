"""One command-line convention in every tool: both spellings of a flag, bare booleans, one name per idea,
help for every option, console commands."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from soflow_fast import evaluate, export, prepare_latents, sample, train
from soflow_fast.cli import BARE, Parser, parse_overrides
from soflow_fast.experiments import compare
from tests.utils import child_env


def _printed_config(capsys, *args: str) -> dict:
    assert train.main(["--print_config", *args]) == 0
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("spelling", ["--total_steps=7", "--total-steps=7", "--total-steps", "--total_steps"])
def test_train_takes_both_spellings_of_a_key(capsys, spelling):
    args = [spelling] if "=" in spelling else [spelling, "7"]
    assert _printed_config(capsys, *args)["run"]["total_steps"] == 7
    assert _printed_config(capsys, "--print-config", "--run.max-steps-this-run=3")["run"]["max_steps_this_run"] == 3


def test_a_bare_boolean_is_true_and_never_takes_the_next_flag(capsys, tmp_path):
    shown = _printed_config(capsys, "--fsdp", f"--working_dir={tmp_path}", "--activation-checkpointing")
    assert shown["parallel"]["fsdp"] is True and shown["parallel"]["activation_checkpointing"] is True
    assert shown["run"]["working_dir"] == str(tmp_path)
    assert _printed_config(capsys, "--fsdp=false")["parallel"]["fsdp"] is False
    assert parse_overrides(["--fsdp", "--seed", "-3"]) == {"fsdp": BARE, "seed": -3}
    # a key that is not a boolean needs its value, and says how to give it
    assert train.main(["--print_config", "--seed", "--fsdp"]) == 2
    assert "run.seed needs a value: --seed=VALUE" in capsys.readouterr().err


def test_a_tool_parser_takes_both_spellings_aliases_and_boolean_values():
    p = Parser("soflow-x", "a test tool", aliases={"work_dir": "working_dir"})
    p.add_argument("--working_dir", help="a run")
    p.add_argument("--skip_bad_files", action="store_true", help="a boolean")
    p.add_argument("--batch_size", type=int, default=1, help="a number")
    for argv in (["--working-dir", "w"], ["--working_dir=w"], ["--work-dir", "w"], ["--work_dir=w"]):
        assert p.parse_args(argv).working_dir == "w", argv
    a = p.parse_args(["--skip-bad-files", "--batch-size", "3"])
    assert a.skip_bad_files is True and a.batch_size == 3
    assert p.parse_args(["--skip_bad_files=false"]).skip_bad_files is False
    assert p.parse_args(["--skip_bad_files=true"]).skip_bad_files is True
    with pytest.raises(SystemExit):
        p.parse_args(["--skip_bad_files=maybe"])
    with pytest.raises(ValueError, match="help text"):
        p.add_argument("--undocumented")


@pytest.mark.parametrize(
    "parse",
    [
        lambda argv: evaluate.parse_args(["--ref_batch=r", "--sample_batch_dir=d", *argv]),
        lambda argv: prepare_latents.parse_args(["--data_path=d", "--save_path=s", "--vae=v", *argv]),
    ],
    ids=["evaluate", "prepare_latents"],
)
def test_the_batch_size_flag_is_one_name_in_both_spellings(parse):
    assert parse(["--batch-size", "5"]).batch_size == parse(["--batch_size=5"]).batch_size == 5


def test_prepare_latents_takes_the_old_flag_names_and_bare_booleans():
    a = prepare_latents.parse_args(["--data-path", "d", "--save-path", "s", "--vae", "v", "--device-batch-size=3"])
    assert (a.data_path, a.save_path, a.batch_size) == ("d", "s", 3)
    assert prepare_latents.parse_args(["--data_path=d", "--save_path=s", "--vae=v", "--skip-bad-files"]).skip_bad_files


@pytest.mark.parametrize("module", [train, sample, export, evaluate, prepare_latents, compare])
def test_every_option_of_every_tool_has_help_and_one_spelling(module, capsys):
    parse = getattr(module, "parse_args", None) or module.main
    with pytest.raises(SystemExit) as done:
        parse(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: soflow-") or "soflow_fast.experiments.compare" in text
    options = [line.split()[0] for line in text.splitlines() if line.startswith("  --")]
    assert options and not any("-" in o[2:].split("=")[0] for o in options), options


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A tiny exported model (the same file ``soflow-export`` writes)."""
    from safetensors.torch import save_file

    from soflow_fast.models import ModelConfig

    folder = tmp_path_factory.mktemp("weights")
    cfg = ModelConfig.from_dict(dict(model="DiT-T/2", input_size=8, in_channels=1, num_classes=2, depth=1))
    torch.manual_seed(0)
    net = cfg.build()
    meta = {
        "format": "soflow_fast.dit.v1",
        "model_name": cfg.LABEL,
        "model_config": __import__("json").dumps(cfg.to_dict()),
        "soflow": __import__("json").dumps({}),
    }
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "w.safetensors"), metadata=meta)
    return folder / "w.safetensors"


def test_two_sample_calls_in_a_row_each_write_their_own_grid(weights):
    common = ["--weights", str(weights), "--num=4", "--device=cpu"]
    assert sample.main([*common, "--npz", str(weights.parent / "a.npz")]) == 0
    assert sample.main([*common, "--npz", str(weights.parent / "b"), "--batch-size=2", "--nfe", "2"]) == 0
    made = sorted(p.name for p in (weights.parent / "samples").iterdir())
    assert made == ["a.png", "b.png"], made
    assert (weights.parent / "a.npz").is_file() and (weights.parent / "b.npz").is_file()


def test_export_takes_the_shared_flag_names():
    for argv in (["w", "o", "--ckpt_steps=3", "--which=model"], ["w", "o", "--ckpt-steps", "3", "--weights", "model"]):
        a = export.parse_args(argv)
        assert (a.working_dir, a.ckpt_steps, a.which) == ("w", 3, "model")


@pytest.mark.parametrize("command", ["soflow-train", "soflow-sample", "soflow-export", "soflow-evaluate",
                                     "soflow-prepare-latents"])  # fmt: skip
def test_console_commands_run(command):
    path = shutil.which(command) or os.path.join(os.path.dirname(sys.executable), command)
    assert os.path.exists(path), f"{command} is not installed (pip install -e . makes it)"
    proc = subprocess.run([path, "--help"], env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith(f"usage: {command}"), proc.stderr[-2000:]
