#!/usr/bin/env bash
# Everything worth measuring on a GPU, in one command that ends within 9 minutes on an H100:
#
#   build     installs the package (`pip install --no-build-isolation --no-deps -e .`, the C++/CUDA
#             extension for sm_90), or reuses a soflow_fast._C built by an earlier call (PREBUILT_EXT)
#   diag      the EMA extension's CUDA calls on small tensors, one process each (cuda-gdb on a crash)
#   device    nvidia-smi, versions
#   parity    the Triton kernels and the EMA extension against their references, on CUDA
#   bench     train-step (eager variants), sampling and EMA benchmarks at the GPU sizes (B2-b64, B2-b256,
#             XL2-b128: benchmarks/_util.GPU_CASES; GPU_SKIPPED says which rows cannot fit) -> gpu.json
#   compiled  the compiled and CUDA-graph train-step variants and trainer-default / trainer-default-fused (what
#             train.py runs with no flags: per-block compile under FSDP2 at world 1), one pytest process and one
#             JSON per size and variant, in COMPILED_VARIANTS' order -> gpu_compiled_<size>_<variant>.json.
#             A whole-loss compile took 53 s at B2 and 128 s at XL2 on the H100, MeanFlow's 80-100 s at B2
#   train     200 SoFlow steps of DiT-B/2 on synthetic 32x32x4 latents through the real trainer
#   syncfree  30 trainer steps of the same run with --sync_debug=true: torch.cuda.set_sync_debug_mode("error")
#             around every step after the warm-up, so a host sync in the step fails the stage
#   kernels   the fused-kernel benchmarks (benchmarks/test_kernels_bench.py) -> gpu_kernels.json
#   sweep     (not in the default list) launch-configuration sweep of the fused kernels (with the pipelined
#             LayerNorm backwards: SWEEP_PARTS=pipeline alone) and a profile of one
#             DiT-B/2 step with the fused ops off/on (benchmarks/kernel_sweep.py) -> kernel_sweep.json/.log
#   shipping  (not in the default list) the packaged 1-NFE sampler (.pt2) against eager sample and FM-50 on
#             CUDA, batch 1 and 64 (benchmarks/test_shipping_bench.py -k cuda) -> shipping_cuda.json/.md
#   report    summary.json (benchmarks/summary.py: one row per case and variant from this run's JSON and the
#             train stage's log, and the issue's checks), then Markdown + PNG of this run merged with the CPU
#             results, the summary first -> summary.json, report.md, report.png
#
# Usage:  bash benchmarks/gpu_suite.sh                  (results under benchmarks/results/gpu)
#         SUITE_STAGES="compiled kernels report" bash benchmarks/gpu_suite.sh   (a second call: the rest)
#         DRY_RUN=1 bash benchmarks/gpu_suite.sh        (no GPU: checks the non-GPU plumbing on CPU; bench and
#                                                        compiled measure rows of the smallest CPU case)
# Stages run in the order above and share one deadline (SUITE_BUDGET_S, default 540 s): each gets at
# most its own cap and what is left, so the most important numbers come first and a slow compile
# costs only the stages after it. Each pytest stage writes its own JSON, so a stage that times out
# loses only its own rows. Outcomes go to $OUT/stages.tsv; the suite goes on after a failed stage
# and exits non-zero when any stage failed, timed out or was skipped for lack of time.
#
# On the lent device machine (the `device` tool sets $OUT and brings back at most 8 files), results
# are written to a staging folder and packed after every stage into $OUT/gpu_suite.tar.gz, so a
# command killed at its limit still returns what finished. KERNEL_BENCH_K narrows the kernel
# benchmarks (a pytest -k expression); PREBUILT_EXT names a folder holding a soflow_fast._C*.so
# built for the same torch and Python by an earlier call (its build stage packs the one it builds under ext/),
# copied in before the first stage. BENCH_K narrows the eager benchmarks further (added to their -k),
# COMPILED_SIZES the compiled ones (B2 XL2), COMPILED_VARIANTS names those in the order they run (NAME or
# NAME@b64; see stage_compiled for the default), CAP_<STAGE> overrides a stage's cap
# (CAP_COMPILED=330), TRAIN_SCOPES the training runs ("blocks", the default per-block compile, "loss", the
# whole-loss compile without FSDP, "graphs", that compile replayed as CUDA graphs, and/or "stepgraph", the
# eager step captured whole; "loss" writes train_b2_loss_log.txt, "graphs" train_b2_graphs_log.txt, ...).
# PYTHON: the interpreter (default python, else python3).
set -euo pipefail

