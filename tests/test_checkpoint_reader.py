"""A run directory runs no code when it is opened (issue #27).

A checkpoint's ``.metadata`` (a pickle) is read with only the globals DCP's metadata is made of, and
its non-tensor values with ``torch.load(weights_only=True)``. A planted pickle, with a marker that
matches it, makes its checkpoint damaged: ``export``, ``sample --work-dir`` and a resume take the
older intact one, or refuse with one line when there is none, and the planted code never runs.
"""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
import shutil
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.metadata as dcp_metadata

from soflow_fast import export
from soflow_fast.checkpoint import MARKER, Checkpointer, CheckpointError, file_digest, verify
from soflow_fast.checkpoint_reader import METADATA_GLOBALS, read_metadata
from soflow_fast.safe_pickle import RefusedGlobal, restricted_load
from tests.utils import (
    assert_one_line_error,
    final_state,
    latest_verified,
    raises_naming,
    run_command,
    train_here,
)

ARGS = ["--total_steps=4", "--ckpt_saving_steps=2"]
REFUSED = ".metadata refers to builtins.exec, which a checkpoint's metadata never holds"


class Planted:
    """Creates the file ``flag`` when plain ``pickle.load`` reads it (it pickles as a call of builtins.exec)."""

    def __init__(self, flag):
        self.flag = str(flag)

    def __reduce__(self):
        return exec, (f"open({self.flag!r}, 'w').close()",)


@pytest.fixture(scope="module")
def run4(tmp_path_factory):
    """A finished 4-step run with checkpoints of steps 2 and 4."""
    work = tmp_path_factory.mktemp("safe_pickle") / "w"
    train_here(work, *ARGS)
    return work


@pytest.fixture
def work(run4, tmp_path):
    copy = tmp_path / "w"
    shutil.copytree(run4, copy)
    return copy


def _remark(ckpt, *names) -> None:
    """Record the files ``names`` of ``ckpt`` as they are now in its marker, as a crafter would."""
    marker = json.loads((ckpt / MARKER).read_text())
    for name in names:
        marker["files"][name] = file_digest(ckpt / name)
    (ckpt / MARKER).write_text(json.dumps(marker))


def _plant_metadata(ckpt, flag) -> None:
    """The checkpoint's own metadata with code that creates ``flag`` when unpickled; a plain
    ``pickle.load`` would run it and then load the checkpoint as if nothing happened."""
    metadata = read_metadata(ckpt)
    metadata.storage_meta.modules = [Planted(flag)]
    (ckpt / ".metadata").write_bytes(pickle.dumps(metadata))
    _remark(ckpt, ".metadata")


def _cli(*args, cwd):
    return run_command([sys.executable, *args], cwd, expect_ok=False)


@pytest.mark.parametrize(
    "payload",
    [
        "os.system",
        "subprocess.check_call",
        "builtins.eval",
        "builtins.exec",
        b"cos\nsystem\n(S'touch {flag}'\ntR.",  # protocol 0, as written by hand
        "torch.serialization:os.system",  # a dotted name, reaching os through an allowed module
    ],
)
def test_the_restricted_unpickler_calls_nothing_outside_its_table(tmp_path, payload):
    flag = tmp_path / "ran"
    if isinstance(payload, bytes):
        data = payload.replace(b"{flag}", str(flag).encode())
    elif ":" in payload:  # protocol 4: STACK_GLOBAL, which plain pickle follows along dotted names
        text = lambda t: b"\x8c" + bytes([len(t)]) + t.encode()  # noqa: E731  SHORT_BINUNICODE
        module, name = payload.split(":")
        data = b"\x80\x04" + text(module) + text(name) + b"\x93" + text(f"touch {flag}") + b"\x85R."
    else:
        module, name = payload.split(".")
        code = f"open({str(flag)!r}, 'w').close()"
        args = {"os.system": f"touch {flag}", "subprocess.check_call": ["touch", str(flag)]}.get(payload, code)
        call = getattr(__import__(module), name)
        data = pickle.dumps(type("P", (), {"__reduce__": lambda self: (call, (args,))})())
    with pytest.raises(RefusedGlobal) as refused:
        restricted_load(io.BytesIO(data), METADATA_GLOBALS)
    assert not flag.exists()
    pickle.loads(data)  # the payload is live: plain pickle runs it
    assert flag.exists()
    assert str(refused.value).startswith("refusing to load ")


