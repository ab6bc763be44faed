"""Residual MLP with dual time conditioning, for action chunks and low-dimensional data.

The network F(x, t, s, y) has the DiT's signature and conditioning, so ``SoFlowObjective``,
``MeanFlowObjective`` and ``sampling.sample`` use it unchanged:

    h = Embed_x(flatten(x)) + TimeEmbed_t(t) + TimeEmbed_s(t - s) + Embed_obs(y)

followed by ``num_layers`` pre-norm residual blocks and a zero-initialised read-out (F = 0 at
init). As in the DiT, the second time embedder sees the interval t - s, not the target time s.

Observations ride in the ``y`` argument as a float tensor (B, obs_size). They are continuous, so
the objective must not treat them as class labels: build the objective with ``num_classes=None``
(no label dropping, no guidance) and it passes ``y`` through untouched. ``obs_size=0`` makes an
unconditional model, which takes ``y=None`` only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn

from soflow_fast.config_fields import at_least, option
from soflow_fast.models.dit import TimestepEmbedder
from soflow_fast.models.registry import ModelConfig, register_model

# ----------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------


class ResidualBlock(nn.Module):
    """x + Linear(SiLU(Linear(LayerNorm(x))))."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.fc1 = nn.Linear(hidden_size, hidden_size)
        self.act = nn.SiLU()
        self.fc2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(self.act(self.fc1(self.norm(h))))


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


class SoFlowMLP(nn.Module):
    """F(x, t, s, y) on action chunks (B, action_horizon, action_dim), or their flat view.

    Args:
        obs_size: width of the observation vector carried in ``y``; 0 for an unconditional model.
        action_dim: size of one action (2 for 2-D points).
        action_horizon: actions per chunk (1 for plain vectors).
        hidden_size: width of the residual stream.
        num_layers: number of residual blocks.
        frequency_embedding_size: sinusoidal features per time input, as in the DiT.
    """

    def __init__(
        self,
        obs_size: int,
        action_dim: int,
        action_horizon: int = 8,
        hidden_size: int = 256,
        num_layers: int = 4,
        frequency_embedding_size: int = 256,
    ):
        super().__init__()
        for name, value, lo in (
            ("obs_size", obs_size, 0),
            ("action_dim", action_dim, 1),
            ("action_horizon", action_horizon, 1),
            ("hidden_size", hidden_size, 1),
            ("num_layers", num_layers, 0),
            ("frequency_embedding_size", frequency_embedding_size, 2),
        ):
            if int(value) != value or value < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
        self.obs_size = obs_size
        self.action_dim = action_dim
        self.action_horizon = action_horizon
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.out_size = action_horizon * action_dim

        self.x_embedder = nn.Linear(self.out_size, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size, frequency_embedding_size)
        self.s_embedder = TimestepEmbedder(hidden_size, frequency_embedding_size)  # fed t - s
        self.obs_embedder = nn.Linear(obs_size, hidden_size) if obs_size else None
        self.blocks = nn.ModuleList([ResidualBlock(hidden_size) for _ in range(num_layers)])
        self.final_norm = nn.LayerNorm(hidden_size)
        self.final_linear = nn.Linear(hidden_size, self.out_size)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for emb in (self.t_embedder, self.s_embedder):
            nn.init.normal_(emb.mlp[0].weight, std=0.02)
            nn.init.normal_(emb.mlp[2].weight, std=0.02)
        # the read-out starts at zero, so F = 0 and f(x, t, s) = x at init
        nn.init.zeros_(self.final_linear.weight)
        nn.init.zeros_(self.final_linear.bias)

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, y: torch.Tensor | None) -> None:
        B = x.shape[0]
        chunk = (self.action_horizon, self.action_dim)
        if tuple(x.shape[1:]) not in (chunk, (self.out_size,)):
            raise ValueError(f"x must be (B, {chunk[0]}, {chunk[1]}) or (B, {self.out_size}), got {tuple(x.shape)}")
        for name, v in (("t", t), ("s", s)):
            if tuple(v.shape) != (B,):
                raise ValueError(f"{name} must have shape ({B},), got {tuple(v.shape)}")
        if self.obs_size == 0:
            if y is not None:
                raise ValueError("this SoFlowMLP is unconditional (obs_size=0): pass y=None")
            return
        if y is None:
            raise ValueError(f"this SoFlowMLP needs observations: pass y of shape ({B}, {self.obs_size})")
        if not torch.is_floating_point(y):
            raise TypeError(
                f"y carries continuous observations and must be a float tensor, got {y.dtype}; integer class "
                "labels belong to the DiT (build the objective with num_classes=None for observations)"
            )
        if tuple(y.shape) != (B, self.obs_size):
            raise ValueError(f"y must have shape ({B}, {self.obs_size}), got {tuple(y.shape)}")

    def forward(self, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """F(x, t, s | y), shaped like x.

        Args:
            x: (B, action_horizon, action_dim) or (B, action_horizon * action_dim).
            t: (B,) current time in [0, 1] (1 is noise).
            s: (B,) target time in [0, 1].
            y: (B, obs_size) float observations, or None when obs_size is 0.
        """
        self._check_inputs(x, t, s, y)
        B = x.shape[0]
        dtype = self.x_embedder.weight.dtype
        t = t.float()
        s = s.float()
        h = self.x_embedder(x.reshape(B, self.out_size).to(dtype))  # (B, D)
        h = h + (self.t_embedder(t) + self.s_embedder(t - s)).to(dtype)
        if self.obs_embedder is not None:
            h = h + self.obs_embedder(y.to(dtype))
        for block in self.blocks:
            h = block(h)  # (B, D)
        out = self.final_linear(self.final_norm(h))  # (B, H * A)
        return out.reshape(x.shape).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Registry entry
# ----------------------------------------------------------------------------------------------


@register_model
@dataclass(kw_only=True)
class MLPConfig(ModelConfig):
    """The observation-conditioned action head (``model.model=MLP``): samples are action chunks
    (action_horizon, action_dim), conditioned on an observation vector instead of a class."""

    LABEL: ClassVar[str] = "MLP"
    CONDITIONS: ClassVar[tuple[str, ...]] = ("obs",)

    num_classes: int = option(0, check=at_least(0))  # observations, not classes, condition this network
    obs_size: int = option(0, check=at_least(0))  # width of the observation vector carried in y; 0 = none
    action_dim: int = option(2, check=at_least(1))  # size of one action
    action_horizon: int = option(8, check=at_least(1))  # actions per chunk
    hidden_size: int = option(256, check=at_least(1))  # width of the residual stream
    num_layers: int = option(4, check=at_least(0))  # residual blocks

    @classmethod
    def construct(cls, name: str, **kwargs) -> SoFlowMLP:
        return SoFlowMLP(**kwargs)

    def build_kwargs(self) -> dict[str, Any]:
        names = ("obs_size", "action_dim", "action_horizon", "hidden_size", "num_layers")
        return {n: getattr(self, n) for n in names}

    @staticmethod
    def blocks(model: SoFlowMLP) -> list[tuple[Any, Any]]:
        return [(model.blocks, i) for i in range(len(model.blocks))]

    def sample_shape(self) -> tuple[int, ...]:
        return (self.action_horizon, self.action_dim)

    def condition(self) -> tuple[str, int] | None:
        return ("obs", self.obs_size) if self.obs_size else None

    def latent_channels(self) -> None:
        return None  # action chunks: nothing for a VAE to decode
