"""Networks F(x, t, s, y) for SoFlow."""

from soflow_fast.models.dit import DIT_SIZES, DiT, build_model, canonical_model_name
from soflow_fast.models.mlp import SoFlowMLP

__all__ = ["DIT_SIZES", "DiT", "SoFlowMLP", "build_model", "canonical_model_name"]
