"""Ship a run's one-step sampler as one file that runs without this project: ``soflow-export RUN OUT.pt2``
(``torch.export`` + AOTInductor) or ``OUT.onnx`` (``torch.onnx``'s exporter).

The file holds the sampler, not only the network: inputs ``noise`` (B, *sample shape), ``labels`` (B,)
int64 or ``obs`` (B, width) float32 where the network is conditioned (the kind's ``condition()``), and
``renoise`` (B, nfe - 1, *sample shape) for a multi-step sampler in "renoise" mode; output ``samples``,
(B, *sample shape) float32, or (B, H, W, C) uint8 images when a VAE decoder is packed in. The batch is
dynamic. Guidance is the trained-in one (SoFlow trains it into the network: one conditional call per
step); each of the ``nfe`` steps is ``sampling.sample_steps``, the arithmetic ``sample`` runs, so the file
and ``sample`` agree for the same noise.

Loading needs only torch (``torch._inductor.aoti_load_package``) or onnxruntime; see docs/shipping.md
for what each runtime does with a bad input.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from torch import nn

from soflow_fast.files import atomic_write, refuse_existing
from soflow_fast.models import ModelConfig
from soflow_fast.objective import SoFlowConfig, SoFlowObjective
from soflow_fast.sampling import MODES, sample_steps

PACKAGE_SUFFIXES = (".pt2", ".onnx")
FORMAT = "soflow_fast.sampler.v1"
EXPORT_BATCH = 2  # the batch the graph is traced at; any batch >= 1 runs
ONNX_OPSET = 20
ONNX_MAX_BYTES = 2**31 - 1  # protobuf's limit on one .onnx file (weights included)
# With a VAE the batch is 1..63: diffusers' upsampler branches on the batch (a .contiguous() from 64 on, no
# other change), a graph holds one branch, and torch.export refuses a batch range that crosses it.
VAE_MAX_BATCH = 63


# ----------------------------------------------------------------------------------------------
# The sampler as a module
# ----------------------------------------------------------------------------------------------


class PackagedSampler(nn.Module):
    """noise (+ labels | obs) (+ renoise) -> samples: ``nfe`` steps of the trained network, then the
    VAE decoder and the cast to uint8 images when ``vae`` is given.

    Args:
        model: the network F(x, t, s, y), in eval mode.
        objective: the run's ``SoFlowObjective`` (its parameterisation and noising).
        model_config: the network's registry entry (sample shape, condition, labels accepted).
        nfe: network calls per sample.
        mode: "renoise" (the authors' multi-step sampler; takes ``renoise``) or "chained".
        vae: a diffusers ``AutoencoderKL`` whose latents the network generates, or None.
    """

    def __init__(
        self,
        model: nn.Module,
        objective: SoFlowObjective,
        model_config: ModelConfig,
        nfe: int = 1,
        mode: str = "renoise",
        vae: nn.Module | None = None,
    ):
        super().__init__()
        if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
            raise ValueError(f"nfe must be a positive integer, got {nfe!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
        self.model = model
        self.objective = objective
        self.sample_shape = tuple(model_config.sample_shape())
        condition = model_config.condition()
        self.condition_name, self.condition_size = (None, 0) if condition is None else condition
        self.num_classes = model_config.num_classes
        self.label_count = model_config.label_count()
        self.example_condition = model_config.condition_example
        self.nfe = nfe
        self.mode = mode
        self.vae = vae
        self.max_batch = None if vae is None else VAE_MAX_BATCH
        if vae is not None:
            channels = model_config.latent_channels()
            if channels is None:
                raise ValueError(f"a {model_config.LABEL} network's samples are no images: a VAE cannot decode them")
            if getattr(vae.config, "latent_channels", None) != channels:
                raise ValueError(
                    f"the VAE decodes {vae.config.latent_channels}-channel latents and the network makes {channels}"
                )
            self.vae_scale = float(getattr(vae.config, "scaling_factor", 0.18215))

    @property
    def takes_renoise(self) -> bool:
        return self.mode == "renoise" and self.nfe > 1

    def input_names(self) -> list[str]:
        """The inputs in the order the packaged graph takes them (AOTInductor's ``input_handles[i]``)."""
        names = ["noise"]
        if self.condition_name is not None:
            names.append(self.condition_name)
        if self.takes_renoise:
            names.append("renoise")
        return names

    def label_message(self) -> str:
        """What the graph raises for a label out of range (it names the input and the range)."""
        text = f"labels must be in [0, {self.label_count - 1}]"
        if self.label_count > self.num_classes:
            text += f" ({self.num_classes} is the null label: an unconditional sample)"
        return text

    def forward(
        self,
        noise: torch.Tensor,
        labels: torch.Tensor | None = None,
        obs: torch.Tensor | None = None,
        renoise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Samples from ``noise`` (B, *sample_shape).

        Args:
            noise: standard normal noise at t = 1.
            labels: (B,) int64 class labels, for a class-conditional network.
            obs: (B, width) float32 observations, for an observation-conditioned network.
            renoise: (B, nfe - 1, *sample_shape) standard normal noise; ``renoise[:, i]`` re-noises after
                step i (``sample``'s ``renoise[i]``).
        Returns:
            (B, *sample_shape) float32 samples, or (B, H, W, C) uint8 images with a VAE.
        """
        y = labels if self.condition_name == "labels" else obs
        if labels is not None:
            # the graph's own check: a runtime that can raise (AOTInductor) refuses the batch before the
            # embedding reads out of its table
            in_range = ((labels >= 0) & (labels < self.label_count)).all()
            torch._assert_async(in_range, self.label_message())
        x = sample_steps(
            self.model,
            self.objective,
            noise,
            y,
            self.nfe,
            self.mode,
            None if renoise is None else (lambda i: renoise[:, i]),
        )
        if self.vae is None:
            return x
        # soflow_fast.vae.decode, then soflow_fast.viz.to_uint8 of a 3-channel image, in one graph
        images = self.vae.decode(x / self.vae_scale).sample.float().clamp(-1, 1)  # (B, C, H * f, W * f)
        return ((images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)  # (B, H * f, W * f, C)

    def example_inputs(self, batch: int = EXPORT_BATCH) -> dict[str, torch.Tensor]:
        """Inputs for ``batch`` samples, keyed and ordered as ``input_names``, on the network's device."""
        device = next(self.model.parameters()).device
        g = torch.Generator().manual_seed(0)
        inputs = {"noise": torch.randn(batch, *self.sample_shape, generator=g)}
        if self.condition_name is not None:
            inputs[self.condition_name] = self.example_condition(batch)
        if self.takes_renoise:
            inputs["renoise"] = torch.randn(batch, self.nfe - 1, *self.sample_shape, generator=g)
        return {k: v.to(device) for k, v in inputs.items()}

    def describe(self) -> dict[str, str]:
        """What the file records about its inputs and output (AOTInductor metadata, ONNX metadata_props)."""
        shape = ", ".join(str(d) for d in self.sample_shape)
        docs = {"noise": f"float32 (batch, {shape}): standard normal noise at t = 1"}
        if self.condition_name == "labels":
            docs["labels"] = f"int64 (batch,): class labels; {self.label_message()}"
            labels_accepted = {"soflow.label_count": str(self.label_count)}
        elif self.condition_name == "obs":
            docs["obs"] = f"float32 (batch, {self.condition_size}): observations"
        if self.takes_renoise:
            docs["renoise"] = (
                f"float32 (batch, {self.nfe - 1}, {shape}): standard normal noise; [:, i] re-noises after step i"
            )
        if self.vae is None:
            docs["samples"] = f"float32 (batch, {shape}): the samples at t = 0"
        else:
            docs["samples"] = "uint8 (batch, height, width, channels): the VAE's decoded images"
        meta = {"soflow.format": FORMAT, "soflow.inputs": ",".join(self.input_names())}
        if self.condition_name == "labels":
            meta.update(labels_accepted)
        meta.update({f"soflow.input.{k}": v for k, v in docs.items() if k != "samples"})
        meta["soflow.output.samples"] = docs["samples"]
        meta.update({"soflow.nfe": str(self.nfe), "soflow.mode": self.mode})
        meta["soflow.batch"] = f"1..{self.max_batch}" if self.max_batch else "1 or more"
        # AOTInductor names a bad input by position only: say which input each position is
        meta.update({f"input_handles[{i}]": name for i, name in enumerate(self.input_names())})
        return meta


def build_sampler(model: nn.Module, model_config: ModelConfig, soflow: SoFlowConfig, **options) -> PackagedSampler:
    """The packaged sampler of a trained network, with its run's objective (as ``soflow-sample`` builds it);
    ``options``: ``PackagedSampler``'s ``nfe``, ``mode`` and ``vae``."""
    objective = SoFlowObjective(soflow, num_classes=model_config.num_classes or None)
    return PackagedSampler(model.eval(), objective, model_config, **options).eval()


# ----------------------------------------------------------------------------------------------
# Export and packaging
# ----------------------------------------------------------------------------------------------


def export_program(sampler: PackagedSampler, batch: int = EXPORT_BATCH) -> torch.export.ExportedProgram:
    """The sampler as a graph with a dynamic batch (1..``sampler.max_batch``): every input's first dimension."""
    inputs = sampler.example_inputs(batch)
    dim = torch.export.Dim("batch", min=1, **({"max": sampler.max_batch} if sampler.max_batch else {}))
    dynamic = {name: {0: dim} for name in inputs}
    # size-oblivious: the graph holds for a batch of 1 as for any other, not only for the traced one
    with torch.no_grad(), torch.fx.experimental._config.patch(backed_size_oblivious=True):
        return torch.export.export(sampler, (), inputs, dynamic_shapes=dynamic)


def write_pt2(program: torch.export.ExportedProgram, out: Path, metadata: dict[str, str], force: bool) -> Path:
    """An AOTInductor package at ``out`` (a .pt2 zip), written under a temporary name and renamed."""
    configs = {
        "aot_inductor.metadata": metadata,
        # the batch may be 1: AOTI_RUNTIME_CHECK_INPUTS otherwise refuses a dynamic size below 2
        "aot_inductor.check_lowerbound": False,
        # CPU kernels take the thread count of the process that runs them (OMP_NUM_THREADS,
        # torch.set_num_threads), not the one of the machine that compiled them
        "cpp.dynamic_threads": True,
    }
    with atomic_write(out, overwrite=force) as tmp:
        torch._inductor.aoti_compile_and_package(program, package_path=str(tmp), inductor_configs=configs)
    return out


def write_onnx(program: torch.export.ExportedProgram, out: Path, metadata: dict[str, str], force: bool) -> Path:
    """An ONNX model at ``out``, one file (weights inside), its inputs and output documented."""
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f'the ONNX export needs {" and ".join(missing)}: pip install "soflow_fast[ship]"')
    size = sum(t.numel() * t.element_size() for t in program.state_dict.values())
    if size > ONNX_MAX_BYTES:
        raise ValueError(
            f"the sampler's weights are {size / 2**30:.1f} GiB, over ONNX's 2 GiB limit on one file: export .pt2"
        )
    with torch.no_grad():
        onnx_program = torch.onnx.export(
            program, (), None, dynamo=True, opset_version=ONNX_OPSET, output_names=["samples"]
        )
    model = onnx_program.model
    for value in (*model.graph.inputs, *model.graph.outputs):
        key = f"soflow.input.{value.name}" if value.name != "samples" else "soflow.output.samples"
        value.doc_string = metadata.get(key)
    model.metadata_props.update({k: v for k, v in metadata.items() if k.startswith("soflow.")})
    import onnx

    proto = onnx_program.model_proto
    label_count = metadata.get("soflow.label_count")
    _add_input_checks(proto, None if label_count is None else int(label_count))
    with atomic_write(out, overwrite=force) as tmp:
        onnx.save_model(proto, str(tmp))
    return out


def _add_input_checks(proto, label_count: int | None) -> None:
    """Checks in front of an ONNX graph: every input's batch equals noise's, and labels lie in
    [0, label_count). ONNX has no operator that raises, so each check is a Reshape that onnxruntime cannot
    do when the check fails (to a size of zero, or to noise's batch), named after what it checks: the name
    is in onnxruntime's error ("... running Reshape node. Name:'labels_must_be_in_0_10' ...")."""
    from onnx import TensorProto, helper

    graph = proto.graph
    names = [value.name for value in graph.input if value.name != "noise"]
    checks = []

    def constant(name: str, value: int) -> str:
        checks.append(
            helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [], [value]))
        )
        return name

    for name in names:
        batch, rest, want, checked = (f"{name}__{part}" for part in ("noise_batch", "rest", "want", "batch_checked"))
        checks += [
            helper.make_node("Shape", ["noise"], [batch], start=0, end=1),
            helper.make_node("Shape", [name], [rest], start=1),
            helper.make_node("Concat", [batch, rest], [want], axis=0),
            helper.make_node("Reshape", [name, want], [checked], name=f"{name}_batch_must_equal_noise_batch"),
        ]
        final = checked
        if name == "labels" and label_count is not None:  # a size of 0 unless every label is in range
            low, high = constant("labels__zero", 0), constant("labels__count", label_count)
            parts = ("at_least_0", "below_count", "in_range", "as_int", "all", "shape", "size")
            ge, lt, both, as_int, every, shape, size = (f"labels__{part}" for part in parts)
            final = "labels__range_checked"
            checks += [
                helper.make_node("GreaterOrEqual", [checked, low], [ge]),
                helper.make_node("Less", [checked, high], [lt]),
                helper.make_node("And", [ge, lt], [both]),
                helper.make_node("Cast", [both], [as_int], to=TensorProto.INT64),
                helper.make_node("ReduceMin", [as_int], [every], keepdims=1),
                helper.make_node("Shape", [checked], [shape]),
                helper.make_node("Mul", [shape, every], [size]),
                # allowzero: a 0 in the target is a size of 0, not "keep the input's"
                helper.make_node(
                    "Reshape", [checked, size], [final], name=f"labels_must_be_in_0_{label_count - 1}", allowzero=1
                ),
            ]
        for node in graph.node:
            inputs = [final if x == name else x for x in node.input]
            del node.input[:]
            node.input.extend(inputs)
    for node in reversed(checks):
        graph.node.insert(0, node)


def package(sampler: PackagedSampler, out: str | Path, metadata: dict[str, str] | None = None, force: bool = False):
    """Write ``sampler`` to ``out`` in the format its suffix names (.pt2 or .onnx); returns ``out``."""
    out = Path(out)
    if out.suffix not in PACKAGE_SUFFIXES:
        given = out.suffix or "no suffix"
        raise ValueError(f"{out}: a packaged sampler is {' or '.join(PACKAGE_SUFFIXES)}, not {given}")
    meta = {**sampler.describe(), **(metadata or {})}
    program = export_program(sampler)
    write = write_pt2 if out.suffix == ".pt2" else write_onnx
    return write(program, out, meta, force)


def ship_run(
    work_dir: str | Path,
    out: str | Path,
    nfe: int = 1,
    mode: str = "renoise",
    vae: str | Path | None = None,
    decay: float | None = None,
    which: str = "ema",
    step: int | None = None,
    force: bool = False,
    device: str = "cpu",
) -> Path:
    """Package a run's sampler (its EMA weights by default) as ``out`` (.pt2 or .onnx); an existing ``out``
    raises FileExistsError unless ``force``. ``vae``: a local diffusers AutoencoderKL folder to decode with;
    ``device``: where a .pt2 runs (an ONNX model is exported on the CPU and runs where onnxruntime puts it)."""
    from soflow_fast.export import load_run_weights
    from soflow_fast.vae import load_vae

    out = Path(out)
    refuse_existing(out, force)  # before the checkpoint is read and the graph compiled
    model, info = load_run_weights(work_dir, decay, which, step)
    cfg = info["config"]
    if cfg.run.objective == "fm":
        raise ValueError(
            "this run trained run.objective=fm, a velocity model sampled by an ODE solver (soflow-sample --solver); "
            "a packaged sampler runs a SoFlow model's solution steps"
        )
    device = torch.device("cpu" if out.suffix == ".onnx" else device)
    decoder = None
    if vae is not None:
        channels = cfg.model.latent_channels()
        if channels is None:
            raise ValueError(f"--vae: a {cfg.model.LABEL} network's samples are no images for a VAE to decode")
        decoder = load_vae(vae, device, latent_channels=channels)
    sampler = build_sampler(model.to(device), cfg.model, cfg.soflow, nfe=nfe, mode=mode, vae=decoder)
    meta = {
        "soflow.model_config": json.dumps(cfg.model.to_dict()),
        "soflow.step": str(info["step"]),
        "soflow.weights": which,
        "soflow.decay": str(info["decay"]),
        "soflow.objective": json.dumps(cfg.to_dict()["soflow"]),
    }
    return package(sampler, out, meta, force=force)
