"""Trace the fused ops' triton_op registrations the way torch.compile does, without a GPU.

Run in a process without TRITON_INTERPRET (tests/kernels/test_triton_op.py does), so that the
kernels are compiled JITFunctions, as on a GPU host, and wrap_triton can capture them:

    python tests/kernels/triton_op_trace.py

Nothing is launched. Dynamo and AOTAutograd trace a forward + backward through the
``soflow_fast::*_triton_op`` ops on fake tensors (CPU tensors: a compiled graph never runs here,
and the autograd engine needs a CUDA context for fake CUDA tensors), and the joint graph that
AOTAutograd hands to its partitioner, the graph Inductor would receive, is checked:
- every Triton launch is a ``triton_kernel_wrapper_functional`` node of the expected kernel, and
  no ``soflow_fast`` op is left in the graph as an opaque call;
- the mutation analysis that functionalises each launch (Triton's TTIR of the kernel, built for an
  sm_90 target when there is no GPU) found exactly the tensors the kernel writes: a launch whose
  analysis failed is treated as writing every argument, and aliased arguments then go wrong;
- with ``dynamic=True`` as well: the launch heuristics specialise symbolic sizes (utils.sizes);
- Inductor compiles a user-defined kernel from a copy of its source plus the @jit functions and
  constants it reaches, each under the name it was defined with: every launch's copy, made by
  Inductor's own function, is built for sm_90 at the traced arguments (a name the copy lacks, e.g.
  an alias, fails here rather than on the GPU).
It also checks each triton_op's fake function (its body run on fake tensors) against the custom
op's hand-written fake, for shapes, strides and dtypes, and that torch's registry of each
triton_op's kernels (which keys AOTAutograd's cache on their source) lists them all.

Prints one line per check and "ok" at the end; raises on the first failure.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Written arguments of every kernel (sum_tiles writes O0..O{K-1}).
WRITES = {
    "_modln_fwd_kernel": {"Y"},
    "_modln_bwd_kernel": {"DX", "PSHIFT", "PSCALE"},
    "_gated_fwd_kernel": {"XN", "Y"},
    "_gated_bwd_kernel": {"DX", "DH", "PGATE", "PSHIFT", "PSCALE"},
    "_consistency_stream_kernel": {"DQ", "PART"},
    "_consistency_finish_kernel": {"COEF", "LOSS", "MSE", "WEIGHT"},
    "_velocity_stream_kernel": {"DELTA", "PART"},
    "_velocity_finish_kernel": {"COEF", "LOSS", "MSE", "WEIGHT"},
    "_scale_rows_kernel": {"OUT"},
}


def _use_sm90_target_without_gpu() -> None:
    """Let Triton build TTIR (torch's mutation analysis) on a host without a GPU driver."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget

    if torch.cuda.is_available():
        return

    class _NoGpuDriver:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    triton.runtime.driver.set_active(_NoGpuDriver())


def _block_and_losses(x, h, gate, shift, scale, shift2, scale2, nn_t, x_t, x_l, nn_l, t, l, s, v, tgt, dbds):
    """tests/kernels/test_compile.py's DiT seam and both losses, through the triton_ops directly."""
    import torch

    ops = torch.ops.soflow_fast
    x_new, y = ops.gated_residual_modulated_layer_norm_forward_triton_op(x, h, gate, shift, scale, 1e-6)
    z = ops.modulated_layer_norm_forward_triton_op(x_new + torch.tanh(y), shift2, scale2, 1e-6)
    scm = ops.euler_consistency_loss_forward_triton_op(nn_t * z.mean(), x_t, x_l, nn_l, t, l, s, 1.0, 0.01, False)
    fm = ops.adaptive_velocity_loss_forward_triton_op(v * z.std(), tgt, dbds, 0.0, 1.0, 0.01)
    return 0.25 * fm[0] + 0.75 * scm[0], torch.stack([scm[1], scm[2], fm[1], fm[2]])


def _y_only_trig_float_dbds(x, h, gate, shift, scale, shift2, scale2, nn_t, x_t, x_l, nn_l, t, l, s, v, tgt, dbds):
    """The other branches: x_new unused (the gated backward without dx_new), Trig, a float db/ds."""
    import torch

    ops = torch.ops.soflow_fast
    _, y = ops.gated_residual_modulated_layer_norm_forward_triton_op(x, h, gate, shift, scale, 1e-6)
    scm = ops.euler_consistency_loss_forward_triton_op(nn_t * y.mean(), x_t, x_l, nn_l, t, l, s, 1.0, 0.01, True)
    fm = ops.adaptive_velocity_loss_forward_triton_op(v * y.std(), tgt, None, 1.5, 1.0, 0.01)
    return scm[0] + fm[0], fm[1]


def _inputs(dtype):
    import torch

    torch.manual_seed(0)
    batch, tokens, width = 3, 5, 100
    seq = [torch.randn(batch, tokens, width).to(dtype).requires_grad_() for _ in range(2)]
    vecs = [(0.5 * torch.randn(batch, width)).to(dtype).requires_grad_() for _ in range(5)]
    rows = [torch.randn(batch, 2, 4, 4).to(dtype) for _ in range(6)]
    rows[0].requires_grad_()
    rows[4].requires_grad_()
    t = torch.rand(batch) * 0.8 + 0.2
    s = torch.rand(batch) * t
    l = t + (s - t) * 0.3
    dbds = torch.rand(batch) + 0.5
    return [*seq, *vecs, *rows[:4], t, l, s, *rows[4:], dbds]


_LAUNCHED = []  # (JITFunction, arguments, num_warps) of every launch traced


def _num_warps(kernel_idx):
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    tuner = kernel_side_table.get_kernel(kernel_idx)
    return tuner.configs[0].num_warps if hasattr(tuner, "configs") else 4


class _Traced(Exception):
    """Raised instead of running a compiled graph: its kernels cannot run on this host."""


def _trace_joint(fn, inputs, dynamic):
    """The joint forward + backward graph AOTAutograd builds for fn (as torch.compile would)."""
    import torch
    from functorch.compile import default_partition
    from torch._dynamo.backends.common import aot_autograd

    joints = []

    def partition(joint, joint_inputs, **kwargs):
        joints.append(joint)
        return default_partition(joint, joint_inputs, **kwargs)

    def compiler(gm, example_inputs):
        def run(*args):
            raise _Traced

        return run

    backend = aot_autograd(fw_compiler=compiler, bw_compiler=compiler, partition_fn=partition)
    torch._dynamo.reset()
    with contextlib.suppress(_Traced):  # the compiled function stops once both graphs are traced
        torch.compile(fn, backend=backend, fullgraph=True, dynamic=dynamic)(*inputs)
    if len(joints) != 1:
        raise AssertionError(f"expected one joint graph, got {len(joints)}")
    return joints[0]


def _launches(graph):
    """[(kernel name, written tensor arguments, tensor arguments, all arguments)] of its Triton launches,
    and the targets of its other call_function nodes."""
    import torch
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    launches, others = [], []
    for node in graph.graph.nodes:
        if node.op != "call_function":
            continue
        name = getattr(node.target, "__name__", str(node.target))
        if name == "triton_kernel_wrapper_functional":
            kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
            while not hasattr(kernel, "arg_names") or hasattr(kernel, "configs"):
                kernel = kernel.fn  # the Autotuner that carries num_warps
            args = {**node.kwargs["kwargs"], **kernel_side_table.get_constant_args(node.kwargs["constant_args_idx"])}
            tensors = {k for k, v in args.items() if isinstance(v, torch.fx.Node)}
            launches.append((kernel.fn.__name__, set(node.kwargs["tensors_to_clone"]), tensors, args))
            _LAUNCHED.append((kernel, args, _num_warps(node.kwargs["kernel_idx"])))
        else:
            others.append(str(node.target))
    return launches, others


def check_joint(fn, dtype, dynamic, expected, constants=None):
    """``expected``: the kernels launched (with repeats); ``constants``: {kernel: {arg: value}} to check."""
    joint = _trace_joint(fn, _inputs(dtype), dynamic)
    launches, others = _launches(joint)
    opaque = sorted({t for t in others if "soflow_fast" in t})
    if opaque:
        raise AssertionError(f"opaque soflow_fast ops left in the joint graph: {opaque}")
    names = sorted(launch[0] for launch in launches)
    if names != sorted(expected):
        raise AssertionError(f"launches {names}, expected {sorted(expected)}")
    for name, written, tensors, args in launches:
        want = {f"O{i}" for i in range(args["K"])} if name == "_sum_tiles_kernel" else WRITES[name]
        if written != want:
            raise AssertionError(
                f"{name}: functionalised as writing {sorted(written)}, it writes {sorted(want)} "
                f"(a failed mutation analysis marks every tensor argument: {sorted(tensors)})"
            )
        for arg, value in (constants or {}).get(name, {}).items():
            if args[arg] != value:
                raise AssertionError(f"{name}: {arg} = {args[arg]!r}, expected {value!r}")
    label = f"{fn.__name__} {str(dtype).removeprefix('torch.')} dynamic={dynamic}"
    print(f"joint graph {label}: {len(launches)} launches, {', '.join(names)}")


_TRITON_TYPES = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}


