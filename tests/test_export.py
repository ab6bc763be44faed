"""``python -m soflow_fast.export``: a run's EMA weights as a .safetensors file, equal to the run's EMA
read back through DCP and sampled by ``sample``; an existing OUT refused unless --force; a failed write
keeps the old file and leaves no partial one."""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

from soflow_fast import export
from soflow_fast.checkpoint import Checkpointer
from soflow_fast.export import load_exported
from soflow_fast.models import DiT, build_model
from soflow_fast.presets import build_config
from tests.utils import TINY, assert_one_line_error, final_state, hidden_files


def test_export_refuses_an_existing_file_unless_forced(fake_run, tmp_path, capsys):
    work, calls = fake_run
    # the audit's mistake: the run's own log as OUT is refused before any checkpoint is read
    assert export.main([str(work), str(work / "log.txt")]) == 1
    assert capsys.readouterr().err == f"error: {work / 'log.txt'} exists; pass --force to replace it\n"
    assert (work / "log.txt").read_text() == "the run's log\n" and calls == []
    out = tmp_path / "ema.safetensors"
    assert export.main([str(work), str(out)]) == 0
    assert capsys.readouterr().out == f"wrote {out}\n"
    first = out.read_bytes()
    assert export.main([str(work), str(out)]) == 1 and out.read_bytes() == first
    assert "exists; pass --force to replace it" in capsys.readouterr().err
    assert export.main([str(work), str(out), "--force"]) == 0
    model, meta = load_exported(out)
    assert meta["step"] == "2" and out.read_bytes() != first  # the second load's weights
    with pytest.raises(FileExistsError, match="exists; pass --force"):
        export.export(work, out)
    assert hidden_files(tmp_path) == []


def test_export_failing_mid_write_keeps_the_old_file(fake_run, tmp_path, monkeypatch, capsys):
    import safetensors.torch

    work, _ = fake_run
    out = tmp_path / "ema.safetensors"
    assert export.main([str(work), str(out)]) == 0
    before = out.read_bytes()

    def half_then_full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(before[: len(before) // 2])
        raise safetensors.SafetensorError(
            f"Error while serializing: I/O error: No space left on device (os error {errno.ENOSPC}) at path {filename}"
        )

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_full_disk)
    capsys.readouterr()
    assert export.main([str(work), str(out), "--force"]) == 1
    assert capsys.readouterr().err == f"error: could not write {out}: no space left on the device (ENOSPC)\n"
    assert out.read_bytes() == before and hidden_files(tmp_path) == []
    assert export.main([str(work), str(tmp_path / "new.safetensors")]) == 1
    assert not (tmp_path / "new.safetensors").exists() and hidden_files(tmp_path) == []


def test_export_and_sample_cli(tiny_runs, tmp_path, capsys):
    from soflow_fast import sample
    from soflow_fast.ema import EMA

    _, one, _ = tiny_runs
    out = tmp_path / "ema.safetensors"
    assert export.main([str(one), str(out), "--decay=0.99"]) == 0, capsys.readouterr().err
    model, meta = load_exported(out)
    assert meta["step"] == "6" and meta["decay"] == "0.99"
    # the exported weights are the run's EMA at decay 0.99, read back through DCP independently
    cfg = build_config("digits", None, TINY)
    ref = DiT(**cfg.model.build_kwargs())
    ema = EMA(ref, decays=(0.9, 0.99))
    dcp.load({"ema": ema}, checkpoint_id=str(Checkpointer(one / "ckpts").latest()))
    ema.copy_to(ref, 0.99)
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert not torch.equal(final_state(one)["final_layer.linear.weight"], ref.final_layer.linear.weight)

    png, npz = tmp_path / "g.png", tmp_path / "s.npz"
    for src in (["--work-dir", str(one)], ["--weights", str(out)]):
        argv = [*src, "--num=12", "--steps=2", "--labels", "3", "4", f"--out={png}", f"--npz={npz}"]
        assert sample.main([*argv, "--force"]) == 0, capsys.readouterr().err  # the second replaces the first's
        assert png.is_file() and np.load(npz)["arr_0"].shape == (12, 8, 8, 3)
        assert np.load(npz)["labels"].tolist() == [3, 4] * 6

    official = tmp_path / "authors.pt"
    torch.save(
        {"model": {f"network.{k}": v for k, v in ref.state_dict().items()}, "ema_model": ref.state_dict()}, official
    )

    argv = ["--official", str(official), "--model=DiT-T/2", "--input-size=8", "--in-channels=1", "--num-classes=10"]
    argv += ["--num=4", f"--out={png}", "--force"]
    capsys.readouterr()
    assert sample.main(argv) == 1
    # DiT-T/2 is larger than the tiny run: the loader must name the key it misses
    assert_one_line_error(capsys.readouterr().err, "missing key", "'blocks.2.")

    tiny2 = build_model("DiT-T/2", input_size=8, in_channels=1, num_classes=10)
    torch.save({"model": tiny2.state_dict(), "ema_model": tiny2.state_dict()}, official)
    assert sample.main(argv) == 0, capsys.readouterr().err
