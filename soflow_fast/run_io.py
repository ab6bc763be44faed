"""What a run shows and writes about itself: log.txt, a progress bar, metrics.jsonl and TensorBoard
scalars (``RunLogger``, ``TrainMetrics``), the working dir's lock and what stops a run (signals, and under
a launcher the launcher's death).

Work-dir layout (the authors'): ``config.yaml``, ``log.txt``, ``ckpts/`` (``soflow_fast.checkpoint``),
``figs/`` and ``evals/`` (``soflow_fast.evaluator``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import resource
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from soflow_fast.files import atomic_write

# With several ranks, the stop flag is all-reduced (a host sync) once every this many steps.
STOP_CHECK_EVERY = 10
# Under a launcher, how often a worker looks whether the launcher still lives (seconds).
LAUNCHER_POLL_S = 0.5
# How long after its launcher's death a worker that has not exited (a peer gone, or stuck in a collective)
# waits before it exits anyway, without its checkpoint; SOFLOW_LAUNCHER_GRACE_S sets it.
LAUNCHER_GRACE_S = 120.0
# The process that started this one, read at import: early, before the launcher can have died. Under
# torchrun it is the launcher; after its death the worker is re-parented, so os.getppid() differs.
PARENT_AT_START = os.getppid()


def peak_memory_gib(device: torch.device) -> float:
    """CUDA: the caching allocator's peak; CPU: the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# what a start creates in a working dir before the run's first step
_SKELETON = (".lock", "log.txt", "ckpts", "figs", "evals", "tb")


def dir_snapshot(work_dir: Path) -> set[str] | None:
    """The entries of the working dir (None: it does not exist), to undo a failed start with."""
    return set(os.listdir(work_dir)) if Path(work_dir).is_dir() else None


def undo_start(work_dir: Path, before: set[str] | None) -> None:
    """Remove what a start that failed added to the working dir: its lock, an empty log, empty folders,
    and the dir itself when the start made it and left nothing else in it."""
    work_dir = Path(work_dir)
    if not work_dir.is_dir():
        return
    for name in set(os.listdir(work_dir)) - (before or set()):
        path = work_dir / name
        if name not in _SKELETON:
            continue
        with contextlib.suppress(OSError):
            if path.is_dir():
                for sub in sorted(path.rglob("*"), reverse=True):  # empty folders only
                    if sub.is_dir():
                        sub.rmdir()
                path.rmdir()
            elif name == ".lock" or path.stat().st_size == 0:
                path.unlink()
    if before is None:
        with contextlib.suppress(OSError):
            work_dir.rmdir()  # only when empty


class RunLocked(RuntimeError):
    """Another live process trains in the same working dir."""


def describe_ranks(ranks: list[tuple[str, int]]) -> str:
    """``ranks[r]`` = (host, pid) of rank r, in words: "host H, pid P" for one process; for several, one
    "host H, pids P0, P1 (ranks 0, 1)" per host, joined by "; "."""
    if len(ranks) == 1:
        return f"host {ranks[0][0]}, pid {ranks[0][1]}"
    by_host: dict[str, list[tuple[int, int]]] = {}
    for rank, (host, pid) in enumerate(ranks):
        by_host.setdefault(host, []).append((rank, pid))
    parts = []
    for host, members in by_host.items():
        pids = ", ".join(str(pid) for _, pid in members)
        numbers = [rank for rank, _ in members]
        if len(numbers) == 1:
            parts.append(f"host {host}, pid {pids} (rank {numbers[0]})")
            continue
        in_a_row = numbers == list(range(numbers[0], numbers[-1] + 1))
        listed = f"{numbers[0]}-{numbers[-1]}" if in_a_row and len(numbers) > 2 else ", ".join(map(str, numbers))
        parts.append(f"host {host}, pids {pids} (ranks {listed})")
    return "; ".join(parts)


