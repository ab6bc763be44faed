"""What a run shows and writes: log.txt, a progress bar, TensorBoard scalars, sample grids, eval npz.

Work-dir layout (the authors'): ``config.yaml``, ``log.txt``, ``ckpts/``, ``figs/``, ``evals/``.
Grids and eval npz are written to a hidden temporary name and renamed: a kill leaves a whole file or
none, and a run that resumes at step S makes S's missing ones (its checkpoint holds the weights and
the noise is seeded, so they are the files the uninterrupted run wrote).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import resource
import socket
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from soflow_fast.objective import dropout_active
from soflow_fast.sampling import sample
from soflow_fast.vae import decode
from soflow_fast.viz import save_grid, to_uint8


def peak_memory_gib(device: torch.device) -> float:
    """CUDA: the caching allocator's peak; CPU: the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# the hidden files a grid or eval npz is made of while it is written: `.step_*.tmp.png|npz`, the
# ranks' `.step_*.rank<r>.npz` (and their own `.tmp.npz`)
UNFINISHED = re.compile(r"\.step_\d+_\w+?(\.rank\d+)?(\.tmp)?\.(npz|png)")


def write_atomic(path: Path, write) -> Path:
    """``write(tmp)`` writes a file at a hidden temporary name in ``path``'s folder, which is synced and
    renamed to ``path``: a kill leaves the whole file or none. A failed write removes the temporary
    file and raises an OSError whose message names ``path`` and the cause."""
    path = Path(path)
    tmp = path.with_name(f"{'' if path.name.startswith('.') else '.'}{path.stem}.tmp{path.suffix}")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            code = errno.errorcode.get(e.errno or 0)
            cause = (e.strerror or str(e) or type(e).__name__) + (f" ({code})" if code else "")
            err = OSError(f"could not write {path}: {cause}")
            err.errno = e.errno
            raise err from e
        raise
    return path


def intact(path: Path) -> bool:
    """Whether a grid PNG or an eval npz is there and whole (a file cut short by a kill before these
    were written atomically is not)."""
    try:
        if path.suffix == ".npz":
            with zipfile.ZipFile(path) as zf:  # reads the central directory, at the file's end
                return bool(zf.namelist())
        from PIL import Image

        with Image.open(path) as im:
            im.verify()  # every chunk and its CRC
        return True
    except (OSError, ValueError, SyntaxError, zipfile.BadZipFile):
        return False


@contextlib.contextmanager
def inference(model):
    """Samples are drawn without dropout: a model whose forward draws dropout masks runs in eval mode
    for the block (its samples then depend on the weights and the seeded noise alone)."""
    if not dropout_active(model):
        yield model
        return
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.train(training)


class RunLocked(RuntimeError):
    """Another live process trains in the same working dir."""


