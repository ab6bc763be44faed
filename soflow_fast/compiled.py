"""A loss function compiled whole by torch.compile, with a probed backward and an eager fallback.

Shared by ``SoFlowObjective.compiled_loss`` and ``MeanFlowObjective.compiled_loss``: both draw
their random numbers eagerly (a torch.Generator cannot enter the graph) and hand tensors to one
compiled function. The first call also runs one throw-away backward, because some compile
failures only surface there (torch 2.13: "ZeroTensors are immutable" in MeanFlow's JVP). If
compiling, the compiled forward or that backward raises, the owner warns once, records the error
and runs eager from then on; later recompilations (a new batch shape) are not probed.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class CompiledLoss:
    """``fn`` compiled on first use. Call with ``(model, eager, *args)``: ``eager()`` computes the same
    loss without the compiler and is used when compilation fails (and then for good)."""

    def __init__(self, fn: Callable, owner: str, compile_options: dict[str, Any] | None = None):
        self.fn = fn
        self.owner = owner  # named in the warning, e.g. "SoFlowObjective.compiled_loss"
        self.options = dict(compile_options or {})
        self.error: str | None = None  # "ExcType: message" once it has fallen back to eager
        self._compiled: Callable | None = None
        self._probed = False

    def __call__(self, model, eager: Callable[[], Any], *args):
        failure = None
        if self.error is None:
            if self._compiled is None:
                self._compiled = torch.compile(self.fn, **self.options)
            try:
                total, logs = self._compiled(model, *args)
                if not self._probed:
                    params = [p for p in model.parameters() if p.requires_grad] if isinstance(model, nn.Module) else []
                    if params and total.requires_grad:
                        torch.autograd.grad(total, params, retain_graph=True, allow_unused=True)
                    self._probed = True
                return total, logs
            except Exception as err:  # the compiler's failure: fall back below and say so once
                failure = err
        out = eager()  # raises on its own when the inputs are at fault, and then the compiler is not blamed
        if failure is not None:
            self.error = f"{type(failure).__name__}: {failure}"
            self._compiled = None
            warnings.warn(
                f"{self.owner}: torch.compile of the full loss failed; running eager from now on. {self.error}",
                RuntimeWarning,
                stacklevel=3,
            )
        return out