def _signature(kernel, args):
    """Triton's signature of a traced launch: pointer dtypes from the fake tensors' metadata."""
    import torch

    signature, constexprs = {}, {}
    for param in kernel.params:
        value = args[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
        elif isinstance(value, torch.fx.Node):
            signature[param.name] = "*" + _TRITON_TYPES[str(value.meta["val"].dtype)]
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int):
            signature[param.name] = "i32" if abs(value) < 2**31 else "i64"
        else:
            signature[param.name] = "fp32"
    return signature, constexprs


def check_inductor_sources():
    """Build Inductor's copy of every traced kernel (source closure) for sm_90 at the traced arguments."""
    import importlib.util
    import tempfile

    import triton
    from torch._inductor.codegen.wrapper import user_defined_triton_kernel_transitive_closure_source_code
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)
    built = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kernel, args, warps in _LAUNCHED:
            signature, constexprs = _signature(kernel, args)
            key = (kernel.fn.__name__, tuple(signature.items()), tuple(constexprs.items()), warps)
            if key in built:
                continue
            name = kernel.fn.__name__
            path = Path(tmp) / f"inductor_copy_{len(built)}.py"
            source = user_defined_triton_kernel_transitive_closure_source_code(kernel)
            path.write_text("import triton\nimport triton.language as tl\n\n@triton.jit\n" + source)
            spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            try:
                source_ast = ASTSource(fn=getattr(module, name), signature=signature, constexprs=constexprs)
                triton.compile(source_ast, target=target, options={"num_warps": warps})
            except Exception as err:
                detail = str(err)[-1500:]  # the source, then the error
                raise AssertionError(f"Inductor's copy of {name} {constexprs} does not build: ...{detail}") from err
            built[key] = name
    print(f"inductor copies: {len(built)} launch configurations of {len(set(built.values()))} kernels build for sm_90")


