"""DiT backbone with dual time conditioning for SoFlow.

The network F(x, t, s, y) is a standard adaLN-Zero DiT whose conditioning vector is
c = TimeEmbed_t(t) + TimeEmbed_s(t - s) + LabelEmbed(y). Module names follow the authors'
release so that their state dicts map one to one (see ``soflow_fast.interop``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from soflow_fast import ops
from soflow_fast.config_fields import at_least, finite, option
from soflow_fast.models.registry import ModelConfig, register_model

try:  # optional: flash-attn is used on CUDA in half precision when it is installed
    from flash_attn import flash_attn_func as _flash_attn_func
except Exception:  # ImportError, or a broken CUDA build of the wheel
    _flash_attn_func = None


# ----------------------------------------------------------------------------------------------
# Embedders
# ----------------------------------------------------------------------------------------------


def timestep_frequencies(dim: int = 256, max_period: float = 10000.0, device=None) -> torch.Tensor:
    """(dim // 2,) fp32 frequencies of ``timestep_embedding``, from 1 down to about 1 / max_period."""
    half = dim // 2
    return torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=device) / half)


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of a float time in [0, 1], computed in fp32 whatever the model dtype.

    Args:
        t: (B,) times.
    Returns:
        (B, dim) fp32 features, cos half first.
    """
    freqs = timestep_frequencies(dim, max_period, t.device)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """sinusoid(256) -> Linear -> SiLU -> Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class table with one extra null row (index num_classes) when guidance is trained.

    The network never drops labels itself: the objective passes already-masked labels. Labels are
    not range-checked here (that would read them back from the device on every call): the training
    data are checked where they enter, and ``sampling.sample`` checks the labels a user passes.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.has_null = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + int(self.has_null), hidden_size)

    def null_labels(self, batch: int, device: torch.device) -> torch.Tensor:
        if not self.has_null:
            raise ValueError("y=None asks for the null label, but this model has class_dropout_prob=0 (no null row)")
        return torch.full((batch,), self.num_classes, dtype=torch.long, device=device)

    def forward(self, y: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        if y is None:
            y = self.null_labels(batch, device)
        return self.embedding_table(y)


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens, a strided convolution as in ViT."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, T, D)


# ----------------------------------------------------------------------------------------------
# Transformer block
# ----------------------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        # MeanFlow's forward-mode AD needs the math SDPA kernel; it turns this off.
        self.allow_flash_attn = True
        # ... and switches this on: attention written out with the softmax in fp32 whatever the
        # autocast dtype. (The math SDPA kernel under bf16 autocast on CUDA leaves a bf16-input,
        # fp32-grad softmax backward in the JVP's graph, which CUDA supports for fp16 only.)
        self.explicit_fp32_softmax = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, D // self.num_heads)  # (B, T, 3, H, hd)
        if (
            _flash_attn_func is not None
            and self.allow_flash_attn
            and x.is_cuda
            and x.dtype in (torch.float16, torch.bfloat16)
        ):
            q, k, v = qkv.unbind(2)  # (B, T, H, hd) each
            out = _flash_attn_func(q, k, v)
        elif self.explicit_fp32_softmax:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, T, hd) each
            scores = (q @ k.transpose(-2, -1)).float() * (q.shape[-1] ** -0.5)
            out = (scores.softmax(dim=-1).to(v.dtype) @ v).transpose(1, 2)  # (B, T, H, hd)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, T, hd) each
            out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)  # (B, T, H, hd)
        return self.proj(out.reshape(B, T, D))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """adaLN-Zero block: six modulation vectors (shift, scale, gate for attention and MLP)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.attn = Attention(hidden_size, num_heads)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # x: (B, T, D), c: (B, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        h = self.attn(ops.modulated_layer_norm(x, shift_msa, scale_msa))
        # the attention residual and the MLP's LayerNorm share one pass over x
        x, y = ops.gated_residual_modulated_layer_norm(x, h, gate_msa, shift_mlp, scale_mlp)
        return x + gate_mlp.unsqueeze(1) * self.mlp(y)


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """(B, T, D) tokens -> (B * T, p*p*C): a 2-D product, whose output is no view of another tensor
        (the caller views it as (B, T, p*p*C); FSDP2 warns about a sharded module that returns a view)."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(ops.modulated_layer_norm(x, shift, scale).flatten(0, 1))


