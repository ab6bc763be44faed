"""The triton_op registration of each fused op: the route compiled graphs take on CUDA.

On a host without a GPU, ``triton_op_trace.py`` (in a process without TRITON_INTERPRET, so the
kernels are compiled JITFunctions as on a GPU host) traces a forward + backward through the
triton_ops as torch.compile does, and checks that AOTAutograd's joint graph launches each Triton
kernel as a user-defined kernel (no opaque op left), with the written tensors found by torch's
mutation analysis, at static and dynamic shapes. The eager parity of the triton_ops is in
test_eager_path.py. The CUDA-only test here checks that Inductor's output code holds the kernels
themselves and that the compiled step matches the eager one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from soflow_fast import ops
from tests.kernels.utils import block_and_losses, block_inputs, check_all, run_block, seed_all

REPO = Path(__file__).resolve().parents[2]
KERNELS = (
    "_gated_fwd_kernel",
    "_gated_bwd_kernel",
    "_modln_fwd_kernel",
    "_modln_bwd_kernel",
    "_sum_tiles_kernel",
    "_consistency_stream_kernel",
    "_consistency_finish_kernel",
    "_velocity_stream_kernel",
    "_velocity_finish_kernel",
    "_scale_rows_kernel",
)


@pytest.mark.slow
def test_triton_ops_trace_into_user_defined_kernels():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO)
    script = Path(__file__).with_name("triton_op_trace.py")
    result = subprocess.run(
        [sys.executable, str(script)], env=env, cwd=REPO, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), (result.stdout + result.stderr)[-6000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Inductor builds user-defined Triton kernels for a GPU only")
def test_inductor_output_code_holds_the_kernels(kernels):
    """Compiled on CUDA, the fused ops reach Inductor as their Triton kernels, not as extern calls to
    opaque custom ops, and forward and gradients match the eager fused path."""
    from torch._inductor.utils import run_and_get_code

    assert kernels.registry.TRITON_OP_ON_CUDA, "the kernels were imported under TRITON_INTERPRET"
    seed_all(3)
    inputs = block_inputs(torch.device("cuda"))
    torch._dynamo.reset()
    with ops.set_use_fused_kernels(True):
        eager = run_block(block_and_losses, inputs)
        compiled_fn = torch.compile(block_and_losses, fullgraph=True, backend="inductor")
        compiled, codes = run_and_get_code(run_block, compiled_fn, inputs)
    code = "\n".join(codes)
    assert len(codes) >= 2, "expected a forward and a backward module"
    missing = [name for name in KERNELS if f"def {name}(" not in code]
    assert not missing, f"kernels missing from Inductor's output code: {missing}"
    assert "torch.ops.soflow_fast" not in code, "an opaque soflow_fast op is still called from the compiled code"
    names = ["loss", "stats", "dx", "dh", "dgate", "dshift", "dscale", "dshift2", "dscale2", "d nn_t", "d v"]
    check_all(names, compiled, eager, eager, torch.float32)
