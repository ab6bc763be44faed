"""Shared pieces of the step and sampling benchmarks: cases, step builders, meters, a memory probe.

The step builders live here (not in the test files) because the CPU memory probe runs the very
same step in a child process: ``python benchmarks/_util.py rss VARIANT CASE_JSON WARMUP``.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils.flop_counter import FlopCounterMode

if __package__ in (None, ""):  # run as a script by the memory probe
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from soflow_fast import ops
from soflow_fast.config import RunConfig, TrainConfig
from soflow_fast.ema import EMAConfig, extension_available
from soflow_fast.models import ModelConfig, build_model
from soflow_fast.objective import SoFlowObjective
from soflow_fast.parallel import DistInfo, ParallelConfig
from soflow_fast.step import StepPlan, TrainStep

# ----------------------------------------------------------------------------------------------
# Cases and variants
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    model: str
    input_size: int
    batch: int
    num_classes: int
    in_channels: int = 4
    device: str = "cpu"

    @property
    def id(self) -> str:
        return f"{self.device}-{self.model.replace('/', '')}-{self.input_size}px-b{self.batch}"

    @property
    def label(self) -> str:
        return f"{self.model} {self.input_size}x{self.input_size}x{self.in_channels} b{self.batch}"

    @property
    def short(self) -> str:
        """The issue's name of a size: ``B2-b64`` for DiT-B/2 at batch 64 (the device and resolution left out)."""
        return short_case(self.model, self.batch)


def short_case(model: str, batch: int) -> str:
    return f"{model.removeprefix('DiT-').replace('/', '')}-b{batch}"


# CPU: DiT-S/4 at 16x16 is the headline size (16 tokens, 33M parameters, the "DiT-S at batch 64").
CPU_CASES = [
    Case("DiT-T/2", 8, 16, 10),
    Case("DiT-T/2", 8, 64, 10),
    Case("DiT-S/4", 16, 64, 10),
]
# GPU: the sizes of issue #18 (ImageNet 256 latents, 32x32x4, 1000 classes, bf16): B2-b64, B2-b256 (the
# imagenet-b2 preset's batch) and XL2-b128. kernel_sweep.py profiles GPU_CASES[0].
GPU_CASES = [
    Case("DiT-B/2", 32, 64, 1000, device="cuda"),
    Case("DiT-B/2", 32, 256, 1000, device="cuda"),
    Case("DiT-XL/2", 32, 128, 1000, device="cuda"),
]
HEADLINE_CASE = CPU_CASES[2]
# Compiling on two CPU cores costs 30 s (per block) to 1.5-2 minutes (a whole loss) a graph from a cold
# cache, and the default run must fit 10 minutes: the two whole-loss compiles (SoFlow's, MeanFlow's) run
# once each, at DiT-S/4 b64, inside test_soflow_vs_meanflow[compiled], and no compiled train-step row
# runs. SOFLOW_BENCH_CPU_COMPILED=all adds every compiled train-step row (the trainer's per-block compile
# among them) at every CPU size, for a separate, longer run (results/cpu_compiled_dit_s.json).
CPU_COMPILE_ALL = os.environ.get("SOFLOW_BENCH_CPU_COMPILED") == "all"
# trainer-default on CPU is the step of soflow-reference-eager (StepPlan.resolve: no compile, no FSDP, fp32),
# so the default run leaves it out; SOFLOW_BENCH_CPU_DEFAULT=1 measures it anyway (the GPU suite's dry run).
CPU_TRAINER_DEFAULT = os.environ.get("SOFLOW_BENCH_CPU_DEFAULT") == "1"


# GPU rows left out, by (variant, Case.short). Estimates below scale the H100 run in benchmarks/results/h100
# (B2-b64, XL2-b32) by batch; they are reasons to skip, not results.
_EAGER_JVP = (
    "does not fit: eager MeanFlow's JVP peaked at 37 GiB at B2-b64 on the H100 and did not fit its peak probe in "
    "80 GiB at XL2-b32; four times the batch needs more than a 141 GB H200 (meanflow-compiled runs here)"
)
GPU_SKIPPED = {
    ("meanflow-eager", "B2-b256"): _EAGER_JVP,
    ("meanflow-eager", "XL2-b128"): _EAGER_JVP,
    ("authors-loop", "XL2-b128"): (
        "GPU suite budget: the fp32 per-term baseline takes about 3.7 s a step at XL2-b128 (0.93 s at XL2-b32 on "
        "the H100) and is not a bf16 path; measured at B/2"
    ),
}