class RunLock:
    """An OS lock on ``<work_dir>/.lock`` held for the life of a run (by rank 0).

    ``flock`` locks die with their process, so the lock of a crashed or killed trainer is free again
    at once; the file keeps the last holders' hosts and pids (every rank's), which the refusal names.
    """

    def __init__(self, work_dir: Path):
        self.path = Path(work_dir) / ".lock"
        self._fd: int | None = None

    def acquire(self, ranks: list[tuple[str, int]] | None = None) -> None:
        """Take the lock for the run whose ranks are ``ranks`` ((host, pid) by rank; default: this process)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 1 << 16, 0).decode(errors="replace").strip() or "an unknown process"
            os.close(fd)
            raise RunLocked(
                f"{self.path.parent} is in use by another trainer ({holder}); wait for it to finish, stop it, "
                "or give this run another --working_dir"
            ) from None
        who = describe_ranks(ranks or [(socket.gethostname(), os.getpid())])
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{who}, since {time.strftime('%F %T')}".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    @classmethod
    def for_ranks(cls, work_dir: Path, dist_info) -> RunLock | None:
        """Rank 0 locks the working dir for the run's life (returned; None on other ranks), recording every
        rank's host and pid; every rank raises ``RunLocked`` when it cannot."""
        ranks = [(socket.gethostname(), os.getpid())]
        if dist_info.world_size > 1:
            ranks = [None] * dist_info.world_size
            dist.all_gather_object(ranks, (socket.gethostname(), os.getpid()))
        lock, refusal = None, None
        if dist_info.is_main:
            lock = cls(work_dir)
            try:
                lock.acquire(ranks)
            except RunLocked as e:
                refusal = str(e)
        if dist_info.world_size > 1:
            box = [refusal]
            dist.broadcast_object_list(box, src=0)
            refusal = box[0]
        if refusal:
            raise RunLocked(refusal)
        return lock


def launcher_pid() -> int | None:
    """The pid of the launcher that started this worker (torchrun sets ``RANK``), or None: a plain
    ``python train.py``, or a worker whose parent is init (a launcher that is pid 1 ends the container)."""
    if "RANK" not in os.environ or PARENT_AT_START <= 1:
        return None
    return PARENT_AT_START


