"""Train a SoFlow model: ``torchrun --nproc_per_node=N soflow_fast/train.py [--preset NAME] [--config F]
[--key=value ...]``, or ``soflow-train`` (the console command).

Plain ``python soflow_fast/train.py`` runs a world of one. With no arguments it trains the ``digits``
preset on CPU with nothing downloaded. A run resumes from its working dir when it finds a complete
checkpoint there, at any world size.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python soflow_fast/train.py` / torchrun with a file path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
import yaml
from torch.distributed.checkpoint.stateful import Stateful

from soflow_fast.authors_config import deliberate_differences, is_authors_file
from soflow_fast.checkpoint import Checkpointer, CheckpointError, ModelOptimizerState
from soflow_fast.cli import Parser
from soflow_fast.config import TrainConfig, keys_help, read_yaml
from soflow_fast.evaluator import Evaluator
from soflow_fast.files import DISK_ERRNOS, WriteError, describe_io_error
from soflow_fast.parallel import destroy_distributed, init_distributed, unused_gpu_note
from soflow_fast.presets import PRESETS, build_config
from soflow_fast.resume import marker_meta, resume, write_config
from soflow_fast.run_io import RunLock, RunLocked, RunLogger, StopSignals, TrainMetrics, dir_snapshot, undo_start
from soflow_fast.step import SYNC_DEBUG_WARMUP, StepMetrics, StepPlan, SyncCheck, TrainingDiverged, TrainStep


class TrainState(Stateful):
    """The trainer's own checkpointed state: the step count and the learning-rate schedule's position."""

    def __init__(self, scheduler):
        self.step, self.scheduler = 0, scheduler

    def state_dict(self) -> dict:
        return {"step": self.step, "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.scheduler.load_state_dict(state["scheduler"])


class Trainer:
    """The loop over one ``TrainStep``; the parts around it (metrics, checkpointer, evaluator, stop signals)
    decide for themselves when they act."""

    def __init__(self, cfg: TrainConfig, allow_config_change: bool = False, notes: tuple[str, ...] = ()):
        self.cfg, run = cfg, cfg.run
        self.dist = init_distributed()
        device, world = self.dist.device, self.dist.world_size
        if run.batch_size % world:
            raise ValueError(f"run.batch_size={run.batch_size} must be divisible by the world size {world}")
        self.plan = StepPlan.resolve(cfg, device, world)
        self.work_dir = Path(run.working_dir)
        self.lock, self.logger = None, None
        before = dir_snapshot(self.work_dir)
        try:
            self.lock = RunLock.for_ranks(
                self.work_dir, self.dist
            )  # first: a second trainer on this dir touches nothing
            self.logger = RunLogger(self.work_dir, enabled=self.dist.is_main)
            for note in (*notes, unused_gpu_note()):  # an authors' file's differences; a GPU torch cannot use
                if note:
                    self.logger.info(note)
            self.data = cfg.data.build_train_data(cfg.model, self.dist, run.batch_size, run.seed, say=self.logger.info)
            torch.manual_seed(run.seed)  # the same initial weights on every rank (TrainStep.build shards them)
            self.model = cfg.model.build().to(device)
            cfg.parallel.set_fused_ops(device, say=self.logger.info)
            self.step_fn = TrainStep.build(cfg, self.model, self.dist, self.plan)
            if self.step_fn.teacher_note:
                self.logger.info(self.step_fn.teacher_note)
            if warning := self.step_fn.split_warning(cfg):
                self.logger.info(warning)
            self.evaluator = Evaluator(
                cfg, self.model, self.step_fn.objective, self.step_fn.ema, self.dist, self.logger
            )
            self.state = TrainState(self.step_fn.scheduler)
            self.stop = StopSignals(self.dist)
            sums = StepMetrics(self.step_fn.log_keys, device)
            self.checkpointer = Checkpointer(
                self.work_dir / "ckpts",
                keep=cfg.checkpoint.keep_checkpoints,
                every=cfg.checkpoint.ckpt_saving_steps,
                states={
                    "model": ModelOptimizerState(self.model, self.step_fn.optimizer),
                    "ema": self.step_fn.ema,
                    "trainer": self.state,
                    "data": self.data.loader,
                },
                meta=lambda: marker_meta(cfg, world, self.data),
                before_save=lambda step: self.metrics.check_finite(step, "before saving a checkpoint"),
                say=self.logger.info,
            )
            lr = lambda: self.step_fn.scheduler.get_last_lr()[0]  # noqa: E731
            self.metrics = TrainMetrics(sums, run.log_steps, run.batch_size, self.dist, self.logger, lr,
                                        last_ckpt=self.checkpointer.latest)  # fmt: skip
            resume(self.checkpointer, cfg, self.data, self.step_fn, self.state, world, allow_config_change, self.logger)
            # written only now: a refused resume (other settings, a bad checkpoint) leaves the run's
            # config.yaml, which export and sample read, as the checkpoints' own
            if self.dist.is_main:
                write_config(self.work_dir, cfg, self.state.step)
                if self.data.classes is not None:
                    (self.work_dir / "classes.json").write_text(json.dumps(self.data.classes, indent=0) + "\n")
            self.logger.begin(
                self.state.step
            )  # metrics.jsonl and TensorBoard set aside what a stopped run wrote past it
        except RunLocked:  # another trainer's dir: nothing of it is this start's
            raise
        except BaseException:  # a failed start leaves the working dir as it found it
            self.close()
            if self.dist.is_main:
                undo_start(self.work_dir, before)
            raise

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()
        if self.lock is not None:
            self.lock.release()

    def run(self) -> None:
        run, plan, step = self.cfg.run, self.plan, self.state.step
        self.stop.install(say=self.logger.info, last_ckpt=self.checkpointer.latest)
        end = run.total_steps if run.max_steps_this_run is None else min(run.total_steps, step + run.max_steps_this_run)
        compiled = f" ({plan.compile_scope})" if plan.compile else ""
        self.logger.info(
            f"{sum(p.numel() for p in self.model.parameters()) / 1e6:.2f}M parameters | world {self.dist.world_size} "
            f"| device {self.dist.device} | fsdp {plan.fsdp} | compile {plan.compile}{compiled} | "
            f"{plan.param_dtype} | global batch {run.batch_size} | steps {step} -> {end}"
        )
        with self.metrics.progress(end, step):  # the bar is closed however the loop ends
            self._loop(end)
        step, total = self.state.step, run.total_steps
        if not self.stop.name:
            self.checkpointer.save_run(step, final=True)
        if step < total:
            why = f"{self.stop.name}: stopped" if self.stop.name else "stopped (run.max_steps_this_run)"
            self.logger.info(f"{why} at step {step} of {total}; run the same command again to continue")
        else:
            self.logger.info(f"done at step {step}")

    def _loop(self, end: int) -> None:
        """Steps until ``end``, or until a stop signal, after which it saves."""
        state, metrics = self.state, self.metrics
        checked = self.cfg.parallel.sync_debug and self.dist.device.type == "cuda"
        sync_check = SyncCheck(checked, state.step + SYNC_DEBUG_WARMUP)
        self.evaluator.remake_missing(state.step)  # a new run's step-0 grids; what a kill left unmade
        metrics.start(state.step, first=True)
        while state.step < end:
            with sync_check(state.step):  # the step itself: no host sync (parallel.sync_debug checks it on CUDA)
                x, y = self.data.loader.next_batch()
                metrics.add(self.step_fn(x, y, state.step))
            state.step += 1
            metrics.maybe_log(state.step, end)
            with metrics.paused():  # saves, grids and evals are left out of the logged steps/s
                self.checkpointer.maybe_save(state.step)
                self.evaluator.maybe_act(state.step)
            if self.stop.requested(state.step):
                self.logger.info(f"{self.stop.name}: saving at step {state.step} and exiting")
                self.checkpointer.save_run(state.step)
                return


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = Parser(prog="soflow-train", description=__doc__, epilog=keys_help())
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


def _one_line(e: BaseException, cfg: TrainConfig) -> str:
    """The error as one line; a disk error under the working dir says it is the working dir's."""
    work = Path(cfg.run.working_dir).resolve()
    name = getattr(e, "filename", None)
    if isinstance(e, OSError) and not isinstance(e, WriteError) and e.errno in DISK_ERRNOS and name:
        if Path(name).resolve() == work or work in Path(name).resolve().parents:
            return f"run.working_dir={cfg.run.working_dir} cannot be written: {describe_io_error(e, work)}"
    return str(e)


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
        line = f"error: {_one_line(e, cfg)}"
        if isinstance(e, RunLocked) and dist.is_initialized() and dist.get_world_size() > 1:
            # every rank is refused alike: rank 0 says it, and the others wait until it has (torchrun stops
            # the ranks still running once one has exited)
            if dist.get_rank() == 0:
                print(line, file=sys.stderr, flush=True)
            dist.barrier()
            return 1
        print(line, file=sys.stderr)
        if trainer is not None:
            trainer.logger.record(line)
        return 1
    except KeyboardInterrupt as e:  # a second Ctrl-C: the last complete checkpoint stays the latest
        message = f"interrupted: {e}" if str(e) else "interrupted"  # a save it cut short says what became of it
        print(message, file=sys.stderr)
        if trainer is not None:
            trainer.logger.record(message)
        return 130
    finally:
        if trainer is not None:
            trainer.close()
        destroy_distributed()
    return 0


if __name__ == "__main__":
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A worker of several leaves without the interpreter's shutdown: a gloo thread may still free its
        # last collective's work while Python finalizes, and the abort that follows would turn a finished
        # run into a crash. Everything of the run is written and closed by now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
