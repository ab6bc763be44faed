"""How a fused op is registered: one description (FusedOp) makes every route into its launches.

Each fused op has a forward host launcher, an autograd formula and a backward host launcher, and
is called three ways:
- inside a graph that torch.compile traces, through a torch.library registration of its forward,
  whose registered autograd formula calls the same registration of its backward. There are two
  registrations of each launcher, and compile_with_triton_op picks one per call (see below);
- eagerly (torch.compiler.is_compiling() false), through an autograd.Function that runs the same
  forward, setup_context and formula, and launches the kernels directly: it skips torch.library's
  dispatch, which costs host time on every call.
library_op registers a launcher both ways; FusedOp registers an op's forward and autograd formula on
each route, builds the Function, and is the callable that picks among them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import triton
from torch.library import triton_op

NAMESPACE = "soflow_fast"


def interpreting() -> bool:
    """Whether Triton runs its kernels under the interpreter (TRITON_INTERPRET), not compiled."""
    knobs = getattr(triton, "knobs", None)  # recent Triton parses the variable itself
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


# Each launcher has two torch.library registrations that run the same host code and kernels:
# - a torch.library.triton_op (soflow_fast::<name>_triton_op): the launcher runs with traced=True,
#   so that each launch goes through wrap_triton; torch.compile traces into it and Inductor receives
#   the Triton kernels themselves, as user-defined Triton kernels scheduled among its own, instead
#   of one extern call. Its fake function is the op body run on fake tensors, which launches
#   nothing. torch finds the body's kernels by reading its source (following calls by name), and
#   they key AOTAutograd's cache with their source: each launcher writes `wrap_triton(_the_kernel)`
#   literally.
# - a torch.library.custom_op (soflow_fast::<name>): one opaque node, run as it is by compiled
#   graphs, with a hand-written fake function.
# The triton_op cannot serve interpreted kernels: under TRITON_INTERPRET wrap_triton hands back the
# bare InterpretedFunction (torch/_library/triton.py), whose launch reads the data pointers of the
# fake tensors that tracing passes it. Compiled graphs therefore take the triton_op for CUDA tensors
# when the kernels are compiled, and the custom op otherwise (CPU tensors under the interpreter).
# Set TRITON_OP_ON_CUDA to False (then torch._dynamo.reset()), or SOFLOW_FUSED_OPAQUE=1 in the
# environment, to trace the opaque custom ops on CUDA as well, e.g. to compare the two inside one
# compiled step (the GPU suite's fused-loss-compiled rows, run once with and once without it).
TRITON_OP_ON_CUDA = not interpreting() and os.environ.get("SOFLOW_FUSED_OPAQUE") != "1"


def compile_with_triton_op(t: torch.Tensor) -> bool:
    """Whether a graph being compiled calls the triton_op (True) or the custom op for tensors like t."""
    return TRITON_OP_ON_CUDA and t.is_cuda


class LibraryOp(NamedTuple):
    """A host launcher as each route calls it."""

    triton_op: Callable[..., Any]  # soflow_fast::<name>_triton_op, traced into on CUDA
    custom_op: Callable[..., Any]  # soflow_fast::<name>, opaque
    launch: Callable[..., Any]  # the launcher itself, for eager calls


def library_op(name: str, schema: str, launch: Callable[..., Any], fake: Callable[..., Any]) -> LibraryOp:
    """Register ``launch(*inputs, traced=False)`` as soflow_fast::<name>_triton_op and soflow_fast::<name>.

    ``schema``: the inputs and outputs in torch.library's schema language, e.g.
    ``"(Tensor x, float eps) -> Tensor"``, without ``traced``. ``fake``: the outputs' metadata for
    the custom op, from the same inputs. Names are keys of torch's on-disk compile caches, which do
    not see an op's autograd formula: an op whose outputs or backward change takes a new name.
    """

    def traced(*inputs):
        return launch(*inputs, traced=True)

    opaque = torch.library.custom_op(f"{NAMESPACE}::{name}", launch, mutates_args=(), schema=schema)
    opaque.register_fake(fake)
    return LibraryOp(
        triton_op(f"{NAMESPACE}::{name}_triton_op", traced, mutates_args=(), schema=schema), opaque, launch
    )


@dataclass(eq=False)
class FusedOp:
    """One fused op, described once; the instance is the callable that dispatches among its routes.

    name: registered as soflow_fast::<name>_forward (and _forward_triton_op); names the Function.
    schema, forward, fake: the forward launcher and its schema and fake, as for library_op.
    setup_context: ``(ctx, inputs, output)``, as autograd.Function and register_autograd take it.
    backward: ``backward(launch, ctx, *grad_outputs)``, one gradient (or None) per input, where
        ``launch`` is backward_op's route of the calling route (its triton_op, its custom op, or the
        launcher itself). Looked up on the instance at each backward, by every route.
    backward_op: the backward launcher's registrations (library_op; several ops may share one).
    """

    name: str
    schema: str
    forward: Callable[..., Any]
    fake: Callable[..., Any]
    setup_context: Callable[..., None]
    backward: Callable[..., tuple[torch.Tensor | None, ...]]
    backward_op: LibraryOp
    forward_op: LibraryOp = field(init=False)
    function: type[torch.autograd.Function] = field(init=False)

    def __post_init__(self) -> None:
        self.forward_op = library_op(f"{self.name}_forward", self.schema, self.forward, self.fake)
        self.forward_op.triton_op.register_autograd(
            self._backward_through(self.backward_op.triton_op), setup_context=self.setup_context
        )
        self.forward_op.custom_op.register_autograd(
            self._backward_through(self.backward_op.custom_op), setup_context=self.setup_context
        )
        launch = self.forward

        def forward(*inputs):
            # the op's inputs only: apply() binds the defaults of forward's signature, and the
            # launcher's `traced` would count as an input
            return launch(*inputs)

        self.function = type(
            "".join(word.capitalize() for word in self.name.split("_")) + "Function",
            (torch.autograd.Function,),
            {
                "__doc__": f"The eager route of the fused op {self.name}: its launches, without torch.library.",
                "forward": staticmethod(forward),
                "setup_context": staticmethod(self.setup_context),
                "backward": staticmethod(self._backward_through(self.backward_op.launch)),
            },
        )

    def _backward_through(self, launch: Callable[..., Any]) -> Callable[..., tuple[torch.Tensor | None, ...]]:
        def backward(ctx, *grad_outputs):
            return self.backward(launch, ctx, *grad_outputs)

        return backward

    def __call__(self, *inputs):
        """Run the op on its schema's inputs, in order; returns its outputs."""
        if torch.compiler.is_compiling():
            route = self.forward_op.triton_op if compile_with_triton_op(inputs[0]) else self.forward_op.custom_op
            return route(*inputs)
        return self.function.apply(*inputs)
