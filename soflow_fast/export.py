"""Export a run: ``soflow-export WORKING_DIR OUT`` (or ``python -m soflow_fast.export``), in the format
OUT's suffix names.

- ``.pt2``: the sampler itself (noise -> samples, ``--nfe`` network calls, the ``--vae`` decoder),
  compiled by AOTInductor; ``torch._inductor.aoti_load_package(OUT)`` runs it, with torch only.
- ``.onnx``: the same sampler as an ONNX model, for onnxruntime.
- any other name (``.safetensors``): the EMA weights (see ``soflow_fast.shipping`` and docs/shipping.md
  for the two packaged formats).

The safetensors file carries the model's constructor arguments in its metadata, so ``load_exported`` builds
the network with no pickle and no config file. An existing OUT is refused unless ``--force``; the
file is written under a hidden temporary name in OUT's folder and renamed onto OUT once complete,
so OUT is never a partial file (``sample`` writes its grid and npz the same way).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import torch

from soflow_fast.checkpoint import Checkpointer, CheckpointError, read_marker, verify
from soflow_fast.cli import Parser
from soflow_fast.config import TrainConfig, load_yaml
from soflow_fast.files import atomic_write, refuse_existing
from soflow_fast.models import ModelConfig, model_kinds


def load_run_weights(
    work_dir: str | Path, decay: float | None = None, which: str = "ema", step: int | None = None
) -> tuple[torch.nn.Module, dict]:
    """The network of a run's latest intact checkpoint (or of step ``step``), on CPU, with its EMA
    (or raw) weights.

    Returns:
        (model, info) with info = {"step", "decay", "config"}.
    """
    from soflow_fast.ema import EMA

    work = Path(work_dir)
    cfg_path = work / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{work} is not a run directory: no config.yaml")
    cfg: TrainConfig = load_yaml(cfg_path)
    ckpts = Checkpointer(work / "ckpts")
    if step is None:
        path = ckpts.latest_verified()  # the newest intact checkpoint
        if path is None:
            raise FileNotFoundError(f"no complete checkpoint under {work / 'ckpts'}")
    else:
        path = ckpts.step_dir(step)
        if path not in ckpts.complete_checkpoints():
            have = ", ".join(str(int(p.name.split("_")[1])) for p in ckpts.complete_checkpoints()) or "none"
            raise FileNotFoundError(f"no complete checkpoint of step {step} under {work / 'ckpts'} (steps: {have})")
        reason = verify(path)
        if reason is not None:
            raise CheckpointError(f"checkpoint {path} is damaged: {reason}")
    model = cfg.model.build()
    decays = cfg.ema.ema_decays
    ema = EMA(model, decays=decays)
    if which == "ema":
        decay = decays[0] if decay is None else float(decay)
        if decay not in decays:
            raise ValueError(f"the run keeps EMA decays {list(decays)}, not {decay}")
        Checkpointer(work / "ckpts").load(path, {"ema": ema})
        ema.copy_to(model, decay)
    elif which == "model":
        decay = None
        state = {"model": {"model": model.state_dict()}}
        Checkpointer(work / "ckpts").load(path, state)
        model.load_state_dict(state["model"]["model"])
    else:
        raise ValueError(f"which must be 'ema' or 'model', got {which!r}")
    step = read_marker(path).get("step")
    return model.eval(), {"step": step, "decay": decay, "config": cfg}


def export(
    work_dir: str | Path,
    out: str | Path,
    decay: float | None = None,
    which: str = "ema",
    step: int | None = None,
    force: bool = False,
) -> Path:
    """Write the weights to ``out``; an existing ``out`` raises FileExistsError unless ``force``."""
    from safetensors.torch import save_file

    out = Path(out)
    refuse_existing(out, force)  # before the checkpoint is read
    model, info = load_run_weights(work_dir, decay, which, step)
    cfg: TrainConfig = info["config"]
    meta = {
        "format": "soflow_fast.dit.v1",
        "model_name": cfg.model.LABEL,
        "model_config": json.dumps(cfg.model.to_dict()),
        "step": str(info["step"]),
        "weights": which,
        "decay": str(info["decay"]),
        "soflow": json.dumps(cfg.to_dict()["soflow"]),
    }
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_write(out, overwrite=force) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=meta)
        except Exception as e:  # safetensors reports I/O failures as SafetensorError("... (os error N) ...")
            code = re.search(r"os error (\d+)", str(e))
            if code is None:
                raise
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(out)) from e
    return out


def exported_model_config(meta: dict) -> ModelConfig:
    """The model config an exported file records. Files written before ``model_config`` existed record
    the kind (``model_name``) and every constructor argument (``model_kwargs``)."""
    if "model_config" in meta:
        return ModelConfig.from_dict(json.loads(meta["model_config"]))
    kind = model_kinds()[meta.get("model_name", "DiT")]
    return kind.from_dict({"model": kind.names()[0], **json.loads(meta["model_kwargs"])})


def load_exported(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Build the network of an exported file. Returns (model, metadata); ``exported_model_config(metadata)``
    is its config."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from None
    if meta.get("format") != "soflow_fast.dit.v1":
        raise ValueError(f"{path} was not written by soflow_fast.export (metadata format {meta.get('format')!r})")
    model = exported_model_config(meta).build()
    model.load_state_dict(load_file(str(path), device="cpu"))
    return model.to(device).eval(), meta


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(prog="soflow-export", description=__doc__, aliases={"weights": "which"})
    p.add_argument("working_dir", help="the training run directory")
    p.add_argument("out", help="the file to write: .pt2 or .onnx (the packaged sampler), else safetensors weights")
    p.add_argument("--decay", type=float, default=None, help="which EMA rate (default: the run's first)")
    p.add_argument(
        "--which", choices=("ema", "model"), default="ema", help="the EMA weights (default) or the raw model's"
    )
    p.add_argument("--ckpt_steps", type=int, default=None, help="the checkpoint of this step (default: the newest)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists (default: refuse)")
    p.add_argument("--nfe", type=int, default=None, help="with .pt2/.onnx: network calls per sample (default 1)")
    p.add_argument(
        "--mode", choices=("renoise", "chained"), default=None, help="with .pt2/.onnx and --nfe > 1: the sampler"
    )
    p.add_argument("--vae", default=None, help="with .pt2/.onnx: a local diffusers AutoencoderKL folder to decode with")
    p.add_argument("--device", default=None, help="with .pt2: the device the package runs on (default cpu)")
    a = p.parse_args(argv)
    if Path(a.out).is_dir():
        p.error(f"out must be a file path (e.g. {Path(a.out) / 'ema.safetensors'}), got the directory {a.out}")
    packaged = Path(a.out).suffix in (".pt2", ".onnx")
    for name in ("nfe", "mode", "vae", "device"):
        if getattr(a, name) is not None and not packaged:
            p.error(f"--{name} shapes a packaged sampler: OUT must end in .pt2 or .onnx, got {a.out}")
    if a.device is not None and Path(a.out).suffix != ".pt2":
        p.error("--device is for a .pt2 package (an ONNX model runs where onnxruntime puts it)")
    if a.nfe is not None and a.nfe < 1:
        p.error(f"--nfe must be >= 1, got {a.nfe}")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        if Path(a.out).suffix in (".pt2", ".onnx"):
            from soflow_fast.shipping import ship_run

            out = ship_run(
                a.working_dir, a.out, nfe=a.nfe or 1, mode=a.mode or "renoise", vae=a.vae, decay=a.decay,
                which=a.which, step=a.ckpt_steps, force=a.force, device=a.device or "cpu",
            )  # fmt: skip
        else:
            out = export(a.working_dir, a.out, a.decay, a.which, a.ckpt_steps, force=a.force)
    except (OSError, ValueError, CheckpointError) as e:  # a missing run, a full disk, ...: one line naming it
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