@dataclass(frozen=True)
class Variant:
    objective: str  # "soflow" (batched loss), "meanflow" or "authors" (per-term loss)
    compiled: bool | None = False  # None: StepPlan.resolve decides (on for CUDA, off on CPU)
    fused: bool | str = False  # the fused kernels: True (all), False, or one group of soflow_fast.ops.FUSED_GROUPS
    whole_loss: bool = False  # compile the whole loss as one graph (parallel.compile_scope=loss)
    default: bool = False  # the trainer's defaults: parallel.compile, compile_scope, fsdp, mixed_precision unset
    cuda_graphs: str | None = None  # parallel.cuda_graphs: "loss" (the whole-loss compile) or "step" (the whole step)

    def compiles(self, device: str) -> bool:
        """Whether this variant compiles on ``device`` (what StepPlan.resolve gives for ``compiled=None``)."""
        return self.compiled if self.compiled is not None else device == "cuda"


VARIANTS = {
    # What `python soflow_fast/train.py` runs with no flags (parallel.use_fused_kernels=false): StepPlan.resolve
    # decides. On CUDA: per-block compile, FSDP2 even at world 1 (bf16 parameters, fp32 gradient
    # reduction) in a one-process group that BenchStep opens as the trainer's init_distributed does;
    # on CPU: eager fp32 without FSDP, the step of soflow-reference-eager.
    "trainer-default": Variant("soflow", compiled=None, default=True),
    # the same path with --use_fused_kernels=true: the fused ops on vs off in the default path
    "trainer-default-fused": Variant("soflow", compiled=None, fused=True, default=True),
    "soflow-reference-eager": Variant("soflow"),
    "soflow-reference-compiled": Variant("soflow", compiled=True),
    "soflow-fused-eager": Variant("soflow", fused=True),
    "soflow-fused-compiled": Variant("soflow", compiled=True, fused=True),
    "soflow-loss-compiled": Variant("soflow", compiled=True, whole_loss=True),
    "soflow-loss-graphs": Variant("soflow", compiled=True, whole_loss=True, cuda_graphs="loss"),
    # the whole eager step in one CUDA graph, with the reference ops and with the fused ops (whose GPU time
    # did not show in the launch-bound eager step)
    "soflow-step-graphs": Variant("soflow", cuda_graphs="step"),
    "soflow-fused-step-graphs": Variant("soflow", fused=True, cuda_graphs="step"),
    # the whole-loss compile with the fused ops inside it, all of them or the LayerNorms only (GPU suite:
    # only when COMPILED_VARIANTS names them)
    "soflow-fused-loss-compiled": Variant("soflow", compiled=True, fused=True, whole_loss=True),
    "soflow-fusedln-loss-compiled": Variant("soflow", compiled=True, fused="layer_norms", whole_loss=True),
    "meanflow-eager": Variant("meanflow"),
    "meanflow-compiled": Variant("meanflow", compiled=True),
    "authors-loop": Variant("authors"),
}


def skip_reason(variant: str, case: Case, cuda_available: bool | None = None, headline: bool = False) -> str | None:
    """Why (variant, case) is not measured, or None. ``cuda_available`` defaults to this process's view;
    ``headline`` asks for the head-to-head test, which runs the whole-loss compiles on CPU."""
    v = VARIANTS[variant]
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if case.device == "cuda" and not cuda_available:
        return "GPU size: needs CUDA"
    if case.device == "cpu" and v.fused:
        return "fused kernels run on CPU only under the Triton interpreter: no meaningful timing"
    if case.device == "cpu" and v.cuda_graphs is not None:
        return "CUDA graphs: CUDA only"
    if case.device == "cpu" and v.default and not CPU_TRAINER_DEFAULT:
        return (
            "on CPU the trainer's default is eager fp32 without FSDP, the step of soflow-reference-eager; "
            "SOFLOW_BENCH_CPU_DEFAULT=1 measures it anyway"
        )
    if case.device == "cpu" and v.compiles("cpu") and not (CPU_COMPILE_ALL or headline):
        return (
            "CPU compile budget: the whole-loss compiles run in test_soflow_vs_meanflow[compiled]; "
            "SOFLOW_BENCH_CPU_COMPILED=all adds the compiled rows"
        )
    if case.device == "cuda" and (variant, case.short) in GPU_SKIPPED:
        return GPU_SKIPPED[variant, case.short]
    return None


