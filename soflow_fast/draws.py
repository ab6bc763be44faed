"""The random quantities of one SoFlow step, and the loss of a batch split into draw groups.

``Draws`` holds everything random in one training step, so that paths can be compared on equal draws
(``SoFlowObjective.draw_batch`` makes them); ``mean_over_groups`` evaluates a loss on draws made for G
ranks in one process. Both are importable from ``soflow_fast.objective`` too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from soflow_fast.network_calls import rows_of


@dataclass
class Draws:
    """Random quantities of one step. With groups == 1, rows [:n_fm] train flow matching and the
    rest consistency; otherwise see ``SoFlowObjective.draw_batch``."""

    n_fm: int
    noise: torch.Tensor  # (B, *dims)
    t: torch.Tensor  # (B,) FM rows: t; SCM rows: t
    s: torch.Tensor  # (B,) FM rows: s = t; SCM rows: s < t
    l: torch.Tensor  # (B,) SCM rows: middle time, clamped; FM rows: unused (= t)
    cfg_mask: torch.Tensor | None  # (B,) bool, True = sees the null label; None without guidance
    groups: int = 1  # row i belongs to group i % groups; each group is [FM rows, SCM rows]

    def group(self, g: int, groups: int | None = None) -> Draws:
        """Rows of group g (rank g's share of a strided global batch), FM rows first."""
        G = self.groups if groups is None else groups
        if G != self.groups:
            raise ValueError(f"these draws were made for {self.groups} groups, not {G}")
        if G == 1:
            return self
        rows = slice(g, None, G)
        return Draws(
            n_fm=self.n_fm // G,
            noise=self.noise[rows],
            t=self.t[rows],
            s=self.s[rows],
            l=self.l[rows],
            cfg_mask=None if self.cfg_mask is None else self.cfg_mask[rows],
        )


def mean_over_groups(loss_fn, model, x0: torch.Tensor, y, d, model_kwargs: dict | None = None):
    """``loss_fn(model, x0, y, d)`` for draws of one group; for draws of G groups, the mean over the
    groups g of the loss on rows g::G, logs averaged likewise (one process standing in for G ranks).
    ``model_kwargs``, when given, is passed on as a fifth argument, its rows sliced likewise."""
    G = d.groups
    if G == 1:
        return loss_fn(model, x0, y, d) if model_kwargs is None else loss_fn(model, x0, y, d, model_kwargs)
    total, logs = 0.0, {}
    for g in range(G):
        rows = slice(g, None, G)
        extra = () if model_kwargs is None else (rows_of(model_kwargs, rows),)
        lg, log_g = loss_fn(model, x0[rows], None if y is None else y[rows], d.group(g), *extra)
        total = total + lg / G
        for k, v in log_g.items():
            logs[k] = logs.get(k, 0.0) + v / G
    return total, logs