cd "$(dirname "$0")/.."
PACK=""
if [ -n "${OUT:-}" ]; then
  PACK="$(mkdir -p "$OUT" && cd "$OUT" && pwd)/gpu_suite.tar.gz"
  OUT="${SUITE_DIR:-/tmp/gpu_suite}"
else
  OUT="${SUITE_DIR:-benchmarks/results/gpu}"
fi
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
# the device machine's interpreter is python3 (there may be no `python`)
PY="${PYTHON:-$(command -v python || command -v python3)}"
# the repository's package, installed or not (the build stage installs it; a call with PREBUILT_EXT need not)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
DRY_RUN="${DRY_RUN:-0}"
BUDGET="${SUITE_BUDGET_S:-540}"
REPORT_RESERVE=40  # seconds kept back for the report at the end (summary.py and report.py: two interpreters)
START=$(date +%s)
STAGES="$OUT/stages.tsv"
printf 'stage\tstatus\tseconds\n' > "$STAGES"
FAILED=0

log() { echo "[gpu_suite $(($(date +%s) - START))s] $*" | tee -a "$OUT/suite.log"; }

# run_stage NAME CAP_SECONDS FUNCTION: runs the stage function in a child bash under a timeout (timeout
# cannot run a function itself, hence the exports below), logs it, and never aborts the suite.
run_stage() {
  local name=$1 cap=$2 fn=$3
  local left=$((BUDGET - REPORT_RESERVE - ($(date +%s) - START)))
  if [ "$name" = report ]; then left=$((BUDGET - ($(date +%s) - START))); fi
  local limit=$((cap < left ? cap : left))
  if [ "$limit" -le 5 ]; then
    log "stage $name: SKIPPED (no time left in the ${BUDGET}s budget)"
    printf '%s\tskipped: no time left\t0\n' "$name" >> "$STAGES"
    FAILED=1
    return 0
  fi
  log "stage $name: start (limit ${limit}s)"
  local t0 rc=0
  t0=$(date +%s)
  timeout --signal=TERM --kill-after=10 "$limit" bash -c "set -euo pipefail; $fn" > "$OUT/$name.log" 2>&1 || rc=$?
  local dt=$(($(date +%s) - t0)) status=ok
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    status="TIMEOUT after ${limit}s"
  elif [ "$rc" -ne 0 ]; then
    status="FAILED (exit $rc)"
  fi
  [ "$status" = ok ] || FAILED=1
  printf '%s\t%s\t%s\n' "$name" "$status" "$dt" >> "$STAGES"
  log "stage $name: $status in ${dt}s; last lines of $OUT/$name.log:"
  tail -n 5 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$OUT/suite.log"
  pack
}

pack() {
  if [ -n "$PACK" ]; then
    tar -czf "$PACK.tmp" -C "$(dirname "$OUT")" "$(basename "$OUT")" && mv "$PACK.tmp" "$PACK"
  fi
}

# --------------------------------------------------------------------------------------- stages

stage_build() {
  local so
  if [ -n "${PREBUILT_EXT:-}" ] && ls "$PREBUILT_EXT"/_C*.so > /dev/null 2>&1; then
    SOFLOW_NO_EXT=1 "$PY" -m pip install -q --no-build-isolation --no-deps -e .
    cp "$PREBUILT_EXT"/_C*.so soflow_fast/
    echo "reused $(ls "$PREBUILT_EXT"/_C*.so)"
  else
    MAX_JOBS="${MAX_JOBS:-16}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
      "$PY" -m pip install -v --no-build-isolation --no-deps -e .
  fi
  mkdir -p "$OUT/ext"
  cp soflow_fast/_C*.so "$OUT/ext/"
  "$PY" -c "import soflow_fast.ema as e; assert e._C is not None, e._C_IMPORT_ERROR; print('cuda part:', e._C.cuda_built())"
}

