"""Compile every Triton kernel for an NVIDIA target without a GPU, as a CPU-only CI check.

Triton lowers a kernel to a cubin with its bundled ptxas and needs a device only to load it, so
type errors, unsupported constructs and register spills of the compiled (not interpreted) path
show up here. Run in a process without TRITON_INTERPRET:

    python tests/kernels/gpu_build.py --arch 90

    python tests/kernels/gpu_build.py --arch 90 --report    (also a table of registers and occupancy)

Each kernel is built as Triton specialises it at run time for tensors from PyTorch's allocator:
every pointer 16-byte aligned, and the row width D marked divisible by 16 where it is (this decides
whether loads are vectorised, and with it the register count). The LayerNorm backwards are also
built software-pipelined (STAGES 2 and 3 where their buffers fit utils.LN_BWD_PREFETCH_BYTES: the
candidates `benchmarks/kernel_sweep.py --parts pipeline` times), and each such build with 16-byte
aligned rows must contain asynchronous copies (cp.async), or the pipelining did not happen.

Prints one line per failure and a final "built N/N" line; exits 1 on any failure or spill.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Scalar arguments by name; every other non-constexpr argument is a pointer.
INT_ARGS = {"N", "D", "T", "B", "ROWS_PER_TILE", "SLICE", "NS"}
FLOAT_ARGS = {"eps", "p", "inv_bd", "dbds_value"}
# Pointers that are fp32 whatever the input dtype (partials, statistics, gradients, times).
FP32_POINTERS = {"PSHIFT", "PSCALE", "PGATE", "P0", "P1", "P2", "PART", "COEF", "G", "STATS", "LOSS", "MSE", "WEIGHT"}
TIME_POINTERS = {"T", "L", "S"}  # in the loss kernels, where T is a pointer rather than a tile count


def _load_kernels() -> types.ModuleType:
    """Import soflow_fast.kernels from this checkout, directly rather than through soflow_fast.ops (whose
    loader chooses the interpreter on a host without CUDA)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    return importlib.import_module("soflow_fast.kernels")


def _cases():
    """(jit function, constexprs, dtype, num_warps, row width or None) for every launch configuration
    the launchers use, and the LayerNorm backwards' pipelined candidates."""
    import torch

    submodule = lambda name: importlib.import_module(f"soflow_fast.kernels.{name}")
    utils = submodule("utils")
    loss_utils = submodule("loss_utils")
    ln = submodule("modulated_layer_norm")
    gated = submodule("gated_residual_modulated_layer_norm")
    scm = submodule("euler_consistency_loss")
    fm = submodule("adaptive_velocity_loss")
    # bf16 and fp32 (fp16 differs from bf16 only in the final cast); widths for the three shapes of
    # the LayerNorm launch: many rows per step (100), four (1024), padded lanes (1152), the widest (16384).
    for dtype in ("bf16", "fp32"):
        for width in (100, 1024, 1152, 16384):
            block_n, block_d, warps = utils.ln_launch(width, backward=False)
            shape = {"BLOCK_N": block_n, "BLOCK_D": block_d}
            yield ln._modln_fwd_kernel, shape, dtype, warps, width
            yield gated._gated_fwd_kernel, shape, dtype, warps, width
            block_n, block_d, warps = utils.ln_launch(width, backward=True)
            itemsize = 2 if dtype == "bf16" else 4
            for requested in sorted({utils.LN_BWD_STAGES, *((2, 3) if dtype == "bf16" else ())}):
                for kernel, tensors, extra in (
                    (ln._modln_bwd_kernel, 2, {}),
                    (gated._gated_bwd_kernel, 4, {"HAS_DXN": True}),
                    (gated._gated_bwd_kernel, 3, {"HAS_DXN": False}),
                ):
                    stages = utils.ln_bwd_stages(block_n, block_d, tensors, itemsize, requested)
                    if stages == requested:  # a lowered request builds a case already listed
                        shape = {**extra, "BLOCK_N": block_n, "BLOCK_D": block_d, "STAGES": stages}
                        yield kernel, shape, dtype, warps, width
        for k in (2, 3):
            yield utils._sum_tiles_kernel, {"K": k, "BLOCK_D": 1024}, dtype, utils.num_warps_for(1024), 1024
        # the losses' streaming kernels at the full block and at a short row's block, their
        # one-program finishing kernels, and the shared backward
        for width in (262144, 3072, 100):  # a DiT output row, a pixel-space latent row, a short row
            _, _, block, warps = loss_utils.split_rows(64, width, torch.device("cpu"))
            for trig in (False, True):
                yield scm._consistency_stream_kernel, {"TRIG": trig, "BLOCK_D": block}, dtype, warps, width
            yield fm._velocity_stream_kernel, {"BLOCK_D": block}, dtype, warps, width
        for block in (loss_utils._SCALE_BLOCK, 128):
            yield loss_utils._scale_rows_kernel, {"BLOCK_D": block}, dtype, utils.num_warps_for(block), None
        for batch, slices in ((3, 1), (64, 9), (1024, 1), (2, 264)):
            block_b, block_s = loss_utils.finish_launch(batch, slices)
            finish = {"BLOCK_B": block_b, "BLOCK_S": block_s}
            for trig in (False, True):
                yield scm._consistency_finish_kernel, {"TRIG": trig, **finish}, dtype, 4, None
            for has_dbds in (True, False):
                yield fm._velocity_finish_kernel, {"HAS_DBDS": has_dbds, **finish}, dtype, 4, None