def test_the_allowed_globals_are_exactly_those_the_projects_checkpoints_hold(run4):
    """METADATA_GLOBALS, the dtypes aside, is what the run's .metadata files name, and covers every
    class of DCP's metadata module."""
    named = set()

    class Recorder(pickle.Unpickler):  # the project's own fresh checkpoint: plain pickle is safe here
        def find_class(self, module, name):
            named.add((module, name))
            return super().find_class(module, name)

    for meta in sorted(run4.glob("ckpts/step_*/.metadata")):
        with open(meta, "rb") as f:
            Recorder(f).load()
    dtypes = {key for key, obj in METADATA_GLOBALS.items() if isinstance(obj, torch.dtype)}
    assert named <= set(METADATA_GLOBALS)
    assert set(METADATA_GLOBALS) - dtypes == named - dtypes
    defined = {c for c in vars(dcp_metadata).values() if isinstance(c, type) and c.__module__ == dcp_metadata.__name__}
    assert defined <= set(METADATA_GLOBALS.values())


def test_the_restricted_reader_loads_what_dcp_loads(run4):
    path = Checkpointer(run4 / "ckpts").latest()
    template = final_state(run4)

    def state():
        return {
            "model": {"model": {k: torch.zeros_like(v) for k, v in template.items()}},
            "trainer": {"step": -1},
            "data": {"position": -1, "epoch": -1},
        }

    ours, plain = state(), state()
    Checkpointer(run4 / "ckpts").load(path, ours)
    dcp.load(plain, checkpoint_id=str(path))
    assert ours["trainer"] == plain["trainer"] == {"step": 4}
    assert ours["data"] == plain["data"] and ours["data"]["position"] > 0
    for k, v in plain["model"]["model"].items():
        assert torch.equal(ours["model"]["model"][k], v), k


def test_planted_metadata_in_the_latest_checkpoint_falls_back_to_the_older(run4, work, tmp_path):
    ckpts = work / "ckpts"
    step2, step4 = ckpts / "step_00000002", ckpts / "step_00000004"
    flag = tmp_path / "planted_code_ran"
    _plant_metadata(step4, flag)
    planted = {p.name: p.read_bytes() for p in step4.iterdir()}
    assert verify(step4) == REFUSED
    skipped = f"skipping checkpoint {step4}: {REFUSED}"
    assert latest_verified(work) == (step2, [skipped])

    proc = _cli("-m", "soflow_fast.export", str(work), "ema.safetensors", cwd=tmp_path)
    assert proc.returncode == 0 and skipped in proc.stderr, proc.stderr
    assert export.load_exported(tmp_path / "ema.safetensors")[1]["step"] == "2"
    proc = _cli("-m", "soflow_fast.sample", "--work-dir", str(work), "--num", "1", "--out", "g.png", cwd=tmp_path)
    assert proc.returncode == 0 and skipped in proc.stderr and (tmp_path / "g.png").is_file(), proc.stderr
    assert not flag.exists()

    # a resume takes step 2, sets step 4 aside as it writes it anew, and ends where the whole run did
    train_here(work, *ARGS)
    log = (work / "log.txt").read_text()
    assert f"warning: {skipped}" in log and f"resumed from {step2} at step 2" in log
    (aside,) = ckpts.glob("damaged_step_00000004_*")
    assert {p.name: p.read_bytes() for p in aside.iterdir()} == planted
    assert latest_verified(work) == (step4, [])
    whole, resumed = final_state(run4), final_state(work)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert not flag.exists()


