"""The fused Triton kernels of soflow_fast, one module per op.

Each op is a ``torch.library`` custom op (namespace ``soflow_fast``) with a fake function and an
autograd formula, so ``torch.compile(fullgraph=True)`` traces through it. Import this package only
after deciding on ``TRITON_INTERPRET`` (Triton reads it when the kernels are defined);
``soflow_fast.ops`` does that for you and is the entry point the model and the objective call.
"""

from .adaptive_velocity_loss import adaptive_velocity_loss
from .euler_consistency_loss import euler_consistency_loss
from .gated_residual_modulated_layer_norm import gated_residual_modulated_layer_norm
from .modulated_layer_norm import modulated_layer_norm

__all__ = [
    "adaptive_velocity_loss",
    "euler_consistency_loss",
    "gated_residual_modulated_layer_norm",
    "modulated_layer_norm",
]