# A quick check of the EMA extension's CUDA entry points on small tensors, each in its own process,
# before anything depends on them; a crash gets a native backtrace from cuda-gdb when it is there.
stage_diag() {
  local rc=0 case traced=0
  { command -v nvcc && nvcc --version | tail -n 2; echo "CUDA_HOME=${CUDA_HOME:-}"; \
    ldd soflow_fast/_C*.so | grep -iE "cuda|c10|torch"; cuobjdump --list-elf soflow_fast/_C*.so; } 2>&1 || true
  for variant in ema_update ema_update:eager-loading multi_bf16 copy; do
    local case="${variant%%:*}" env_args=()
    if [ "$variant" != "$case" ]; then env_args=(CUDA_MODULE_LOADING=EAGER); fi
    local code="
import torch, soflow_fast._C as C
g = torch.Generator(device='cuda').manual_seed(0)
p = [torch.randn(n, device='cuda', generator=g) for n in (1, 7, 1000, 70000)]
e = [torch.randn_like(x) for x in p]
ref = [0.9 * a + 0.1 * b for a, b in zip(e, p)]
case = '$case'
if case == 'ema_update':
    C.ema_update_(e, p, 0.9, False)
elif case == 'multi_bf16':
    pb = [x.bfloat16() for x in p]
    e2 = [x.clone() for x in e]
    ref = [0.9 * a + 0.1 * b.float() for a, b in zip(e, pb)]
    C.ema_update_multi_([e, e2], pb, [0.9, 0.9], False)
    assert all(torch.equal(a, b) for a, b in zip(e, e2))
else:
    ref = [x.clone() for x in p]
    C.copy_(e, p)
torch.cuda.synchronize()
err = max((a - b).abs().max().item() for a, b in zip(e, ref))
print(case, 'max abs err', err)
assert err < 1e-6, err
"
    if env "${env_args[@]}" "$PY" -X faulthandler -c "$code"; then
      echo "diag $variant: ok"
    else
      rc=1
      echo "diag $variant: FAILED"
      if [ "$traced" = 0 ] && command -v cuda-gdb > /dev/null; then
        traced=1
        timeout 120 cuda-gdb -batch -ex run -ex "bt 30" -ex "info registers rip" -ex "x/6i \$pc" \
          --args "$PY" -c "$code" 2>&1 | grep -vE "^\[(New|Thread|Detaching)" | tail -n 60 || true
      fi
    fi
  done
  return $rc
}

stage_device() {
  if [ "$DRY_RUN" = 1 ]; then
    echo "DRY_RUN: no nvidia-smi"
  else
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    nvidia-smi
  fi
  "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton not installed")
import soflow_fast.ema as ema
print("soflow_fast._C:", "built" if ema._C is not None else f"missing ({ema._C_IMPORT_ERROR})",
      "| cuda part:", bool(ema._C is not None and ema._C.cuda_built()))
EOF
}

stage_parity() {
  local rc=0
  "$PY" -m pytest -q -p no:cacheprovider tests/test_ema.py -k cuda -rs || rc=$?
  "$PY" -m pytest -q -p no:cacheprovider tests/kernels tests/test_ops.py -rs || rc=$?
  return $rc
}

