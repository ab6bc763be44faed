"""The trainer under torchrun when the launcher dies, when a second launcher finds the working dir locked,
and across two "machines" (two torchrun processes meeting through a c10d rendezvous on localhost).

torchrun starts each worker in a session of its own, so a launcher killed with SIGKILL takes none of them
along: each worker watches its launcher (``run_io.LauncherWatch``), saves at its next stop check and exits.
Output goes to files, never pipes: a worker that outlives its launcher must not block on a full pipe.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from soflow_fast.checkpoint import Checkpointer
from soflow_fast.run_io import describe_ranks
from tests.utils import TINY, TRAIN, child_env, final_state

STEPS = 40  # long enough that a run whose launcher dies at step 2 stops (checked every 10 steps) before its end
RUN = [*TINY, f"--total_steps={STEPS}", "--ckpt_saving_steps=0"]  # checkpoints only at a stop and at the end


def torchrun(*options: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *options, TRAIN]


def standalone(nproc: int) -> list[str]:
    return torchrun("--standalone", f"--nproc_per_node={nproc}")


def start(cmd: list[str], out: Path, env: dict | None = None) -> subprocess.Popen:
    with open(out, "w") as f:
        return subprocess.Popen(cmd, env=child_env(env), stdout=f, stderr=subprocess.STDOUT)


def run(cmd: list[str], out: Path) -> str:
    with open(out, "w") as f:
        proc = subprocess.run(cmd, env=child_env(), stdout=f, stderr=subprocess.STDOUT, timeout=300)
    text = out.read_text()
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{text[-4000:]}"
    return text


def last_step(work: Path) -> int:
    """The step of metrics.jsonl's last whole line (0 before the first)."""
    path = work / "metrics.jsonl"
    steps = [0]
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            steps.append(int(json.loads(line)["step"]))
        except (ValueError, KeyError):  # a line being written
            pass
    return steps[-1]


def wait_for_step(work: Path, step: int, *procs: subprocess.Popen, timeout: float = 180) -> int:
    deadline = time.time() + timeout
    while (at := last_step(work)) < step:
        for p in procs:
            assert p.poll() is None, f"{p.args} exited ({p.returncode}) before step {step}"
        assert time.time() < deadline, f"no step {step} after {timeout} s"
        time.sleep(0.05)
    return at


def _stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat's fields after the command name (state first), or None when there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) and int(fields[1]) == pid:
            found.append(int(entry.name))
    return sorted(found)


def identity(pid: int) -> str | None:
    """The process's start time (field 22 of its stat), which tells it from a later process of the same pid."""
    fields = _stat(pid)
    return fields[19] if fields else None


def alive(pid: int, born: str) -> bool:
    """Whether the process that started at ``born`` still runs (a zombie waiting to be reaped does not)."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z" and fields[19] == born


def lock_pids(work: Path) -> list[int]:
    """The pids the working dir's lock names, by rank."""
    found = re.search(r"pids ([\d, ]+) \(ranks 0, 1\)", (work / ".lock").read_text())
    assert found, (work / ".lock").read_text()
    return [int(p) for p in found[1].split(", ")]


def wait_gone(pids: dict[int, str], seconds: float) -> list[int]:
    """Wait up to ``seconds`` for the processes to end; those still running."""
    deadline = time.time() + seconds
    while (left := [p for p, born in pids.items() if alive(p, born)]) and time.time() < deadline:
        time.sleep(0.1)
    return left


def kill_all(pids: dict[int, str]) -> None:
    for pid, born in pids.items():
        if alive(pid, born):
            os.kill(pid, signal.SIGKILL)


