"""A function of tensors captured once in a CUDA graph and replayed: the engine of ``parallel.cuda_graphs=step``.

``StepGraph(fn)`` runs ``fn(*tensors)`` eagerly for its first ``warmup`` calls (on a side stream on
CUDA, as graph capture wants: lazy allocations, cuBLAS workspaces and compiles happen there), then
captures one call on static copies of the inputs. Every later call copies its inputs into those
static tensors and replays the graph: the hundreds of kernels of a training step start with one
launch. The outputs are the graph's static tensors, so each call returns copies.

A captured call cannot depend on the host: every input that is not a tensor (``None``, an int
such as the step's number of flow-matching rows) must be the same at every call, and shapes and
dtypes must not change; either is an error naming the input. Off CUDA, or with a ``capture``
stand-in (the tests'), the same bookkeeping runs without a graph.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

Capture = Callable[[Callable[[], Any]], tuple[Callable[[], None], Any]]


def cuda_capture(fn: Callable[[], Any]) -> tuple[Callable[[], None], Any]:
    """Capture ``fn()`` in a CUDA graph: (replay, the graph's outputs).

    The capture forbids unsafe CUDA calls on this thread only: a DataLoader's pin-memory thread
    allocates pinned host memory and queries events while the step is being captured.
    """
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        out = fn()
    return graph.replay, out


def _describe(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device)
    return value


class StepGraph:
    """``fn(*inputs)`` replayed from a CUDA graph after ``warmup`` eager calls.

    Args:
        fn: a function of tensors (and fixed non-tensor values) returning a dict of tensors.
        warmup: eager calls before the capture (at least 1).
        capture: ``cuda_capture`` (default) or a stand-in with its signature.
    """

    def __init__(self, fn: Callable[..., dict[str, torch.Tensor]], *, warmup: int = 3, capture: Capture = cuda_capture):
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1, got {warmup}")
        self.fn, self.warmup, self.capture = fn, warmup, capture
        self.calls = 0
        self._static: list[Any] | None = None  # the captured call's inputs
        self._replay: Callable[[], None] | None = None
        self._out: dict[str, torch.Tensor] | None = None

    @property
    def captured(self) -> bool:
        return self._replay is not None

    def __call__(self, *inputs: Any) -> dict[str, torch.Tensor]:
        self.calls += 1
        if self.calls <= self.warmup:
            return self._eager(inputs, side_stream=any(isinstance(v, torch.Tensor) and v.is_cuda for v in inputs))
        if self._replay is None:
            self._static = [v.clone() if isinstance(v, torch.Tensor) else v for v in inputs]
            self._replay, self._out = self.capture(lambda: self.fn(*self._static))
        self._load(inputs)
        self._replay()
        return {k: v.clone() for k, v in self._out.items()}

    def _eager(self, inputs: Sequence[Any], side_stream: bool) -> dict[str, torch.Tensor]:
        if not side_stream:
            return self.fn(*inputs)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            out = self.fn(*inputs)
        torch.cuda.current_stream().wait_stream(stream)
        return out

    def _load(self, inputs: Sequence[Any]) -> None:
        """Copy a call's inputs into the captured ones, which must match them in kind, shape and dtype."""
        if len(inputs) != len(self._static):
            raise ValueError(f"the captured step took {len(self._static)} inputs, this call {len(inputs)}")
        for i, (new, old) in enumerate(zip(inputs, self._static, strict=True)):
            if _describe(new) != _describe(old):
                raise ValueError(
                    f"input {i} of the captured step changed from {_describe(old)} to {_describe(new)}: "
                    "a CUDA graph replays fixed shapes and host values"
                )
            if isinstance(new, torch.Tensor):
                old.copy_(new)
