"""SongUNet: the authors' CIFAR-10 network, a DDPM++-style U-Net conditioned on t and on t - s.

The SoFlow release trains unconditional CIFAR-10 with the U-Net of Song et al. in the form that
NVIDIA's EDM gives it. This is an independent implementation of that architecture:

- a mapping network turns sinusoidal features of t and of the interval t - s (concatenated, plus
  a linear map of the six augmentation labels while training) into one embedding vector;
- an encoder: a 3x3 input convolution, then per resolution level a downsampling residual block
  (from the second level on) and ``num_blocks`` residual blocks, self-attention at the resolutions
  in ``attn_resolutions``;
- a decoder that mirrors it: two blocks at the lowest resolution (the first with attention), then
  per level an upsampling block (below the lowest) and ``num_blocks + 1`` blocks that each take
  one encoder activation by concatenation; GroupNorm -> SiLU -> 3x3 convolution to the output.

Every residual sum is scaled by sqrt(1/2); resampling filters with the separable FIR kernel
``resample_filter``. Module, parameter and buffer names equal the authors' (``map_layer0``,
``enc.32x32_block0.conv0``, ``dec.32x32_aux_conv``, ...), so ``soflow_fast.interop`` loads their
checkpoints as they are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from soflow_fast.config_fields import at_least, in_range, option
from soflow_fast.models.registry import ModelConfig, register_model

_SKIP_SCALE = math.sqrt(0.5)  # keeps the variance of a residual sum that of one branch
_NORM_EPS = 1e-6

EMBEDDING_TYPES = ("positional", "fourier")
ENCODER_TYPES = ("standard", "skip", "residual")
DECODER_TYPES = ("standard", "skip")


# ----------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups of at least 4 channels each."""
    return nn.GroupNorm(num_groups=min(32, channels // 4), num_channels=channels, eps=_NORM_EPS)


class Conv2d(nn.Module):
    """A k x k convolution (k = 0: none) with an optional 2x up- or downsampling by an FIR filter.

    The 2-D filter (outer product of ``resample_filter`` with itself, normalised to sum 1) is the
    buffer ``resample_filter``, present only on resampling layers, as in the authors' checkpoints.
    Upsampling is a stride-2 transposed depthwise filter (scaled by 4 to keep the mean), then the
    convolution; downsampling filters with stride 2, then convolves. ``fused`` (down only, the
    residual encoder's side path) convolves at full resolution first and filters after.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        bias: bool = True,
        up: bool = False,
        down: bool = False,
        resample_filter: Sequence[float] = (1, 1),
        fused: bool = False,
    ):
        super().__init__()
        if up and down:
            raise ValueError("a convolution resamples up or down, not both")
        if fused and not (down and kernel):
            raise ValueError("fused resampling is a downsampling convolution with a kernel")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused = up, down, fused
        if kernel:
            self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel, kernel))
            self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if up or down:
            f = torch.as_tensor(resample_filter, dtype=torch.float32)
            self.register_buffer("resample_filter", (torch.outer(f, f) / f.sum() ** 2)[None, None])  # (1, 1, n, n)
        else:
            self.resample_filter = None
        if kernel:
            nn.init.xavier_uniform_(self.weight)

    def _filter(self, channels: int, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
        """The filter repeated for a depthwise convolution over ``channels``, and its padding."""
        f = self.resample_filter.to(dtype)
        return f.repeat(channels, 1, 1, 1), (f.shape[-1] - 1) // 2  # (C, 1, n, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, Cin, H, W) -> (B, Cout, H', W'), H' = 2H up, H/2 down
        w = self.weight
        pad = w.shape[-1] // 2 if w is not None else 0
        if self.fused:
            f, f_pad = self._filter(self.out_channels, x.dtype)
            x = F.conv2d(x, w, padding=pad + f_pad)  # (B, Cout, H + 2 f_pad, W + 2 f_pad)
            x = F.conv2d(x, f, groups=self.out_channels, stride=2)  # (B, Cout, H/2, W/2)
        else:
            if self.up:
                f, f_pad = self._filter(self.in_channels, x.dtype)
                x = F.conv_transpose2d(x, f * 4, groups=self.in_channels, stride=2, padding=f_pad)  # (B, Cin, 2H, 2W)
            if self.down:
                f, f_pad = self._filter(self.in_channels, x.dtype)
                x = F.conv2d(x, f, groups=self.in_channels, stride=2, padding=f_pad)  # (B, Cin, H/2, W/2)
            if w is not None:
                x = F.conv2d(x, w, padding=pad)
        if self.bias is not None:
            x = x + self.bias.view(1, -1, 1, 1).to(x.dtype)
        return x


# ----------------------------------------------------------------------------------------------
# Residual block
# ----------------------------------------------------------------------------------------------


class UNetBlock(nn.Module):
    """Pre-activation residual block with additive embedding conditioning and optional attention.

    GroupNorm -> SiLU -> 3x3 conv (resampling here when up/down) -> + Linear(emb) -> GroupNorm ->
    SiLU -> dropout -> 3x3 conv, plus the input (through a resampling 1x1 conv when the shape
    changes); then, with ``attention``, single-head self-attention over the H*W positions as a
    second residual step.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        *,
        up: bool = False,
        down: bool = False,
        attention: bool = False,
        dropout: float = 0.0,
        resample_filter: Sequence[float] = (1, 1),
    ):
        super().__init__()
        self.in_channels, self.out_channels, self.attention = in_channels, out_channels, attention
        resample = dict(up=up, down=down, resample_filter=resample_filter)
        self.norm0 = group_norm(in_channels)
        self.conv0 = Conv2d(in_channels, out_channels, 3, **resample)
        self.affine = nn.Linear(emb_channels, out_channels)
        self.norm1 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)  # an nn.Dropout, so the objective can see that masks are drawn
        self.conv1 = Conv2d(out_channels, out_channels, 3)
        self.skip = (
            Conv2d(in_channels, out_channels, 1, **resample) if in_channels != out_channels or up or down else None
        )
        if attention:
            self.norm2 = group_norm(out_channels)
            self.qkv = Conv2d(out_channels, 3 * out_channels, 1)
            self.proj = Conv2d(out_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # x: (B, Cin, H, W), emb: (B, E) -> (B, Cout, H', W')
        h = self.conv0(F.silu(self.norm0(x)))  # (B, Cout, H', W')
        h = F.silu(self.norm1(h + self.affine(emb).to(h.dtype)[:, :, None, None]))
        h = self.conv1(self.dropout(h))
        h = (h + (x if self.skip is None else self.skip(x))) * _SKIP_SCALE
        if self.attention:
            h = (h + self.proj(self._attend(self.norm2(h)))) * _SKIP_SCALE
        return h

    def _attend(self, h: torch.Tensor) -> torch.Tensor:
        # h: (B, C, H, W) -> (B, C, H, W). The qkv channels interleave as (channel, q/k/v): the
        # authors' layout, which their checkpoints' qkv weights follow.
        B, C, H, W = h.shape
        q, k, v = self.qkv(h).reshape(B, C, 3, H * W).unbind(2)  # (B, C, HW) each
        q, k, v = (z.transpose(1, 2)[:, None] for z in (q, k, v))  # (B, 1, HW, C): one head
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C), softmax(q k^T / sqrt(C)) v
        return out[:, 0].transpose(1, 2).reshape(B, C, H, W)


