#!/usr/bin/env bash
# The one script for a lent GPU machine (issue 5): build the extension with its CUDA kernels, run the
# CUDA tests (every gate kernel and backward variant: tests/test_cuda.py, tests/test_cuda_mma.py,
# tests/test_cuda_mma_backward.py) and a quick slice of the CPU tests, compute-sanitizer (memcheck,
# racecheck) on a small program with each, the GPU benchmark with all of them (issue 22) and ncu's
# SpeedOfLight / Occupancy / WarpStateStats of one in-place step at N = 1e7 per gate kernel and of one
# backward at N = 1e7 per backward variant (ffma, mma, mma_wgrad). Logs under $OUT (at most 8 files); the summary, the ncu figures and
# the benchmark tables are printed last. Fits in about 8 minutes: every stage has a time limit and the
# whole script a deadline (GPU_RUN_BUDGET seconds, default 470); a stage that would start past it is
# skipped, and GPU_RUN_SKIP="bench racecheck ..." skips stages by name (for a rerun of what failed).
#
#   device tool:  command "GPU_RUN_SKIP='bench_compile test_cpu' bash scripts/gpu_run.sh", timeout_s 540
#                 (the issue-22 run: the two slowest stages that say nothing about the gate kernels left out)
#   by hand:      OUT=/tmp/gpu_out bash scripts/gpu_run.sh
#
# The GPU image has torch 2.11 (cu13), nvcc, pytest, hypothesis, pytest-benchmark, pytest-xdist; nothing
# is installed from outside. Built for sm_90 only (the lent H100 / H200); set TORCH_CUDA_ARCH_LIST to change.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT="${OUT:-$(mktemp -d /tmp/gpu_run.XXXXXX)}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
start=$(date +%s)
deadline=$((start + ${GPU_RUN_BUDGET:-470}))
summary="$OUT/summary.txt"
: >"$summary"
failed=0

# stage NAME LIMIT LOG COMMAND...: runs COMMAND with a timeout of min(LIMIT, time left), appends to LOG.
stage() {
  local name=$1 limit=$2 log=$3
  shift 3
  local now left rc t0
  if [[ " ${GPU_RUN_SKIP:-} " == *" $name "* ]]; then
    echo "$name: skipped (GPU_RUN_SKIP)" | tee -a "$summary"
    return 0
  fi
  now=$(date +%s)
  left=$((deadline - now))
  if ((left < 15)); then
    echo "$name: SKIPPED (budget spent)" | tee -a "$summary"
    failed=1
    return 1
  fi
  ((limit > left)) && limit=$left
  echo "== $name (limit ${limit} s, at $((now - start)) s)" | tee -a "$OUT/$log"
  t0=$(date +%s)
  timeout --signal=INT --kill-after=10 "$limit" "$@" >>"$OUT/$log" 2>&1
  rc=$?
  local line="$name: rc=$rc in $(($(date +%s) - t0)) s"
  ((rc == 124)) && line="$line (TIMED OUT)"
  echo "$line" | tee -a "$summary"
  ((rc != 0)) && failed=1
  return $rc
}

# 1. the machine, read-only
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw,persistence_mode --format=csv
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda, '| GPU', torch.cuda.get_device_name(0), '| SMs', torch.cuda.get_device_properties(0).multi_processor_count)"
  command -v nvcc && nvcc --version | tail -2
  command -v compute-sanitizer && compute-sanitizer --version | head -2
  nproc
} >"$OUT/env.log" 2>&1
cat "$OUT/env.log"

# 2. build (ptxas resource report of every kernel into build.log). With the system compiler where there
# is one: the image's default (CXX=/opt/gcc/bin/g++, which links libstdc++ statically) gave an
# extension whose every C++ error was a segfault (H200 run, 2026-11-26); /usr/bin/g++ 13.3 did not.
if [ -x /usr/bin/g++ ] && [ -x /usr/bin/gcc ]; then export CC=/usr/bin/gcc CXX=/usr/bin/g++; fi
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" NVCC_APPEND_FLAGS="-Xptxas=-v"
if ! stage build 240 build.log "$PY" -m pip install -v --no-build-isolation --no-deps --no-index -e .; then
  tail -40 "$OUT/build.log"
  echo "build failed: nothing else runs"
  cat "$summary"
  exit 1
fi
unset NVCC_APPEND_FLAGS
stage registered 60 build.log "$PY" -c "
from l2l_fast import _C, ops
assert _C.has_cuda_kernels() and 'cuda' in ops.native_devices(), 'built without the CUDA kernels'
print('CUDA kernels registered')"

# 2b. an error thrown in the extension must reach Python (see the compiler note above); if not, print
# what tells the toolchains apart. The tests then show which of them crash.
if ! stage error_probe 60 build.log "$PY" scripts/error_probe.py; then
  so=$(ls l2l_fast/_C*.so)
  { echo "CC=${CC-} CXX=${CXX-}"; ls -l /usr/bin/g++* /usr/bin/gcc*; "${CXX:-c++}" --version | head -1
    readelf -lW "$so" | grep -i eh_frame; ldd "$so" | grep -E "gcc|stdc"; } >>"$OUT/build.log" 2>&1
fi

# 3. the CUDA tests (correctness first: the benchmark of a wrong kernel means nothing); test_cuda_mma.py
# selects the tensor-core forward (L2L_FAST_CUDA_GATES=mma) for its own tests, test_cuda_mma_backward.py the
# tensor-core backward (L2L_FAST_CUDA_BACKWARD=mma: every product at 20 x 2; mma_wgrad in its bit-identity test)
xdist=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8")  # a crashing test then costs one worker, not the file
stage test_cuda 240 tests.log "$PY" -m pytest -q -ra -p no:cacheprovider -o addopts="" $xdist tests/test_cuda.py \
  tests/test_cuda_mma.py tests/test_cuda_mma_backward.py --maxfail=15 --durations=8

