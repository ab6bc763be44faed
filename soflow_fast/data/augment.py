"""EDM's geometric augmentation as the SoFlow authors train CIFAR-10 with it.

The authors call NVIDIA EDM's ``AugmentPipe(p=0.12, xflip=1e8, yflip=0, scale=1, rotate_frac=0,
aniso=1, translate_frac=1)`` and give the network the six labels it returns. This module is an
independent implementation of that configuration (the same random draws, in the same order, and
the same resampling), split into :meth:`EDMAugment.draw` and :meth:`EDMAugment.apply` so that a
trainer can draw for the whole global batch from a per-step generator and apply only its rank's
rows; the result then depends neither on the world size nor on anything but the step's seed.

Per image, with ``p`` the probability of each geometric transform:

1. x-flip with probability 1/2 (EDM's ``xflip=1e8`` makes ``xflip * p`` exceed 1, so ``p`` plays no part);
2. isotropic scaling by ``s = 2 ** (scale_std * w)``, ``w ~ N(0, 1)``, with probability ``p``;
3. anisotropic scaling by ``(s, 1 / s)``, ``s = 2 ** (aniso_std * w)``, with probability ``p``, along
   axes turned by an angle ``r ~ U(-pi, pi)`` with probability ``aniso_rotate_prob`` (else 0);
4. translation by ``(wx * W, wy * H) * translate_std`` pixels, ``wx, wy ~ N(0, 1)``, with probability ``p``.

Labels (float32, ``[N, NUM_LABELS]``): ``[flip, w_scale, w_aniso * cos r, w_aniso * sin r, wx, wy]``,
each 0 where its transform was not drawn. The flip is exact; steps 2-4 compose into one affine
map that every image goes through, transformed or not: reflect padding, 2x upsampling with the
Symlet-6 low-pass filter, bilinear sampling (zeros outside), 2x downsampling with the same
filter, crop. The filter is orthonormal at even shifts, so where the map moves pixels by whole
pixels (no transform, integer shifts) the round trip gives the pixels back up to float rounding;
fractional maps are interpolated with the filter's low-pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["NUM_LABELS", "AugmentDraws", "EDMAugment"]

NUM_LABELS = 6

# Symlet-6 decomposition low-pass filter (the published wavelet coefficients; they sum to sqrt 2).
_SYM6 = (
    0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
    0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
    -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148,
)  # fmt: skip
_TAPS = len(_SYM6)
# Output pixels computed beyond each side of the image and cropped after downsampling: the
# downsampling filter reaches 3 base pixels from an output pixel (6 taps at the 2x resolution).
_BORDER = _TAPS // 4


@dataclass
class AugmentDraws:
    """The random numbers of one batch; ``draws[rows]`` takes rows (a slice, an index tensor).

    Magnitudes are 0 where their transform is off; the ``*_on`` masks say which were drawn on.
    """

    flip: Tensor  # [N] bool
    scale: Tensor  # [N] w of the isotropic scaling
    aniso: Tensor  # [N] w of the anisotropic scaling
    angle: Tensor  # [N] r of the anisotropic scaling's frame (0 when the frame is not turned)
    translate: Tensor  # [N, 2] (wx, wy)
    scale_on: Tensor  # [N] bool
    aniso_on: Tensor  # [N] bool
    rotate_on: Tensor  # [N] bool
    translate_on: Tensor  # [N] bool

    def __len__(self) -> int:
        return self.flip.shape[0]

    def __getitem__(self, rows) -> AugmentDraws:
        return AugmentDraws(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})

    def to(self, device) -> AugmentDraws:
        return AugmentDraws(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def labels(self) -> Tensor:
        """``[N, NUM_LABELS]`` float32: flip, scale, aniso cos, aniso sin, tx, ty."""
        cols = (self.flip.float(), self.scale, self.aniso * self.angle.cos(), self.aniso * self.angle.sin())
        return torch.cat([torch.stack(cols, dim=1), self.translate], dim=1).float()


@dataclass
class EDMAugment:
    """EDM's geometric augmentation; the defaults are the SoFlow authors' CIFAR-10 settings.

    ``p`` is the probability of each of scaling, anisotropic scaling and translation; the x-flip
    (``xflip=True``) flips half the images whatever ``p`` is, as ``xflip=1e8`` does in EDM.
    """

    p: float = 0.12
    xflip: bool = True
    scale_std: float = 0.2
    aniso_std: float = 0.2
    aniso_rotate_prob: float = 0.5
    translate_std: float = 0.125

    def __post_init__(self):
        for name in ("p", "aniso_rotate_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"EDMAugment.{name} must lie in [0, 1], got {getattr(self, name)}")
        for name in ("scale_std", "aniso_std", "translate_std"):
            if not getattr(self, name) >= 0.0:
                raise ValueError(f"EDMAugment.{name} must be >= 0, got {getattr(self, name)}")

    def draw(self, n: int, generator: torch.Generator | None = None, device=None) -> AugmentDraws:
        """Draw for ``n`` images in EDM's order, on the generator's device (the global RNG of
        ``device`` when ``generator`` is None, as EDM does), and return them on ``device``."""
        src = generator.device if generator is not None else torch.device(device or "cpu")
        kw = {"generator": generator, "device": src}
        if self.xflip:
            flip = torch.randint(2, (n,), **kw) == 1
            torch.rand(n, **kw)  # EDM's "is the flip applied" draw: always true with xflip * p > 1
        else:
            flip = torch.zeros(n, dtype=torch.bool, device=src)

        def gated(w: Tensor, prob: float) -> tuple[Tensor, Tensor]:
            on = torch.rand(w.shape[-1], **kw) < prob
            return torch.where(on, w, torch.zeros_like(w)), on

        scale, scale_on = gated(torch.randn(n, **kw), self.p)
        aniso = torch.randn(n, **kw)
        angle = (torch.rand(n, **kw) * 2 - 1) * math.pi
        aniso, aniso_on = gated(aniso, self.p)
        angle, rotate_on = gated(angle, self.aniso_rotate_prob)
        translate, translate_on = gated(torch.randn(2, n, **kw), self.p)
        draws = AugmentDraws(flip, scale, aniso, angle, translate.t(), scale_on, aniso_on, rotate_on, translate_on)
        return draws.to(device) if device is not None else draws

    def apply(self, images: Tensor, draws: AugmentDraws) -> tuple[Tensor, Tensor]:
        """Augment ``images`` [N, C, H, W] with ``draws`` (N rows); returns (images in the input's
        dtype, labels [N, NUM_LABELS] float32), both on the images' device."""
        if images.ndim != 4:
            raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"images must be floating point, got {images.dtype}")
        if len(draws) != images.shape[0]:
            raise ValueError(f"{len(draws)} rows of draws for {images.shape[0]} images")
        draws = draws.to(images.device)
        x = images.to(torch.promote_types(images.dtype, torch.float32))  # bf16/fp16 resample in fp32
        x = torch.where(draws.flip[:, None, None, None], x.flip(3), x)
        x = _resample(x, *self._inverse_map(draws, images.shape[2], images.shape[3]))
        return x.to(images.dtype), draws.labels()

    def __call__(
        self, images: Tensor, generator: torch.Generator | None = None, rows=None, total: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """Draw for ``total`` images (default: len(images)), keep ``rows`` of the draws (e.g.
        ``slice(rank, None, world_size)``) and apply them to ``images``."""
        draws = self.draw(images.shape[0] if total is None else total, generator, images.device)
        return self.apply(images, draws if rows is None else draws[rows])

    def _inverse_map(self, d: AugmentDraws, H: int, W: int) -> tuple[Tensor, Tensor]:
        """(L [N, 2, 2], b [N, 2]) with input = L @ output + b in pixel coordinates centred on the
        image: the inverse of "scale, then aniso-scale, then translate"."""

        def mat(a, b, c, e):
            return torch.stack([torch.stack([a, b], -1), torch.stack([c, e], -1)], -2)

        zero = torch.zeros_like(d.scale)
        inv_s = torch.exp2(-self.scale_std * d.scale)
        inv_a = torch.exp2(-self.aniso_std * d.aniso)
        cos, sin = d.angle.cos(), d.angle.sin()
        # Undo the translation, then the anisotropic scaling in the frame turned by r (turn by
        # r, divide x by s and y by 1 / s, turn back), then the isotropic scaling.
        turn, turn_back = mat(cos, -sin, sin, cos), mat(cos, sin, -sin, cos)
        L = mat(inv_s, zero, zero, inv_s) @ turn_back @ mat(inv_a, zero, zero, 1 / inv_a) @ turn
        shift = d.translate * d.translate.new_tensor([W * self.translate_std, H * self.translate_std])
        return L, -(L @ shift[:, :, None])[:, :, 0]


def _resample(x: Tensor, L: Tensor, b: Tensor, margin: tuple[int, int, int, int] | None = None) -> Tensor:
    """Warp ``x`` [N, C, H, W] by input = L @ output + b (centred pixel coordinates), EDM-style.
    ``margin`` (left, top, right, bottom) replaces the fixed padding (for tests against EDM)."""
    N, C, H, W = x.shape
    # Padding. EDM reflect-pads by a margin computed from the batch (how far the map sends the
    # image's corners, plus 6 pixels for the filters, clamped to H - 1 / W - 1: the most reflect
    # padding allows) and reads it to the host, a device->host sync per batch. We always pad by the
    # clamp. Padding the map never reaches is never read, so where EDM's margin covers what is
    # sampled the output is the same to float precision. It does not always: its 6 pixels are
    # fixed while the 3-pixel output border that the downsampling reads grows with a zoom-out, so
    # EDM can read the zero-filled edge of its padding into the outer 3 rows/columns (measured up
    # to ~1e-4 on [-1, 1] noise); we read reflected pixels there. An image's output also no longer
    # depends on the rest of its batch. The cost: resampling a ~3x wider, ~3x taller image.
    mx0, my0, mx1, my1 = (W - 1, H - 1) * 2 if margin is None else margin
    x = F.pad(x, [mx0, mx1, my0, my1], mode="reflect")
    Hp, Wp = x.shape[2:]
    x = x.reshape(N * C, 1, Hp, Wp)
    b = b + b.new_tensor([mx0 - mx1, my0 - my1]) / 2  # centred coordinates of the padded image
    # 2x upsampling: zero-stuffing + the filter, i.e. a stride-2 transposed convolution. Its phase
    # puts base pixel x (centred coordinates) at 2x - 1/2 on the fine grid, and downsampling below
    # undoes that.
    k = x.new_tensor(_SYM6)
    pad = (_TAPS - 2) // 2
    x = F.conv_transpose2d(x, k.view(1, 1, 1, -1), stride=(1, 2), padding=(0, pad))
    x = F.conv_transpose2d(x, k.view(1, 1, -1, 1), stride=(2, 1), padding=(pad, 0)).view(N, C, 2 * Hp, 2 * Wp)
    # Bilinear sampling at the fine resolution of an output that is _BORDER pixels larger on each
    # side. In affine_grid's normalised coordinates (align_corners=False: +-1 at the outer pixel
    # edges) the map is n_in = D_in L D_out^-1 n_out + D_in (b + (L - I) 1 / 4), with D = diag(2 /
    # width, 2 / height) at the base resolution; the quarter pixel comes from the 2x - 1/2 phase.
    Ho, Wo = H + 2 * _BORDER, W + 2 * _BORDER
    d_in = x.new_tensor([2 / Wp, 2 / Hp])
    d_out = x.new_tensor([Wo / 2, Ho / 2])
    L = L.to(x.dtype)
    offset = b.to(x.dtype) + ((L - torch.eye(2, dtype=x.dtype, device=x.device)).sum(-1)) / 4
    theta = torch.cat([d_in[:, None] * L * d_out, (d_in * offset)[:, :, None]], dim=2)
    grid = F.affine_grid(theta, [N, C, 2 * Ho, 2 * Wo], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # 2x downsampling with the same filter, then crop the border.
    x = x.reshape(N * C, 1, 2 * Ho, 2 * Wo)
    pad = (_TAPS - 1) // 2
    x = F.conv2d(x, k.view(1, 1, 1, -1), stride=(1, 2), padding=(0, pad))
    x = F.conv2d(x, k.view(1, 1, -1, 1), stride=(2, 1), padding=(pad, 0))
    return x.view(N, C, Ho, Wo)[:, :, _BORDER:-_BORDER, _BORDER:-_BORDER]