# ----------------------------------------------------------------------------------------------
# Time features
# ----------------------------------------------------------------------------------------------


class PositionalFeatures(nn.Module):
    """(B,) -> (B, channels): sin then cos of x at frequencies max_positions^(-i / (channels/2 - 1)).

    The frequencies run from 1 down to exactly 1 / max_positions; computed in fp32.
    """

    def __init__(self, channels: int, max_positions: float = 10000.0):
        super().__init__()
        if channels % 2 or channels < 4:
            raise ValueError(f"positional time features need an even number >= 4 of channels, got {channels}")
        self.channels, self.max_positions = channels, max_positions

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.channels // 2
        exponents = torch.arange(half, dtype=torch.float32, device=x.device) / (half - 1)
        args = torch.outer(x.float(), (1.0 / self.max_positions) ** exponents)  # (B, half)
        return torch.cat([args.sin(), args.cos()], dim=1)


class FourierFeatures(nn.Module):
    """(B,) -> (B, channels): sin then cos of 2 pi f x for fixed random frequencies f ~ N(0, scale^2)."""

    def __init__(self, channels: int, scale: float = 16.0):
        super().__init__()
        if channels % 2:
            raise ValueError(f"Fourier time features need an even number of channels, got {channels}")
        self.register_buffer("freqs", torch.randn(channels // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        args = torch.outer(x.float(), 2 * math.pi * self.freqs.float())  # (B, channels/2)
        return torch.cat([args.sin(), args.cos()], dim=1)


# ----------------------------------------------------------------------------------------------
# SongUNet
# ----------------------------------------------------------------------------------------------


class SongUNet(nn.Module):
    """F(x, t, s): the authors' unconditional U-Net. Defaults are their CIFAR-10 settings (55.9M parameters).

    Args:
        img_resolution: height and width of the (square) input; divisible by 2^(levels - 1).
        in_channels, out_channels: image channels in and out.
        label_dim: must be 0: the authors' U-Net is unconditional (kept for their argument list).
        augment_dim: number of augmentation labels embedded while training (0: none).
        model_channels: channels at the first level; level i has model_channels * channel_mult[i].
        channel_mult: per-level channel multipliers; one level per entry, halving the resolution.
        channel_mult_emb: the embedding has model_channels * channel_mult_emb channels.
        num_blocks: residual blocks per level in the encoder (the decoder has one more).
        attn_resolutions: resolutions whose blocks end with self-attention.
        dropout: dropout probability inside every residual block.
        label_dropout: unused (no labels), kept for the authors' argument list.
        embedding_type: "positional" (DDPM++) or "fourier" time features.
        channel_mult_noise: each time feature vector has model_channels * channel_mult_noise channels.
        encoder_type: "standard", "skip" (downsampled input added at each level) or "residual".
        decoder_type: "standard" or "skip" (an output read at every level, upsampled and summed).
        resample_filter: 1-D FIR taps of the up/downsampling filter.
    """

    def __init__(
        self,
        img_resolution: int = 32,
        in_channels: int = 3,
        out_channels: int = 3,
        label_dim: int = 0,
        augment_dim: int = 6,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (2, 2, 2),
        channel_mult_emb: int = 4,
        num_blocks: int = 4,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.3,
        label_dropout: float = 0.0,
        embedding_type: str = "positional",
        channel_mult_noise: int = 2,
        encoder_type: str = "standard",
        decoder_type: str = "standard",
        resample_filter: Sequence[float] = (1, 3, 3, 1),
    ):
        super().__init__()
        levels = len(channel_mult)
        if label_dim:
            raise ValueError(
                f"SongUNet is unconditional (the authors' U-Net path): label_dim must be 0, got {label_dim}"
            )
        for name, value, allowed in (
            ("embedding_type", embedding_type, EMBEDDING_TYPES),
            ("encoder_type", encoder_type, ENCODER_TYPES),
            ("decoder_type", decoder_type, DECODER_TYPES),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
        if levels < 1 or num_blocks < 0 or not 0 <= dropout < 1:
            raise ValueError(
                f"need a non-empty channel_mult, num_blocks >= 0 and dropout in [0, 1); got {list(channel_mult)}, "
                f"{num_blocks}, {dropout}"
            )
        if img_resolution % (1 << (levels - 1)):
            raise ValueError(f"img_resolution={img_resolution} is not divisible by 2^{levels - 1} ({levels} levels)")
        self.img_resolution = self.input_size = img_resolution  # input_size: the name samplers read
        self.in_channels, self.out_channels = in_channels, out_channels
        self.augment_dim, self.label_dropout = augment_dim, label_dropout
        self.num_classes = 0  # unconditional
        self.null_label = None
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        block = partial(UNetBlock, emb_channels=emb_channels, dropout=dropout, resample_filter=resample_filter)

        # Mapping: [features(t), features(t - s)] (+ Linear(augment labels)) -> Linear -> SiLU -> Linear -> SiLU
        features = PositionalFeatures if embedding_type == "positional" else FourierFeatures
        self.map_noise = features(noise_channels)
        self.map_augment = nn.Linear(augment_dim, 2 * noise_channels, bias=False) if augment_dim else None
        self.map_layer0 = nn.Linear(2 * noise_channels, emb_channels)
        self.map_layer1 = nn.Linear(emb_channels, emb_channels)

        # Encoder. `skips` records the channels of every activation the decoder will concatenate.
        self.enc = nn.ModuleDict()
        c, c_aux, skips = in_channels, in_channels, []
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            tag = f"{res}x{res}"
            if level == 0:
                self.enc[f"{tag}_conv"] = Conv2d(c, model_channels, 3)
                c = model_channels
            else:
                self.enc[f"{tag}_down"] = block(c, c, down=True)
                if encoder_type == "skip":  # the input image, downsampled, projected and added
                    self.enc[f"{tag}_aux_down"] = Conv2d(c_aux, c_aux, 0, down=True, resample_filter=resample_filter)
                    self.enc[f"{tag}_aux_skip"] = Conv2d(c_aux, c, 1)
                elif encoder_type == "residual":  # a strided side path carried from level to level
                    self.enc[f"{tag}_aux_residual"] = Conv2d(
                        c_aux, c, 3, down=True, resample_filter=resample_filter, fused=True
                    )
                    c_aux = c
            skips.append(c)
            for i in range(num_blocks):
                self.enc[f"{tag}_block{i}"] = block(c, model_channels * mult, attention=res in attn_resolutions)
                c = model_channels * mult
                skips.append(c)

        # Decoder, lowest resolution first.
        self.dec = nn.ModuleDict()
        for level in reversed(range(levels)):
            res = img_resolution >> level
            tag = f"{res}x{res}"
            if level == levels - 1:
                self.dec[f"{tag}_in0"] = block(c, c, attention=True)
                self.dec[f"{tag}_in1"] = block(c, c)
            else:
                self.dec[f"{tag}_up"] = block(c, c, up=True)
            for i in range(num_blocks + 1):  # each block takes one encoder activation
                c_in, c = c + skips.pop(), model_channels * channel_mult[level]
                self.dec[f"{tag}_block{i}"] = block(c_in, c, attention=i == num_blocks and res in attn_resolutions)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < levels - 1:
                    self.dec[f"{tag}_aux_up"] = Conv2d(
                        out_channels, out_channels, 0, up=True, resample_filter=resample_filter
                    )
                self.dec[f"{tag}_aux_norm"] = group_norm(c)
                self.dec[f"{tag}_aux_conv"] = Conv2d(c, out_channels, 3)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier-uniform weights and zero biases; the last convolution of each residual branch and
        of the output starts at 1e-5 of that (near-identity blocks), qkv at sqrt(0.2)."""
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, (nn.Linear, Conv2d)) and m.weight is not None:
                    nn.init.xavier_uniform_(m.weight)
                    if m.bias is not None:
                        m.bias.zero_()
            for m in self.modules():
                if isinstance(m, UNetBlock):
                    m.conv1.weight.mul_(1e-5)
                    if m.attention:
                        m.qkv.weight.mul_(math.sqrt(0.2))
                        m.proj.weight.mul_(1e-5)
            for name, m in self.dec.items():
                if name.endswith("_aux_conv"):
                    m.weight.mul_(1e-5)

    def embed(self, t: torch.Tensor, s: torch.Tensor, augment_labels: torch.Tensor | None) -> torch.Tensor:
        """The conditioning vector (B, E) from t, t - s and the augmentation labels."""
        t, s = t.float(), s.float()
        emb = torch.cat([self.map_noise(t), self.map_noise(t - s)], dim=1)  # (B, 2 * noise_channels)
        emb = emb.to(self.map_layer0.weight.dtype)
        if augment_labels is not None:
            if self.map_augment is None:
                raise ValueError("this SongUNet has augment_dim=0: it takes no augment_labels")
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        emb = F.silu(self.map_layer0(emb))
        return F.silu(self.map_layer1(emb))  # (B, E)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        s: torch.Tensor,
        y: torch.Tensor | None = None,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """F(x, t, s).

        Args:
            x: (B, C, H, W) state at time t.
            t, s: (B,) float times in [0, 1] (t = 1 is noise).
            y: must be None (the network is unconditional); there for the (x, t, s, y) signature.
            augment_labels: (B, augment_dim) labels of the augmentation each row went through while
                training; None (inference) leaves the augmentation term out.
        Returns:
            (B, out_channels, H, W)
        """
        B = x.shape[0]
        if y is not None:
            raise ValueError("SongUNet is unconditional: y must be None")
        if x.shape[1:] != (self.in_channels, self.img_resolution, self.img_resolution):
            raise ValueError(
                f"SongUNet expects x of shape (B, {self.in_channels}, {self.img_resolution}, {self.img_resolution}), "
                f"got {tuple(x.shape)}"
            )
        if t.shape != (B,) or s.shape != (B,):
            raise ValueError(f"t and s must have shape ({B},), got {tuple(t.shape)} and {tuple(s.shape)}")
        if augment_labels is not None and self.augment_dim and augment_labels.shape != (B, self.augment_dim):
            raise ValueError(
                f"augment_labels must have shape ({B}, {self.augment_dim}), got {tuple(augment_labels.shape)}"
            )
        emb = self.embed(t, s, augment_labels)  # (B, E)
        h = x.to(self.map_layer0.weight.dtype)

        # Encoder: keep every main-path activation for the decoder. The names say what a module is.
        skips, aux = [], h
        for name, m in self.enc.items():
            if name.endswith("_aux_down"):  # (skip encoder) the image at this level's resolution
                aux = m(aux)
            elif name.endswith("_aux_skip"):  # ... added to the downsampling block's output
                h = skips[-1] = h + m(aux)
            elif name.endswith("_aux_residual"):  # (residual encoder) the side path joins the main one
                h = skips[-1] = aux = (h + m(aux)) / math.sqrt(2)
            else:
                h = m(h) if name.endswith("_conv") else m(h, emb)  # (B, C_level, res, res)
                skips.append(h)

        # Decoder: `_block` modules concatenate the matching encoder activation; `_aux_*` modules
        # read an output image off the main path (and, for the skip decoder, sum it over levels).
        out, tmp = None, None
        for name, m in self.dec.items():
            if name.endswith("_aux_up"):
                out = m(out)
            elif name.endswith("_aux_norm"):
                tmp = m(h)
            elif name.endswith("_aux_conv"):
                tmp = m(F.silu(tmp))  # (B, out_channels, res, res)
                out = tmp if out is None else tmp + out
            else:
                if "_block" in name:
                    h = torch.cat([h, skips.pop()], dim=1)  # (B, C + C_skip, res, res)
                h = m(h, emb)
        return out.to(x.dtype)


def build_unet(input_size: int = 32, in_channels: int = 3, num_classes: int | None = 0, **kwargs) -> SongUNet:
    """``build_model("UNet", input_size=32, in_channels=3)``: the authors' CIFAR-10 U-Net.

    ``input_size`` and ``in_channels`` map to ``img_resolution`` and both ``in_channels`` and
    ``out_channels``; other keyword arguments go to ``SongUNet``. It is unconditional, so
    ``num_classes`` must be 0 or None.
    """
    if num_classes:
        raise ValueError(f"model 'UNet' is unconditional: num_classes must be 0, got {num_classes}")
    kwargs.setdefault("out_channels", in_channels)
    return SongUNet(img_resolution=input_size, in_channels=in_channels, **kwargs)


# ----------------------------------------------------------------------------------------------
# Registry entry
# ----------------------------------------------------------------------------------------------

_DEFAULT_AUGMENT_DIM = 6  # SongUNet's default: EDM's augmentation labels


@register_model
@dataclass(kw_only=True)
class UNetConfig(ModelConfig):
    """The authors' CIFAR-10 U-Net (``model.model=UNet``): unconditional; None keeps SongUNet's default."""

    LABEL: ClassVar[str] = "UNet"
    # every block runs UNetBlock.forward, one code object to dynamo, so each distinct block (channels,
    # resolution, up/down, attention) is a recompile of it; Inductor fails on the dynamic shapes such a
    # recompile would bring in (tests/test_unet.py), so the blocks compile with static shapes
    COMPILE_DYNAMIC: ClassVar[bool | None] = False
    OFFICIAL_DEFAULTS: ClassVar[dict[str, Any]] = {"in_channels": 3, "num_classes": 0}
    CONDITIONS: ClassVar[tuple[str, ...]] = ()

    num_classes: int = option(0, check=at_least(0))
    model_channels: int | None = option(None, check=at_least(1))  # SongUNet's 128
    channel_mult: tuple[int, ...] | None = option(None, check=at_least(1))  # [2, 2, 2]: channels per level
    num_blocks: int | None = option(None, check=at_least(1))  # 4 per level
    attn_resolutions: tuple[int, ...] | None = option(None, check=at_least(1))  # [16]
    dropout: float | None = option(None, check=in_range(0, 1, open_high=True))  # 0.3
    augment_dim: int | None = option(None, check=at_least(0))  # 6 augmentation labels; 0 = none

    @classmethod
    def construct(cls, name: str, **kwargs) -> SongUNet:
        return build_unet(**kwargs)

    def build_kwargs(self) -> dict[str, Any]:
        names = ("model_channels", "channel_mult", "num_blocks", "attn_resolutions", "dropout", "augment_dim")
        kw = {n: list(v) if isinstance(v, tuple) else v for n in names if (v := getattr(self, n)) is not None}
        return dict(input_size=self.input_size, in_channels=self.in_channels, **kw)

    @staticmethod
    def blocks(model: SongUNet) -> list[tuple[Any, Any]]:
        """The encoder's and decoder's ``UNetBlock`` entries; the convolutions stay with the root."""
        return [(d, k) for d in (model.enc, model.dec) for k, m in d.items() if isinstance(m, UNetBlock)]

    def condition(self) -> None:
        return None

    def embeds_augment_labels(self) -> bool:
        return (_DEFAULT_AUGMENT_DIM if self.augment_dim is None else self.augment_dim) > 0

    def check_with(self, cfg) -> None:
        # a layer that never receives labels gets no gradient and so no optimiser state, which a resume misses
        if self.embeds_augment_labels() and not cfg.data.augment:
            augment_dim = _DEFAULT_AUGMENT_DIM if self.augment_dim is None else self.augment_dim
            raise ValueError(
                f"model.augment_dim={augment_dim} embeds augmentation labels, but data.augment is off, so that "
                "layer would never train: set model.augment_dim=0, or data.augment=edm"
            )
