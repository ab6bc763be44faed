"""Launch-configuration sweep of the fused kernels on a GPU: the data behind the launch heuristics.

    python benchmarks/kernel_sweep.py --out sweep.json [--parts ln_fwd ln_bwd pipeline loss scale host step]
    python benchmarks/kernel_sweep.py --dry          (CPU, interpreter, tiny shapes: checks the plumbing)

For each op it times the raw launch functions (no autograd, no custom-op dispatch) under a grid of
launch configurations, with the heuristics' own choice marked, at the benchmark shapes in bf16. A
call is timed inside a CUDA graph that replays a run of calls on rotating input copies (more bytes
than the L2 holds), so the time is the device's, launch gaps included, without host overhead.

Configurations are forced by replacing the module-level heuristics (``utils.ln_launch``,
``utils.PROGRAMS_PER_SM``, ``utils.LN_BWD_PROGRAMS_PER_SM``, ``utils.LN_BWD_STAGES``,
``loss_utils.split_rows``, ``loss_utils._SCALE_BLOCK``) for the duration of one
measurement. ``--parts step`` also profiles one DiT-B/2 bf16 training step with the fused ops on and
off and prints the top device kernels and host time of each (where the step time goes); ``--parts
host`` times the host's cost per call of each way into the ops at a tiny shape (GPU work negligible).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="JSON file for all rows")
    ap.add_argument("--parts", nargs="+", default=["ln_fwd", "ln_bwd", "pipeline", "loss", "scale", "host", "step"])
    ap.add_argument("--dry", action="store_true", help="CPU interpreter, tiny shapes, wall-clock timer")
    ap.add_argument("--rotate-mb", type=int, default=256, help="input bytes per rotation (above the L2 size)")
    return ap.parse_args()


ARGS = _args()
if ARGS.dry:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402

from soflow_fast import ops  # noqa: E402

DEV = "cpu" if ARGS.dry else "cuda"
K = ops.load_kernels()
M_LN = sys.modules["soflow_fast.kernels.modulated_layer_norm"]
M_GATED = sys.modules["soflow_fast.kernels.gated_residual_modulated_layer_norm"]
M_EC = sys.modules["soflow_fast.kernels.euler_consistency_loss"]
M_AV = sys.modules["soflow_fast.kernels.adaptive_velocity_loss"]
M_UT = sys.modules["soflow_fast.kernels.utils"]
M_LU = sys.modules["soflow_fast.kernels.loss_utils"]
ROWS: list[dict] = []

if ARGS.dry:
    LN_SHAPES = [(3, 5, 100)]
    LOSS_SHAPES = [(3, 4, 6, 6)]
else:
    LN_SHAPES = [(32, 256, 768), (32, 256, 1024), (32, 256, 1152)]
    LOSS_SHAPES = [(32, 256, 1024), (32, 256, 768), (64, 4, 32, 32), (256, 4, 32, 32), (1024, 3, 32, 32)]
DT = torch.bfloat16


@contextlib.contextmanager
def patched(*triples):
    """Temporarily set module attributes: (module, name, value) triples."""
    old = [(m, n, getattr(m, n)) for m, n, _ in triples]
    for m, n, v in triples:
        setattr(m, n, v)
    try:
        yield
    finally:
        for m, n, v in old:
            setattr(m, n, v)


def few(configs):
    """All configurations on a GPU; the first two in a dry run (the interpreter takes seconds a call)."""
    configs = list(configs)
    return configs[:2] if ARGS.dry else configs


def copies(nbytes: int) -> int:
    """Input sets to rotate through: enough to exceed the L2 on a GPU; two in a dry run."""
    if ARGS.dry:
        return 2
    return max(2, min(64, -(-ARGS.rotate_mb * 2**20 // max(nbytes, 1))))


def time_us(call, n_sets: int) -> float:
    """Device microseconds per call(i) (i = input set), from CUDA-graph replays of a run of calls."""
    for i in range(n_sets):  # compile and warm every path outside the capture
        call(i)
    if ARGS.dry:
        t0 = time.perf_counter()
        for i in range(n_sets):
            call(i)
        return (time.perf_counter() - t0) / n_sets * 1e6
    torch.cuda.synchronize()
    reps = max(n_sets, 24)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(3):
            call(i % n_sets)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for r in range(reps):
            call(r % n_sets)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(7):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / reps)
    del graph
    return statistics.median(times)


def record(part, op, shape, cfg, us, nbytes, chosen):
    row = {"part": part, "op": op, "shape": str(shape), "cfg": cfg, "us": round(us, 2),
           "gbps": round(nbytes / (us * 1e-6) / 1e9, 1), "chosen": chosen}  # fmt: skip
    ROWS.append(row)
    mark = "*" if chosen else " "
    print(f"{mark} {part:7s} {op:34s} {str(shape):18s} {json.dumps(cfg):60s} {us:8.2f} us {row['gbps']:7.0f} GB/s",
          flush=True)  # fmt: skip


def rnd(*shape):
    return (torch.randn(*shape, device=DEV) * 0.5).to(DT)


# ----------------------------------------------------------------------------------------------


def ln_fwd_configs(width):
    bd = triton.next_power_of_2(width)
    for bn, warps in itertools.product([1, 2, 4, 8], [2, 4, 8, 16]):
        if 4 <= bn * bd // (32 * warps) <= 32:
            yield bn, bd, warps


def part_ln_fwd():
    for shape in LN_SHAPES:
        b, n, d = shape
        rows = b * n * d * DT.itemsize
        for op, mod in (("modulated_layer_norm", M_LN), ("gated_residual", M_GATED)):
            nrows = 1 if mod is M_LN else 2
            sets = [[rnd(b, n, d) for _ in range(nrows)] + [rnd(b, d) for _ in range(2 if mod is M_LN else 3)]
                    for _ in range(copies(nrows * rows))]  # fmt: skip
            nbytes = (2 if mod is M_LN else 4) * rows
            chosen = M_UT.ln_launch(d, backward=False)
            if mod is M_LN:

                def call(i, sets=sets):
                    return M_LN.modulated_layer_norm_fwd(*sets[i], 1e-6)
            else:

                def call(i, sets=sets):
                    return M_GATED.gated_residual_modulated_layer_norm_fwd(*sets[i], 1e-6)

            for cfg in few(ln_fwd_configs(d)):
                with patched((M_UT, "ln_launch", lambda w, backward, c=cfg: c)):
                    us = time_us(call, len(sets))
                record("ln_fwd", op, shape, {"BLOCK_N": cfg[0], "warps": cfg[2]}, us, nbytes, cfg == chosen)
            # torch.compile of the reference, same timer
            torch._dynamo.reset()
            if mod is M_LN:
                ref = torch.compile(ops.modulated_layer_norm_ref, fullgraph=True)

                def rcall(i, sets=sets, ref=ref):
                    return ref(*sets[i])
            else:
                ref = torch.compile(ops.gated_residual_modulated_layer_norm_ref, fullgraph=True)

                def rcall(i, sets=sets, ref=ref):
                    return ref(*sets[i])

            with torch.no_grad():
                us = time_us(rcall, len(sets))
            record("ln_fwd", op, shape, {"impl": "torch.compile"}, us, nbytes, False)


def _ln_bwd_calls(shape):
    """(op name, module, input sets, bytes moved, call) for both LayerNorm backwards at one shape."""
    b, n, d = shape
    rows = b * n * d * DT.itemsize
    sets = [[rnd(b, n, d), rnd(b, n, d), rnd(b, d)] for _ in range(copies(2 * rows))]

    def modulated(i, sets=sets):
        dy, x, scale = sets[i]
        return M_LN.modulated_layer_norm_bwd(dy, x, scale, 1e-6, DT)

    gsets = [[rnd(b, n, d) for _ in range(4)] + [rnd(b, d), rnd(b, d)] for _ in range(copies(4 * rows))]

    def gated(i, sets=gsets):
        dxn, dy, xn, h, gate, scale = sets[i]
        return M_GATED.gated_residual_modulated_layer_norm_bwd(dxn, dy, xn, h, gate, scale, 1e-6, DT, DT)

    return [("modulated_layer_norm", M_LN, sets, 3 * rows, modulated),
            ("gated_residual", M_GATED, gsets, 6 * rows, gated)]  # fmt: skip


def part_ln_bwd():
    for shape in LN_SHAPES:
        bd = triton.next_power_of_2(shape[2])
        for op, _, sets, nbytes, call in _ln_bwd_calls(shape):
            chosen = (M_UT.ln_launch(shape[2], backward=True), M_UT.LN_BWD_PROGRAMS_PER_SM)
            grid = [
                c for c in itertools.product([1, 2, 4], [4, 8, 16], [2, 4, 8]) if 2 <= c[0] * bd // (32 * c[1]) <= 32
            ]
            for bn, warps, pps in few(grid):
                cfg = (bn, bd, warps)
                with patched((M_UT, "ln_launch", lambda w, backward, c=cfg: c), (M_UT, "LN_BWD_PROGRAMS_PER_SM", pps)):
                    us = time_us(call, len(sets))
                record("ln_bwd", op, shape, {"BLOCK_N": bn, "warps": warps, "pps": pps}, us, nbytes,
                       (cfg, pps) == chosen)  # fmt: skip


def part_pipeline():
    """The LayerNorm backwards with their token-tile loop software-pipelined (utils.LN_BWD_STAGES):
    stages 1 (the plain loop), 2 and 3, at the chosen tile and at half its rows, over 1-4 programs per
    SM (the compiled kernels fit 2-3 per SM by registers: tests/kernels/gpu_build.py --report)."""
    for shape in LN_SHAPES:
        for op, mod, sets, nbytes, call in _ln_bwd_calls(shape):
            bn0, bd, warps = M_UT.ln_launch(shape[2], backward=True)
            chosen = (bn0, M_UT.LN_BWD_PROGRAMS_PER_SM, M_UT.LN_BWD_STAGES)
            tensors = 2 if mod is M_LN else 4
            grid = list(itertools.product(sorted({bn0, max(1, bn0 // 2)}, reverse=True), [1, 2, 3, 4], [1, 2, 3]))
            for bn, pps, stages in few(grid):
                cfg = (bn, bd, warps)
                ran = M_UT.ln_bwd_stages(bn, bd, tensors, DT.itemsize, stages)
                row = {"BLOCK_N": bn, "warps": warps, "pps": pps, "stages": ran}
                try:  # a configuration that cannot launch (shared memory, say) is a row, not the end of the part
                    with patched((M_UT, "ln_launch", lambda w, backward, c=cfg: c),
                                 (M_UT, "LN_BWD_PROGRAMS_PER_SM", pps), (M_UT, "LN_BWD_STAGES", stages)):  # fmt: skip
                        us = time_us(call, len(sets))
                except Exception as err:
                    error = repr(err)[:500]
                    ROWS.append({"part": "pipeline", "op": op, "shape": str(shape), "cfg": row, "error": error})
                    print(f"  pipeline {op} {shape} {row}: {err!r}"[:300], flush=True)
                    continue
                record("pipeline", op, shape, row, us, nbytes, (bn, pps, stages) == chosen)


def part_loss():
    for shape in LOSS_SHAPES:
        b = shape[0]
        elems = torch.Size(shape).numel()
        width = elems // b
        for op, mod in (("euler_consistency", M_EC), ("adaptive_velocity", M_AV)):
            nrows = 4 if mod is M_EC else 2

            def make(b=b, shape=shape, nrows=nrows):
                t = torch.rand(b, device=DEV) * 0.8 + 0.2
                s = t * torch.rand(b, device=DEV)
                return [rnd(*shape) for _ in range(nrows)] + [t, t + (s - t) * 0.3, s]

            sets = [make() for _ in range(copies(nrows * elems * DT.itemsize))]
            nbytes = (nrows + 1) * elems * DT.itemsize  # rows in, dq/delta out
            if mod is M_EC:

                def call(i, sets=sets):
                    nn_t, x_t, x_l, nn_l, t, l_, s = sets[i]
                    return M_EC.euler_consistency_loss_fwd(nn_t, x_t, x_l, nn_l, t, l_, s, 1.0, 0.01, False)
            else:

                def call(i, sets=sets):
                    v, tgt, t, _, _ = sets[i]
                    return M_AV.adaptive_velocity_loss_fwd(v, tgt, t, 1.0, 1.0, 0.01)

            _, _, block0, warps0 = M_LU.split_rows(b, width, torch.device(DEV))
            chosen = (block0, warps0, M_UT.PROGRAMS_PER_SM)
            grid = [
                c
                for c in itertools.product([1024, 2048, 4096, 8192], [4, 8, 16], [1, 2, 4, 8, 16])
                if c[0] <= max(1024, triton.next_power_of_2(width)) and 4 <= c[0] // (32 * c[1]) <= 64
            ]
            for block, warps, pps in few(grid):

                def forced(batch, width_, dev, blk=block, wp=warps):
                    return (*M_UT.tiling(batch, width_, blk, dev), blk, wp)

                with patched((M_LU, "split_rows", forced), (M_UT, "PROGRAMS_PER_SM", pps)):
                    us = time_us(call, len(sets))
                record("loss", op, shape, {"BLOCK": block, "warps": warps, "pps": pps}, us, nbytes,
                       (block, warps, pps) == chosen)  # fmt: skip


def part_scale():
    for shape in LOSS_SHAPES:
        b = shape[0]
        elems = torch.Size(shape).numel()
        width = elems // b
        sets = [[rnd(*shape), torch.rand(b, device=DEV), torch.ones((), device=DEV)] for _ in range(copies(elems * 2))]

        def call(i, sets=sets):
            return M_LU.scale_rows(*sets[i])

        chosen_block = min(M_LU._SCALE_BLOCK, triton.next_power_of_2(width))
        chosen = (chosen_block, M_UT.num_warps_for(chosen_block))
        grid = [
            c
            for c in itertools.product([1024, 2048, 4096, 8192, 16384], [4, 8, 16])
            if c[0] <= max(1024, triton.next_power_of_2(width)) and 4 <= c[0] // (32 * c[1]) <= 64
        ]
        for block, warps in few(grid):
            with patched((M_LU, "_SCALE_BLOCK", block), (M_LU, "num_warps_for", lambda e, w=warps: w)):
                us = time_us(call, len(sets))
            record("scale", "scale_rows", shape, {"BLOCK": block, "warps": warps}, us, 2 * elems * 2,
                   (block, warps) == chosen)  # fmt: skip


def part_host():
    """Host microseconds per call at a tiny shape, where the GPU waits on the host: the raw launch, the
    eager public function (autograd.Function), the custom op, and PyTorch's reference."""
    import cProfile
    import pstats

    b, n, d = 2, 4, 64
    x, h = rnd(b, n, d), rnd(b, n, d)
    gate, shift, scale = rnd(b, d), rnd(b, d), rnd(b, d)
    dy = rnd(b, n, d)

    def fwd_bwd(fn):
        def run():
            args = [t.detach().requires_grad_(True) for t in (x, h, gate, shift, scale)]
            x_new, y = fn(*args)
            torch.autograd.grad((x_new, y), args, (dy, dy))

        return run

    custom_op = torch.ops.soflow_fast.gated_residual_modulated_layer_norm_forward
    cases = {
        "raw launch (fwd)": lambda: M_GATED.gated_residual_modulated_layer_norm_fwd(x, h, gate, shift, scale, 1e-6),
        "raw launch (bwd)": lambda: M_GATED.gated_residual_modulated_layer_norm_bwd(
            dy, dy, x, h, gate, scale, 1e-6, DT, DT
        ),
        "eager path (fwd)": lambda: K.gated_residual_modulated_layer_norm(x, h, gate, shift, scale),
        "custom op (fwd)": lambda: custom_op(x, h, gate, shift, scale, 1e-6),
        "reference (fwd)": lambda: ops.gated_residual_modulated_layer_norm_ref(x, h, gate, shift, scale),
        "eager path (fwd+bwd)": fwd_bwd(K.gated_residual_modulated_layer_norm),
        "custom op (fwd+bwd)": fwd_bwd(lambda *a: custom_op(*a, 1e-6)),
        "reference (fwd+bwd)": fwd_bwd(ops.gated_residual_modulated_layer_norm_ref),
    }
    calls = 20 if ARGS.dry else 400
    for name, fn in cases.items():
        with torch.no_grad() if "bwd" not in name or "raw" in name else contextlib.nullcontext():
            for _ in range(5):
                fn()
            if not ARGS.dry:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            if not ARGS.dry:
                torch.cuda.synchronize()
        us = (time.perf_counter() - t0) / calls * 1e6
        record("host", "gated_residual", (b, n, d), {"path": name}, us, 0, False)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        cases["raw launch (fwd)"]()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(15)