def _signature(fn, constexprs: dict, dtype: str) -> dict[str, str]:
    is_loss = "TRIG" in fn.arg_names
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in TIME_POINTERS and is_loss:
            sig[name] = "*fp32"
        elif name in INT_ARGS:
            sig[name] = "i32"
        elif name in FLOAT_ARGS:
            sig[name] = "fp32"
        elif name in FP32_POINTERS:
            sig[name] = "*fp32"
        else:
            sig[name] = f"*{dtype}"
    return sig


def _attrs(fn, signature: dict[str, str], width: int | None) -> dict:
    """Triton's run-time specialisation: aligned pointers, and D divisible by 16 where it is."""
    aligned = lambda name: signature[name].startswith("*") or (name == "D" and width is not None and width % 16 == 0)
    return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if aligned(name)}


def _occupancy(registers: int, shared: int, warps: int) -> int:
    """Programs one H100 SM can hold, from the CUDA occupancy rules (65536 registers per SM, given out
    per warp in 256-register units; 227 KiB of shared memory; at most 64 warps and 32 programs)."""
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_registers = 65536 // (per_warp * warps)
    by_shared = (227 * 1024) // shared if shared else 32
    return min(by_registers, by_shared, 64 // warps, 32)


def _resources(cubin: bytes, cuobjdump: Path) -> dict[str, int]:
    """Per-thread registers (REG) and local memory (LOCAL: register spills) of a cubin; {} without cuobjdump."""
    if not cuobjdump.is_file():
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        out = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(path)], capture_output=True, text=True)
    return {key: int(value) for key, value in re.findall(r"\b(REG|LOCAL):(\d+)", out.stdout)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="SM version, e.g. 80 (A100) or 90 (H100)")
    parser.add_argument("--report", action="store_true", help="print registers, shared memory and programs per SM")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: this builds the compiled kernels")
        return 2
    _load_kernels()
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", args.arch, 32)
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    cases = list(_cases())
    failures = 0
    if args.report:
        print(f"{'kernel':28s} {'constexprs':58s} {'dtype':5s} {'D':>6s} warps  regs  shared  programs/SM")
    for fn, constexprs, dtype, warps, width in cases:
        label = f"{fn.__name__} {constexprs} {dtype} D={width} num_warps={warps}"
        signature = _signature(fn, constexprs, dtype)
        try:
            source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=_attrs(fn, signature, width))
            kernel = triton.compile(source, target=target, options={"num_warps": warps})
        except Exception as err:  # every failure is reported, not just the first
            failures += 1
            print(f"FAIL {label}: {err!r}"[:3000])
            continue
        usage = _resources(kernel.asm["cubin"], cuobjdump)
        if usage.get("LOCAL"):
            failures += 1
            print(f"SPILL {label}: {usage['LOCAL']} bytes of local memory per thread")
        # Triton pipelines the loads only where rows are 16-byte aligned (D = 100 keeps the plain loop)
        pipelined = constexprs.get("STAGES", 1) > 1 and width % 16 == 0
        if pipelined and "cp.async" not in kernel.asm["ptx"]:
            failures += 1
            print(f"NOT PIPELINED {label}: STAGES > 1 but the PTX has no cp.async")
        if args.report and "REG" in usage:
            shared = kernel.metadata.shared
            print(f"{fn.__name__:28s} {str(constexprs):58s} {dtype:5s} {str(width):>6s} {warps:5d} {usage['REG']:5d} "
                  f"{shared:7d}  {_occupancy(usage['REG'], shared, warps):11d}")  # fmt: skip
    print(f"built {len(cases) - failures}/{len(cases)} for sm_{args.arch}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
