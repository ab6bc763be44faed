"""Sample from a trained network: ``soflow-sample --working_dir W [--nfe 1] [--num N]`` (or ``python -m
soflow_fast.sample``).

Sources: a run directory (EMA weights of its latest checkpoint), a file written by
``soflow_fast.export``, or an authors' checkpoint (``--official FILE.pt`` with the model's size:
``--model DiT-B/4`` and the other DiT sizes, or ``--model UNet`` for their CIFAR-10 U-Net). A DiT
checkpoint trained without label dropout (their B/4 unconditional) has no null label row; the
model is built to match what the checkpoint holds.
Guidance is trained in; ``--cfg_scale`` adds optional inference-time guidance on top (two network
calls per step).

A SoFlow (or MeanFlow) model samples with ``--mode renoise|chained``; a flow-matching model (a run of
``run.objective=fm``) integrates its velocity F(x, t, t) from t = 1 to 0 with ``--solver euler|heun``
(default heun). ``--nfe`` counts network calls either way: Heun takes ceil(N/2) steps of two calls, the last a
one-call Euler step when N is odd. A run directory says which objective trained it; an exported or authors'
file does not, and is sampled as SoFlow unless ``--solver`` is given.

Outputs: a grid image of the first ``--grid`` samples (default 64) in ``--out`` (default, in
``samples/`` of the run directory or of the folder of the ``--weights`` / ``--official`` file:
``<npz name>.png`` with ``--npz``, else ``grid_<nfe>step.png``; ``.png`` is added to a name without a
suffix) and, with ``--npz``, all the samples in the ADM evaluator's format (``.npz`` is added to a
name without it, as NumPy does). The samples are generated (and decoded by ``--vae``)
``--batch_size`` at a time, with a progress bar;
each batch goes to the npz as uint8 images right away, so memory does not grow with ``--num``
(except a latent model's raw latents without ``--vae``, which the npz keeps under ``latents``).
An existing output is refused before anything is loaded, unless ``--force``; each is written under
a hidden temporary name in its folder and renamed once complete, as ``soflow_fast.export`` does.
"""

from __future__ import annotations

import argparse
import math
import pickle
import sys
import zipfile
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch

from soflow_fast.checkpoint import CheckpointError
from soflow_fast.cli import Parser
from soflow_fast.files import atomic_write, describe_io_error, refuse_existing
from soflow_fast.objective import SoFlowConfig, SoFlowObjective
from soflow_fast.sampling import MODES, SOLVERS, sample
from soflow_fast.vae import decode, load_vae
from soflow_fast.viz import save_grid, to_uint8

GRID = 64  # samples in the grid image by default
DECODE_BATCH = 64  # latents per VAE call (``vae.decode``'s default), counted from the first sample


def _default_out_dir(a: argparse.Namespace) -> Path:
    """``samples/`` in the run directory, or in the folder holding the weights file."""
    base = Path(a.working_dir) if a.working_dir else Path(a.weights or a.official).parent
    return base / "samples"


def output_paths(a: argparse.Namespace) -> tuple[Path, Path | None]:
    """The grid and npz paths as written: ``.png`` added to a grid name without a suffix, ``.npz`` to
    an npz name without it (``np.savez``'s rule). The default grid is named after the npz, so that
    each call's grid is its own."""
    npz = None
    if a.npz:
        npz = Path(a.npz)
        if npz.suffix != ".npz":
            npz = npz.with_name(npz.name + ".npz")
    default = f"{npz.stem}.png" if npz is not None else f"grid_{a.nfe}step.png"
    out = Path(a.out) if a.out else _default_out_dir(a) / default
    if not out.suffix:
        out = out.with_name(out.name + ".png")
    return out, npz


