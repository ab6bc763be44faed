"""SiT checkpoints (facebookresearch/SiT) as this engine's DiT: the adapter behind ``DiTConfig.foreign_state_dict``.

SiT's network is DiT's (``x_embedder``, ``t_embedder``, ``y_embedder``, ``blocks``, ``final_layer``, a frozen
``pos_embed``) with one time embedder, trained on the interpolant x_tau = tau x0 + (1 - tau) eps (tau = 1 is
data: its ``Linear`` path) to predict the velocity x0 - eps (its ``prediction=velocity``). In SoFlow's time
t = 1 - tau the same path has the velocity eps - x0, so the velocity at our (x, t) is -v_SiT(x, 1 - t). The
conversion writes both changes into the weights, so the result is a plain DiT that trains, shards, saves and
exports like any other:

* time: the t-embedder's sinusoid of 1 - t is a fixed linear map of its sinusoid of t, frequency by frequency
  (cos w(1 - t) = cos w cos wt + sin w sin wt, sin w(1 - t) = sin w cos wt - cos w sin wt), folded into the
  embedder's first Linear (in float64);
* sign: the final Linear's weight and bias are negated;
* ``learn_sigma`` (SiT's default: 2C output channels, of which its forward keeps the first C): the final
  Linear keeps the rows of those C channels;
* the s-embedder SiT lacks: ``model``'s own initial weights with its last Linear zeroed. Its input at s = t is
  the sinusoid of 0, which is not zero (cos 0 = 1), so only a zero last layer makes it add nothing to c: the
  converted model then gives F(x, t, s) = -v_SiT(x, 1 - t) for every s, and the s-embedder learns from there.

A training checkpoint's ``args`` are checked when present (``path_type`` Linear, ``prediction`` velocity);
the released weights carry none and are taken to be those defaults.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn

from soflow_fast.models.dit import timestep_frequencies

_SIT_DEFAULTS = (("path_type", "Linear"), ("prediction", "velocity"))


def reverse_time(weight: torch.Tensor) -> torch.Tensor:
    """The first Linear of a time embedder that reads the sinusoid of t as ``weight`` reads that of 1 - t.

    ``weight`` is (hidden, dim) over ``timestep_embedding``'s features [cos(w t), sin(w t)] (a zero last column
    when dim is odd)."""
    half = weight.shape[1] // 2
    w = timestep_frequencies(weight.shape[1]).double()
    cos, sin = torch.cos(w), torch.sin(w)
    old = weight.double()
    new = old.clone()
    new[:, :half] = old[:, :half] * cos + old[:, half : 2 * half] * sin
    new[:, half : 2 * half] = old[:, :half] * sin - old[:, half : 2 * half] * cos
    return new.to(weight.dtype)


def sit_state_dict(state: Mapping, model: nn.Module) -> dict[str, torch.Tensor]:
    """SiT's weights in ``state`` (its state dict, or its training checkpoint ``{"model", "ema", "opt", "args"}``,
    whose EMA weights are taken) as a state dict of ``model``, our DiT of the same sizes (see the module
    docstring). A missing or mis-shaped key surfaces when the result is checked against ``model``."""
    from soflow_fast.interop import convert_official_state_dict

    args = state.get("args") if isinstance(state, Mapping) else None
    for key, want in _SIT_DEFAULTS:
        got = getattr(args, key, want)
        if got != want:
            raise ValueError(f"a SiT checkpoint trained with {key}={got}: only {key}={want} converts")
    sd = dict(convert_official_state_dict(state))
    if any(k.startswith("s_embedder.") for k in sd) or "t_embedder.mlp.0.weight" not in sd:
        raise ValueError("not a SiT checkpoint: it has an s_embedder, or no t_embedder")
    own = model.state_dict()
    sd["t_embedder.mlp.0.weight"] = reverse_time(sd["t_embedder.mlp.0.weight"])
    rows = own["final_layer.linear.weight"].shape[0]
    if sd["final_layer.linear.weight"].shape[0] == 2 * rows:  # learn_sigma: rows are (p, q, channel of 2C)
        C = model.out_channels
        keep = torch.arange(2 * rows) % (2 * C) < C
        for k in ("final_layer.linear.weight", "final_layer.linear.bias"):
            sd[k] = sd[k][keep]
    for k in ("final_layer.linear.weight", "final_layer.linear.bias"):
        sd[k] = -sd[k]
    for k, v in own.items():
        if k.startswith("s_embedder."):
            sd[k] = torch.zeros_like(v) if k.startswith("s_embedder.mlp.2.") else v.clone()
    return sd