def test_planted_metadata_in_every_checkpoint_is_one_error_line(work, tmp_path):
    ckpts = work / "ckpts"
    flag = tmp_path / "planted_code_ran"
    for ckpt in ckpts.glob("step_*"):
        _plant_metadata(ckpt, flag)
    expected = (
        f"error: every checkpoint under {ckpts} is damaged: step_00000004 ({REFUSED}); step_00000002 ({REFUSED})."
    )
    commands = [
        ["-m", "soflow_fast.export", str(work), "ema.safetensors"],
        ["-m", "soflow_fast.sample", "--work-dir", str(work), "--num", "1", "--out", "g.png"],
    ]
    for cmd in commands:
        proc = _cli(*cmd, cwd=tmp_path)
        assert assert_one_line_error(proc).startswith(expected), proc.stderr
    proc = train_here(work, *ARGS, expect_ok=False)
    assert assert_one_line_error(proc).startswith(expected), proc.stderr
    with pytest.raises(CheckpointError, match=f"step_00000002 is damaged: {REFUSED}"):
        export.load_run_weights(work, step=2)
    assert not (tmp_path / "ema.safetensors").exists() and not (tmp_path / "g.png").exists()
    assert not flag.exists()


def test_a_planted_value_in_a_part_file_is_refused_too(work, tmp_path):
    """A non-tensor value (DCP saves them with torch.save into the .distcp files) that pickles code:
    verify names it, and a load that skips verify refuses it as well."""
    step4 = work / "ckpts" / "step_00000004"
    flag = tmp_path / "planted_code_ran"
    metadata = read_metadata(step4)
    (index,) = [i for i in metadata.storage_data if i.fqn == "trainer.step"]
    info = metadata.storage_data[index]
    blob = io.BytesIO()
    torch.save(Planted(flag), blob)
    part = step4 / info.relative_path
    offset = part.stat().st_size
    with open(part, "ab") as f:
        f.write(blob.getvalue())
    metadata.storage_data[index] = dataclasses.replace(info, offset=offset, length=len(blob.getvalue()))
    (step4 / ".metadata").write_bytes(pickle.dumps(metadata))
    _remark(step4, ".metadata", info.relative_path)
    why = verify(step4)
    assert why.startswith(f"{info.relative_path}: the value of trainer.step is not plain data "), why
    assert "(torch.load(weights_only=True): Unsupported global: GLOBAL exec was not an allowed global" in why, why
    assert latest_verified(work)[0] == work / "ckpts" / "step_00000002"
    with raises_naming(CheckpointError, str(step4), "trainer.step"):
        Checkpointer(work / "ckpts").load(step4, {"trainer": {"step": -1}})
    assert not flag.exists()


@pytest.mark.parametrize("kind", ["a dict", "cut short", "outside the folder", "protocol 0"])
def test_a_metadata_file_that_is_not_dcps_is_a_reason(work, kind):
    step4 = work / "ckpts" / "step_00000004"
    meta = step4 / ".metadata"
    if kind == "a dict":
        meta.write_bytes(pickle.dumps({"state_dict_metadata": {}}))
        why = ".metadata holds a dict, not a checkpoint's metadata"
    elif kind == "cut short":
        meta.write_bytes(meta.read_bytes()[:1000])
        why = ".metadata is not a checkpoint's metadata (UnpicklingError: "
    elif kind == "outside the folder":
        metadata = read_metadata(step4)
        index = next(iter(metadata.storage_data))
        metadata.storage_data[index] = dataclasses.replace(metadata.storage_data[index], relative_path="../../x")
        meta.write_bytes(pickle.dumps(metadata))
        why = f".metadata places {index.fqn} in '../../x', which is not a file of this checkpoint"
    else:
        meta.write_bytes(b"cposix\nsystem\n(S'true'\ntR.")
        why = ".metadata refers to posix.system, which a checkpoint's metadata never holds"
    _remark(step4, ".metadata")
    assert verify(step4).startswith(why)
    with raises_naming(CheckpointError, str(step4)):
        Checkpointer(work / "ckpts").load(step4, {"trainer": {"step": -1}})


def test_values_cut_short_are_a_reason_also_under_a_marker_without_file_sizes(work):
    """The check reads the non-tensor values, so a part file cut before them is damaged even where the
    marker records no sizes (markers written before they did)."""
    step4 = work / "ckpts" / "step_00000004"
    marker = json.loads((step4 / MARKER).read_text())
    del marker["files"]
    (step4 / MARKER).write_text(json.dumps(marker))
    part = step4 / "__0_0.distcp"
    part.write_bytes(part.read_bytes()[:100])
    assert verify(step4).startswith("__0_0.distcp ends before the value of ")
    assert latest_verified(work)[0] == work / "ckpts" / "step_00000002"