def read_official(path: str | Path) -> Mapping:
    """The state of an authors' checkpoint file, read with ``weights_only=True`` (no pickled code runs).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: a file that is not one (a YAML file, an empty or damaged file, a torch file of other
            objects), one line naming it.
    """
    from soflow_fast.interop import convert_official_state_dict

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {'a directory, not a file' if path.is_dir() else 'no such file'}")
    not_theirs = f"{path}: not a checkpoint of the authors' release"
    if path.stat().st_size == 0:
        raise ValueError(f"{not_theirs} (an empty file)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # YAML, random bytes, a pickle of objects other than tensors: all one answer
        # torch's own message suggests weights_only=False, i.e. running the file's pickled code: not shown
        raise ValueError(f"{not_theirs} (not a torch file of tensors: {type(e).__name__})") from None
    try:
        convert_official_state_dict(state)
    except (ValueError, KeyError) as e:
        raise ValueError(f"{not_theirs} ({str(e.args[0] if e.args else e).splitlines()[0]})") from None
    return state


def _load(a: argparse.Namespace):
    """(network, its ModelConfig, the SoFlowConfig it was trained with, its run.objective or None where the
    source does not record it) of the source the flags name."""
    if a.working_dir:
        from soflow_fast.export import load_run_weights

        model, info = load_run_weights(a.working_dir, a.decay, step=a.ckpt_steps)
        return model, info["config"].model, info["config"].soflow, info["config"].run.objective
    if a.weights:
        import json

        from soflow_fast.export import exported_model_config, load_exported

        model, meta = load_exported(a.weights)
        return model, exported_model_config(meta), SoFlowConfig.from_dict(json.loads(meta["soflow"])), None
    from soflow_fast.config_fields import field_types
    from soflow_fast.interop import load_official_state_dict
    from soflow_fast.models import ModelConfig

    kind, name = ModelConfig.variant_of(a.model)
    given = {"input_size": a.input_size, "in_channels": a.in_channels, "num_classes": a.num_classes}
    kwargs = dict(kind.OFFICIAL_DEFAULTS)
    kwargs.update({k: v for k, v in given.items() if v is not None}, **_model_args(a.model_arg))
    state = read_official(a.official)
    kwargs = kind.official_kwargs(kwargs, state)
    try:
        model = kind.construct(name, **kwargs)
    except TypeError as e:  # a --model_arg the model does not take
        raise ValueError(f"model {a.model!r}: {e}") from e
    load_official_state_dict(model, state)
    model_cfg = kind.from_dict({"model": name, **{k: v for k, v in kwargs.items() if k in field_types(kind)}})
    return model.eval(), model_cfg, SoFlowConfig(), None


def sampler(a: argparse.Namespace, objective: str | None) -> str:
    """The sampling mode of ``sampling.sample``: ``--solver`` for a flow-matching model, ``--mode`` otherwise;
    a ValueError for the flag that does not fit the run's objective."""
    if objective == "fm":
        if a.mode is not None:
            raise ValueError(f"--mode {a.mode} samples a SoFlow model; this run trained run.objective=fm: use --solver")
        return a.solver or "heun"
    if objective is not None and a.solver is not None:
        raise ValueError(
            f"--solver integrates a flow-matching model's velocity; this run trained run.objective={objective}: "
            "use --mode"
        )
    return a.solver or a.mode or "renoise"


def _model_args(items: list[str]) -> dict:
    """``--model_arg KEY=VALUE`` pairs as a dict, each VALUE read as YAML (``[1, 2]``, ``0.1``, ``fourier``)."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--model_arg takes KEY=VALUE, got {item!r}")
        out[key.replace("-", "_")] = yaml.safe_load(value)
    return out


class NpyStream:
    """One array of an open npz zip, written ``rows`` at a time as ``np.savez`` would write it whole
    (the same header; the rows' bytes in order). ``close`` checks every row came."""

    def __init__(self, zf: zipfile.ZipFile, name: str, shape: tuple[int, ...], dtype) -> None:
        dtype = np.dtype(dtype)
        self.f = zf.open(f"{name}.npy", "w", force_zip64=True)
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
        np.lib.format.write_array_header_1_0(self.f, header)
        self.left, self.dtype, self.name = math.prod(shape) * dtype.itemsize, dtype, name

    def write(self, rows: np.ndarray) -> None:
        data = np.ascontiguousarray(rows, dtype=self.dtype).tobytes()
        self.left -= len(data)
        self.f.write(data)

    def close(self) -> None:
        self.f.close()
        if self.left != 0:
            raise RuntimeError(f"npz array {self.name!r}: {self.left} bytes short of its header's shape")


def _write_array(zf: zipfile.ZipFile, name: str, array: np.ndarray) -> None:
    with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
        np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)


def generate(a, model, objective, labels: torch.Tensor | None, vae, out: Path, npz: Path | None, writing: list) -> None:
    """Sample ``a.num`` images ``a.batch_size`` at a time; write the grid of the first ``a.grid`` and, with
    ``npz``, every sample as uint8 into it as each batch is done. ``writing[0]`` is the file being
    written (for the caller's error message)."""
    from tqdm import tqdm

    g = torch.Generator().manual_seed(a.seed)
    g_renoise = torch.Generator(a.device).manual_seed(a.seed + 1)
    shape = a.sample_shape
    keep_latents = npz is not None and vae is None and shape[0] not in (1, 3)  # kept raw: they cannot be decoded
    n_grid = min(a.grid, a.num)
    grid, kept, pending = [], [], None
    with ExitStack() as files:
        zf, arr = None, None
        if npz is not None:
            writing[0] = npz
            zf = files.enter_context(zipfile.ZipFile(files.enter_context(atomic_write(npz, overwrite=a.force)), "w"))
        bar = tqdm(total=a.num, desc="sampling", unit="img", file=sys.stderr, dynamic_ncols=True)
        with bar:
            for start in range(0, a.num, a.batch_size):
                b = min(a.batch_size, a.num - start)
                noise = torch.randn((b, *shape), generator=g).to(a.device)
                y = None if labels is None else labels[start : start + b].to(a.device)
                x = sample(
                    model,
                    objective,
                    noise,
                    y,
                    steps=a.nfe,
                    mode=a.mode,
                    generator=g_renoise,
                    guidance_scale=a.cfg_scale,
                ).cpu()
                bar.update(b)
                if vae is not None:  # whole DECODE_BATCH chunks from the first sample: as decoding all at once
                    pending = x if pending is None else torch.cat([pending, x])
                    n = len(pending) if start + b == a.num else len(pending) // DECODE_BATCH * DECODE_BATCH
                    x, pending = pending[:n], pending[n:]
                    if n:
                        x = decode(vae, x.to(a.device), DECODE_BATCH).cpu()
                if not len(x):  # all of it waits for a whole chunk to decode
                    continue
                if sum(map(len, grid)) < n_grid:
                    grid.append(x[: n_grid - sum(map(len, grid))])
                if keep_latents:
                    kept.append(x)
                elif zf is not None:
                    images = to_uint8(x)
                    if arr is None:
                        arr = NpyStream(zf, "arr_0", (a.num, *images.shape[1:]), np.uint8)
                        files.callback(arr.f.close)  # before the zip closes, when an error ends the block
                    arr.write(images)
        if arr is not None:
            arr.close()
        writing[0] = out
        x = torch.cat(grid)
        with atomic_write(out, overwrite=a.force) as tmp:
            save_grid(x, tmp, nrow=math.ceil(math.sqrt(n_grid)), scale=max(1, 64 // x.shape[-1]))
        print(f"wrote {out}")
        if zf is None:
            return
        writing[0] = npz
        latents = torch.cat(kept) if keep_latents else None
        if latents is not None:  # the preview's channels are stretched over all samples: made once they are all here
            _write_array(zf, "arr_0", to_uint8(latents))
        _write_array(zf, "labels", labels.numpy() if labels is not None else np.full(a.num, -1))
        if latents is not None:
            _write_array(zf, "latents", latents.numpy())
            print("the npz keeps the raw latents under 'latents' (arr_0 is a preview): pass --vae to decode")
    print(f"wrote {npz}")


def main(argv: list[str] | None = None) -> int:
    p = Parser(
        prog="soflow-sample",
        description=__doc__,
        aliases={"work_dir": "working_dir", "steps": "nfe", "batch": "batch_size"},
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--working_dir", help="a training run directory (the EMA weights of its newest intact checkpoint)")
    src.add_argument("--weights", help="a .safetensors file from soflow-export")
    src.add_argument("--official", help="an authors' checkpoint (.pt); give --model and sizes")
    p.add_argument("--model", default="DiT-B/4", help="with --official: a DiT size (DiT-B/4 or DiT-B-4) or UNet")
    p.add_argument("--input_size", type=int, default=32, help="with --official: the side of the samples")
    p.add_argument("--in_channels", type=int, default=None, help="with --official: default 4 (DiT), 3 (UNet)")
    p.add_argument("--num_classes", type=int, default=None, help="with --official: default 1000 (DiT), 0 (UNet)")
    p.add_argument(
        "--model_arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="with --official: another model constructor argument, VALUE as YAML (channel_mult=[1,2]); repeatable",
    )
    p.add_argument("--decay", type=float, default=None, help="EMA rate of a run (default: its first)")
    p.add_argument("--ckpt_steps", type=int, default=None, help="with --working_dir: the checkpoint of this step")
    p.add_argument("--nfe", type=int, default=1, help="network calls per sample (default 1: one step)")
    how = p.add_mutually_exclusive_group()
    how.add_argument(
        "--mode",
        choices=MODES,
        default=None,
        help="a SoFlow model's multi-step sampler (with --nfe > 1; default renoise)",
    )
    how.add_argument(
        "--solver",
        choices=SOLVERS,
        default=None,
        help="a flow-matching model's (run.objective=fm) ODE solver from t = 1 to 0 in --nfe network calls "
        "(heun, the default: ceil(NFE/2) steps, the last one Euler when NFE is odd)",
    )
    p.add_argument("--num", type=int, default=64, help="samples to generate (all go to --npz)")
    p.add_argument("--labels", type=int, nargs="*", help="class labels, cycled over the samples (default: all)")
    p.add_argument("--cfg_scale", type=float, default=1.0, help="extra inference-time guidance; 1 = off")
    p.add_argument("--seed", type=int, default=0, help="the noise's seed")
    p.add_argument("--batch_size", type=int, default=256, help="samples per forward pass (and per write to --npz)")
    p.add_argument(
        "--out",
        help="grid image path (default: samples/<the npz's name>.png with --npz, else samples/grid_<nfe>step.png, "
        "in the --working_dir run, or in the folder of the --weights or --official file)",
    )
    p.add_argument(
        "--grid",
        type=int,
        default=GRID,
        help=f"the grid image shows the first GRID samples (default {GRID}) in a square; --npz holds them all",
    )
    p.add_argument("--npz", help="also write the samples as uint8 NHWC arr_0 (ADM evaluator format)")
    p.add_argument("--force", action="store_true", help="replace existing outputs (default: refuse)")
    p.add_argument("--vae", help="a local diffusers AutoencoderKL folder: decode a latent model's samples to images")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    a = p.parse_args(argv)
    for name in ("num", "batch_size", "nfe", "grid"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(a, name)}")
    if not math.isfinite(a.cfg_scale):
        p.error(f"--cfg_scale must be a finite number, got {a.cfg_scale}")
    out, npz = output_paths(a)
    from PIL import Image

    if out.suffix.lower() not in Image.registered_extensions():
        p.error(f"--out: {out.suffix!r} is not an image type PIL writes (e.g. .png)")
    try:
        for path in (out, npz):
            if path is not None:
                refuse_existing(path, a.force)  # before the model is loaded and sampled
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        model, model_cfg, scfg, trained = _load(a)
        a.mode = sampler(a, trained)
        vae = load_vae(a.vae, a.device) if a.vae else None
    except (FileNotFoundError, ValueError, KeyError, CheckpointError, pickle.UnpicklingError, RuntimeError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"error: {str(message).strip().splitlines()[0]}", file=sys.stderr)
        return 1
    model = model.to(a.device)
    a.sample_shape = model_cfg.sample_shape()
    ncls = model_cfg.num_classes
    objective = SoFlowObjective(scfg, num_classes=ncls or None)
    if ncls:
        pool = a.labels if a.labels else list(range(ncls))
        if any(not 0 <= c < ncls for c in pool):
            print(f"error: labels must be in [0, {ncls})", file=sys.stderr)
            return 1
        labels = torch.tensor([pool[i % len(pool)] for i in range(a.num)])
    else:
        if a.cfg_scale != 1.0:
            print("error: --cfg_scale needs a class-conditional model; this one has no classes", file=sys.stderr)
            return 1
        labels = None
    writing = [out]
    try:
        generate(a, model, objective, labels, vae, out, npz, writing)
    except FileExistsError as e:  # created by someone else while this one sampled
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a full disk, a read-only or forbidden path: one line naming it
        print(f"error: could not write {describe_io_error(e, writing[0])}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