class RunLock:
    """An OS lock on ``<work_dir>/.lock`` held for the life of a run (by rank 0).

    ``flock`` locks die with their process, so the lock of a crashed or killed trainer is free again
    at once; the file keeps the last holder's host and pid, which the refusal names.
    """

    def __init__(self, work_dir: Path):
        self.path = Path(work_dir) / ".lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "an unknown process"
            os.close(fd)
            raise RunLocked(
                f"{self.path.parent} is in use by another trainer ({holder}); wait for it to finish, stop it, "
                "or give this run another --working_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()}, pid {os.getpid()}, since {time.strftime('%F %T')}".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


class RunLogger:
    """Rank-0 logging; on other ranks every method is a no-op."""

    def __init__(self, work_dir: Path, enabled: bool):
        self.enabled = enabled
        self.work_dir = Path(work_dir)
        self._file = None
        self._tb = None
        if not enabled:
            return
        for sub in ("ckpts", "figs", "evals"):
            (self.work_dir / sub).mkdir(parents=True, exist_ok=True)
        self._file = open(self.work_dir / "log.txt", "a", buffering=1)
        # the lock is held: whatever is half-written here was left by a run that stopped
        left = [p for d in ("figs", "evals") for p in (self.work_dir / d).iterdir() if UNFINISHED.fullmatch(p.name)]
        left = sorted(left) + [p for p in [self.work_dir / ".metrics.tmp.jsonl"] if p.exists()]
        for p in left:
            p.unlink()
        if left:
            names = ", ".join(str(p.relative_to(self.work_dir)) for p in left)
            self.info(f"removed {len(left)} unfinished file(s) that a stopped run was writing: {names}")

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
        write_atomic(path, lambda tmp: tmp.write_text("".join(kept)))
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


def _demo_inputs(cfg, device: torch.device):
    """Fixed noise and labels: the grids of one run are comparable across steps."""
    g = torch.Generator().manual_seed(cfg.run.seed + 777)
    ncls = cfg.model.num_classes
    rows, per_row = cfg.run.eval_demo_shape or (min(ncls, 10) if ncls else 4, 8)
    n = rows * per_row
    shape = (n, cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size)
    noise = torch.randn(shape, generator=g).to(device)
    renoise = [torch.randn(shape, generator=g).to(device)]
    y = (torch.arange(rows).repeat_interleave(per_row) % max(ncls, 1)).to(device) if ncls else None  # row r: class r
    return noise, renoise, y, per_row


def grid_paths(work_dir: Path, step: int) -> tuple[Path, Path]:
    return tuple(Path(work_dir) / "figs" / f"step_{step:08d}_{n}step.png" for n in (1, 2))


def eval_npz_path(work_dir: Path, step: int, steps: int) -> Path:
    return Path(work_dir) / "evals" / f"step_{step:08d}_{steps}step.npz"


def outputs_to_remake(cfg, step: int, logger: RunLogger, dist_info, scoring: bool) -> tuple[bool, bool, bool]:
    """What the run makes before its first step: (grids, eval npz, eval scores) of ``step``. A new
    run makes step 0's grids; a resume makes those of its step that are missing or cut short (a kill
    after the checkpoint, before they were written) and, when it scores, the missing scores. Rank 0
    decides for every rank (they all run the model)."""
    run, todo = cfg.run, [False, False, False]
    if logger.enabled:
        demo = bool(run.eval_demo_steps) and step % run.eval_demo_steps == 0
        todo[0] = demo and (step == 0 or not all(intact(p) for p in grid_paths(logger.work_dir, step)))
        evals = bool(run.eval_steps and run.eval_num_samples) and step > 0 and step % run.eval_steps == 0
        todo[1] = evals and not intact(eval_npz_path(logger.work_dir, step, run.eval_nfe))
        todo[2] = evals and scoring and (todo[1] or not logger.has_eval_scores(step))
        missing = [what for what, do in zip(("sample grids", "eval npz", "eval scores"), todo, strict=True) if do]
        if step > 0 and missing:
            logger.info(f"step {step}'s {', '.join(missing)} were not written before the run stopped: making them now")
    if dist_info.world_size > 1:
        dist.broadcast_object_list(todo, src=0)
    return tuple(todo)


@torch.no_grad()
def demo_grids(model, objective, cfg, step: int, device: torch.device, logger: RunLogger, vae=None) -> None:
    """1-step and 2-step grids (row r of a class-conditional grid is class r mod num_classes), decoded
    to images by ``vae`` when given (latent models); every rank runs the model, rank 0 writes."""
    noise, renoise, y, per_row = _demo_inputs(cfg, device)
    with inference(model):
        one = sample(model, objective, noise, y, steps=1)
        two = sample(model, objective, noise, y, steps=2, renoise=renoise)
    if logger.enabled:
        if vae is not None:
            one, two = decode(vae, one), decode(vae, two)
        scale = max(1, 64 // one.shape[-1])
        for path, x in zip(grid_paths(logger.work_dir, step), (one, two), strict=True):
            write_atomic(path, lambda tmp, x=x: save_grid(x, tmp, nrow=per_row, scale=scale))
        logger.info(f"wrote figs/step_{step:08d}_{{1step,2step}}.png")


@torch.no_grad()
def write_eval_npz(
    model, objective, cfg, step: int, dist_info, logger: RunLogger, steps: int = 1, vae=None
) -> Path | None:
    """N samples as uint8 NHWC (``arr_0``, the ADM evaluator's format) with ``labels``, spread over ranks.

    The samples come in fixed chunks of ``run.eval_batch_size`` whose noise and labels are seeded by
    (seed, step, chunk): chunk j runs on rank j % world, each rank writes its chunks to a part file,
    and rank 0 merges them in chunk order, so the file does not depend on the world size. Latent
    samples are decoded by ``vae``; without one, the raw latents are kept under ``latents`` next to
    an ``arr_0`` preview of their first three channels.
    """
    n_total, world, rank = cfg.run.eval_num_samples, dist_info.world_size, dist_info.rank
    if n_total == 0:
        return None
    chunk = min(cfg.run.eval_batch_size or cfg.run.batch_size, n_total)
    n_chunks = math_ceil(n_total, chunk)
    ncls = cfg.model.num_classes
    shape = (cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size)
    latent = cfg.model.in_channels not in (1, 3)
    path = eval_npz_path(logger.work_dir, step, steps)
    mine = {}
    from tqdm import tqdm

    slots = tqdm(
        range(math_ceil(n_chunks, world)),
        desc=f"eval samples, step {step}",
        unit="batch",
        leave=False,
        position=1,
        disable=not logger.enabled,  # rank 0 shows its share
    )
    with inference(model):
        for slot in slots:
            j = rank + slot * world
            if j >= n_chunks:
                # a sharded model gathers its weights in every forward: each rank runs as many as the others
                y = torch.zeros(1, dtype=torch.long, device=dist_info.device) if ncls else None
                sample(model, objective, torch.zeros((1, *shape), device=dist_info.device), y, steps=steps)
                continue
            b = min(chunk, n_total - j * chunk)
            g = torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + step * 7_919 + j)
            noise = torch.randn((b, *shape), generator=g).to(dist_info.device)
            y = torch.randint(0, ncls, (b,), generator=g) if ncls else torch.full((b,), -1)
            x = sample(model, objective, noise, y.to(dist_info.device) if ncls else None, steps=steps).float()
            mine[f"arr_0.{j}"] = to_uint8((decode(vae, x) if vae is not None else x).cpu())
            mine[f"labels.{j}"] = y.numpy()
            if latent and vae is None:
                mine[f"latents.{j}"] = x.cpu().numpy()
    part = lambda r: path.with_name(f".{path.stem}.rank{r}.npz")  # noqa: E731
    part(rank).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(part(rank), lambda tmp: np.savez(tmp, **mine))
    if world > 1:
        dist.barrier()
    if not logger.enabled:
        return None
    try:
        parts = []
        for r in range(world):
            with np.load(part(r)) as z:
                parts.append({k: z[k] for k in z.files})
        keys = ["arr_0", "labels"] + (["latents"] if latent and vae is None else [])
        arrays = {k: np.concatenate([parts[j % world][f"{k}.{j}"] for j in range(n_chunks)]) for k in keys}
        write_atomic(path, lambda tmp: np.savez(tmp, **arrays))
    finally:  # written or not, the parts go
        for r in range(world):
            part(r).unlink(missing_ok=True)
    kept = " (raw latents under 'latents': no run.vae to decode them)" if "latents" in arrays else ""
    logger.info(f"wrote {path.relative_to(logger.work_dir)} ({n_total} samples){kept}")
    return path


class EvalScorer:
    """Scores every eval npz against ``run.eval_reference`` on rank 0 (``soflow_fast.evaluate``), logged
    with the training scalars. The files are checked when the run starts; the Inception network and
    the reference's features are built at the first eval. A scoring failure does not stop training:
    it is one error line naming the files and the cause, and the npz stays for ``soflow_fast.evaluate``
    (after a failure to build the scorer, no later npz of the run is scored)."""

    def __init__(self, cfg, device: torch.device, logger: RunLogger):
        self.reference = Path(cfg.run.eval_reference).expanduser() if cfg.run.eval_reference else None
        self.inception = Path(cfg.run.inception).expanduser() if cfg.run.inception else None
        self.device, self.logger, self._scorer, self._broken = device, logger, None, False
        if self.reference is None:
            return
        for name, path in (("eval_reference", self.reference), ("inception", self.inception)):
            if not path.is_file():
                raise FileNotFoundError(f"run.{name}: no such file: {path}")
        from soflow_fast.eval import checks

        checks.check_decoded_samples(cfg.model.in_channels, cfg.run.vae, "run.eval_reference")
        checks.check_reference_batch(
            self.reference
        )  # headers and file sizes only: the images are read at the first eval
        checks.check_inception_weights(self.inception)
        checks.check_sample_count(cfg.run.eval_num_samples, "run.eval_num_samples")

    @property
    def enabled(self) -> bool:
        return self.reference is not None

    def __call__(self, npz: Path | None, step: int) -> None:
        if npz is None or self.reference is None or self._broken or not self.logger.enabled:  # rank 0 scores
            return
        later = (
            f"python -m soflow_fast.evaluate --ref_batch {self.reference} --sample_batch_dir {npz.parent} "
            f"--inception {self.inception}"
        )
        if self._scorer is None:
            try:
                from soflow_fast.evaluate import ReferenceScorer

                self._scorer = ReferenceScorer(self.reference, self.inception, self.device, say=self.logger.info)
            except Exception as e:  # the reference batch or the Inception weights: every npz would fail
                self._broken = True
                self.logger.info(
                    f"error: cannot score {npz} with run.eval_reference={self.reference} and run.inception="
                    f"{self.inception}: {type(e).__name__}: {e}; training goes on without eval scores, and the "
                    f"eval npz files are kept: score them with `{later}`"
                )
                return
        try:
            metrics = self._scorer.score(npz)
        except Exception as e:
            self.logger.info(
                f"error: cannot score {npz} against {self.reference}: {type(e).__name__}: {e}; training goes on, "
                f"and the npz is kept: score it with `{later}`"
            )
            return
        self.logger.eval_scalars(step, metrics)


def math_ceil(a: int, b: int) -> int:
    return -(-a // b)