# ----------------------------------------------------------------------------------------------
# DiT
# ----------------------------------------------------------------------------------------------


class DiT(nn.Module):
    """F(x, t, s, y): the SoFlow network on a DiT backbone.

    Args:
        input_size: spatial size of the (square) input.
        patch_size, in_channels, hidden_size, depth, num_heads, mlp_ratio: standard DiT sizes.
        num_classes: number of classes; 0 makes an unconditional model (only the null row).
        class_dropout_prob: > 0 adds the null-label row (index num_classes) used by guidance.
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        class_dropout_prob: float = 0.1,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size={input_size} is not divisible by patch_size={patch_size}")
        if num_classes == 0 and class_dropout_prob <= 0:
            class_dropout_prob = 1.0  # unconditional: the table is just the null row
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_classes = num_classes

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.s_embedder = TimestepEmbedder(hidden_size)  # sees the interval t - s, not s
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.num_patches = (input_size // patch_size) ** 2
        # frozen sin-cos table; a buffer (not a parameter) so optimisers, EMA and FSDP ignore it
        self.register_buffer("pos_embed", torch.zeros(1, self.num_patches, hidden_size), persistent=True)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @property
    def null_label(self) -> int | None:
        return self.num_classes if self.y_embedder.has_null else None

    def initialize_weights(self) -> None:
        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        grid = int(self.num_patches**0.5)
        pos = get_2d_sincos_pos_embed(self.hidden_size, grid)
        self.pos_embed.copy_(torch.from_numpy(pos).float().unsqueeze(0))

        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for emb in (self.t_embedder, self.s_embedder):
            nn.init.normal_(emb.mlp[0].weight, std=0.02)
            nn.init.normal_(emb.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity, the output as zero
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        # (B, T, p*p*C) -> (B, C, H, W)
        p, c = self.patch_size, self.out_channels
        h = w = self.input_size // p
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def embed_condition(self, t: torch.Tensor, s: torch.Tensor, y: torch.Tensor | None, batch: int) -> torch.Tensor:
        """c = emb_t(t) + emb_s(t - s) + emb_y(y), (B, D)."""
        t = t.float()
        s = s.float()
        return self.t_embedder(t) + self.s_embedder(t - s) + self.y_embedder(y, batch, t.device)

    def forward(self, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """F(x, t, s, y).

        Args:
            x: (B, C, H, W) state at time t.
            t, s: (B,) float times in [0, 1] (t = 1 is noise).
            y: (B,) int labels, index num_classes = null; None means all null.
        Returns:
            (B, C, H, W)
        """
        B, C, H, W = x.shape
        if C != self.in_channels or H != self.input_size or W != self.input_size:
            raise ValueError(
                f"DiT expects x of shape (B, {self.in_channels}, {self.input_size}, {self.input_size}), "
                f"got {tuple(x.shape)}"
            )
        if t.shape != (B,) or s.shape != (B,):
            raise ValueError(f"t and s must have shape ({B},), got {tuple(t.shape)} and {tuple(s.shape)}")
        # under FSDP2 the parameters seen here are fp32 shards; the trainer records the compute dtype
        dtype = getattr(self, "compute_dtype", None) or self.x_embedder.proj.weight.dtype
        h = self.x_embedder(x.to(dtype)) + self.pos_embed.to(dtype)  # (B, T, D)
        c = self.embed_condition(t, s, y, B).to(dtype)  # (B, D)
        for block in self.blocks:
            h = block(h, c)
        out = self.final_layer(h, c).view(B, h.shape[1], -1)  # (B, T, p*p*C)
        return self.unpatchify(out).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Sin-cos position table (frozen)
# ----------------------------------------------------------------------------------------------


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """(grid_size**2, embed_dim) table: half the channels encode the row, half the column."""
    gh = np.arange(grid_size, dtype=np.float32)
    gw = np.arange(grid_size, dtype=np.float32)
    grid = np.meshgrid(gw, gh)  # w first, as in MAE/DiT
    grid = np.stack(grid, axis=0).reshape(2, 1, grid_size, grid_size)
    emb_h = _1d_sincos(embed_dim // 2, grid[0])
    emb_w = _1d_sincos(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def _1d_sincos(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


# ----------------------------------------------------------------------------------------------
# Sizes: (patch, hidden, depth, heads)
# ----------------------------------------------------------------------------------------------

DIT_SIZES: dict[str, tuple[int, int, int, int]] = {
    "DiT-T/2": (2, 192, 6, 3),
    "DiT-S/2": (2, 384, 12, 6),
    "DiT-S/4": (4, 384, 12, 6),
    "DiT-B/4": (4, 768, 12, 12),
    "DiT-B/2": (2, 768, 12, 12),
    "DiT-M/2": (2, 1024, 16, 16),
    "DiT-L/2": (2, 1024, 24, 16),
    "DiT-XL/2": (2, 1152, 28, 16),
}


def canonical_model_name(name: str) -> str:
    """Accept the authors' spelling (``DiT-B-4``) as well as ours (``DiT-B/4``)."""
    if name in DIT_SIZES:
        return name
    alt = name.replace("_", "-")
    if alt.count("-") == 2:
        head, size, patch = alt.split("-")
        alt = f"{head}-{size}/{patch}"
    if alt in DIT_SIZES:
        return alt
    raise ValueError(f"unknown model {name!r}; known: {', '.join(DIT_SIZES)}")


