"""The run's samples: 1- and 2-step grids (``figs/``), eval npz for the ADM evaluator (``evals/``), and
their scores against a reference batch. ``Evaluator.maybe_act(step)`` decides when.

Grids and eval npz are written under a hidden temporary name and renamed: a kill leaves a whole file
or none, and a run that resumes at step S makes S's missing ones (its checkpoint holds the weights and
the noise is seeded, so they are the files the uninterrupted run wrote).
"""

from __future__ import annotations

import contextlib
import math
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.distributed as dist

from soflow_fast.config_fields import Section, at_least, option
from soflow_fast.eval.checks import INCEPTION_SHA256
from soflow_fast.files import atomic_write
from soflow_fast.network_calls import dropout_active
from soflow_fast.sampling import default_mode, sample
from soflow_fast.vae import decode
from soflow_fast.viz import save_grid, to_uint8

# the hidden files a grid or eval npz is made of while it is written: `.step_*.tmp<pid>.png|npz`, the
# ranks' `.step_*.rank<r>.npz` (and their own `.tmp.npz`)
UNFINISHED = re.compile(r"\.step_\d+_\w+?(\.rank\d+)?(\.tmp\d*)?\.(npz|png)")


@dataclass(kw_only=True)
class EvalConfig(Section):
    """Samples of the EMA weights during training; a resume may change every one of these."""

    SECTION: ClassVar[str] = "eval"

    eval_demo_steps: int = option(500, check=at_least(0), resume_safe=True)  # 1- and 2-step sample grids (figs/)
    eval_demo_shape: tuple[int, int] | None = option(None, check=at_least(1), resume_safe=True)  # grid rows x
    # columns; None = a row per class (up to 10) x 8
    eval_steps: int = option(0, check=at_least(0), resume_safe=True)  # npz of samples for the ADM evaluator
    # (evals/); 0 = off
    eval_num_samples: int = option(1000, check=at_least(0), resume_safe=True)
    eval_batch_size: int | None = option(None, check=at_least(1), resume_safe=True)  # eval samples per forward
    # (one chunk, one rank); None = run.batch_size
    eval_nfe: int = option(1, check=at_least(1), resume_safe=True)  # network calls per eval sample: 1 =
    # one-step, N = the N-step sampler (the authors' eval_NFE)
    vae: str | None = option(None, resume_safe=True)  # a local diffusers AutoencoderKL folder: grids and eval npz
    # of latents are decoded
    eval_reference: str | None = option(None, resume_safe=True)  # an ADM reference batch (npz): FID and friends
    # of every eval npz, logged
    inception: str | None = option(None, resume_safe=True)  # the local Inception weights file (torch-fidelity's)
    # that eval_reference needs
    inception_sha256: str | None = option(
        INCEPTION_SHA256, resume_safe=True
    )  # the start of its SHA-256 (torch-fidelity's
    # file); None takes other weights, whose scores are not comparable to published ones

    def check(self) -> None:
        if self.eval_reference and not (self.inception and self.eval_steps):
            raise ValueError("eval.eval_reference needs eval.inception (a local weights file) and eval.eval_steps > 0")


def intact(path: Path) -> bool:
    """Whether a grid PNG or an eval npz is there and whole (a file cut short by a kill is not)."""
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


def grid_paths(work_dir: Path, step: int) -> tuple[Path, Path]:
    return tuple(Path(work_dir) / "figs" / f"step_{step:08d}_{n}step.png" for n in (1, 2))


def eval_npz_path(work_dir: Path, step: int, steps: int) -> Path:
    return Path(work_dir) / "evals" / f"step_{step:08d}_{steps}step.npz"