# -k cuda: the GPU sizes of the step and sampling benchmarks and the CUDA EMA case (the CPU cases run elsewhere);
# trainer-default compiles on CUDA, so it runs in the compiled stage
stage_bench() {
  if [ "$DRY_RUN" = 1 ]; then
    # the same entry point and JSON on CPU, shrunk to seconds: the smallest CPU case, trainer-default included,
    # three timed steps a row
    SOFLOW_BENCH_CPU_DEFAULT=1 SOFLOW_BENCH_TIME_S=0 "$PY" -m pytest -q -p no:cacheprovider benchmarks/test_train_step.py --benchmark-only \
      -k "cpu-DiT-T2-8px-b16 and (trainer-default or soflow-reference-eager or meanflow-eager)" \
      --benchmark-json="$OUT/gpu.json" -rs
    return
  fi
  "$PY" -m pytest -q -p no:cacheprovider benchmarks/test_train_step.py benchmarks/test_sampling_bench.py \
    benchmarks/test_ema_bench.py --benchmark-only -k "cuda and not compiled and not graphs and not trainer-default ${BENCH_K:+and $BENCH_K}" \
    --benchmark-json="$OUT/gpu.json" -rs
}

# One pytest process per size and variant, in the order of COMPILED_VARIANTS, each writing its own JSON
# (gpu_compiled_<size>_<variant>.json): pytest-benchmark writes its JSON only when its session ends, so a stage
# cut off by its cap loses only the variant it was running. NAME@bN runs NAME at batch N only. The default
# order puts first what summary.json's checks read: trainer-default, the candidates for the fastest SoFlow
# step, MeanFlow at B2-b64, the fused ops on in the default path; the fused ops inside a whole-loss compile
# (soflow-fused-loss-compiled, soflow-fusedln-loss-compiled) run only when named. A dry run measures the
# smallest CPU case the same way.
stage_compiled() {
  local rc=0 size entry variant batch k json dev=cuda sizes="${COMPILED_SIZES:-B2 XL2}"
  local variants="${COMPILED_VARIANTS:-trainer-default soflow-step-graphs soflow-loss-compiled meanflow-compiled@b64
    trainer-default-fused soflow-fused-step-graphs soflow-loss-graphs soflow-reference-compiled meanflow-compiled@b256
    meanflow-compiled@b128}"
  if [ "$DRY_RUN" = 1 ]; then
    dev=cpu sizes="${COMPILED_SIZES:-T2}" variants="${COMPILED_VARIANTS:-trainer-default@b16 meanflow-eager@b16}"
    export SOFLOW_BENCH_CPU_DEFAULT=1 SOFLOW_BENCH_TIME_S=0
  fi
  for size in $sizes; do
    for entry in $variants; do
      variant="${entry%@*}" batch=""
      if [ "$entry" != "$variant" ]; then batch="${entry#*@}"; fi
      # ids read test_train_step[<variant>-<device>-DiT-<size>-32px-b<batch>]: the "-<device>" after the name
      # keeps trainer-default from matching trainer-default-fused
      k="${variant}-${dev}-DiT-${size}-${batch:+ and ${batch}]}"
      json="$OUT/gpu_compiled_${size}_${variant}${batch:+_$batch}.json"
      echo "== $size $entry (-k \"$k\") -> $(basename "$json")"
      local one=0
      "$PY" -m pytest -q -p no:cacheprovider benchmarks/test_train_step.py --benchmark-only -k "$k" \
        --benchmark-json="$json" -rs || one=$?
      if [ "$one" -eq 5 ] && [ -n "$batch" ]; then
        echo "no $batch case at $size"  # pytest's "no tests collected": NAME@bN names one size's batch
      elif [ "$one" -ne 0 ]; then
        rc=$one
      fi
    done
  done
  return $rc
}

make_latents() {
  # synthetic SD-VAE-like latents: 2048 samples of 4x32x32 (scaled like 0.18215 * a unit latent) and labels 0..999
  "$PY" - "$1" <<'EOF'
import sys
import numpy as np
rng = np.random.default_rng(0)
n = 2048
x = (rng.standard_normal((n, 4, 32, 32)) * 0.8).astype(np.float32)
y = np.arange(n) % 1000
np.savez(sys.argv[1], x=x, y=y.astype(np.int64))
print("wrote", sys.argv[1], x.shape, y.max() + 1, "classes")
EOF
}

