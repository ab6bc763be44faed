"""The VAE between pixels and latents: a diffusers ``AutoencoderKL`` read from a local folder.

``prepare_latents`` encodes with it; training (``eval.vae``) and ``python -m soflow_fast.sample
--vae`` decode a latent model's samples with it into images. Nothing is downloaded: the folder is a
copy of a diffusers model such as stabilityai/sd-vae-ft-mse.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

VAE_HELP = (
    "a local diffusers AutoencoderKL folder (config.json and diffusion_pytorch_model.safetensors), e.g. a copy of "
    "stabilityai/sd-vae-ft-mse made where there is internet; nothing is downloaded at run time"
)


def load_vae(path: str | os.PathLike, device: torch.device | str = "cpu", latent_channels: int | None = None):
    """The AutoencoderKL in the local folder ``path``, frozen, in eval mode; a problem is one ValueError.

    ``latent_channels``: the channels of the latents it will decode (a model's in_channels), checked
    against the VAE's own.
    """
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise ValueError(f"vae {folder}: no config.json there; it must be {VAE_HELP}")
    try:
        from diffusers import AutoencoderKL
    except ImportError as err:
        raise ValueError(f'the VAE needs diffusers (pip install diffusers, or "soflow_fast[eval]"): {err}') from None
    try:
        # low_cpu_mem_usage=False: the plain load, which needs no `accelerate` (diffusers asks for it otherwise)
        vae = AutoencoderKL.from_pretrained(str(folder), local_files_only=True, low_cpu_mem_usage=False)
    except Exception as err:  # diffusers raises several types for a folder that is not a model
        raise ValueError(
            f"vae {folder} could not be loaded ({type(err).__name__}: {err}); it must be {VAE_HELP}"
        ) from None
    own = getattr(vae.config, "latent_channels", None)
    if latent_channels is not None and own != latent_channels:
        raise ValueError(
            f"vae {folder} has {own} latent channels and the model has {latent_channels}: a VAE decodes the "
            "samples of a model trained on its own latents (model.in_channels)"
        )
    return vae.to(device).eval().requires_grad_(False)


def vae_downsampling(vae) -> int:
    """The VAE's spatial downsampling factor: one halving per encoder block but the last."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.inference_mode()
def decode(vae, latents: Tensor, batch: int = 64) -> Tensor:
    """Images in [-1, 1], (B, 3, H * f, W * f), from latents scaled as the model trains on them
    (divided by the VAE's ``scaling_factor`` before decoding), ``batch`` at a time."""
    scale = float(getattr(vae.config, "scaling_factor", 0.18215))
    dtype = next(vae.parameters()).dtype
    out = [vae.decode(z.to(dtype) / scale).sample.float() for z in latents.split(batch)]
    return torch.cat(out).clamp_(-1, 1)
