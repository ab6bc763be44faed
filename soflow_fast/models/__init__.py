"""Networks F(x, t, s, y) for SoFlow."""

from __future__ import annotations

from torch import nn

from soflow_fast.models import dit
from soflow_fast.models.dit import DIT_SIZES, DiT, canonical_model_name
from soflow_fast.models.mlp import SoFlowMLP
from soflow_fast.models.unet import SongUNet, build_unet

__all__ = ["DIT_SIZES", "DiT", "SoFlowMLP", "SongUNet", "build_model", "build_unet", "canonical_model_name"]


def build_model(name: str, **kwargs) -> nn.Module:
    """A network by name: a DiT size (``DiT-B/2``, or the authors' ``DiT-B-2``) or ``UNet`` (the
    authors' CIFAR-10 SongUNet, see ``unet.build_unet``); keyword arguments go to its builder.

    ``build_model("DiT-B/2", input_size=32, in_channels=4, num_classes=1000)``,
    ``build_model("UNet", input_size=32, in_channels=3)``.
    """
    if name == "UNet":
        return build_unet(**kwargs)
    return dit.build_model(name, **kwargs)