# ----------------------------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------------------------


def randomize_zero_init(model: torch.nn.Module, std: float = 0.02, seed: int = 0) -> None:
    """Give adaLN-Zero's zeroed layers small random weights, as after some training.

    A freshly initialised DiT is the identity in every block and outputs zero, which makes the
    samplers' outputs trivial; the cost of the math does not depend on it.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)


def variant_config(variant: str, case: Case) -> TrainConfig:
    """The training config that runs ``variant`` at ``case`` in one process: without FSDP, except the
    ``trainer-default`` variants, which leave parallel.compile, compile_scope, fsdp and mixed_precision at
    the trainer's defaults (None / auto) for ``StepPlan.resolve`` to decide on the case's device."""
    v = VARIANTS[variant]
    model = ModelConfig.from_dict(
        dict(model=case.model, input_size=case.input_size, in_channels=case.in_channels, num_classes=case.num_classes)
    )
    if v.default:
        parallel = ParallelConfig(
            use_fused_kernels=bool(v.fused), fused_ops=v.fused if isinstance(v.fused, str) else "all"
        )
    else:
        parallel = ParallelConfig(
            fsdp=False,
            compile=v.compiled,
            compile_scope=("loss" if v.whole_loss else "blocks") if v.objective == "soflow" else None,
            cuda_graphs=v.cuda_graphs,
        )
    run = RunConfig(objective=v.objective, batch_size=case.batch)
    return TrainConfig(model=model, run=run, parallel=parallel, ema=EMAConfig(ema_decays=(0.9999,)))


def ensure_process_group(device: torch.device) -> None:
    """A one-process group for FSDP2 at world 1, as ``soflow_fast.parallel.init_distributed`` opens for a
    plain ``python train.py``: nccl (bound to the device) on CUDA, gloo on CPU. An in-process store
    replaces its env:// rendezvous, so that nothing in os.environ (RANK, MASTER_PORT) leaks into the
    processes that benchmarks and tests start afterwards. Kept open for the rest of the process."""
    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise RuntimeError(f"BenchStep runs one process; found a process group of {dist.get_world_size()}")
        return
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=device)
    else:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


class AuthorsStep:
    """The authors' step structure, a baseline of its own: one network call per loss term on the
    FM/SCM split of the batch, fp32, torch's default AdamW and a per-parameter Python EMA loop."""

    def __init__(self, model: torch.nn.Module, num_classes: int, device: torch.device, seed: int):
        self.model, self.device = model, device
        self.objective = SoFlowObjective(num_classes=num_classes)
        self.optimizer = torch.optim.AdamW(list(model.parameters()), lr=1e-4, betas=(0.9, 0.99))
        self.shadow = [p.detach().clone() for p in model.parameters()]
        self.ema = None
        self.generator = torch.Generator(device).manual_seed(seed + 2)
        self.plan = None

    def loss(self, x: torch.Tensor, y: torch.Tensor, step: int):
        obj = self.objective
        d = obj.draw(x, y, step, self.generator)
        n, B = d.n_fm, x.shape[0]
        fm, _, _ = obj.velocity_loss(self.model, x[:n], d.noise[:n], d.t[:n], y[:n], d.cfg_mask[:n])
        sl = slice(n, B)
        scm, _, _ = obj.consistency_loss(
            self.model, x[sl], d.noise[sl], d.t[sl], d.l[sl], d.s[sl], y[sl], d.cfg_mask[sl]
        )
        loss = fm * (n / B) + scm * ((B - n) / B)
        return loss, {"loss": loss.detach()}

    def __call__(self, x: torch.Tensor, y: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        loss, logs = self.loss(x, y, step)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for e, p in zip(self.shadow, self.model.parameters(), strict=True):
                e.mul_(0.9999).add_(p, alpha=1 - 0.9999)
        return logs


class BenchStep:
    """A variant's training step on a fixed synthetic batch.

    Our variants run ``soflow_fast.step.TrainStep``, built from the variant's config by
    ``TrainStep.build`` exactly as ``train.py`` builds it (one process): the trainer's optimiser
    (foreach AdamW on CPU, fused on CUDA), ``soflow_fast.ema.EMA``, bf16 autocast on CUDA without FSDP.
    The ``trainer-default`` variants take the plan ``StepPlan.resolve`` gives the trainer's defaults; on
    CUDA that is FSDP2 at world 1 (bf16 parameters), in a one-process group (``ensure_process_group``).
    ``authors-loop`` runs ``AuthorsStep``.
    """

    def __init__(self, variant: str, case: Case, seed: int = 0):
        self.variant, self.case, self.v = variant, case, VARIANTS[variant]
        self.device = torch.device(case.device)
        torch.manual_seed(seed)
        self.model = build_model(
            case.model, input_size=case.input_size, in_channels=case.in_channels, num_classes=case.num_classes
        ).to(self.device)
        randomize_zero_init(self.model, seed=seed)
        self.num_params = sum(p.numel() for p in self.model.parameters())
        g = torch.Generator(self.device).manual_seed(seed + 1)
        shape = (case.batch, case.in_channels, case.input_size, case.input_size)
        self.x = torch.randn(shape, generator=g, device=self.device)
        self.y = torch.randint(0, case.num_classes, (case.batch,), generator=g, device=self.device)
        self.k = 0
        if self.v.objective == "authors":
            self.step_fn = AuthorsStep(self.model, case.num_classes, self.device, seed)
            self.dtype = torch.float32
            self.compiled = False
        else:
            cfg = variant_config(variant, case)
            cfg.run.seed = seed
            plan = StepPlan.resolve(cfg, self.device, 1)
            if plan.fsdp:
                ensure_process_group(self.device)
            self.step_fn = TrainStep.build(cfg, self.model, DistInfo(0, 1, 0, self.device), plan)
            self.dtype = plan.param_dtype
            self.compiled = plan.compile
        self.ema = self.step_fn.ema
        self.optimizer = self.step_fn.optimizer

    def loss(self, eager: bool = False) -> torch.Tensor:
        """The variant's loss at the current step (``eager`` bypasses a whole-loss compile, for counting FLOPs)."""
        step_fn = self.step_fn
        compiled = getattr(step_fn, "loss_fn", None)
        if eager and compiled is not None:
            step_fn.loss_fn = step_fn.objective.loss_from_draws
        try:
            with ops.set_use_fused_kernels(self.v.fused):  # variants share one process: restored after
                loss, _ = step_fn.loss(self.x, self.y, self.k)
        finally:
            if eager and compiled is not None:
                step_fn.loss_fn = compiled
        self._check_compiled()
        return loss

    @property
    def warmup_steps(self) -> int:
        """Untimed steps before the timed ones: a first step (compiles included) and a settled one; under
        CUDA graphs, until the steps replay."""
        if self.v.cuda_graphs == "step":
            return self.step_fn.graph.warmup + 2  # the eager warm-up steps, the capture, one replay
        if self.v.cuda_graphs == "loss":
            return 4  # cudagraph trees: a warm-up run, the recording, replays
        return 2

    def step(self) -> torch.Tensor:
        with ops.set_use_fused_kernels(self.v.fused):  # variants share one process: restored after
            logs = self.step_fn(self.x, self.y, self.k)
        self._check_compiled()
        self.k += 1
        return logs["loss"]

    def _check_compiled(self) -> None:
        error = getattr(getattr(self.step_fn, "loss_fn", None), "error", None)
        if error is not None:
            raise RuntimeError(f"{self.variant}: the whole-loss compile fell back to eager: {error}")

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    # -- measurements outside the timed region (no optimiser step: the weights stay) --

    def count_flops(self) -> int:
        """Model FLOPs of one loss + backward: what the step has to compute, counted on the eager path.

        Matmuls and convolutions, and attention where torch's counter knows the kernel (CUDA SDPA,
        the math path; not the CPU flash kernel). No-grad guidance and target passes count. Matmuls
        against a broadcast zero do not (``ModelFlopCounter``): eager forward-mode AD runs one per
        linear layer of MeanFlow's JVP, a zero tangent for the weight, which the compiled graph drops.
        """
        with ModelFlopCounter(display=False) as counter, _uncompiled(self.model):
            loss = self.loss(eager=True)
            loss.backward()
        self.optimizer.zero_grad(set_to_none=True)
        self.zero_tangent_flops = int(counter.skipped_flops)
        return int(counter.get_total_flops())

    def saved_bytes(self) -> int:
        """Activation bytes held for backward by one loss (unique storages, parameters excluded)."""
        meter = SavedTensorMeter(exclude=[*self.model.parameters(), *self.model.buffers()])
        with meter:
            loss = self.loss()
        loss.backward()
        self.optimizer.zero_grad(set_to_none=True)
        return meter.nbytes

    def state_bytes(self) -> int:
        """Parameters, gradients (allocated in every step), optimiser state and EMA shadows (under FSDP2
        at world 1 the shards are whole tensors, so these are the same bytes)."""
        params = list(self.model.parameters())
        n = 2 * sum(p.nbytes for p in params)
        n += sum(t.nbytes for s in self.optimizer.state.values() for t in s.values() if torch.is_tensor(t))
        if self.ema is not None:
            n += sum(t.nbytes for shadow in self.ema.shadows for t in shadow.values())
        else:
            n += sum(t.nbytes for t in self.step_fn.shadow)
        return n

    def info(self) -> dict:
        return {
            "variant": self.variant,
            "case": self.case.id,
            "model": self.case.model,
            "input": f"{self.case.in_channels}x{self.case.input_size}x{self.case.input_size}",
            "batch": self.case.batch,
            "num_classes": self.case.num_classes,
            "params": self.num_params,
            "dtype": str(self.dtype).removeprefix("torch."),
            "ema_extension": self.ema is not None and extension_available(self.device),
            **self.plan_info(),
        }

    def plan_info(self) -> dict:
        """The resolved plan of a TrainStep variant (what the trainer logs at its start); {} for authors-loop."""
        plan = getattr(self.step_fn, "plan", None)
        if plan is None:
            return {}
        return {"plan_fsdp": plan.fsdp, "plan_compile": plan.compile, "plan_compile_scope": plan.compile_scope}


@contextlib.contextmanager
def _uncompiled(model: torch.nn.Module):
    """Bypass ``Module.compile`` on the blocks inside the block: compiled code hides its ops from FlopCounterMode."""
    blocks = [(b, b.__dict__.get("_compiled_call_impl")) for b in getattr(model, "blocks", ())]
    for b, _ in blocks:
        b._compiled_call_impl = None
    try:
        yield
    finally:
        for b, impl in blocks:
            b._compiled_call_impl = impl


# ----------------------------------------------------------------------------------------------
# Meters
# ----------------------------------------------------------------------------------------------


def _broadcast_zero(x) -> bool:
    """A tensor expanded from one zero (every stride 0): forward-mode AD's materialised zero tangent."""
    if not (torch.is_tensor(x) and x.dim() > 0 and x.numel() > 1 and all(st == 0 for st in x.stride())):
        return False
    return not bool(x.as_strided((1,), (1,)).any())


class ModelFlopCounter(FlopCounterMode):
    """torch's FlopCounterMode, minus the matmuls that multiply by a broadcast zero.

    Eager ``torch.func.jvp`` through ``nn.Linear`` applies addmm's forward-AD formula with a zero
    tangent for the weight, ``zeros(()).expand(out, in)``, and really runs that matmul; a compiled
    graph does not. Left in, it would count a third forward of work in every JVP linear layer as
    useful, inflating MeanFlow's FLOPs (and so its MFU) by about a sixth. ``skipped_flops`` keeps the sum.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skipped_flops = 0

    def _count_flops(self, func_packet, out, args, kwargs):
        if func_packet in self.flop_registry and any(_broadcast_zero(a) for a in args):
            self.skipped_flops += self.flop_registry[func_packet](*args, **kwargs, out_val=out)
            return out
        return super()._count_flops(func_packet, out, args, kwargs)


class SavedTensorMeter(torch.autograd.graph.saved_tensors_hooks):
    """Sums the bytes of the distinct storages that autograd keeps for backward inside the block.

    Storages of ``exclude`` (the model's parameters and buffers, resident anyway) do not count, so
    the sum is the activation memory a step holds between its forward and its backward.
    """

    def __init__(self, exclude: list[torch.Tensor] = ()):
        # FSDP2's parameters are DTensors: their storage is the local shard's. The unsharded (bf16)
        # parameters that FSDP2 gathers for a forward are new storages and count as saved, as the
        # bf16 weight casts of autocast do without FSDP.
        local = [t.to_local() if isinstance(t, DTensor) else t for t in exclude]
        self.skip = {(t.device, t.untyped_storage().data_ptr()) for t in local}
        self.storages: dict[tuple, int] = {}
        self.unnamed = 0  # saved tensors without a storage pointer, counted by their size
        super().__init__(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        base = t
        # torch.func.jvp (MeanFlow) saves functorch wrappers, whose storage is the wrapped tensor's
        while torch._C._functorch.is_functorch_wrapped_tensor(base):
            base = torch._C._functorch.get_unwrapped(base)
        try:
            key = (base.device, base.untyped_storage().data_ptr())
            if key not in self.skip:
                self.storages[key] = base.untyped_storage().nbytes()
        except RuntimeError:  # no storage to name: count the tensor itself
            self.storages[("tensor", id(t))] = t.numel() * t.element_size()
            self.unnamed += 1
        return t

    @property
    def nbytes(self) -> int:
        return sum(self.storages.values())


def _busy_jiffies() -> int | None:
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return user + nice + system + irq + softirq + steal


class CpuMeter:
    """CPU time that other processes used on this machine during the block, in cores.

    A benchmark on two cores is only as good as the other load on them: 0.0 means the machine was
    ours; 0.5 means half a core went to someone else on average.
    """

    def __enter__(self):
        self.start = (time.perf_counter(), _busy_jiffies(), _own_cpu_seconds(), os.getloadavg()[0])
        return self

    def __exit__(self, *exc) -> None:
        wall0, busy0, own0, self.load_start = self.start
        wall, busy, own = time.perf_counter() - wall0, _busy_jiffies(), _own_cpu_seconds() - own0
        self.load_end = os.getloadavg()[0]
        self.other_cores = None
        if busy is not None and busy0 is not None and wall > 0:
            hz = os.sysconf("SC_CLK_TCK")
            self.other_cores = max(0.0, ((busy - busy0) / hz - own) / wall)

    def info(self) -> dict:
        out = {"loadavg_1m_start": round(self.load_start, 2), "loadavg_1m_end": round(self.load_end, 2)}
        if self.other_cores is not None:
            out["other_load_cores"] = round(self.other_cores, 2)
        return out


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def matmul_peak_tflops(device: str) -> dict:
    """Measured dense matmul peak: bf16 8192^3 on CUDA, fp32 2048^3 on CPU (median of timed runs)."""
    if device == "cuda":
        n, dtype, reps = 8192, torch.bfloat16, 20
    else:
        n, dtype, reps = 2048, torch.float32, 5
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for i in range(reps + 2):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.matmul(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    med = sorted(times)[len(times) // 2]
    return {"tflops": 2 * n**3 / med / 1e12, "shape": n, "dtype": str(dtype).removeprefix("torch.")}


def device_name(device: str) -> str:
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    with contextlib.suppress(OSError):  # no /proc/cpuinfo: the platform's name below
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def environment() -> dict:
    """What a result needs to be compared with another: device, versions, threads, date."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name("cuda" if torch.cuda.is_available() else "cpu"),
        "cpu": device_name("cpu"),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


# ----------------------------------------------------------------------------------------------
# CPU memory probe: peak resident memory of one step, in a child process
# ----------------------------------------------------------------------------------------------


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _probe(variant: str, case: Case, warmup: int) -> dict:
    runner = BenchStep(variant, case)
    for _ in range(warmup):
        runner.step()
    # VmHWM is reset to the current RSS, so the high-water mark below is this step's alone
    try:
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    before = _status_kib("VmRSS")
    loss = runner.step()
    peak = _status_kib("VmHWM")
    return {
        "rss_before_step_mib": before / 1024,
        "rss_peak_mib": peak / 1024,
        "rss_step_mib": (peak - before) / 1024,
        "hwm_reset": reset,
        "loss_finite": bool(torch.isfinite(loss)),
    }


def measure_rss(variant: str, case: Case, warmup: int = 1, timeout: float = 300) -> dict:
    """Run one step of (variant, case) in a fresh process and return its resident-memory peak.

    glibc's malloc otherwise keeps freed large blocks mapped (its mmap threshold adapts upwards);
    a fixed threshold hands them back at once, so the resident size tracks live tensors.
    """
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    cmd = [sys.executable, str(Path(__file__).resolve()), "rss", variant, json.dumps(asdict(case)), str(warmup)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "rss":
        print(json.dumps(_probe(sys.argv[2], Case(**json.loads(sys.argv[3])), int(sys.argv[4]))))
    else:
        sys.exit(f"usage: {sys.argv[0]} rss VARIANT CASE_JSON WARMUP")
