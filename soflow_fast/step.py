"""The training step: the one object the trainer runs and the benchmarks time.

``TrainStep.build(cfg, model, dist)`` wires the model (FSDP2, compile) and builds the objective,
optimiser, LR schedule and EMA from a ``TrainConfig``; ``step(x, y, k)`` then runs

    draws -> loss -> backward -> (gradient all-reduce) -> clip -> optimiser -> LR -> EMA

and returns the loss logs as device tensors. A call never waits for the device: the draws are made
on the device from a generator seeded on the host, the FM/consistency split of a batch is known on
the host, and nothing is read back (the trainer reads the logs at logging steps).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from soflow_fast.compiled import CompiledLoss
from soflow_fast.config import TrainConfig
from soflow_fast.ema import EMA
from soflow_fast.meanflow import MeanFlowObjective
from soflow_fast.objective import SoFlowObjective, mean_over_groups
from soflow_fast.parallel import DistInfo, parallelize, resolve_precision


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


def build_objective(cfg: TrainConfig) -> SoFlowObjective | MeanFlowObjective:
    ncls = cfg.model.num_classes or None
    if cfg.run.objective == "meanflow":
        return MeanFlowObjective(cfg.meanflow, num_classes=ncls)
    return SoFlowObjective(cfg.soflow, num_classes=ncls)


@dataclass(frozen=True)
class StepPlan:
    """How a config runs on this world: resolved once, logged by the trainer."""

    fsdp: bool
    compile: bool
    compile_scope: str  # "blocks" (per-block compile) or "loss" (the whole loss as one graph)
    param_dtype: torch.dtype
    draw_groups: int  # the world size whose draws this run reproduces

    @property
    def compile_loss(self) -> bool:
        return self.compile and self.compile_scope == "loss"

    @classmethod
    def resolve(cls, cfg: TrainConfig, device: torch.device, world: int) -> StepPlan:
        run = cfg.run
        meanflow = run.objective == "meanflow"
        draw_groups = run.draw_groups or world
        if draw_groups != world and world != 1:
            raise ValueError(
                f"run.draw_groups={run.draw_groups} differs from the world size {world}: "
                "only a single process can reproduce another world size's draws"
            )
        if meanflow:
            # torch.func.jvp does not pass through FSDP2's wrappers: MeanFlow keeps whole replicas and
            # all-reduces gradients by hand, as the PyTorch port of MeanFlow does
            if run.fsdp:
                raise ValueError("run.objective=meanflow cannot use run.fsdp=true: the JVP does not go through FSDP2")
            fsdp = False
        else:
            fsdp = run.fsdp if run.fsdp is not None else (world > 1 or device.type == "cuda")
            if world > 1 and not fsdp:
                raise ValueError("run.fsdp=false with several ranks is not supported: the engine shards with FSDP2")
        use_compile = run.compile if run.compile is not None else device.type == "cuda"
        # MeanFlow compiles its whole loss (jvp included); SoFlow per block unless asked for the whole loss
        scope = run.compile_scope or ("loss" if meanflow else "blocks")
        if use_compile and scope == "loss" and not meanflow and (fsdp or draw_groups != world):
            raise ValueError(
                "run.compile_scope=loss compiles SoFlow's whole loss in one process without FSDP: it needs "
                f"world size 1, run.fsdp=false and one draw group (world {world}, fsdp {fsdp}, "
                f"draw_groups {draw_groups}); use run.compile_scope=blocks to compile with FSDP"
            )
        return cls(fsdp, use_compile, scope, resolve_precision(run.mixed_precision, device), draw_groups)


class TrainStep:
    """One optimiser step over a rank's share of the global batch.

    Args:
        model: the model as wired by ``parallelize`` (FSDP2-sharded or not).
        objective: ``SoFlowObjective`` or ``MeanFlowObjective`` (the ``draw_batch`` /
            ``loss_from_draws`` / ``log_keys`` protocol).
        plan: the resolved run plan (FSDP, compile, precision, draw groups).
        global_batch: rows per step over all ranks.
        seed: the run's seed; step k draws from a generator seeded by (seed, k).
        grad_clip: max gradient norm, 0 for none.
    """

    def __init__(
        self,
        model: nn.Module,
        objective,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        ema: EMA,
        plan: StepPlan,
        *,
        dist_info: DistInfo,
        global_batch: int,
        seed: int,
        grad_clip: float = 0.0,
    ):
        self.model, self.objective, self.plan = model, objective, plan
        self.optimizer, self.scheduler, self.ema = optimizer, scheduler, ema
        self.rank, self.world, self.device = dist_info.rank, dist_info.world_size, dist_info.device
        self.global_batch, self.seed, self.grad_clip = global_batch, seed, grad_clip
        self.log_keys = objective.log_keys
        self.loss_fn = CompiledLoss(objective.loss_from_draws) if plan.compile_loss else objective.loss_from_draws
        # under FSDP the parameters run in param_dtype already; otherwise low precision is autocast
        low = plan.param_dtype != torch.float32 and not plan.fsdp
        self.autocast = torch.autocast(self.device.type, dtype=plan.param_dtype) if low else nullcontext()
        # replicas (MeanFlow on several ranks) average their gradients by hand
        self.allreduce_grads = not plan.fsdp and self.world > 1
        self.generator = torch.Generator(self.device)

    @classmethod
    def build(cls, cfg: TrainConfig, model: nn.Module, dist_info: DistInfo, plan: StepPlan | None = None) -> TrainStep:
        """Wire ``model`` in place for ``cfg`` on this world and build the step around it."""
        plan = plan or StepPlan.resolve(cfg, dist_info.device, dist_info.world_size)
        run = cfg.run
        parallelize(
            model,
            device=dist_info.device,
            world_size=dist_info.world_size,
            compile=plan.compile and plan.compile_scope == "blocks",
            fsdp=plan.fsdp,
            activation_checkpointing=run.activation_checkpointing,
            param_dtype=plan.param_dtype,
        )
        optimizer = build_optimizer(cfg, model.parameters(), dist_info.device)
        warm = cfg.optim.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: min(1.0, (k + 1) / warm) if warm else 1.0)
        ema = EMA(model, decays=run.ema_decays)
        return cls(
            model,
            build_objective(cfg),
            optimizer,
            scheduler,
            ema,
            plan,
            dist_info=dist_info,
            global_batch=run.batch_size,
            seed=run.seed,
            grad_clip=cfg.optim.grad_clip,
        )

    def loss(self, x: torch.Tensor, y: torch.Tensor | None, step: int):
        """This rank's loss and logs at step ``step`` (no backward)."""
        G = self.plan.draw_groups
        self.generator.manual_seed(step_seed(self.seed, step))
        shape = (self.global_batch, *x.shape[1:])
        draws = self.objective.draw_batch(shape, self.device, x.dtype, y is not None, step, self.generator, groups=G)
        with self.autocast:
            if G == self.world:  # one group per rank: this rank's rows are its group
                return self.loss_fn(self.model, x, y, draws.group(self.rank))
            return mean_over_groups(self.loss_fn, self.model, x, y, draws)  # one process standing in for G ranks

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None, step: int) -> dict[str, torch.Tensor]:
        loss, logs = self.loss(x, y, step)
        loss.backward()
        if self.allreduce_grads:
            self._allreduce_grads()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.ema.update(self.model)
        return logs

    def _allreduce_grads(self) -> None:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        torch._foreach_copy_(
            grads, [v.view_as(g) for v, g in zip(flat.split([g.numel() for g in grads]), grads, strict=True)]
        )
