"""The one dispatch point for the ops that the DiT and the objective share with the fused kernels.

Every function here has the reference PyTorch semantics below; the fused Triton path (kernels/)
must match them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def modulated_layer_norm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """y = LayerNorm(x) * (1 + scale) + shift, no affine LN weights.

    Args:
        x: (B, N, D) tokens.
        shift, scale: (B, D) per-sample modulation.
    """
    y = F.layer_norm(x, (x.shape[-1],), eps=eps)
    return y * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def gated_residual_modulated_layer_norm(
    x: torch.Tensor,
    h: torch.Tensor,
    gate: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x_new = x + gate * h, y = modulated_layer_norm(x_new, shift, scale).

    Args:
        x, h: (B, N, D); gate, shift, scale: (B, D).
    Returns:
        (x_new, y), both (B, N, D).
    """
    x_new = x + gate.unsqueeze(1) * h
    return x_new, modulated_layer_norm(x_new, shift, scale, eps)