def check_fakes():
    """Each triton_op's fake (its body on fake tensors) against the custom op's hand-written fake."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    ops = torch.ops.soflow_fast
    bf16, f32 = torch.bfloat16, torch.float32
    with FakeTensorMode():
        x = torch.empty(3, 5, 100, dtype=bf16)
        vec = torch.empty(3, 100, dtype=f32)
        vec16 = torch.empty(3, 100, dtype=bf16)
        rows = torch.empty(3, 2, 4, 4, dtype=bf16)
        times = torch.empty(3)
        g = torch.empty(())
        cases = {
            "modulated_layer_norm_forward": (x, vec, vec16, 1e-6),
            "modulated_layer_norm_backward": (x, x, vec16, 1e-6, f32),
            "gated_residual_modulated_layer_norm_forward": (x, x.float(), vec16, vec, vec16, 1e-6),
            "gated_residual_modulated_layer_norm_backward": (x.float(), x, x, x, vec16, vec, 1e-6, f32, bf16),
            "euler_consistency_loss_forward": (rows, rows, rows, rows, times, times, times, 1.0, 0.01, True),
            "adaptive_velocity_loss_forward": (rows, rows, times, 0.0, 1.0, 0.01),
            "scale_rows": (rows, times, g),
        }
        cases["gated_residual_modulated_layer_norm_backward (no dx_new)"] = (
            None,
            *cases["gated_residual_modulated_layer_norm_backward"][1:],
        )
        for label, args in cases.items():
            name = label.split(" ")[0]
            got = getattr(ops, f"{name}_triton_op")(*args)
            want = getattr(ops, name)(*args)
            got, want = (o if isinstance(o, (tuple, list)) else (o,) for o in (got, want))
            meta = lambda ts: [(tuple(t.shape), t.stride(), t.dtype, t.device.type) for t in ts]  # noqa: E731
            if meta(got) != meta(want):
                raise AssertionError(f"{label}: triton_op fake {meta(got)} != custom op fake {meta(want)}")
            print(f"fake {label}: {len(got)} outputs match")


def check_kernel_registry():
    from torch._library.triton import get_triton_kernels_for_op

    expected = {
        "modulated_layer_norm_forward": {"_modln_fwd_kernel"},
        "modulated_layer_norm_backward": {"_modln_bwd_kernel", "_sum_tiles_kernel"},
        "gated_residual_modulated_layer_norm_forward": {"_gated_fwd_kernel"},
        "gated_residual_modulated_layer_norm_backward": {"_gated_bwd_kernel", "_sum_tiles_kernel"},
        "euler_consistency_loss_forward": {"_consistency_stream_kernel", "_consistency_finish_kernel"},
        "adaptive_velocity_loss_forward": {"_velocity_stream_kernel", "_velocity_finish_kernel"},
        "scale_rows": {"_scale_rows_kernel"},
    }
    for name, kernels in expected.items():
        op = f"soflow_fast::{name}_triton_op"
        found = {k.fn.__name__ for k in get_triton_kernels_for_op(op)}
        if found != kernels:
            raise AssertionError(f"{op}: the registry lists {sorted(found)}, expected {sorted(kernels)}")
    print(f"kernel registry: {len(expected)} triton_ops list their kernels")


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("run without TRITON_INTERPRET: wrap_triton cannot capture interpreted kernels", file=sys.stderr)
        return 2
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import torch

    import soflow_fast.kernels  # noqa: F401  (registers the ops)

    _use_sm90_target_without_gpu()
    check_kernel_registry()
    check_fakes()
    forward = ["_gated_fwd_kernel", "_modln_fwd_kernel", "_consistency_stream_kernel", "_consistency_finish_kernel",
               "_velocity_stream_kernel", "_velocity_finish_kernel"]  # fmt: skip
    backward = ["_scale_rows_kernel"] * 2 + ["_modln_bwd_kernel", "_gated_bwd_kernel"] + ["_sum_tiles_kernel"] * 2
    for dtype in (torch.float32, torch.bfloat16):
        for dynamic in (False, True):
            constants = {"_gated_bwd_kernel": {"HAS_DXN": True}, "_velocity_finish_kernel": {"HAS_DBDS": True}}
            check_joint(_block_and_losses, dtype, dynamic, forward + backward, constants)
    other = ["_gated_fwd_kernel", "_consistency_stream_kernel", "_consistency_finish_kernel",
             "_velocity_stream_kernel", "_velocity_finish_kernel", "_scale_rows_kernel", "_scale_rows_kernel",
             "_gated_bwd_kernel", "_sum_tiles_kernel"]  # fmt: skip
    constants = {
        "_gated_bwd_kernel": {"HAS_DXN": False},
        "_consistency_stream_kernel": {"TRIG": True},
        "_velocity_finish_kernel": {"HAS_DBDS": False, "dbds_value": 1.5},
    }
    check_joint(_y_only_trig_float_dbds, torch.bfloat16, False, other, constants)
    check_inductor_sources()
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
