"""Networks F(x, t, s, y) for SoFlow, one registry entry per kind (``soflow_fast.models.registry``)."""

from __future__ import annotations

# the built-in kinds: importing each file registers it
from soflow_fast.models.dit import DIT_SIZES, DiT, DiTConfig, canonical_model_name  # noqa: I001
from soflow_fast.models.mlp import MLPConfig, SoFlowMLP
from soflow_fast.models.registry import ModelConfig, build_model, model_kinds, register_model
from soflow_fast.models.unet import SongUNet, UNetConfig, build_unet

__all__ = [
    "DIT_SIZES",
    "DiT",
    "DiTConfig",
    "MLPConfig",
    "ModelConfig",
    "SoFlowMLP",
    "SongUNet",
    "UNetConfig",
    "build_model",
    "build_unet",
    "canonical_model_name",
    "model_kinds",
    "register_model",
]
