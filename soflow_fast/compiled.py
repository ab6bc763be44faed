"""An objective's training loss compiled whole by torch.compile, with a probed backward and an eager fallback.

``CompiledLoss(objective.loss_from_draws)`` has the training-loss protocol of both objectives:
``(model, x0, y, draws[, model_kwargs]) -> (loss, logs)``. The draws are made eagerly (a
torch.Generator cannot enter the graph) and their tensors become graph inputs. The first call also runs one throw-away
backward, because some compile failures only surface there (torch 2.13: "ZeroTensors are
immutable" in MeanFlow's JVP). If compiling, the compiled forward or that backward raises, the
wrapper warns once, records the error and runs eager from then on; later recompilations (a new
batch shape) are not probed.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class CompiledLoss:
    """``loss_fn`` (an objective's ``loss_from_draws``) compiled on first use, same signature.

    Args:
        loss_fn: ``(model, x0, y, draws) -> (loss, logs)``; ``draws`` is a dataclass of tensors and ints.
        compile_options: keyword arguments for ``torch.compile``.
        probe_backward: run the throw-away backward on the first call. Off under CUDA graphs
            (``mode="reduce-overhead"``), whose recorded backward should run once per forward: a
            failure there raises from the step's own backward instead of falling back.
    """

    def __init__(
        self, loss_fn: Callable, compile_options: dict[str, Any] | None = None, *, probe_backward: bool = True
    ):
        self.loss_fn = loss_fn
        self.owner = getattr(loss_fn, "__qualname__", repr(loss_fn))  # named in the warning
        self.options = dict(compile_options or {})
        self.error: str | None = None  # "ExcType: message" once it has fallen back to eager
        self._compiled: Callable | None = None
        self._probed = not probe_backward
        self._draws_type: type | None = None
        self._names: tuple[str, ...] = ()

    def _eager(self, model, x0, y, draws, model_kwargs):
        # extra network inputs are passed only when there are some: MeanFlow's loss takes none
        extra = () if model_kwargs is None else (model_kwargs,)
        return self.loss_fn(model, x0, y, draws, *extra)

    def _from_fields(self, model, x0, y, model_kwargs, *values):
        # the draws rebuilt inside the graph from its flat inputs
        return self._eager(model, x0, y, self._draws_type(**dict(zip(self._names, values, strict=True))), model_kwargs)

    def __call__(self, model, x0: torch.Tensor, y, draws, model_kwargs: dict | None = None):
        failure = None
        if self.error is None:
            if self._compiled is None:
                self._draws_type = type(draws)
                self._names = tuple(f.name for f in dataclasses.fields(draws))
                self._compiled = torch.compile(self._from_fields, **self.options)
            try:
                values = [getattr(draws, n) for n in self._names]
                if self._probed:
                    return self._compiled(model, x0, y, model_kwargs, *values)
                # the probe's backward keeps the graph for the step's own backward, which a backward
                # compiled with donated buffers refuses ("non-empty donated buffers"): the probed first
                # compile is made without them
                with torch._functorch.config.patch(donated_buffer=False):
                    total, logs = self._compiled(model, x0, y, model_kwargs, *values)
                    params = [p for p in model.parameters() if p.requires_grad] if isinstance(model, nn.Module) else []
                    if params and total.requires_grad:
                        torch.autograd.grad(total, params, retain_graph=True, allow_unused=True)
                self._probed = True
                return total, logs
            except Exception as err:  # the compiler's failure: fall back below and say so once
                failure = err
        out = self._eager(model, x0, y, draws, model_kwargs)  # raises on its own when the inputs are at fault
        if failure is not None:
            self.error = f"{type(failure).__name__}: {failure}"
            self._compiled = None
            warnings.warn(
                f"{self.owner}: torch.compile of the full loss failed; running eager from now on. {self.error}",
                RuntimeWarning,
                stacklevel=2,
            )
        return out
