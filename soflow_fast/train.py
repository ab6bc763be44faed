"""Train a SoFlow DiT: ``torchrun --nproc_per_node=N soflow_fast/train.py [--preset NAME] [--config F] [--key=value]``.

Plain ``python soflow_fast/train.py`` runs a world of one. With no arguments it trains the
``digits`` preset on CPU with nothing downloaded. A run resumes from its work dir when it finds a
complete checkpoint there, at any world size.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import warnings
from pathlib import Path

if __package__ in (None, ""):  # `python soflow_fast/train.py` / torchrun with a file path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
import yaml

from soflow_fast import run_io
from soflow_fast.authors_config import deliberate_differences, is_authors_file
from soflow_fast.checkpoint import Checkpointer, CheckpointError, ModelOptimizerState, ObjectState, read_marker
from soflow_fast.config import TrainConfig, keys_help, read_yaml
from soflow_fast.data import build_dataset, build_loader
from soflow_fast.interop import load_official_training_state
from soflow_fast.parallel import destroy_distributed, init_distributed
from soflow_fast.presets import PRESETS, build_config
from soflow_fast.resume import check_resume
from soflow_fast.run_io import EvalScorer, RunLock, RunLocked, RunLogger, demo_grids, write_eval_npz
from soflow_fast.step import SYNC_DEBUG_WARMUP, StepMetrics, StepPlan, SyncCheck, TrainStep, keep_optimizer_impl
from soflow_fast.vae import load_vae

# With several ranks, the SIGTERM flag is all-reduced (a host sync) once every this many steps.
STOP_CHECK_EVERY = 10


class TrainingDiverged(RuntimeError):
    """A non-finite loss: the run stops and its last good checkpoint stays the latest."""


class Trainer:
    """The loop and its side duties (log, checkpoints, sample grids, eval npz) around one ``TrainStep``."""

    def __init__(self, cfg: TrainConfig, allow_config_change: bool = False, notes: tuple[str, ...] = ()):
        self.cfg = cfg
        self.allow_config_change = allow_config_change
        self.dist = init_distributed()
        self.device = self.dist.device
        if cfg.run.batch_size % self.dist.world_size:
            raise ValueError(
                f"run.batch_size={cfg.run.batch_size} must be divisible by the world size {self.dist.world_size}"
            )
        self.plan = StepPlan.resolve(cfg, self.device, self.dist.world_size)
        self.work_dir = Path(cfg.run.working_dir)
        self.lock = self._lock()  # before anything is written: a second trainer on this dir touches nothing
        self.logger = RunLogger(self.work_dir, enabled=self.dist.is_main)
        for note in notes:  # what the config's origin asks to be said first (an authors' file's differences)
            self.logger.info(note)
        self._build_data()
        self._build_model()
        self.vae = load_vae(cfg.run.vae, self.device, cfg.model.in_channels) if cfg.run.vae else None
        self.eval_scorer = EvalScorer(cfg, self.device, self.logger)  # FID of each eval npz (run.eval_reference)
        self.step_fn = TrainStep.build(cfg, self.model, self.dist, self.plan)
        self._check_split()
        self.metrics = StepMetrics(self.step_fn.log_keys, self.device)
        self.step = 0
        self.checkpointer = Checkpointer(self.work_dir / "ckpts", keep=cfg.run.keep_checkpoints)
        self._stop_signal: str | None = None  # the signal that asked the run to stop
        self._resume()
        # written only now: a refused resume (other settings, a bad checkpoint) leaves the run's
        # config.yaml, which export and sample read, as the checkpoints' own
        if self.dist.is_main:
            self._write_config()
            if self.classes is not None:
                (self.work_dir / "classes.json").write_text(json.dumps(self.classes, indent=0) + "\n")
        self.logger.begin(self.step)  # metrics.jsonl and TensorBoard set aside what a stopped run wrote past it

    # -- building -------------------------------------------------------------------------------

    def _lock(self) -> RunLock | None:
        """Rank 0 locks the working dir for the run's life; every rank stops when it cannot."""
        lock, refusal = None, None
        if self.dist.is_main:
            lock = RunLock(self.work_dir)
            try:
                lock.acquire()
            except RunLocked as e:
                refusal = str(e)
        if self.dist.world_size > 1:
            box = [refusal]
            dist.broadcast_object_list(box, src=0)
            refusal = box[0]
        if refusal:
            raise RunLocked(refusal)
        return lock

    def _write_config(self) -> None:
        """config.yaml describes the checkpoints; one that this run changes (a resume's, or the authors'
        trainer's copy of its YAML file in their working dir) is kept as config.<step>.yaml."""
        path = self.work_dir / "config.yaml"
        text = yaml.safe_dump(self.cfg.to_dict(), sort_keys=False)
        if path.is_file() and path.read_text() != text:
            kept, n = self.work_dir / f"config.{self.step:08d}.yaml", 0
            while kept.exists():  # several resumes at one step: each earlier config stays
                n += 1
                kept = self.work_dir / f"config.{self.step:08d}.{n}.yaml"
            path.replace(kept)
        path.write_text(text)

    def close(self) -> None:
        self.logger.close()
        if self.lock is not None:
            self.lock.release()

    def _build_data(self) -> None:
        """The dataset, checked once against the model config (shape, labels), and this rank's loader."""
        cfg, d = self.cfg, self.cfg.data
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self.dataset = build_dataset(
                d.dataset,
                d.data_path,
                image_size=d.image_size,
                conditional=cfg.model.num_classes > 0,
                **d.reader_kwargs(),
            )
        for w in caught:  # the readers' doubts about the data belong in the run's log, not only on stderr
            self.logger.info(f"warning: {w.message}")
        # the label -> class-name map (folder names, for instance) the checkpoints' labels mean
        self.classes = list(self.dataset.classes) if self.dataset.num_classes and self.dataset.classes else None
        if tuple(self.dataset.shape) != (cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size):
            raise ValueError(
                f"dataset {d.dataset!r} holds samples of shape {tuple(self.dataset.shape)}, but the model expects "
                f"({cfg.model.in_channels}, {cfg.model.input_size}, {cfg.model.input_size}): set model.in_channels "
                "and model.input_size"
                + (
                    " (or data.channels=1|3 and data.image_size, which image folders convert to)"
                    if d.dataset == "image_folder"
                    else ""
                )
            )
        # the readers check that labels are integers in [0, num_classes): with these two checks every
        # label the loader yields has a row in the model's table, and the steps need not look at them
        if cfg.model.num_classes and self.dataset.num_classes == 0:
            raise ValueError(
                f"dataset {d.dataset!r} has no labels, but model.num_classes={cfg.model.num_classes}: every step "
                "would train on the null label; set model.num_classes=0 for an unconditional model, or add labels"
            )
        if cfg.model.num_classes and self.dataset.num_classes > cfg.model.num_classes:
            raise ValueError(
                f"dataset has {self.dataset.num_classes} classes, model.num_classes={cfg.model.num_classes}"
            )
        self.loader = build_loader(
            self.dataset,
            cfg.run.batch_size // self.dist.world_size,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            seed=cfg.run.seed,
            hflip=d.random_flip,
            device=self.device,
            num_workers=d.num_workers,
            **({"prefetch_factor": d.prefetch_factor} if d.prefetch_factor and d.num_workers else {}),
        )

    def _build_model(self) -> None:
        """The same initial weights on every rank (``TrainStep.build`` shards them), and the fused-op switch."""
        run = self.cfg.run
        torch.manual_seed(run.seed)
        self.model = self.cfg.model.build().to(self.device)
        self.num_params = sum(p.numel() for p in self.model.parameters())
        if run.use_fused_kernels:
            from soflow_fast import ops

            ops.set_use_fused_kernels(run.fused_ops)
            if self.device.type != "cuda":
                self.logger.info("run.use_fused_kernels: the fused Triton ops run on CUDA only; reference ops here")
        elif run.fused_ops != "all":
            self.logger.info(f"run.fused_ops={run.fused_ops} has no effect without run.use_fused_kernels=true")

    def _check_split(self) -> None:
        soflow = self.cfg.soflow
        per_group = self.cfg.run.batch_size // self.plan.draw_groups
        if self.cfg.run.objective == "soflow" and soflow.velocity_loss_ratio > 0:
            if int(soflow.velocity_loss_ratio * per_group) == 0:
                self.logger.info(
                    f"warning: {per_group} row(s) per draw group x soflow.velocity_loss_ratio="
                    f"{soflow.velocity_loss_ratio:g} rounds to no flow-matching rows: only the consistency loss "
                    "trains; raise run.batch_size (or lower the world size / run.draw_groups)"
                )

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.step_fn.optimizer

    @property
    def scheduler(self):
        return self.step_fn.scheduler

    @property
    def ema(self):
        return self.step_fn.ema

    @property
    def objective(self):
        return self.step_fn.objective

    # -- checkpoint state ------------------------------------------------------------------------

    def _state(self) -> dict:
        return {
            "model": ModelOptimizerState(self.model, self.optimizer),
            "ema": self.ema,
            "trainer": ObjectState(self._trainer_state, self._load_trainer_state),
            "data": self.loader,
        }

    def _trainer_state(self) -> dict:
        return {"step": self.step, "scheduler": self.scheduler.state_dict()}

    def _load_trainer_state(self, s: dict) -> None:
        self.step = int(s["step"])
        self.scheduler.load_state_dict(s["scheduler"])

    def _meta(self) -> dict:
        return {
            "config": self.cfg.to_dict(),
            "model": self.cfg.to_dict()["model"],
            "world_size": self.dist.world_size,
            "ema_decays": list(self.cfg.run.ema_decays),
            "classes": self.classes,
            "num_samples": len(self.dataset),
        }

    def _resume(self) -> None:
        with warnings.catch_warnings(record=True) as skipped:
            warnings.simplefilter("always")
            path = self.checkpointer.latest_verified()  # the newest checkpoint whose files are intact
        for w in skipped:
            self.logger.info(f"warning: {w.message}")
        if path is None:
            self._start_or_continue_theirs()
            return
        marker = read_marker(path)  # what the checkpoint was saved with
        lines, same_data = check_resume(
            path, marker, self.cfg, self.classes, len(self.dataset), self.allow_config_change
        )
        for line in lines:
            self.logger.info(line)
        state = self._state()
        if not same_data:
            del state["data"]  # the stream position of other data: start the stream afresh
        self.checkpointer.load(path, state)
        self.logger.info(
            f"resumed from {path} at step {self.step} (saved by {marker.get('world_size')} "
            f"rank(s), now {self.dist.world_size})"
        )
        self._apply_optim_config()

    def _start_or_continue_theirs(self) -> None:
        """A new run, unless the working dir holds the authors' ``ckpts/<step>.pt`` files (their
        trainer's layout): then the newest continues, with its model, EMA, optimiser and step."""
        theirs = sorted(
            (p for p in (self.work_dir / "ckpts").glob("*.pt") if p.stem.isdigit()), key=lambda p: int(p.stem)
        )
        if not theirs:
            self.logger.info(f"starting a new run in {self.work_dir}")
            return
        with warnings.catch_warnings(record=True) as caught:  # their lr/betas where they differ from ours
            warnings.simplefilter("always")
            state = load_official_training_state(theirs[-1], self.model, self.optimizer, self.ema)
        for w in caught:
            self.logger.info(f"warning: {w.message}")
        self.step = state.finished_steps
        self.scheduler.last_epoch = self.step
        self._apply_optim_config()
        self.logger.info(
            f"continuing the authors' checkpoint {theirs[-1]} at step {self.step} ({state.optimizer} state, "
            "EMA and weights); the data stream starts afresh"
        )

    def _apply_optim_config(self) -> None:
        """The config's optimiser settings win over the checkpoint's: loading the optimiser and the
        scheduler brought back the saved lr, betas, weight decay and eps, and a resume that changes
        them in the config must run with the new ones (the moments and the step count are kept)."""
        o = self.cfg.optim
        want = {"betas": tuple(o.betas), "weight_decay": o.weight_decay, "eps": o.adam_eps}
        changed = []
        if any(base != o.lr for base in self.scheduler.base_lrs):
            changed.append(f"lr {self.scheduler.base_lrs[0]:g} -> {o.lr:g}")
        self.scheduler.base_lrs = [o.lr] * len(self.optimizer.param_groups)
        factor = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        for group in self.optimizer.param_groups:
            group["initial_lr"] = o.lr
            group["lr"] = o.lr * factor
            for key, value in want.items():
                old = tuple(group[key]) if key == "betas" else group[key]
                if old != value:
                    changed.append(f"{key} {old} -> {value}")
                group[key] = value
        keep_optimizer_impl(self.optimizer)
        if changed:
            self.logger.info(
                "optimiser settings from the config, not the checkpoint: " + ", ".join(dict.fromkeys(changed))
            )

    def save(self) -> Path | None:
        self._check_finite("before saving a checkpoint")
        path = self.checkpointer.save(self.step, self._state(), self._meta())
        if path is None:
            self.logger.info(f"step {self.step} already has a complete checkpoint: kept as it is")
        else:
            self.logger.info(f"saved checkpoint {path}")
        return path

    # -- checks and signals ----------------------------------------------------------------------

    def _check_finite(self, when: str) -> None:
        if self.metrics.diverged(self.dist.world_size):
            last = self.checkpointer.latest()
            raise TrainingDiverged(
                f"non-finite loss at or before step {self.step} (checked {when}); "
                f"last good checkpoint: {last if last else 'none'} (left intact)"
            )

    def _on_signal(self, signum, frame) -> None:
        """SIGTERM or a first Ctrl-C: save at the next stop check and exit 0; a second Ctrl-C exits at once."""
        if signum == signal.SIGINT and self._stop_signal is not None:
            raise KeyboardInterrupt
        if signum == signal.SIGINT and self.dist.is_main:
            print("\nCtrl-C: saving a checkpoint and exiting (Ctrl-C again to exit at once)", file=sys.stderr)
        self._stop_signal = signal.Signals(signum).name

    def _stop_requested(self) -> bool:
        """The SIGTERM flag: a host bool; with several ranks, all-reduced so that every rank stops at
        the same step (called every ``STOP_CHECK_EVERY`` steps there, since the all-reduce syncs)."""
        if self.dist.world_size == 1:
            return self._stop_signal is not None
        flag = torch.tensor([0.0 if self._stop_signal is None else 1.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self._stop_signal is None:
            self._stop_signal = "SIGTERM"  # another rank's signal
        return bool(flag.item())

    # -- the loop --------------------------------------------------------------------------------

    def run(self) -> None:
        run, world = self.cfg.run, self.dist.world_size
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        end = run.total_steps
        if run.max_steps_this_run is not None:
            end = min(end, self.step + run.max_steps_this_run)
        plan = self.plan
        compiled = f" ({plan.compile_scope})" if plan.compile else ""
        self.logger.info(
            f"{self.num_params / 1e6:.2f}M parameters | world {world} | device {self.device} | "
            f"fsdp {plan.fsdp} | compile {plan.compile}{compiled} | {plan.param_dtype} | "
            f"global batch {run.batch_size} | steps {self.step} -> {end}"
        )
        bar = self.logger.progress(total=end, initial=self.step)
        try:  # the bar is closed however the loop ends, so an error prints on a line of its own
            self._loop(end, bar)
        finally:
            bar.close()
        if not self._stop_signal and not (run.ckpt_saving_steps and self.step % run.ckpt_saving_steps == 0):
            self.save()
        self.logger.info(
            f"{self._stop_signal}: stopped at step {self.step}" if self._stop_signal else f"done at step {self.step}"
        )

    def _loop(self, end: int, bar) -> bool:
        """Steps until ``end`` (False) or a stop signal, after which it saves (True)."""
        run, world = self.cfg.run, self.dist.world_size
        # tests: send this process a signal (SIGKILL unless SOFLOW_TEST_KILL_SIGNAL names another) after a step
        crash_at = int(os.environ.get("SOFLOW_TEST_KILL_AT_STEP", "-1"))
        crash_signal = signal.Signals["SIG" + os.environ.get("SOFLOW_TEST_KILL_SIGNAL", "KILL")]
        stop_every = 1 if world == 1 else STOP_CHECK_EVERY
        self._remake_missing()  # a new run's step-0 grids; a resumed step's grids and evals that a kill left unmade
        t_last, step_last = time.time(), self.step
        sync_check = SyncCheck(run.sync_debug and self.device.type == "cuda", self.step + SYNC_DEBUG_WARMUP)
        while self.step < end:
            with sync_check(self.step):  # the step itself: no host sync (run.sync_debug checks it on CUDA)
                x, y = self.loader.next_batch()
                self.metrics.add(self.step_fn(x, y, self.step))
            self.step += 1
            bar.update(1)
            if self.step == crash_at:
                os.kill(os.getpid(), crash_signal)
            if run.log_steps and (self.step % run.log_steps == 0 or self.step == end):
                means = self.metrics.means(world)
                dt = time.time() - t_last
                steps_s = (self.step - step_last) / max(dt, 1e-9)
                lr = self.scheduler.get_last_lr()[0]
                self.logger.scalars(self.step, means, steps_s, steps_s * run.batch_size, self.device, lr=lr)
                bar.set_postfix_str(self.logger.postfix(means, steps_s, steps_s * run.batch_size, self.device))
                self._check_finite("at a logging step")
                t_last, step_last = time.time(), self.step
            t_side = time.time()  # saves, grids and evals are left out of the logged steps/s
            if run.ckpt_saving_steps and self.step % run.ckpt_saving_steps == 0:
                self.save()
            if run.eval_demo_steps and self.step % run.eval_demo_steps == 0:
                self._demo()
            if run.eval_steps and self.step % run.eval_steps == 0:
                self._eval_npz()
            t_last += time.time() - t_side
            if self.step % stop_every == 0 and self._stop_requested():
                self.logger.info(f"{self._stop_signal}: saving at step {self.step} and exiting")
                self.save()
                return True
        return False

    # -- samples ---------------------------------------------------------------------------------

    def _demo(self) -> None:
        with self.ema.swapped(self.model, self.cfg.run.ema_decays[0]):
            demo_grids(self.model, self.objective, self.cfg, self.step, self.device, self.logger, self.vae)

    def _eval_npz(self) -> None:
        with self.ema.swapped(self.model, self.cfg.run.ema_decays[0]):
            npz = write_eval_npz(
                self.model, self.objective, self.cfg, self.step, self.dist, self.logger, self.cfg.run.eval_nfe, self.vae
            )
        self.eval_scorer(npz, self.step)

    def _remake_missing(self) -> None:
        grids, npz, scores = run_io.outputs_to_remake(
            self.cfg, self.step, self.logger, self.dist, self.eval_scorer.enabled
        )
        if grids:
            self._demo()
        if npz:
            self._eval_npz()
        elif scores:  # the npz is there, its scores are not
            self.eval_scorer(run_io.eval_npz_path(self.work_dir, self.step, self.cfg.run.eval_nfe), self.step)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        description=__doc__, epilog=keys_help(), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", help="a YAML file (flat with the authors' keys, or nested by section)")
    p.add_argument(
        "--preset", choices=sorted(PRESETS), help="the base config (default: digits; an authors' file names its own)"
    )
    p.add_argument("--print_config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument(
        "--allow_config_change",
        action="store_true",
        help="resume a run with settings that change what it trains (seed, batch, data, objective, ...)",
    )
    return p.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    try:
        cfg = build_config(args.preset, args.config, overrides)
    except (ValueError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    notes = ()
    if args.config and is_authors_file(read_yaml(args.config)):
        notes = (deliberate_differences(cfg, "cuda" if torch.cuda.is_available() else "cpu"),)
    trainer = None
    try:
        trainer = Trainer(cfg, allow_config_change=args.allow_config_change, notes=notes)
        trainer.run()
    except (TrainingDiverged, CheckpointError, RunLocked, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        if trainer is not None:
            trainer.logger.info(f"error: {e}")
        return 1
    except KeyboardInterrupt as e:  # a second Ctrl-C: the last complete checkpoint stays the latest
        message = f"interrupted: {e}" if str(e) else "interrupted"  # a save it cut short says what became of it
        print(message, file=sys.stderr)
        if trainer is not None:
            trainer.logger.info(message)
        return 130
    finally:
        if trainer is not None:
            trainer.close()
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