stage_train() {
  # both outside $OUT, so that no checkpoint (GBs) or data file is copied back
  local data="${TMPDIR:-/tmp}/soflow_gpu_suite_latents.npz" rc=0 scope work tag
  make_latents "$data"
  # TRAIN_SCOPES: "blocks" (per-block compile, FSDP on one GPU: the trainer's default), "loss"
  # (--compile_scope=loss --fsdp=false: SoFlow's whole loss as one graph), "graphs" (the same, replayed
  # as CUDA graphs: --cuda_graphs=loss) and/or "stepgraph" (the eager step in one CUDA graph: --cuda_graphs=step)
  for scope in ${TRAIN_SCOPES:-blocks}; do
    tag=$([ "$scope" = blocks ] && echo "" || echo "_$scope")
    work="${TMPDIR:-/tmp}/soflow_gpu_suite_b2$tag"
    rm -rf "$work"
    local args=(--preset imagenet-b2 --dataset=npz "--data_path=$data" "--working_dir=$work" --total_steps=200
                --log_steps=20 --eval_demo_steps=0 --eval_steps=0 --ckpt_saving_steps=0)
    if [ "$scope" = loss ]; then
      args+=(--fsdp=false --compile_scope=loss)
    elif [ "$scope" = graphs ]; then
      args+=(--fsdp=false --compile_scope=loss --cuda_graphs=loss)
    elif [ "$scope" = stepgraph ]; then
      args+=(--fsdp=false --compile=false --cuda_graphs=step)
    fi
    if [ "$DRY_RUN" = 1 ]; then
      # the same entry point and keys on CPU, shrunk to seconds
      args+=(--total_steps=2 --log_steps=1 --model.model=DiT-T/2 --batch_size=8 --compile=false)
    fi
    "$PY" soflow_fast/train.py "${args[@]}" || rc=$?
    cp "$work/log.txt" "$OUT/train_b2${tag}_log.txt" 2>/dev/null || true
    cp "$work/config.yaml" "$OUT/train_b2${tag}_config.yaml" 2>/dev/null || true
    grep -E "steps/s|img/s|images/s|done at step" "$work/log.txt" 2>/dev/null | tail -n 5 || true
  done
  return $rc
}

stage_syncfree() {
  local data="${TMPDIR:-/tmp}/soflow_gpu_suite_latents.npz" work="${TMPDIR:-/tmp}/soflow_gpu_suite_syncfree"
  [ -f "$data" ] || make_latents "$data"
  rm -rf "$work"
  local args=(--preset imagenet-b2 --dataset=npz "--data_path=$data" "--working_dir=$work" --total_steps=30
              --log_steps=10 --eval_demo_steps=0 --eval_steps=0 --ckpt_saving_steps=0 --sync_debug=true)
  if [ "$DRY_RUN" = 1 ]; then
    args+=(--total_steps=4 --log_steps=2 --model.model=DiT-T/2 --batch_size=8 --compile=false)
  fi
  "$PY" soflow_fast/train.py "${args[@]}"
  cp "$work/log.txt" "$OUT/syncfree_log.txt"
  grep -q "done at step" "$work/log.txt"
}

stage_kernels() {
  local rc=0
  "$PY" -m pytest -q -p no:cacheprovider benchmarks/test_kernels_bench.py --benchmark-only \
    -k "${KERNEL_BENCH_K:-}" --benchmark-json="$OUT/gpu_kernels.json" || rc=$?
  cp benchmarks/results/kernels_*.json benchmarks/results/kernels_*.md "$OUT/" 2>/dev/null || true
  return $rc
}

stage_sweep() {
  "$PY" benchmarks/kernel_sweep.py --out "$OUT/kernel_sweep.json" ${SWEEP_PARTS:+--parts $SWEEP_PARTS}
}

stage_shipping() {
  local rc=0
  "$PY" -m pytest -q -p no:cacheprovider benchmarks/test_shipping_bench.py --benchmark-only \
    -k "${SHIPPING_BENCH_K:-cuda}" || rc=$?
  cp benchmarks/results/shipping_cuda.json benchmarks/results/shipping_cuda.md "$OUT/" 2>/dev/null || true
  return $rc
}

