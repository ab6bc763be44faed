"""The training step: the one object the trainer runs and the benchmarks time.

``TrainStep.build(cfg, model, dist)`` wires the model (FSDP2, compile) and builds the objective,
optimiser, LR schedule and EMA from a ``TrainConfig``; ``step(x, y, k)`` then runs

    draws -> loss -> backward -> (gradient all-reduce) -> clip -> optimiser -> LR -> EMA

and returns the loss logs as device tensors. A call never waits for the device: the draws are made
on the device from a generator seeded on the host, the FM/consistency split of a batch is known on
the host, and nothing is read back (the trainer reads the logs at logging steps).
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from soflow_fast.compiled import CompiledLoss
from soflow_fast.cuda_graph import StepGraph
from soflow_fast.ema import EMA
from soflow_fast.flow_matching import FlowMatchingObjective
from soflow_fast.meanflow import MeanFlowObjective
from soflow_fast.objective import SoFlowObjective, mean_over_groups
from soflow_fast.parallel import DistInfo, parallelize, resolve_precision

if TYPE_CHECKING:
    from soflow_fast.config import TrainConfig


class TrainingDiverged(RuntimeError):
    """A non-finite loss: the run stops and its last good checkpoint stays the latest."""


def step_seed(seed: int, step: int) -> int:
    """The randomness of step k is a pure function of (seed, k): resumes replay it exactly."""
    return (seed * 1_000_003 + step * 7_919 + 12_345) % (2**63 - 1)


def build_objective(cfg: TrainConfig, teacher: nn.Module | None = None) -> SoFlowObjective | MeanFlowObjective:
    """The objective ``run.objective`` names; ``teacher`` (SoFlow's teacher mode) as ``load_teacher`` gives it."""
    ncls = cfg.model.num_classes or None
    if cfg.run.objective == "meanflow":
        return MeanFlowObjective(cfg.meanflow, num_classes=ncls)
    if cfg.run.objective == "fm":
        return FlowMatchingObjective(cfg.soflow, num_classes=ncls)
    return SoFlowObjective(cfg.soflow, num_classes=ncls, teacher=teacher)


@dataclass(frozen=True)
class StepPlan:
    """How a config runs on this world: resolved once, logged by the trainer."""

    fsdp: bool
    compile: bool
    compile_scope: str  # "blocks" (per-block compile) or "loss" (the whole loss as one graph)
    param_dtype: torch.dtype
    draw_groups: int  # the world size whose draws this run reproduces
    cuda_graphs: str | None = None  # "loss": the whole-loss compile as CUDA graphs; "step": the whole step captured

    @property
    def compile_loss(self) -> bool:
        return self.compile and self.compile_scope == "loss"

    @classmethod
    def resolve(cls, cfg: TrainConfig, device: torch.device, world: int) -> StepPlan:
        run, par = cfg.run, cfg.parallel
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
            if par.fsdp:
                raise ValueError(
                    "run.objective=meanflow cannot use parallel.fsdp=true: the JVP does not go through FSDP2"
                )
            fsdp = False
        else:
            fsdp = par.fsdp if par.fsdp is not None else (world > 1 or device.type == "cuda")
            if world > 1 and not fsdp:
                raise ValueError(
                    "parallel.fsdp=false with several ranks is not supported: the engine shards with FSDP2"
                )
        use_compile = par.compile if par.compile is not None else device.type == "cuda"
        # MeanFlow compiles its whole loss (jvp included); SoFlow per block unless asked for the whole loss
        scope = par.compile_scope or ("loss" if meanflow else "blocks")
        if use_compile and scope == "loss" and not meanflow and (fsdp or draw_groups != world):
            raise ValueError(
                "parallel.compile_scope=loss compiles SoFlow's whole loss in one process without FSDP: it needs "
                f"world size 1, parallel.fsdp=false and one draw group (world {world}, fsdp {fsdp}, "
                f"draw_groups {draw_groups}); use parallel.compile_scope=blocks to compile with FSDP"
            )
        _check_cuda_graphs(cfg, device, world, fsdp, use_compile and scope == "loss")
        precision = resolve_precision(par.mixed_precision, device)
        return cls(fsdp, use_compile, scope, precision, draw_groups, par.cuda_graphs)


def _check_cuda_graphs(cfg: TrainConfig, device: torch.device, world: int, fsdp: bool, loss_compiled: bool) -> None:
    """What each ``parallel.cuda_graphs`` route needs; one error naming the first thing missing."""
    graphs = cfg.parallel.cuda_graphs
    if graphs is None:
        return
    need = None
    if device.type != "cuda":
        need = f"a CUDA device (this is {device.type})"
    elif graphs == "loss" and not loss_compiled:
        need = "parallel.compile=true and parallel.compile_scope=loss: it replays the whole-loss compile"
    elif graphs == "step" and (fsdp or world > 1):
        need = "one process without FSDP (FSDP2 runs host logic around every block): world size 1, parallel.fsdp=false"
    elif graphs == "step" and loss_compiled:
        need = "the eager or per-block compiled loss (for the whole-loss compile, use parallel.cuda_graphs=loss)"
    elif graphs == "step" and cfg.optim.warmup_steps:
        need = "a constant learning rate, optim.warmup_steps=0: the captured optimiser step keeps the lr it saw"
    if need:
        raise ValueError(f"parallel.cuda_graphs={graphs} needs {need}")


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
        augment: ``soflow_fast.data.augment.EDMAugment`` or None. Its parameters are drawn for the whole
            global batch after the objective's draws; this rank augments its rows (r, r + W, ... as the
            loader deals them).
        augment_labels: whether the labels of ``augment`` reach every network call (a model that embeds
            them: its config's ``embeds_augment_labels()``).
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
        augment=None,
        augment_labels: bool = False,
    ):
        self.model, self.objective, self.plan = model, objective, plan
        self.optimizer, self.scheduler, self.ema = optimizer, scheduler, ema
        self.rank, self.world, self.device = dist_info.rank, dist_info.world_size, dist_info.device
        self.global_batch, self.seed, self.grad_clip = global_batch, seed, grad_clip
        self.log_keys = objective.log_keys
        # cuda_graphs=loss: the compiled forward and backward are replayed instead of launched kernel by kernel
        graphed_loss = plan.cuda_graphs == "loss"
        options = {"mode": "reduce-overhead"} if graphed_loss else None
        self.loss_fn = objective.loss_from_draws
        if plan.compile_loss:
            self.loss_fn = CompiledLoss(objective.loss_from_draws, options, probe_backward=not graphed_loss)
        # under FSDP the parameters run in param_dtype already; otherwise low precision is autocast
        low = plan.param_dtype != torch.float32 and not plan.fsdp
        # (a captured step keeps no autocast weight cache: its casts must be recorded in the graph)
        cache = plan.cuda_graphs != "step"
        self.autocast = nullcontext()
        if low:
            self.autocast = torch.autocast(self.device.type, plan.param_dtype, cache_enabled=cache)
        # replicas (MeanFlow on several ranks) average their gradients by hand
        self.allreduce_grads = not plan.fsdp and self.world > 1
        self.generator = torch.Generator(self.device)
        self.augment = augment
        # dropout draws from the default generator, which a checkpoint does not keep: each step seeds it
        self.seed_dropout = any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules())
        self.augment_labels = augment is not None and augment_labels
        if self.augment_labels and isinstance(objective, MeanFlowObjective):
            raise ValueError("run.objective=meanflow does not pass augmentation labels to the network: use a DiT")
        # cuda_graphs=step: loss, backward, clipping and optimiser step replay as one CUDA graph
        self.graph = StepGraph(self._update_from_flat) if plan.cuda_graphs == "step" else None
        if self.graph is not None and self.seed_dropout:
            raise ValueError(
                "parallel.cuda_graphs=step cannot capture this network's dropout (its loss forks the RNG state "
                "on the host): leave parallel.cuda_graphs unset, or use loss"
            )
        self._layout: tuple | None = None  # how a step's inputs flatten for the graph
        self.teacher_note: str | None = None  # what the teacher is (``build`` sets it in teacher mode), for the log

    @classmethod
    def build(cls, cfg: TrainConfig, model: nn.Module, dist_info: DistInfo, plan: StepPlan | None = None) -> TrainStep:
        """Wire ``model`` in place for ``cfg`` on this world and build the step around it."""
        plan = plan or StepPlan.resolve(cfg, dist_info.device, dist_info.world_size)
        parallelize(
            model,
            cfg.model,
            device=dist_info.device,
            world_size=dist_info.world_size,
            compile=plan.compile and plan.compile_scope == "blocks",
            fsdp=plan.fsdp,
            activation_checkpointing=cfg.parallel.activation_checkpointing,
            param_dtype=plan.param_dtype,
        )
        teacher, note = None, None
        if cfg.run.teacher is not None:
            from soflow_fast.teacher import load_teacher

            teacher, note = load_teacher(cfg, dist_info.device, plan.param_dtype, plan.fsdp)
        # a captured step keeps its optimiser step counts on the device
        capturable = cfg.parallel.cuda_graphs == "step"
        optimizer = cfg.optim.build(model.parameters(), dist_info.device, capturable=capturable)
        augment = None
        if cfg.data.augment == "edm":
            from soflow_fast.data.augment import EDMAugment

            augment = EDMAugment()
        step = cls(
            model,
            build_objective(cfg, teacher),
            optimizer,
            cfg.optim.schedule(optimizer),
            cfg.ema.build(model),
            plan,
            dist_info=dist_info,
            global_batch=cfg.run.batch_size,
            seed=cfg.run.seed,
            grad_clip=cfg.optim.grad_clip,
            augment=augment,
            augment_labels=cfg.model.embeds_augment_labels(),
        )
        step.teacher_note = note
        return step

    def split_warning(self, cfg: TrainConfig) -> str | None:
        """A warning when SoFlow's flow-matching share of a draw group rounds to no rows."""
        soflow, per_group = cfg.soflow, cfg.run.batch_size // self.plan.draw_groups
        if cfg.run.objective == "soflow" and soflow.velocity_loss_ratio > 0:
            if int(soflow.velocity_loss_ratio * per_group) == 0:
                return (
                    f"warning: {per_group} row(s) per draw group x soflow.velocity_loss_ratio="
                    f"{soflow.velocity_loss_ratio:g} rounds to no flow-matching rows: only the consistency loss "
                    "trains; raise run.batch_size (or lower the world size / run.draw_groups)"
                )
        return None

    def inputs(self, x: torch.Tensor, y: torch.Tensor | None, step: int):
        """Step ``step``'s inputs to the loss on this rank: (x, y, draws, model_kwargs), x augmented."""
        G = self.plan.draw_groups
        if self.plan.cuda_graphs == "loss":  # a new iteration: the graphs' output buffers of the last one are reused
            torch.compiler.cudagraph_mark_step_begin()
        self.generator.manual_seed(step_seed(self.seed, step))
        if self.seed_dropout:  # the masks of step k on rank r are a function of (seed, k, r): resumes replay them
            torch.manual_seed((step_seed(self.seed, step) + 104_729 * (self.rank + 1)) % (2**63 - 1))
        shape = (self.global_batch, *x.shape[1:])
        draws = self.objective.draw_batch(shape, self.device, x.dtype, y is not None, step, self.generator, groups=G)
        kwargs = None
        if self.augment is not None:
            rows = slice(self.rank, None, self.world)
            x, labels = self.augment(x, generator=self.generator, rows=rows, total=self.global_batch)
            kwargs = {"augment_labels": labels} if self.augment_labels else None
        return x, y, draws, kwargs

    def loss(self, x: torch.Tensor, y: torch.Tensor | None, step: int):
        """This rank's loss and logs at step ``step`` (no backward)."""
        return self._loss(*self.inputs(x, y, step))

    def _loss(self, x, y, draws, kwargs):
        with self.autocast:
            if self.plan.draw_groups == self.world:  # one group per rank: this rank's rows are its group
                extra = () if kwargs is None else (kwargs,)
                return self.loss_fn(self.model, x, y, draws.group(self.rank), *extra)
            # one process standing in for G ranks
            return mean_over_groups(self.loss_fn, self.model, x, y, draws, kwargs)

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None, step: int) -> dict[str, torch.Tensor]:
        inputs = self.inputs(x, y, step)
        logs = self._update(*inputs) if self.graph is None else self.graph(*self._flatten(*inputs))
        self.scheduler.step()
        self.ema.update(self.model)
        return logs

    def _update(self, x, y, draws, kwargs) -> dict[str, torch.Tensor]:
        """Loss, backward, (gradient all-reduce), clipping and the optimiser step: what cuda_graphs=step captures."""
        loss, logs = self._loss(x, y, draws, kwargs)
        if self.plan.cuda_graphs == "loss":
            # the logs outlive this step; the next overwrites the graph's outputs
            logs = {k: v.detach().clone() for k, v in logs.items()}
        loss.backward()
        if self.allreduce_grads:
            self._allreduce_grads()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return logs

    def _flatten(self, x, y, draws, kwargs) -> list:
        """The step's inputs as one flat list (tensors, and values a captured step needs unchanged)."""
        names = tuple(f.name for f in dataclasses.fields(draws))
        keys = None if kwargs is None else tuple(kwargs)
        self._layout = (type(draws), names, keys)
        return [x, y, *(getattr(draws, n) for n in names), *(kwargs or {}).values()]

    def _update_from_flat(self, *flat) -> dict[str, torch.Tensor]:
        draws_type, names, keys = self._layout
        draws = draws_type(**dict(zip(names, flat[2 : 2 + len(names)], strict=True)))
        kwargs = None if keys is None else dict(zip(keys, flat[2 + len(names) :], strict=True))
        return {k: v.detach() for k, v in self._update(flat[0], flat[1], draws, kwargs).items()}

    def _allreduce_grads(self) -> None:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        torch._foreach_copy_(
            grads, [v.view_as(g) for v, g in zip(flat.split([g.numel() for g in grads]), grads, strict=True)]
        )