def part_step():
    """Profile one DiT-B/2 b64 bf16-autocast training step, fused ops off and on."""
    from torch.profiler import ProfilerActivity, profile

    from benchmarks._util import CPU_CASES, GPU_CASES, BenchStep

    case = CPU_CASES[0] if ARGS.dry else GPU_CASES[0]
    for variant in ("soflow-reference-eager", "soflow-fused-eager"):
        if ARGS.dry and "fused" in variant:
            continue
        runner = BenchStep(variant, case)
        for _ in range(3):
            runner.step()
        runner.sync()
        t0 = time.perf_counter()
        for _ in range(5):
            runner.step()
        runner.sync()
        wall_ms = (time.perf_counter() - t0) / 5 * 1e3
        acts = [ProfilerActivity.CPU] + ([] if ARGS.dry else [ProfilerActivity.CUDA])
        with profile(activities=acts) as prof:
            for _ in range(2):
                runner.step()
            runner.sync()
        key = "self_cpu_time_total" if ARGS.dry else "self_device_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=70)
        print(f"\n===== {variant} {case.model} b{case.batch}: {wall_ms:.1f} ms/step (wall, 5 steps) =====")
        print(table, flush=True)
        ROWS.append({"part": "step", "op": variant, "shape": f"{case.model} b{case.batch}", "cfg": {},
                     "us": wall_ms * 1e3, "gbps": 0, "chosen": True, "table": table})  # fmt: skip
        del runner
        if not ARGS.dry:
            torch.cuda.empty_cache()


def main():
    meta = {"device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu (interpreter)",
            "torch": torch.__version__, "triton": triton.__version__}  # fmt: skip
    print(json.dumps(meta), flush=True)
    t0 = time.time()
    for part in ARGS.parts:
        t1 = time.time()
        try:
            {"ln_fwd": part_ln_fwd, "ln_bwd": part_ln_bwd, "pipeline": part_pipeline, "loss": part_loss,
             "scale": part_scale, "host": part_host, "step": part_step}[part]()  # fmt: skip
        except Exception as e:  # keep the other parts' rows
            import traceback

            traceback.print_exc()
            ROWS.append({"part": part, "error": repr(e)})
        print(f"[sweep] {part}: {time.time() - t1:.0f} s", flush=True)
        if ARGS.out:
            Path(ARGS.out).write_text(json.dumps({"meta": meta, "rows": ROWS}, indent=1))
    print(f"[sweep] total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
