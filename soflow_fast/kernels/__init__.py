"""The fused Triton kernels of soflow_fast, one module per op.

Each op is registered twice in the ``soflow_fast`` namespace, with one autograd formula: as a
``torch.library.triton_op``, which ``torch.compile`` traces into on CUDA (Inductor receives the
Triton kernels), and as an opaque ``torch.library.custom_op``, which compiled graphs call on the CPU
(the Triton interpreter); eager calls go through an ``autograd.Function``. One ``registry.FusedOp``
per op makes all three (see README.md).
Import this package only after deciding on ``TRITON_INTERPRET`` (Triton reads it when the kernels
are defined);
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
