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
from contextlib import nullcontext
from pathlib import Path

if __package__ in (None, ""):  # `python soflow_fast/train.py` / torchrun with a file path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist

from soflow_fast.checkpoint import Checkpointer, CheckpointError, ModelOptimizerState, ObjectState, read_marker
from soflow_fast.config import PRESETS, TrainConfig, build_config
from soflow_fast.data import build_dataset, build_loader
from soflow_fast.ema import EMA
from soflow_fast.meanflow import MeanFlowObjective
from soflow_fast.models import DiT
from soflow_fast.objective import SoFlowObjective
from soflow_fast.parallel import destroy_distributed, init_distributed, parallelize, resolve_precision
from soflow_fast.run_io import RunLogger, demo_grids, write_eval_npz

LOG_KEYS = {
    "soflow": ("loss", "fm_loss", "fm_mse", "fm_weight", "scm_loss", "scm_mse", "scm_weight"),
    "meanflow": ("loss", "mse", "weight"),
}


class TrainingDiverged(RuntimeError):
    """A non-finite loss: the run stops and its last good checkpoint stays the latest."""


def step_seed(seed: int, step: int) -> int:
    """The randomness of step k is a pure function of (seed, k): resumes replay it exactly."""
    return (seed * 1_000_003 + step * 7_919 + 12_345) % (2**63 - 1)