# 4. the benchmark, fused rows with every gate kernel and backward reduction and baselines at N = 1e6, 1e7, 1e8
# (no torch.compile: that is step 7)
stage bench 170 bench.log "$PY" benchmarks/bench_step.py --device cuda --gates ffma mma mma16 --backward ffma mma mma_wgrad \
  --no-compile --min-run-time 0.25 --markdown

# 5. ncu of one in-place step at N = 1e7 per gate kernel (the third launch of the forward kernel: two
# warm-ups) and of one backward per backward variant, at the clocks the benchmark runs at; skipped
# where the image has no ncu. (The bf16-state forward's profile gave way to the backward's: the stage's time.)
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
ncu_step() {
  local gates=$1 state=$2
  echo "-- ncu: gates=$gates, $state state"
  L2L_FAST_CUDA_GATES=$gates "$NCU" --clock-control none -k regex:forward_ --launch-skip 2 --launch-count 1 \
    --section SpeedOfLight --section Occupancy --section WarpStateStats \
    "$PY" scripts/ncu_step.py --n 1e7 --state-dtype "$state"
}
ncu_backward() {
  local reduction=$1
  echo "-- ncu: backward=$reduction, float32 state"
  L2L_FAST_CUDA_BACKWARD=$reduction "$NCU" --clock-control none -k regex:backward_kernel --launch-skip 2 \
    --launch-count 1 --section SpeedOfLight --section Occupancy --section WarpStateStats \
    "$PY" scripts/ncu_step.py --n 1e7 --op backward
}
ncu_all() {
  local rc=0
  for gates in ffma mma mma16; do ncu_step "$gates" float32 || rc=1; done
  for reduction in mma mma_wgrad ffma; do ncu_backward "$reduction" || rc=1; done
  return $rc
}
if [ -n "$NCU" ]; then
  export NCU PY
  export -f ncu_step ncu_backward ncu_all  # stage runs its command under timeout: a new bash, which needs them exported
  stage ncu 170 ncu.log bash -c ncu_all
else
  echo "ncu: not found on this image (no profile)" | tee -a "$summary"
fi

# 6. compute-sanitizer on a small program that runs every kernel (the forward once per gate kernel)
stage memcheck 90 sanitizer.log compute-sanitizer --tool memcheck --leak-check no --error-exitcode 99 \
  "$PY" scripts/cuda_smoke.py --n-backward 40000
stage memcheck_mma 60 sanitizer.log env L2L_FAST_CUDA_GATES=mma L2L_FAST_CUDA_BACKWARD=mma compute-sanitizer \
  --tool memcheck --leak-check no --error-exitcode 99 "$PY" scripts/cuda_smoke.py --n-backward 4000
stage racecheck_mma 60 sanitizer.log env L2L_FAST_CUDA_GATES=mma L2L_FAST_CUDA_BACKWARD=mma compute-sanitizer \
  --tool racecheck --racecheck-report hazard --error-exitcode 99 "$PY" scripts/cuda_smoke.py --n-backward 4000

# 7. torch.compile of the reference next to the fused rows, at N = 1e7 (two compiles, ~1 min)
stage bench_compile 120 bench_compile.log "$PY" benchmarks/bench_step.py --device cuda --sizes 1e7 --min-run-time 0.25 --markdown

# 8. the core CPU tests, a quick slice, with this build (CPU kernels in a CUDA build)
stage test_cpu 120 tests.log "$PY" -m pytest -q -p no:cacheprovider -o addopts="" $xdist tests/test_kernel_cpu.py tests/test_gradcheck.py \
  tests/test_opcheck_compile.py tests/test_bad_input.py -k "n7 or n1000 or gradcheck or opcheck or bad or reject"

# 9. racecheck (shared-memory hazards of the backward's staging), smaller n
stage racecheck 60 sanitizer.log compute-sanitizer --tool racecheck --racecheck-report hazard --error-exitcode 99 \
  "$PY" scripts/cuda_smoke.py --n-backward 4000

echo
echo "==================== summary ($(($(date +%s) - start)) s) ===================="
cat "$OUT/env.log" | head -3
cat "$summary"
echo "-- tests"
grep -E "passed|failed|error" "$OUT/tests.log" | tail -4
grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -20
echo "-- sanitizer"
grep -E "ERROR SUMMARY|cuda_smoke:|MISMATCH" "$OUT/sanitizer.log" | head -10
echo "-- ncu (per profiled kernel: duration, throughput, occupancy, warp stalls)"
grep -E "^-- ncu|ncu_step:|==ERROR==|ERR_NVGPUCTRPERM|(forward_|backward_).*kernel|Duration|Memory Throughput|DRAM Throughput|Compute \(SM\) Throughput|Registers Per|Achieved Occupancy|Theoretical Occupancy|Block Limit|Warp Cycles Per Issued|Issued Warp|No Eligible|Active Warps Per" \
  "$OUT/ncu.log" 2>/dev/null | head -90
echo "-- error probe"
grep -E "^error_probe|^CC=|^ *GNU_EH|libgcc|libstdc|g\+\+ \(" "$OUT/build.log" | head -24
echo "-- benchmark"
sed -n '/^```text/,/^```$/p' "$OUT/bench.log" | grep -E "gpu|memory|sanity|GEMM"
grep -E "^### |^\| (fused|eager|torch)" "$OUT/bench.log" "$OUT/bench_compile.log" | sed 's/^[^:]*://'
exit $failed
