"""The files ``export`` and ``sample`` write: existing ones refused unless --force, the paths printed
as written, and writes that never leave a partial file under the asked-for name."""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pytest
import torch

from soflow_fast import export, sample
from soflow_fast.export import load_exported
from soflow_fast.models import build_model
from soflow_fast.presets import build_config

TINY = ["--hidden_size=32", "--depth=2", "--num_heads=2"]


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture
def fake_run(tmp_path, monkeypatch):
    """A run folder with a log.txt, whose weights (a tiny digits DiT, seeded by the call count) come
    from a stand-in for ``load_run_weights``; ``calls`` counts the loads."""
    cfg = build_config("digits", None, TINY)
    calls = []

    def load_run_weights(work_dir, decay=None, which="ema", step=None):
        calls.append(work_dir)
        torch.manual_seed(len(calls))
        return cfg.model.build().eval(), {"step": len(calls), "decay": 0.9, "config": cfg}

    monkeypatch.setattr(export, "load_run_weights", load_run_weights)
    work = tmp_path / "run"
    work.mkdir()
    (work / "log.txt").write_text("the run's log\n")
    return work, calls


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
    assert _hidden(tmp_path) == []


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
    assert out.read_bytes() == before and _hidden(tmp_path) == []
    assert export.main([str(work), str(tmp_path / "new.safetensors")]) == 1
    assert not (tmp_path / "new.safetensors").exists() and _hidden(tmp_path) == []


@pytest.fixture
def tiny_official(tmp_path) -> list[str]:
    path = tmp_path / "weights" / "unconditional.pt"
    path.parent.mkdir()
    net = build_model("DiT-T/2", input_size=8, in_channels=1, num_classes=0, class_dropout_prob=0.0)
    torch.save(net.state_dict(), path)
    return ["--official", str(path), "--model=DiT-T/2", "--input-size=8", "--in-channels=1", "--num-classes=0"]


def test_sample_prints_the_paths_it_writes_and_refuses_existing_ones(tiny_official, tmp_path, capsys):
    args = [*tiny_official, "--num=4", "--device=cpu", f"--out={tmp_path / 'grid'}", f"--npz={tmp_path / 'samp_out'}"]
    assert sample.main(args) == 0
    grid, npz = tmp_path / "grid.png", tmp_path / "samp_out.npz"  # the suffixes the writers add
    assert capsys.readouterr().out == f"wrote {grid}\nwrote {npz}\n"
    assert not (tmp_path / "grid").exists() and not (tmp_path / "samp_out").exists()
    first = np.load(npz)["arr_0"]
    assert first.shape == (4, 8, 8, 3) and grid.stat().st_size > 0
    # refused before the model is read: a missing checkpoint is not what it reports
    moved = [*args[:1], str(tmp_path / "nowhere.pt"), *args[2:]]
    assert sample.main(moved) == 1
    assert capsys.readouterr().err == f"error: {grid} exists; pass --force to replace it\n"
    assert sample.main([*args, f"--out={tmp_path / 'other.png'}"]) == 1
    assert capsys.readouterr().err == f"error: {npz} exists; pass --force to replace it\n"
    assert not (tmp_path / "other.png").exists()
    assert sample.main([*args, "--seed=1", "--force"]) == 0
    assert capsys.readouterr().out == f"wrote {grid}\nwrote {npz}\n"
    assert not np.array_equal(np.load(npz)["arr_0"], first)
    # the default grid goes to samples/ in the weights' folder (as to <run>/samples/), refused the same way
    assert sample.main([*tiny_official, "--num=2", "--device=cpu"]) == 0
    default = tmp_path / "weights" / "samples" / "grid_1step.png"
    assert capsys.readouterr().out == f"wrote {default}\n"
    assert sample.main([*tiny_official, "--num=2", "--device=cpu"]) == 1
    assert capsys.readouterr().err == f"error: {default} exists; pass --force to replace it\n"
    with pytest.raises(SystemExit) as info:
        sample.main([*tiny_official, f"--out={tmp_path / 'grid.txt'}"])
    assert info.value.code == 2 and "'.txt' is not an image type PIL writes" in capsys.readouterr().err
    assert _hidden(tmp_path) == [] and _hidden(tmp_path / "weights") == [] and _hidden(default.parent) == []


def test_sample_failing_mid_write_keeps_the_old_npz(tiny_official, tmp_path, monkeypatch, capsys):
    npz, grid = tmp_path / "s.npz", tmp_path / "g.png"
    args = [*tiny_official, "--num=4", "--batch=2", "--device=cpu", f"--out={grid}", f"--npz={npz}"]
    assert sample.main(args) == 0
    before, grid_before = npz.read_bytes(), grid.read_bytes()
    write = sample.NpyStream.write

    def full_disk_at_the_second_batch(self, rows):
        if self.left < rows.nbytes * 2:  # the first batch went in
            raise OSError(errno.ENOSPC, "No space left on device")
        write(self, rows)

    monkeypatch.setattr(sample.NpyStream, "write", full_disk_at_the_second_batch)
    capsys.readouterr()
    assert sample.main([*args, "--force", "--seed=3"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"error: could not write {npz}: no space left on the device (ENOSPC)"
    assert "Traceback" not in err and err.count("error:") == 1
    assert npz.read_bytes() == before and grid.read_bytes() == grid_before and _hidden(tmp_path) == []


def test_sample_default_grid_is_in_samples_of_every_source(fake_run, tmp_path, capsys):
    work, _ = fake_run
    weights = tmp_path / "exported" / "ema.safetensors"
    assert export.main([str(work), str(weights)]) == 0
    for src, folder in ((["--work-dir", str(work)], work), (["--weights", str(weights)], weights.parent)):
        capsys.readouterr()
        assert sample.main([*src, "--num=2", "--device=cpu"]) == 0
        assert capsys.readouterr().out == f"wrote {folder / 'samples' / 'grid_1step.png'}\n"
    with pytest.raises(SystemExit):
        sample.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: samples/grid_<steps>step.png in the --work-dir run, or in the folder of the --weights or" in text
