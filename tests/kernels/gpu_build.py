"""Compile every Triton kernel for an NVIDIA target without a GPU, as a CPU-only CI check.

Triton lowers a kernel to a cubin with its bundled ptxas and needs a device only to load it, so
type errors, unsupported constructs and register spills of the compiled (not interpreted) path
show up here. Run in a process without TRITON_INTERPRET:

    python tests/kernels/gpu_build.py --arch 90

Prints one line per failure and a final "built N/N" line; exits 1 on any failure or spill.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
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
    """Import kernels/ as soflow_fast.kernels without importing soflow_fast (and its ops module)."""
    if "soflow_fast" not in sys.modules:
        package = types.ModuleType("soflow_fast")
        package.__path__ = []
        sys.modules["soflow_fast"] = package
    folder = REPO / "kernels"
    spec = importlib.util.spec_from_file_location(
        "soflow_fast.kernels", folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _cases():
    """(jit function, constexprs, dtype, num_warps) for every launch configuration the launchers use."""
    import torch

    submodule = lambda name: importlib.import_module(f"soflow_fast.kernels.{name}")
    utils = submodule("utils")
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
            yield ln._modln_fwd_kernel, shape, dtype, warps
            yield gated._gated_fwd_kernel, shape, dtype, warps
            block_n, block_d, warps = utils.ln_launch(width, backward=True)
            shape = {"BLOCK_N": block_n, "BLOCK_D": block_d}
            yield ln._modln_bwd_kernel, shape, dtype, warps
            for has_dxn in (True, False):
                yield gated._gated_bwd_kernel, {"HAS_DXN": has_dxn, **shape}, dtype, warps
        for k in (2, 3):
            yield utils._sum_tiles_kernel, {"K": k, "BLOCK_D": 1024}, dtype, utils.num_warps_for(1024)
        # the losses' streaming kernels at the full block and at a short row's block, their
        # one-program finishing kernels, and the shared backward
        for width in (262144, 3072, 100):  # a DiT output row, a pixel-space latent row, a short row
            _, _, block, warps = utils.split_rows(64, width, torch.device("cpu"))
            for trig in (False, True):
                yield scm._consistency_stream_kernel, {"TRIG": trig, "BLOCK_D": block}, dtype, warps
            yield fm._velocity_stream_kernel, {"BLOCK_D": block}, dtype, warps
        for block in (utils._SCALE_BLOCK, 128):
            yield utils._scale_rows_kernel, {"BLOCK_D": block}, dtype, utils.num_warps_for(block)
        for batch, slices in ((3, 1), (64, 9), (1024, 1), (2, 264)):
            block_b, block_s = utils.finish_launch(batch, slices)
            finish = {"BLOCK_B": block_b, "BLOCK_S": block_s}
            for trig in (False, True):
                yield scm._consistency_finish_kernel, {"TRIG": trig, **finish}, dtype, 4
            for has_dbds in (True, False):
                yield fm._velocity_finish_kernel, {"HAS_DBDS": has_dbds, **finish}, dtype, 4


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


def _local_bytes(cubin: bytes, cuobjdump: Path) -> int | None:
    """Per-thread local memory (register spills) of a cubin, or None without cuobjdump."""
    if not cuobjdump.is_file():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        out = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(path)], capture_output=True, text=True)
    match = re.search(r"LOCAL:(\d+)", out.stdout)
    return int(match.group(1)) if match else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="SM version, e.g. 80 (A100) or 90 (H100)")
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
    for fn, constexprs, dtype, warps in cases:
        label = f"{fn.__name__} {constexprs} {dtype} num_warps={warps}"
        try:
            source = ASTSource(fn=fn, signature=_signature(fn, constexprs, dtype), constexprs=constexprs)
            kernel = triton.compile(source, target=target, options={"num_warps": warps})
        except Exception as err:  # every failure is reported, not just the first
            failures += 1
            print(f"FAIL {label}: {err!r}"[:3000])
            continue
        spill = _local_bytes(kernel.asm["cubin"], cuobjdump)
        if spill:
            failures += 1
            print(f"SPILL {label}: {spill} bytes of local memory per thread")
    print(f"built {len(cases) - failures}/{len(cases)} for sm_{args.arch}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