class LauncherWatch:
    """A daemon thread that notices the launcher's death: the worker is then re-parented (torchrun starts
    each worker in a session of its own, so nothing else tells it). It calls ``on_gone`` once, then, if the
    process still lives ``grace_s`` seconds later, ``on_overdue`` and exits the process with status 1.

    Polling ``os.getppid()`` costs one system call per poll and sees the death however the launcher died
    and whichever of its threads started the worker (``PR_SET_PDEATHSIG`` fires when that thread ends, and
    misses a launcher that died before the worker asked for it).
    """

    def __init__(self, pid: int, on_gone, on_overdue):
        self.pid, self.on_gone, self.on_overdue = pid, on_gone, on_overdue
        grace = os.environ.get("SOFLOW_LAUNCHER_GRACE_S", "")
        try:
            self.grace_s = float(grace) if grace else LAUNCHER_GRACE_S
        except ValueError:
            raise ValueError(f"SOFLOW_LAUNCHER_GRACE_S={grace!r} is not a number of seconds") from None
        self._thread = threading.Thread(target=self._watch, name="soflow-launcher-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def gone(self) -> bool:
        return os.getppid() != self.pid

    def _watch(self) -> None:
        while not self.gone():
            time.sleep(LAUNCHER_POLL_S)
        self.on_gone()
        time.sleep(self.grace_s)
        # the process still runs: a collective waits for a rank that is gone or stuck. The line is written
        # from a thread of its own, given a few seconds: the stuck main thread may hold a lock it needs
        say = threading.Thread(target=self.on_overdue, name="soflow-launcher-overdue", daemon=True)
        say.start()
        say.join(timeout=5)
        os._exit(1)


class StopSignals:
    """What asks the run to stop: SIGTERM or a first Ctrl-C, and under a launcher the launcher's death
    (``LauncherWatch``). The run saves at the next check and exits 0. A second Ctrl-C raises
    KeyboardInterrupt at once. With several ranks the reason's code is all-reduced (MAX) every
    ``STOP_CHECK_EVERY`` steps (a host sync), so every rank stops at the same step."""

    SIGNAL, LAUNCHER_GONE = 1, 2  # the reasons' codes; 0: none

    def __init__(self, dist_info):
        self.dist = dist_info
        self.name: str | None = None  # what asked the run to stop, as the log says it
        self.code = 0
        self.every = 1 if dist_info.world_size == 1 else STOP_CHECK_EVERY
        self.stop_step: int | None = None  # the step after which the run stops, once decided
        self.watch: LauncherWatch | None = None
        self._say, self._last_ckpt = None, None

    def install(self, say=None, last_ckpt=None) -> None:
        """Catch the signals and, under a launcher, watch it. ``say``: rank 0's log; ``last_ckpt``: the
        newest complete checkpoint, named when the worker exits without its own."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self._say, self._last_ckpt = say, last_ckpt
        pid = launcher_pid()
        if pid is not None and self.watch is None:
            self.watch = LauncherWatch(pid, self._on_launcher_gone, self._on_overdue)
            self.watch.start()

    def _ask(self, name: str, code: int) -> None:
        if self.name is None:
            self.name = name  # before the code: the loop reads the code first
            self.code = code

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.name is not None:
            raise KeyboardInterrupt
        if signum == signal.SIGINT and self.dist.is_main:
            print("\nCtrl-C: saving a checkpoint and exiting (Ctrl-C again to exit at once)", file=sys.stderr)
        self._ask(signal.Signals(signum).name, self.SIGNAL)

    def _on_launcher_gone(self) -> None:
        self._ask(f"the launcher (pid {self.watch.pid}) is gone", self.LAUNCHER_GONE)

    def _on_overdue(self) -> None:
        """The line a worker leaves when it exits without finishing after its launcher's death."""
        last = self._last_ckpt() if self._last_ckpt is not None else None
        late = f"the launcher (pid {self.watch.pid}) is gone and rank {self.dist.rank} has not exited "
        late += f"{self.watch.grace_s:g} s later"
        stuck = " (a rank gone, or stuck in a collective?)"
        if self.stop_step is None:
            what = f"{stuck}: exiting before its next stop check, without a checkpoint"
        elif last is not None and last.name == f"step_{self.stop_step:08d}":
            what = f": exiting; the checkpoint of step {self.stop_step} is complete"
        else:
            what = f"{stuck}: exiting; the checkpoint of step {self.stop_step} was not written"
        line = f"{late}{what}; the latest complete checkpoint is {last if last else 'none'}"
        if self.dist.is_main and self._say is not None:
            self._say(line)
        else:
            print(f"rank {self.dist.rank}: {line}", file=sys.stderr)
        sys.stderr.flush()

    def _adopt(self, code: int) -> None:
        """Another rank's reason to stop, learnt from the all-reduce."""
        if code == self.LAUNCHER_GONE and self.watch is not None and self.watch.gone():
            self._on_launcher_gone()  # the same launcher: its death not yet seen by this rank's watch
        elif code == self.LAUNCHER_GONE:
            self._ask("the launcher of another rank is gone", code)
        else:
            self._ask("SIGTERM", code)  # another rank's signal

    def requested(self, step: int) -> bool:
        """Whether the run stops after ``step`` (checked on every ``every``-th step)."""
        if step % self.every:
            return False
        code = self.code
        if self.dist.world_size > 1:
            flag = torch.tensor([float(code)], device=self.dist.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            code = int(flag.item())
            if code and self.name is None:
                self._adopt(code)
        if code:
            self.stop_step = step
        return bool(code)


class RunLogger:
    """Rank-0 logging; on other ranks every method is a no-op."""

    def __init__(self, work_dir: Path, enabled: bool):
        self.enabled = enabled
        self.work_dir = Path(work_dir)
        self._file = None
        self._tb = None
        if not enabled:
            return
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.work_dir / "log.txt", "a", buffering=1)
        # the lock is held: a temporary metrics file was left by a run that stopped while writing it
        for left in self.work_dir.glob(".metrics.tmp*.jsonl"):
            left.unlink()

    def begin(self, step: int) -> None:
        """The run starts at ``step`` (0, or the checkpoint's it resumed from). An interrupted run wrote
        scalars past its last checkpoint, which this run writes again: metrics.jsonl's lines of steps
        after ``step`` move to metrics.abandoned.jsonl, and TensorBoard drops its events after it.
        log.txt keeps every line: it is the history, and says where each run resumed."""
        if not self.enabled:
            return
        self._set_aside_metrics(step)
        try:
            from torch.utils.tensorboard import SummaryWriter

            tb = self.work_dir / "tb"
            had_events = tb.is_dir() and any(tb.iterdir())
            self._tb = SummaryWriter(str(tb), purge_step=step + 1 if had_events else None)
        except ImportError as e:  # a dependency; a broken install costs the TensorBoard scalars only
            self._tb = None
            self.info(f"warning: no TensorBoard scalars ({e}); log.txt and metrics.jsonl hold them")

    def _set_aside_metrics(self, step: int) -> None:
        path = self.work_dir / "metrics.jsonl"
        if not path.is_file():
            return
        kept, moved = [], []
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                keep = int(json.loads(line)["step"]) <= step
            except (ValueError, KeyError, TypeError):  # a line cut short by a kill
                keep = False
            (kept if keep else moved).append(line + "\n")
        if not moved:
            return
        side = path.with_name("metrics.abandoned.jsonl")
        with open(side, "a") as f:  # first: a kill in between leaves the lines in both, never in none
            f.writelines(moved)
            f.flush()
            os.fsync(f.fileno())
        with atomic_write(path) as tmp:
            tmp.write_text("".join(kept))
        where = f"resumed at step {step}" if step else "a new run at step 0"
        self.info(
            f"{where}: moved {len(moved)} line(s) of later steps from metrics.jsonl to {side.name} "
            "(written after the last checkpoint by the run that stopped; this run writes those steps again)"
        )

    def has_eval_scores(self, step: int) -> bool:
        """Whether metrics.jsonl holds the eval metrics of ``step``."""
        path = self.work_dir / "metrics.jsonl"
        if not path.is_file():
            return False
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                row = json.loads(line)
                if row.get("step") == step and any(k.startswith("eval/") for k in row):
                    return True
        return False

    def record(self, msg: str) -> None:
        """``msg`` in log.txt only (the caller has shown it already)."""
        if self.enabled and self._file is not None:
            self._file.write(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}\n")

    def info(self, msg: str) -> None:
        if not self.enabled:
            return
        line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}"
        self._file.write(line + "\n")
        from tqdm import tqdm

        tqdm.write(line, file=sys.stderr)

    def progress(self, total: int, initial: int):
        from tqdm import tqdm

        return tqdm(
            total=total,
            initial=initial,
            disable=not self.enabled,
            dynamic_ncols=True,
            unit="step",
            file=sys.stderr,
            mininterval=1.0,
        )

    @staticmethod
    def postfix(means: dict, steps_s: float, images_s: float, device: torch.device) -> str:
        parts = [f"loss {means['loss']:.4f}"]
        if means.get("fm_loss"):
            parts.append(f"fm {means['fm_loss']:.4f}")
        if means.get("scm_loss"):
            parts.append(f"scm {means['scm_loss']:+.4f}")
        parts += [f"{steps_s:.2f} step/s", f"{images_s:.0f} img/s", f"mem {peak_memory_gib(device):.2f}G"]
        return " | ".join(parts)

    def scalars(self, step: int, means: dict, steps_s: float, images_s: float, device: torch.device, lr: float):
        if not self.enabled:
            return
        body = " ".join(f"{k} {v:.6g}" for k, v in means.items())
        record = dict(step=step, **means, lr=lr, steps_per_s=steps_s, images_per_s=images_s)
        with open(self.work_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        self.info(
            f"step {step} | {body} | lr {lr:.3g} | {steps_s:.3f} step/s | {images_s:.1f} img/s | "
            f"peak mem {peak_memory_gib(device):.3f} GiB"
        )
        if self._tb is not None:
            for k, v in means.items():
                self._tb.add_scalar(f"train/{k}", v, step)
            self._tb.add_scalar("perf/steps_per_s", steps_s, step)
            self._tb.add_scalar("perf/images_per_s", images_s, step)
            self._tb.add_scalar("train/lr", lr, step)

    def eval_scalars(self, step: int, metrics: dict) -> None:
        """An eval npz's metrics (FID, sFID, IS, precision, recall): log.txt, metrics.jsonl, TensorBoard."""
        if not self.enabled:
            return
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        with open(self.work_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **{f"eval/{k}": v for k, v in numbers.items()}}) + "\n")
        self.info(f"eval step {step} | " + " | ".join(f"{k} {v:.4g}" for k, v in numbers.items()))
        if self._tb is not None:
            for k, v in numbers.items():
                self._tb.add_scalar(f"eval/{k}", v, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class TrainMetrics:
    """The loss logs between logging steps (``step.StepMetrics``, on the device), written with the
    throughput every ``run.log_steps`` steps, at the run's first step and at its last, and the progress
    bar; a non-finite loss stops the run there. Time spent in ``paused()`` (saves, grids, evals) is left
    out of steps/s."""

    def __init__(self, sums, log_steps: int, batch_size: int, dist_info, logger: RunLogger, lr, last_ckpt):
        self.sums, self.log_steps, self.batch_size = sums, log_steps, batch_size
        self.dist, self.logger, self.lr, self.last_ckpt = dist_info, logger, lr, last_ckpt
        self.bar = None
        self.t_last, self.step_last, self.first = time.time(), 0, 1

    @contextlib.contextmanager
    def progress(self, total: int, initial: int):
        """The progress bar for the block; closed however it ends, so an error prints on a line of its own."""
        self.bar = self.logger.progress(total=total, initial=initial)
        try:
            yield self.bar
        finally:
            self.bar.close()

    def start(self, step: int, first: bool = False) -> None:
        """Time from ``step``; ``first``: the run starts there, and its first step is logged."""
        self.t_last, self.step_last = time.time(), step
        if first:
            self.first = step + 1

    def add(self, logs: dict) -> None:
        self.sums.add(logs)
        self.bar.update(1)

    def maybe_log(self, step: int, end: int) -> None:
        """Every ``log_steps`` steps, at the run's first step (a short run shows its metrics at once) and
        at its last."""
        if not (self.log_steps and (step % self.log_steps == 0 or step in (self.first, end))):
            return
        means = self.sums.means(self.dist.world_size)
        steps_s = (step - self.step_last) / max(time.time() - self.t_last, 1e-9)
        images_s, device = steps_s * self.batch_size, self.dist.device
        self.logger.scalars(step, means, steps_s, images_s, device, lr=self.lr())
        self.bar.set_postfix_str(self.logger.postfix(means, steps_s, images_s, device))
        self.check_finite(step, "at a logging step")
        self.start(step)

    def check_finite(self, step: int, when: str) -> None:
        from soflow_fast.step import TrainingDiverged

        if self.sums.diverged(self.dist.world_size):
            last = self.last_ckpt()
            raise TrainingDiverged(
                f"non-finite loss at or before step {step} (checked {when}); "
                f"last good checkpoint: {last if last else 'none'} (left intact)"
            )

    @contextlib.contextmanager
    def paused(self):
        t0 = time.time()
        try:
            yield
        finally:
            self.t_last += time.time() - t0