class Evaluator:
    """Grids every ``eval.eval_demo_steps``, eval npz (scored when ``eval.eval_reference`` is set) every
    ``eval.eval_steps``, all of the EMA weights at the first decay. Every rank samples; rank 0 writes.

    Args:
        cfg: the training config.
        model, objective, ema: the trained network (as wired), its objective, its ``EMA``.
        dist_info: this process's rank, world size and device.
        logger: the run's ``RunLogger`` (rank 0 writes and logs).
    """

    def __init__(self, cfg, model, objective, ema, dist_info, logger):
        self.cfg, self.e = cfg, cfg.eval
        self.model, self.objective, self.ema = model, objective, ema
        self.dist, self.logger = dist_info, logger
        self.work_dir = Path(cfg.run.working_dir)
        from soflow_fast.vae import load_vae

        self.vae = load_vae(self.e.vae, dist_info.device, cfg.model.sample_shape()[0]) if self.e.vae else None
        self.scorer = EvalScorer(cfg, dist_info.device, logger)  # FID of each eval npz (eval.eval_reference)
        if logger.enabled:
            self._remove_unfinished()

    def maybe_act(self, step: int) -> None:
        """This step's grids and eval npz, as the intervals ask."""
        if self.e.eval_demo_steps and step % self.e.eval_demo_steps == 0:
            self.grids(step)
        if self.e.eval_steps and step % self.e.eval_steps == 0:
            self.scorer(self.eval_npz(step), step)

    def remake_missing(self, step: int) -> None:
        """Before the first step: a new run's step-0 grids; a resumed step's grids, eval npz and scores
        that a kill left unmade."""
        grids, npz, scores = self._missing(step)
        if grids:
            self.grids(step)
        if npz:
            self.scorer(self.eval_npz(step), step)
        elif scores:  # the npz is there, its scores are not
            self.scorer(eval_npz_path(self.work_dir, step, self.e.eval_nfe), step)

    def _remove_unfinished(self) -> None:
        """The lock is held: what is half-written in figs/ and evals/ was left by a run that stopped."""
        for sub in ("figs", "evals"):
            (self.work_dir / sub).mkdir(parents=True, exist_ok=True)
        left = sorted(
            p for d in ("figs", "evals") for p in (self.work_dir / d).iterdir() if UNFINISHED.fullmatch(p.name)
        )
        for p in left:
            p.unlink()
        if left:
            names = ", ".join(str(p.relative_to(self.work_dir)) for p in left)
            self.logger.info(f"removed {len(left)} unfinished file(s) that a stopped run was writing: {names}")

    def _missing(self, step: int) -> tuple[bool, bool, bool]:
        """(grids, eval npz, eval scores) of ``step`` to make now; rank 0 decides for every rank (they
        all run the model)."""
        e, todo = self.e, [False, False, False]
        if self.logger.enabled:
            demo = bool(e.eval_demo_steps) and step % e.eval_demo_steps == 0
            todo[0] = demo and (step == 0 or not all(intact(p) for p in grid_paths(self.work_dir, step)))
            evals = bool(e.eval_steps and e.eval_num_samples) and step > 0 and step % e.eval_steps == 0
            todo[1] = evals and not intact(eval_npz_path(self.work_dir, step, e.eval_nfe))
            todo[2] = evals and self.scorer.enabled and (todo[1] or not self.logger.has_eval_scores(step))
            missing = [what for what, do in zip(("sample grids", "eval npz", "eval scores"), todo, strict=True) if do]
            if step > 0 and missing:
                self.logger.info(
                    f"step {step}'s {', '.join(missing)} were not written before the run stopped: making them now"
                )
        if self.dist.world_size > 1:
            dist.broadcast_object_list(todo, src=0)
        return tuple(todo)

    # -- grids -------------------------------------------------------------------------------------

    def _demo_inputs(self):
        """Fixed noise and labels: the grids of one run are comparable across steps."""
        g = torch.Generator().manual_seed(self.cfg.run.seed + 777)
        ncls, device = self.cfg.model.num_classes, self.dist.device
        rows, per_row = self.e.eval_demo_shape or (min(ncls, 10) if ncls else 4, 8)
        shape = (rows * per_row, *self.cfg.model.sample_shape())
        noise = torch.randn(shape, generator=g).to(device)
        renoise = [torch.randn(shape, generator=g).to(device)]
        # row r: class r
        y = (torch.arange(rows).repeat_interleave(per_row) % max(ncls, 1)).to(device) if ncls else None
        return noise, renoise, y, per_row

    @torch.no_grad()
    def grids(self, step: int) -> None:
        """1-step and 2-step grids (row r of a class-conditional grid is class r mod num_classes), decoded
        to images by the VAE when there is one (latent models)."""
        noise, renoise, y, per_row = self._demo_inputs()
        with self.ema.swapped(self.model, self.cfg.ema.ema_decays[0]), inference(self.model):
            one = sample(self.model, self.objective, noise, y, steps=1)
            renoise = renoise if default_mode(self.objective) == "renoise" else None  # an ODE sampler draws none
            two = sample(self.model, self.objective, noise, y, steps=2, renoise=renoise)
        if not self.logger.enabled:
            return
        if self.vae is not None:
            one, two = decode(self.vae, one), decode(self.vae, two)
        scale = max(1, 64 // one.shape[-1])
        for path, x in zip(grid_paths(self.work_dir, step), (one, two), strict=True):
            with atomic_write(path) as tmp:
                save_grid(x, tmp, nrow=per_row, scale=scale)
        self.logger.info(f"wrote figs/step_{step:08d}_{{1step,2step}}.png")

    # -- eval npz ----------------------------------------------------------------------------------

    @torch.no_grad()
    def eval_npz(self, step: int) -> Path | None:
        """N samples as uint8 NHWC (``arr_0``, the ADM evaluator's format) with ``labels``, spread over ranks.

        The samples come in fixed chunks of ``eval.eval_batch_size`` whose noise and labels are seeded by
        (seed, step, chunk): chunk j runs on rank j % world, each rank writes its chunks to a part file,
        and rank 0 merges them in chunk order, so the file does not depend on the world size. Latent
        samples are decoded by the VAE; without one, the raw latents are kept under ``latents`` next to
        an ``arr_0`` preview of their first three channels.
        """
        e, world, rank, device = self.e, self.dist.world_size, self.dist.rank, self.dist.device
        n_total, steps = e.eval_num_samples, e.eval_nfe
        if n_total == 0:
            return None
        chunk = min(e.eval_batch_size or self.cfg.run.batch_size, n_total)
        n_chunks = math.ceil(n_total / chunk)
        ncls, shape = self.cfg.model.num_classes, self.cfg.model.sample_shape()
        keep_latents = shape[0] not in (1, 3) and self.vae is None
        path = eval_npz_path(self.work_dir, step, steps)
        mine = {}
        from tqdm import tqdm

        slots = tqdm(
            range(math.ceil(n_chunks / world)),
            desc=f"eval samples, step {step}",
            unit="batch",
            leave=False,
            position=1,
            disable=not self.logger.enabled,  # rank 0 shows its share
        )
        with self.ema.swapped(self.model, self.cfg.ema.ema_decays[0]), inference(self.model):
            for slot in slots:
                j = rank + slot * world
                if j >= n_chunks:
                    # a sharded model gathers its weights in every forward: each rank runs as many as the others
                    y = torch.zeros(1, dtype=torch.long, device=device) if ncls else None
                    sample(self.model, self.objective, torch.zeros((1, *shape), device=device), y, steps=steps)
                    continue
                b = min(chunk, n_total - j * chunk)
                g = torch.Generator().manual_seed(self.cfg.run.seed * 1_000_003 + step * 7_919 + j)
                noise = torch.randn((b, *shape), generator=g).to(device)
                y = torch.randint(0, ncls, (b,), generator=g) if ncls else torch.full((b,), -1)
                x = sample(self.model, self.objective, noise, y.to(device) if ncls else None, steps=steps).float()
                mine[f"arr_0.{j}"] = to_uint8((decode(self.vae, x) if self.vae is not None else x).cpu())
                mine[f"labels.{j}"] = y.numpy()
                if keep_latents:
                    mine[f"latents.{j}"] = x.cpu().numpy()
        part = lambda r: path.with_name(f".{path.stem}.rank{r}.npz")  # noqa: E731
        part(rank).parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(part(rank)) as tmp:
            np.savez(tmp, **mine)
        if world > 1:
            dist.barrier()
        if not self.logger.enabled:
            return None
        try:
            parts = []
            for r in range(world):
                with np.load(part(r)) as z:
                    parts.append({k: z[k] for k in z.files})
            keys = ["arr_0", "labels"] + (["latents"] if keep_latents else [])
            arrays = {k: np.concatenate([parts[j % world][f"{k}.{j}"] for j in range(n_chunks)]) for k in keys}
            with atomic_write(path) as tmp:
                np.savez(tmp, **arrays)
        finally:  # written or not, the parts go
            for r in range(world):
                part(r).unlink(missing_ok=True)
        kept = " (raw latents under 'latents': no eval.vae to decode them)" if keep_latents else ""
        self.logger.info(f"wrote {path.relative_to(self.work_dir)} ({n_total} samples){kept}")
        return path


class EvalScorer:
    """Scores every eval npz against ``eval.eval_reference`` on rank 0 (``soflow_fast.evaluate``), logged
    with the training scalars. The files are checked when the run starts; the Inception network and
    the reference's features are built at the first eval. A scoring failure does not stop training:
    it is one error line naming the files and the cause, and the npz stays for ``soflow_fast.evaluate``
    (after a failure to build the scorer, no later npz of the run is scored)."""

    def __init__(self, cfg, device: torch.device, logger):
        e = cfg.eval
        self.reference = Path(e.eval_reference).expanduser() if e.eval_reference else None
        self.inception = Path(e.inception).expanduser() if e.inception else None
        self.device, self.logger, self._scorer, self._broken = device, logger, None, False
        self.sha256 = e.inception_sha256
        if self.reference is None:
            return
        for name, path in (("eval_reference", self.reference), ("inception", self.inception)):
            if not path.is_file():
                raise FileNotFoundError(f"eval.{name}: no such file: {path}")
        from soflow_fast.eval import checks

        checks.check_decoded_samples(cfg.model.sample_shape()[0], e.vae, "eval.eval_reference")
        checks.check_reference_batch(self.reference)  # headers and sizes only: the images are read at the first eval
        checks.check_inception_weights(self.inception, e.inception_sha256)
        checks.check_sample_count(e.eval_num_samples, "eval.eval_num_samples")

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

                self._scorer = ReferenceScorer(
                    self.reference, self.inception, self.device, say=self.logger.info, sha256=self.sha256
                )
            except Exception as e:  # the reference batch or the Inception weights: every npz would fail
                self._broken = True
                self.logger.info(
                    f"error: cannot score {npz} with eval.eval_reference={self.reference} and eval.inception="
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
