"""Calling a network F(x, t, s, y, **model_kwargs): per-row extra inputs and dropout masks.

Extra inputs (the U-Net's augmentation labels) travel as ``model_kwargs``, a dict whose tensors have
one row per sample; the objectives split and join them with the batch. A network with dropout draws
masks in every forward; ``same_masks_after`` lets the no_grad target call and the trained call see
the same masks.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn


def rows_of(model_kwargs: dict | None, rows) -> dict | None:
    """The per-row entries of ``model_kwargs`` (tensors with one row per sample) indexed by ``rows``
    (a slice or an index tensor); other values pass unchanged."""
    if model_kwargs is None:
        return None
    return {k: v[rows] if isinstance(v, torch.Tensor) else v for k, v in model_kwargs.items()}


def cat_rows(parts: list[dict | None]) -> dict | None:
    """Row-wise concatenation of several ``model_kwargs`` (the inverse of ``rows_of`` over a split)."""
    if parts[0] is None:
        return None
    return {k: torch.cat([p[k] for p in parts]) if isinstance(v, torch.Tensor) else v for k, v in parts[0].items()}


def call(model, x, t, s, y, model_kwargs: dict | None) -> torch.Tensor:
    return model(x, t, s, y, **(model_kwargs or {}))


def dropout_active(model) -> bool:
    """Whether a forward pass of ``model`` draws dropout masks: it holds a torch dropout module with
    p > 0 in training mode. (Dropout written as a bare ``F.dropout`` call is not seen.)"""
    if not isinstance(model, nn.Module):
        return False
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 and m.training for m in model.modules())


def same_masks_after(enabled: bool, device: torch.device):
    """A context that, when ``enabled``, puts the RNG (CPU, and the device's when on CUDA) back as it
    found it: the network call after it then draws the dropout masks the call inside drew. (Disabled,
    it is a nullcontext, which torch.compile traces through; fork_rng would break the graph.)"""
    if not enabled:
        return contextlib.nullcontext()
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