def test_the_lock_names_every_rank_by_host():
    assert describe_ranks([("a", 7)]) == "host a, pid 7"
    assert describe_ranks([("a", 7), ("a", 9)]) == "host a, pids 7, 9 (ranks 0, 1)"
    eight = [("a", 10 + r) for r in range(4)] + [("b", 20 + r) for r in range(4)]
    assert describe_ranks(eight) == "host a, pids 10, 11, 12, 13 (ranks 0-3); host b, pids 20, 21, 22, 23 (ranks 4-7)"
    assert describe_ranks([("a", 1), ("b", 2), ("a", 3)]) == "host a, pids 1, 3 (ranks 0, 2); host b, pid 2 (rank 1)"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The final weights of a 2-rank run of RUN that nothing interrupts."""
    work = tmp_path_factory.mktemp("uninterrupted") / "w"
    run(standalone(2) + [f"--working_dir={work}", *RUN], work.parent / "out.txt")
    return final_state(work)


def test_a_launcher_killed_with_sigkill_leaves_a_checkpoint_no_worker_and_resumes_exactly(uninterrupted, tmp_path):
    work = tmp_path / "w"
    cmd = standalone(2) + [f"--working_dir={work}", *RUN]
    launcher = start(cmd, tmp_path / "killed.txt")
    workers: dict[int, str] = {}
    try:
        wait_for_step(work, 2, launcher)
        workers = {pid: identity(pid) for pid in children(launcher.pid)}
        assert len(workers) == 2, workers
        at_kill = last_step(work)
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
        left = wait_gone(workers, 30)
        assert not left, f"workers {left} still run 30 s after their launcher was killed"
    finally:
        launcher.kill()
        kill_all(workers)
    saved = [p.name for p in Checkpointer(work / "ckpts").complete_checkpoints()]
    assert len(saved) == 1, saved
    stopped = int(saved[0].split("_")[1])
    assert at_kill <= stopped < STEPS and stopped % 10 == 0, (at_kill, saved)
    log = (work / "log.txt").read_text()
    assert f"the launcher (pid {launcher.pid}) is gone: saving at step {stopped} and exiting" in log
    assert last_step(work) == stopped, "no step after the stop was logged"
    # the same command again: it resumes and ends with the weights of the run that nothing interrupted
    run(cmd, tmp_path / "resumed.txt")
    assert f"resumed from {work / 'ckpts' / saved[0]} at step {stopped}" in (work / "log.txt").read_text()
    assert Checkpointer(work / "ckpts").latest().name == f"step_{STEPS:08d}"
    got = final_state(work)
    for k, v in uninterrupted.items():
        assert torch.equal(v, got[k]), f"{k} differs after the launcher's SIGKILL and a resume"


def test_two_nodes_with_a_c10d_rendezvous_then_one_node_resumes_exactly(uninterrupted, tmp_path):
    """Two torchrun processes of one process each meet on localhost as two machines would; the run
    stops at step 20 (checkpoints at 10 and 20) and one machine with two processes finishes it."""
    work = tmp_path / "w"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rdzv = ("--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=soflow-test")
    args = [f"--working_dir={work}", *RUN, "--ckpt_saving_steps=10"]
    node = torchrun("--nnodes=2", "--nproc_per_node=1", *rdzv)
    nodes = [start(node + args + ["--max_steps_this_run=20"], tmp_path / f"node{i}.txt") for i in range(2)]
    try:
        for i, proc in enumerate(nodes):
            assert proc.wait(timeout=300) == 0, (tmp_path / f"node{i}.txt").read_text()[-4000:]
    finally:
        for proc in nodes:
            proc.kill()
    ckpts = Checkpointer(work / "ckpts")
    assert [p.name for p in ckpts.complete_checkpoints()] == ["step_00000010", "step_00000020"]
    log = (work / "log.txt").read_text()
    assert "world 2 " in log and "stopped (run.max_steps_this_run) at step 20 of 40" in log
    run(standalone(2) + args, tmp_path / "one_node.txt")
    log = (work / "log.txt").read_text()
    assert f"resumed from {work / 'ckpts' / 'step_00000020'} at step 20 (saved by 2 rank(s), now 2)" in log
    assert [p.name for p in ckpts.complete_checkpoints()][-1] == f"step_{STEPS:08d}"
    got = final_state(work)
    for k, v in uninterrupted.items():
        assert torch.equal(v, got[k]), f"{k} differs after two nodes and a resume on one"


def test_a_frozen_run_refuses_a_second_launcher_once_and_its_live_rank_exits_after_the_grace(tmp_path):
    """A 2-rank run frozen (SIGSTOP) holds its working dir: a second launcher is refused with one line naming
    both ranks' pids. Then rank 0 goes on and its launcher is killed while rank 1 stays frozen: rank 0 waits in
    a collective that cannot end, and exits SOFLOW_LAUNCHER_GRACE_S seconds after it saw the launcher gone,
    naming the last checkpoint."""
    work = tmp_path / "w"
    cmd = standalone(2) + [f"--working_dir={work}", *TINY, "--total_steps=100000", "--ckpt_saving_steps=2"]
    launcher = start(cmd, tmp_path / "out.txt", env={"SOFLOW_LAUNCHER_GRACE_S": "3"})
    workers: dict[int, str] = {}
    try:
        wait_for_step(work, 3, launcher)
        rank0, rank1 = lock_pids(work)
        workers = {pid: identity(pid) for pid in (rank0, rank1)}
        assert sorted(workers) == children(launcher.pid), "the lock names every rank's pid"
        for pid in workers:  # frozen, the run leaves the cores to the second launcher
            os.kill(pid, signal.SIGSTOP)
        config = (work / "config.yaml").read_bytes()
        second = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=300)
        assert second.returncode == 1, second.stderr[-3000:]
        errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, second.stderr[-3000:]
        holders = f"(host {socket.gethostname()}, pids {rank0}, {rank1} (ranks 0, 1), since "
        assert f"is in use by another trainer {holders}" in errors[0], errors[0]
        assert (work / "config.yaml").read_bytes() == config
        os.kill(rank0, signal.SIGCONT)
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
        assert not wait_gone({rank0: workers[rank0]}, 30), "rank 0 waits on for its frozen peer"
    finally:
        launcher.kill()
        kill_all(workers)
    last = Checkpointer(work / "ckpts").latest()
    log = (work / "log.txt").read_text()
    said = f"the launcher (pid {launcher.pid}) is gone and rank 0 has not exited 3 s later"
    assert said in log and log.rstrip().endswith(f"the latest complete checkpoint is {last}"), log[-2000:]