def build_optimizer(cfg: TrainConfig, params, device: torch.device) -> torch.optim.Optimizer:
    o = cfg.optim
    kw = dict(lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, eps=o.adam_eps)
    if o.optimizer == "RAdam":
        return torch.optim.RAdam(params, foreach=True, **kw)
    cls = torch.optim.AdamW if o.optimizer == "AdamW" else torch.optim.Adam
    # fused Adam(W) is one kernel for all parameters on CUDA; on CPU foreach is the fast path
    return cls(params, fused=True, **kw) if device.type == "cuda" else cls(params, foreach=True, **kw)


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.dist = init_distributed()
        self.device = self.dist.device
        rank, world = self.dist.rank, self.dist.world_size
        run = cfg.run
        if run.batch_size % world:
            raise ValueError(f"run.batch_size={run.batch_size} must be divisible by the world size {world}")
        self.local_batch = run.batch_size // world
        self.draw_groups = run.draw_groups or world
        if self.draw_groups != world and world != 1:
            raise ValueError(
                f"run.draw_groups={run.draw_groups} differs from the world size {world}: "
                "only a single process can reproduce another world size's draws"
            )
        self.work_dir = Path(run.working_dir)
        self.logger = RunLogger(self.work_dir, enabled=self.dist.is_main)

        # data
        d = cfg.data
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
            self.local_batch,
            rank=rank,
            world_size=world,
            seed=run.seed,
            hflip=d.random_flip,
            device=self.device,
            num_workers=d.num_workers,
        )

        # model: the same initial weights on every rank, then sharded
        torch.manual_seed(run.seed)
        self.model = DiT(**cfg.model.build_kwargs()).to(self.device)
        self.num_params = sum(p.numel() for p in self.model.parameters())
        self.param_dtype = resolve_precision(run.mixed_precision, self.device)
        self.meanflow = run.objective == "meanflow"
        if self.meanflow:
            # torch.func.jvp does not pass through FSDP2's wrappers: MeanFlow keeps whole replicas and
            # all-reduces gradients by hand, as the PyTorch port of MeanFlow does
            if run.fsdp:
                raise ValueError("run.objective=meanflow cannot use run.fsdp=true: the JVP does not go through FSDP2")
            self.use_fsdp = False
        else:
            self.use_fsdp = run.fsdp if run.fsdp is not None else (world > 1 or self.device.type == "cuda")
            if world > 1 and not self.use_fsdp:
                raise ValueError("run.fsdp=false with several ranks is not supported: the engine shards with FSDP2")
        self.use_compile = run.compile if run.compile is not None else self.device.type == "cuda"
        # MeanFlow compiles its whole loss (jvp included); SoFlow per block unless asked for the whole loss
        self.compile_scope = run.compile_scope or ("loss" if self.meanflow else "blocks")
        self.compile_loss = self.use_compile and self.compile_scope == "loss"
        if self.compile_loss and not self.meanflow and (world > 1 or self.use_fsdp or self.draw_groups > 1):
            raise ValueError(
                "run.compile_scope=loss compiles SoFlow's whole loss in one process without FSDP: it needs "
                f"world size 1, run.fsdp=false and one draw group (world {world}, fsdp {self.use_fsdp}, "
                f"draw_groups {self.draw_groups}); use run.compile_scope=blocks to compile with FSDP"
            )
        if run.use_fused_kernels:
            from soflow_fast import ops

            ops.set_use_fused_kernels(run.fused_ops)
            if self.device.type != "cuda":
                self.logger.info("run.use_fused_kernels: the fused Triton ops run on CUDA only; reference ops here")
        elif run.fused_ops != "all":
            self.logger.info(f"run.fused_ops={run.fused_ops} has no effect without run.use_fused_kernels=true")
        parallelize(
            self.model,
            device=self.device,
            world_size=world,
            compile=self.use_compile and self.compile_scope == "blocks",
            fsdp=self.use_fsdp,
            activation_checkpointing=run.activation_checkpointing,
            param_dtype=self.param_dtype,
        )
        self.autocast = (
            torch.autocast(self.device.type, dtype=self.param_dtype)
            if (self.param_dtype != torch.float32 and not self.use_fsdp)
            else nullcontext()
        )
        ncls = cfg.model.num_classes or None
        if self.meanflow:
            self.objective = MeanFlowObjective(cfg.meanflow, num_classes=ncls)
        else:
            self.objective = SoFlowObjective(cfg.soflow, num_classes=ncls)
        self.log_keys = LOG_KEYS[run.objective]
        per_group = run.batch_size // self.draw_groups
        if (
            not self.meanflow
            and cfg.soflow.velocity_loss_ratio > 0
            and int(cfg.soflow.velocity_loss_ratio * per_group) == 0
        ):
            self.logger.info(
                f"warning: {per_group} row(s) per draw group x soflow.velocity_loss_ratio="
                f"{cfg.soflow.velocity_loss_ratio:g} rounds to no flow-matching rows: only the consistency loss "
                "trains; raise run.batch_size (or lower the world size / run.draw_groups)"
            )
        self.optimizer = build_optimizer(cfg, self.model.parameters(), self.device)
        warm = cfg.optim.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda k: min(1.0, (k + 1) / warm) if warm else 1.0
        )
        self.ema = EMA(self.model, decays=run.ema_decays)
        self.generator = torch.Generator(self.device)

        self.step = 0
        self.checkpointer = Checkpointer(self.work_dir / "ckpts")
        self._stop_signal = False
        self._resume()
        # written only now: a refused resume (another model, a bad checkpoint) leaves the run's
        # config.yaml, which export and sample read, as the checkpoints' own
        if self.dist.is_main:
            cfg.save_yaml(self.work_dir / "config.yaml")
            if self.classes is not None:
                (self.work_dir / "classes.json").write_text(json.dumps(self.classes, indent=0) + "\n")

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
            "model": self.cfg.to_dict()["model"],
            "world_size": self.dist.world_size,
            "ema_decays": list(self.cfg.run.ema_decays),
            "classes": self.classes,
        }

    def _resume(self) -> None:
        path = self.checkpointer.latest()
        if path is None:
            self.logger.info(f"starting a new run in {self.work_dir}")
            return
        marker = read_marker(path)  # what the checkpoint was saved with: read once, checked below
        saved = marker.get("model", {})
        ours = self._meta()["model"]
        diff = {k: (saved.get(k), v) for k, v in ours.items() if k in saved and saved.get(k) != v}
        if diff:
            k, (a, b) = next(iter(diff.items()))
            raise ValueError(f"checkpoint {path} is from another model: model.{k} was {a!r}, this run has {b!r}")
        saved_decays = marker.get("ema_decays")  # absent in checkpoints older than this check
        if saved_decays is not None and tuple(saved_decays) != self.cfg.run.ema_decays:
            raise ValueError(
                f"checkpoint {path} keeps EMA weights for run.ema_decays={tuple(saved_decays)}, this run asks for "
                f"{self.cfg.run.ema_decays}: resume with the same decays, or start a new run.working_dir"
            )
        saved_classes = marker.get("classes")  # absent in older checkpoints, None for unnamed labels
        if saved_classes is not None and self.classes is not None and saved_classes != self.classes:
            first = next(
                (i for i, (a, b) in enumerate(zip(saved_classes, self.classes, strict=False)) if a != b),
                min(len(saved_classes), len(self.classes)),
            )
            was = saved_classes[first] if first < len(saved_classes) else "(none)"
            now = self.classes[first] if first < len(self.classes) else "(none)"
            raise ValueError(
                f"checkpoint {path} was trained with {len(saved_classes)} classes, the data now has "
                f"{len(self.classes)}, and label {first} meant {was!r} but now means {now!r}: resuming would "
                "train the labels on other classes; restore the data's classes or start a new run.working_dir"
            )
        self.checkpointer.load(path, self._state())
        self.logger.info(
            f"resumed from {path} at step {self.step} (saved by {marker.get('world_size')} "
            f"rank(s), now {self.dist.world_size})"
        )
        self._apply_optim_config()

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
        if changed:
            self.logger.info(
                "optimiser settings from the config, not the checkpoint: " + ", ".join(dict.fromkeys(changed))
            )

    def save(self) -> Path:
        self._check_finite("before saving a checkpoint")
        path = self.checkpointer.save(self.step, self._state(), self._meta())
        self.logger.info(f"saved checkpoint {path}")
        return path

    # -- the step --------------------------------------------------------------------------------

    def train_step(self, x: torch.Tensor, y: torch.Tensor | None) -> dict[str, torch.Tensor]:
        if self.meanflow:
            return self._meanflow_step(x, y)
        G, r = self.draw_groups, self.dist.rank
        self.generator.manual_seed(step_seed(self.cfg.run.seed, self.step))
        shape = (self.cfg.run.batch_size, *x.shape[1:])
        draws = self.objective.draw_batch(
            shape, self.device, x.dtype, self.objective.guided(y), self.step, self.generator, groups=G
        )
        with self.autocast:
            if self.compile_loss:  # one process, one group: the whole loss as one compiled graph
                loss, logs = self.objective.compiled_loss_from_draws(self.model, x, y, draws)
            elif G == self.dist.world_size:  # one group per rank: this rank's rows are its group
                loss, logs = self.objective.loss_from_draws(self.model, x, y, draws.group(r))
            else:  # one process standing in for G ranks
                loss, logs = self.objective.loss_from_grouped_draws(self.model, x, y, draws)
        loss.backward()
        return self._update(logs)

    def _meanflow_step(self, x: torch.Tensor, y: torch.Tensor | None) -> dict[str, torch.Tensor]:
        # per-rank draws: the baseline makes no claim of world-size invariance
        self.generator.manual_seed(step_seed(self.cfg.run.seed, self.step) + 7_777 * self.dist.rank)
        loss_fn = self.objective.compiled_loss if self.compile_loss else self.objective.loss
        with self.autocast:
            loss, logs = loss_fn(self.model, x, y, self.step, self.generator)
        loss.backward()
        if self.dist.world_size > 1:
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat /= self.dist.world_size
            torch._foreach_copy_(
                grads, [v.view_as(g) for v, g in zip(flat.split([g.numel() for g in grads]), grads, strict=True)]
            )
        return self._update(logs)

    def _update(self, logs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.ema.update(self.model)
        self.step += 1
        return logs

    # -- checks and signals ----------------------------------------------------------------------

    def _check_finite(self, when: str) -> None:
        if self._nonfinite is None:
            return
        bad = self._nonfinite.clone()
        if dist.is_initialized() and self.dist.world_size > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item():
            last = self.checkpointer.latest()
            raise TrainingDiverged(
                f"non-finite loss at or before step {self.step} (checked {when}); "
                f"last good checkpoint: {last if last else 'none'} (left intact)"
            )

    def _on_sigterm(self, signum, frame) -> None:
        self._stop_signal = True

    def _stop_requested(self) -> bool:
        flag = torch.tensor([1.0 if self._stop_signal else 0.0], device=self.device)
        if self.dist.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank stops at the same step
        return bool(flag.item())

    # -- the loop --------------------------------------------------------------------------------

    def run(self) -> None:
        run = self.cfg.run
        signal.signal(signal.SIGTERM, self._on_sigterm)
        crash_at = int(os.environ.get("SOFLOW_TEST_KILL_AT_STEP", "-1"))  # tests: SIGKILL after this step
        end = run.total_steps
        if run.max_steps_this_run is not None:
            end = min(end, self.step + run.max_steps_this_run)
        self._nonfinite = torch.zeros((), device=self.device)
        acc = torch.zeros(len(self.log_keys), device=self.device, dtype=torch.float64)
        n_acc, t_last, step_last = 0, time.time(), self.step
        compiled = f" ({self.compile_scope})" if self.use_compile else ""
        self.logger.info(
            f"{self.num_params / 1e6:.2f}M parameters | world {self.dist.world_size} | device {self.device} | "
            f"fsdp {self.use_fsdp} | compile {self.use_compile}{compiled} | {self.param_dtype} | "
            f"global batch {run.batch_size} | steps {self.step} -> {end}"
        )
        bar = self.logger.progress(total=end, initial=self.step)
        sig_every = 1 if self.dist.world_size == 1 else 10
        if self.cfg.run.eval_demo_steps and self.step == 0:
            self._demo()
        while self.step < end:
            x, y = self.loader.next_batch()
            logs = self.train_step(x, y)
            vals = torch.stack([logs.get(k, torch.zeros((), device=self.device)).double() for k in self.log_keys])
            acc += vals
            n_acc += 1
            self._nonfinite = torch.maximum(self._nonfinite, (~torch.isfinite(logs["loss"])).float())
            bar.update(1)
            if self.step == crash_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if run.log_steps and (self.step % run.log_steps == 0 or self.step == end):
                if self.dist.world_size > 1:
                    dist.all_reduce(acc)
                    acc /= self.dist.world_size
                means = dict(zip(self.log_keys, (acc / n_acc).tolist(), strict=True))
                dt = time.time() - t_last
                steps_s = (self.step - step_last) / max(dt, 1e-9)
                self.logger.scalars(
                    self.step, means, steps_s, steps_s * run.batch_size, self.device, lr=self.scheduler.get_last_lr()[0]
                )
                bar.set_postfix_str(self.logger.postfix(means, steps_s, steps_s * run.batch_size, self.device))
                self._check_finite("at a logging step")
                acc.zero_()
                n_acc, t_last, step_last = 0, time.time(), self.step
            if run.ckpt_saving_steps and self.step % run.ckpt_saving_steps == 0:
                self.save()
            if run.eval_demo_steps and self.step % run.eval_demo_steps == 0:
                self._demo()
            if run.eval_steps and self.step % run.eval_steps == 0:
                self._eval_npz()
            if self.step % sig_every == 0 and self._stop_requested():
                self.logger.info(f"SIGTERM: saving at step {self.step} and exiting")
                self.save()
                bar.close()
                return
        bar.close()
        if not (run.ckpt_saving_steps and self.step % run.ckpt_saving_steps == 0):
            self.save()
        self.logger.info(f"done at step {self.step}")

    # -- samples ---------------------------------------------------------------------------------

    def _demo(self) -> None:
        with self.ema.swapped(self.model, self.cfg.run.ema_decays[0]):
            demo_grids(self.model, self.objective, self.cfg, self.step, self.device, self.logger)

    def _eval_npz(self) -> None:
        with self.ema.swapped(self.model, self.cfg.run.ema_decays[0]):
            write_eval_npz(self.model, self.objective, self.cfg, self.step, self.dist, self.logger)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a YAML file (flat with the authors' keys, or nested by section)")
    p.add_argument("--preset", default="digits", choices=sorted(PRESETS), help="the base config (default: digits)")
    return p.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    try:
        cfg = build_config(args.preset, args.config, overrides)
    except (ValueError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    trainer = None
    try:
        trainer = Trainer(cfg)
        trainer.run()
    except (TrainingDiverged, CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        if trainer is not None:
            trainer.logger.info(f"error: {e}")
        return 1
    finally:
        if trainer is not None:
            trainer.logger.close()
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