stage_report() {
  local runs=() logs=() f
  for f in "$OUT/gpu.json" "$OUT"/gpu_compiled_*.json; do
    if [ -f "$f" ]; then runs+=("$f"); fi
  done
  for f in "$OUT"/train_b2*_log.txt; do
    if [ -f "$f" ]; then logs+=(--train-log "$f"); fi
  done
  # this run's rows and checks (written even with no rows: every check then null)
  "$PY" benchmarks/summary.py ${runs[@]+"${runs[@]}"} ${logs[@]+"${logs[@]}"} --out "$OUT/summary.json" --markdown
  if [ -f benchmarks/results/cpu.json ]; then runs=(benchmarks/results/cpu.json ${runs[@]+"${runs[@]}"}); fi
  if [ "${#runs[@]}" -eq 0 ]; then
    echo "no benchmark JSON to report"
    return 1
  fi
  "$PY" benchmarks/report.py "${runs[@]}" --out "$OUT/report" --summary "$OUT/summary.json"
}

# ---------------------------------------------------------------------------------------- main

export OUT PY DRY_RUN
export -f stage_build stage_diag stage_device stage_parity stage_bench stage_compiled make_latents stage_train stage_syncfree \
  stage_kernels stage_sweep stage_shipping stage_report

STAGE_LIST="${SUITE_STAGES:-build diag device parity bench compiled train syncfree kernels report}"
GPU_ONLY=" build diag parity kernels sweep shipping "  # bench, compiled and train run shrunk on CPU in a dry run
log "results under $OUT (budget ${BUDGET}s, DRY_RUN=$DRY_RUN, stages: $STAGE_LIST, python: $PY)"
# an extension built by an earlier call (its build stage packs it under ext/), for every stage of this call
if [ -n "${PREBUILT_EXT:-}" ]; then
  if ls "$PREBUILT_EXT"/_C*.so > /dev/null 2>&1; then
    cp "$PREBUILT_EXT"/_C*.so soflow_fast/
    log "EMA extension from $PREBUILT_EXT: $(cd "$PREBUILT_EXT" && ls _C*.so)"
  else
    log "PREBUILT_EXT=$PREBUILT_EXT holds no _C*.so: the EMA runs on its torch fallback unless the build stage runs"
    FAILED=1
  fi
fi
for stage in $STAGE_LIST; do
  case $stage in
    build) cap=240 ;; diag) cap=150 ;; device) cap=30 ;; parity) cap=180 ;; bench) cap=150 ;; compiled) cap=200 ;; train) cap=180 ;; syncfree) cap=120 ;;
    kernels) cap=240 ;; sweep) cap=360 ;; shipping) cap=240 ;; report) cap=60 ;;
    *) log "unknown stage $stage (known: build diag device parity bench compiled train syncfree kernels sweep shipping report)"; FAILED=1; continue ;;
  esac
  cap_var="CAP_$(echo "$stage" | tr '[:lower:]' '[:upper:]')"  # e.g. CAP_COMPILED=330 overrides the stage's cap
  cap=${!cap_var:-$cap}
  if [ "$DRY_RUN" = 1 ] && [[ "$GPU_ONLY" == *" $stage "* ]]; then
    printf '%s\tskipped: dry run\t0\n' "$stage" >> "$STAGES"
    continue
  fi
  run_stage "$stage" "$cap" "stage_$stage"
  if [ "$stage" = diag ] && ! grep -q "^diag	ok" "$STAGES"; then
    export SOFLOW_EMA_EXTENSION=0
    log "EMA extension failed its CUDA check: later stages run with SOFLOW_EMA_EXTENSION=0 (torch fallback)"
  fi
done

log "done in $(($(date +%s) - START))s"
if command -v column > /dev/null; then column -t -s $'\t' "$STAGES"; else cat "$STAGES"; fi | tee -a "$OUT/suite.log"
pack
exit $FAILED