# ----------------------------------------------------------------------------------------------
# Registry entry
# ----------------------------------------------------------------------------------------------


@register_model
@dataclass(kw_only=True)
class DiTConfig(ModelConfig):
    """A DiT of a named size (``model.model``), optionally overridden field by field."""

    LABEL: ClassVar[str] = "DiT"
    OFFICIAL_DEFAULTS: ClassVar[dict[str, Any]] = {"in_channels": 4, "num_classes": 1000}

    patch_size: int | None = option(None, check=at_least(1))  # overrides of the named size
    hidden_size: int | None = option(None, check=at_least(1))
    depth: int | None = option(None, check=at_least(1))
    num_heads: int | None = option(None, check=at_least(1))
    mlp_ratio: float = option(4.0, check=finite(above=0))

    @classmethod
    def canonical(cls, name: str) -> str | None:
        try:
            return canonical_model_name(name)
        except ValueError:
            return None

    @classmethod
    def names(cls) -> list[str]:
        return list(DIT_SIZES)

    @classmethod
    def construct(cls, name: str, **kwargs) -> DiT:
        """A named size (``DiT-B/2``) fills the sizes that ``kwargs`` leave out; the label ``DiT`` takes
        every size from ``kwargs``."""
        if name in DIT_SIZES:
            sizes = dict(zip(("patch_size", "hidden_size", "depth", "num_heads"), DIT_SIZES[name], strict=True))
            for key, value in sizes.items():
                if kwargs.get(key) is None:
                    kwargs[key] = value
        return DiT(**kwargs)

    def build_kwargs(self) -> dict[str, Any]:
        names = ("patch_size", "hidden_size", "depth", "num_heads")
        named = dict(zip(names, DIT_SIZES[self.model], strict=True))
        sizes = {k: named[k] if getattr(self, k) is None else getattr(self, k) for k in names}
        return dict(
            super().build_kwargs(), **sizes, mlp_ratio=self.mlp_ratio, class_dropout_prob=self.class_dropout_prob
        )

    @staticmethod
    def blocks(model: DiT) -> list[tuple[Any, Any]]:
        return [(model.blocks, i) for i in range(len(model.blocks))]

    @staticmethod
    def head_modules(model: DiT) -> list[nn.Module]:
        return [model.final_layer]

    @classmethod
    def foreign_state_dict(cls, state: Mapping, model: nn.Module) -> dict[str, torch.Tensor]:
        """A SiT checkpoint (facebookresearch/SiT: DiT's names, no s-embedder, time reversed, velocity x0 - eps)
        as this DiT's weights: F(x, t, t) = -v_SiT(x, 1 - t), whatever s at first. The conversion is in the
        weights (``soflow_fast.models.sit``), so the model needs no wrapper."""
        from soflow_fast.models.sit import sit_state_dict

        return sit_state_dict(state, model)

    @classmethod
    def official_kwargs(cls, kwargs: dict[str, Any], state: Mapping) -> dict[str, Any]:
        """A label table without the null row (trained without label dropout) builds without one."""
        from soflow_fast.interop import label_table_rows

        if "class_dropout_prob" not in kwargs and label_table_rows(state) == kwargs.get("num_classes"):
            kwargs = dict(kwargs, class_dropout_prob=0.0)
        return kwargs