# parallel.sync_debug leaves the first steps of a run unchecked: compiling and allocator warm-up may sync.
SYNC_DEBUG_WARMUP = 3


class StepMetrics:
    """Sums of the step logs and a sticky non-finite flag, kept on the device between logging steps."""

    def __init__(self, keys: tuple[str, ...], device: torch.device):
        self.keys = keys
        self.sums = torch.zeros(len(keys), device=device, dtype=torch.float64)
        self.nonfinite = torch.zeros((), device=device)
        self._zero = torch.zeros((), device=device)  # for a log a step lacks (no FM rows, say)
        self.count = 0  # steps summed, a host int

    def add(self, logs: dict[str, torch.Tensor]) -> None:
        self.sums += torch.stack([logs.get(k, self._zero).double() for k in self.keys])
        self.nonfinite = torch.maximum(self.nonfinite, (~torch.isfinite(logs["loss"])).float())
        self.count += 1

    def means(self, world: int) -> dict[str, float]:
        """The mean of each log over the steps since the last call and over ranks; resets the sums."""
        if world > 1:
            dist.all_reduce(self.sums)
            self.sums /= world
        means = dict(zip(self.keys, (self.sums / max(self.count, 1)).tolist(), strict=True))  # host sync
        self.sums.zero_()
        self.count = 0
        return means

    def diverged(self, world: int) -> bool:
        """Whether any rank saw a non-finite loss so far (a host sync)."""
        bad = self.nonfinite.clone()
        if world > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bool(bad.item())


class SyncCheck:
    """``with check(step):`` runs the block under ``torch.cuda.set_sync_debug_mode("error")`` from step
    ``start`` on, when enabled: a host sync inside it raises instead of silently stalling the GPU."""

    def __init__(self, enabled: bool, start: int):
        self.enabled, self.start = enabled, start

    @contextmanager
    def __call__(self, step: int):
        if not (self.enabled and step >= self.start):
            yield
            return
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")
