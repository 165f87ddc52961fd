#!/usr/bin/env bash
# Proves on a machine without a GPU that the CUDA kernels compile and link: a separate venv with the
# CUDA build of torch (default /work/cuda-venv, or $1), the extension built there with nvcc into a
# build directory outside the checkout (the in-place CPU build's l2l_fast/_C*.so is untouched), then
#   - the built module imports, has_cuda_kernels() is True and every op has a CUDA kernel registered;
#   - its CPU kernels pass a quick slice of the CPU tests, and tests/test_cuda.py skips cleanly;
#   - the kernel bodies, run on CPU threads, match the reference (tests/test_cuda_emulated.py, the mma
#     forward's and backward's tests/test_cuda_mma_emulated.py, tests/test_cuda_mma_backward_emulated.py);
#   - ptxas' resource report (registers, stack, spills) of the sm_90 kernels is printed, and the SASS
#     instruction counts of the forward kernels and of the backward's loops (scripts/sass_counts.py) where
#     a cuobjdump is found.
# Not part of CI (the venv is ~5.5 GB). Environment: TORCH_CUDA_ARCH_LIST (default "8.0;9.0"),
# MAX_JOBS (default 1), CUDA_HOME (default /usr/local/cuda), L2L_CUDA_CHECK_DIR (default /tmp/l2l_fast-cuda-check).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-/work/cuda-venv}"
work="${L2L_CUDA_CHECK_DIR:-/tmp/l2l_fast-cuda-check}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
export MAX_JOBS="${MAX_JOBS:-1}"
start=$(date +%s)
step() { echo; echo "== $* ($(( $(date +%s) - start )) s)"; }

step "venv $venv with the CUDA build of torch"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q torch==2.14.1 numpy ninja setuptools wheel pybind11 pytest expecttest hypothesis
"$venv/bin/python" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'GPU', torch.cuda.is_available())"
"$CUDA_HOME/bin/nvcc" --version | tail -1

step "build with nvcc (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS) into $work"
rm -rf "$work/lib" "$work/pkg"
mkdir -p "$work/lib" "$work/tmp" "$work/pkg"
(cd "$root" && "$venv/bin/python" setup.py -q build_ext -b "$work/lib" -t "$work/tmp") 2>&1 | grep -v "^$" | tail -20
so=$(ls "$work"/lib/l2l_fast/_C*.so)
ls -l "$so"

step "link and registration check"
cp -r "$root/l2l_fast" "$work/pkg/"
rm -f "$work"/pkg/l2l_fast/_C*.so
cp "$so" "$work/pkg/l2l_fast/"
cd "$work/pkg"  # python puts the working directory first on sys.path: not the checkout with its CPU build
PYTHONPATH="$work/pkg" "$venv/bin/python" - <<'EOF'
import torch
import l2l_fast
from l2l_fast import _C, ops

assert ops.HAS_NATIVE, ops.NATIVE_IMPORT_ERROR
print("module      :", _C.__file__)
print("cuda kernels:", _C.has_cuda_kernels(), "| native devices:", sorted(ops.native_devices()))
assert _C.has_cuda_kernels() and "cuda" in ops.native_devices()
for name in ("lstm_step", "lstm_step_backward", "lstm_step_", "lstm_multi_step_"):
    dump = torch._C._dispatch_dump(f"l2l_fast::{name}")
    keys = sorted({line.split(":")[0].strip() for line in dump.splitlines()
                   if line.strip().startswith(("CPU:", "CUDA:"))})
    print(f"l2l_fast::{name:<20} kernels for {keys}")
    assert "CUDA" in keys, dump
print("GPU available:", torch.cuda.is_available(), "(the CUDA tests below skip without one)")
EOF

step "undefined symbols of _C left to torch / the CUDA runtime"
nm -D --undefined-only "$so" | grep -c " U " | sed 's/^/undefined dynamic symbols: /'
ldd "$so" | grep -E "cudart|torch_cuda|c10_cuda|not found" || true
if ldd "$so" | grep -q "not found"; then
  PYTHONPATH="$work/pkg" "$venv/bin/python" -c "import l2l_fast._C" && echo "(libraries found through torch's rpath at import)"
fi

step "tests with the CUDA build: a quick slice of the CPU kernel tests; tests/test_cuda.py (skips without a GPU)"
cp -r "$root/tests" "$root/csrc" "$work/pkg/"  # csrc: the emulation test compiles the kernel bodies
cp "$root/pyproject.toml" "$work/pkg/"
export PYTHONPATH="$work/pkg" L2L_FAST_REQUIRE_NATIVE=1
"$venv/bin/python" -m pytest -q -p no:cacheprovider -o addopts="" tests/test_kernel_cpu.py -k "n7 or n1000" 2>&1 | tail -2
# without a GPU the module skips itself: pytest's exit code 5 (nothing collected) is the expected outcome
rc=0
"$venv/bin/python" -m pytest -q -p no:cacheprovider -o addopts="-ra" tests/test_cuda.py >"$work/test_cuda.log" 2>&1 || rc=$?
tail -3 "$work/test_cuda.log"
if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then echo "tests/test_cuda.py failed (exit $rc)"; exit 1; fi

step "the CUDA kernels' code on CPU threads vs the reference (tests/test_cuda_emulated.py, test_cuda_mma_*emulated.py; builds its own module)"
L2L_FAST_CUDA_EMULATION=1 "$venv/bin/python" -m pytest -q -p no:cacheprovider -o addopts="" tests/test_cuda_emulated.py \
  tests/test_cuda_mma_emulated.py tests/test_cuda_mma_backward_emulated.py 2>&1 | tail -2
unset PYTHONPATH L2L_FAST_REQUIRE_NATIVE

step "ptxas resource report, sm_90"
ti="$("$venv/bin/python" -c 'import torch.utils.cpp_extension as c; print(" ".join("-I" + p for p in c.include_paths()))')"
for cu in forward_kernels backward_kernels; do
  "$CUDA_HOME/bin/nvcc" -std=c++17 -O3 -gencode=arch=compute_90,code=sm_90 -Xptxas -v -I "$root/csrc" $ti \
    -c "$root/csrc/cuda/$cu.cu" -o "$work/tmp/$cu.sm90.o" 2>&1 |
    grep -E "Compiling entry|registers|stack frame" | grep -v "No CUDA runtime" | sed -E "s/.*entry function '([^']+)'.*/\1/" | c++filt |
    sed -E 's/l2l_fast::cuda::(\(anonymous namespace\)::)?//g; s/^void ([a-z_]+<[^>]*>?[^(]*)\(.*/  \1/' |
    paste - - - | sed -E 's/ptxas info *: //g; s/[[:space:]]+/ /g'
done

step "SASS instruction counts of the forward kernels (mma unit loops unrolled) and the backward's loops, sm_90 (scripts/sass_counts.py)"
cuobjdump=""
for candidate in "$(command -v cuobjdump || true)" "$CUDA_HOME/bin/cuobjdump" \
    "$venv"/lib/python3*/site-packages/triton/backends/nvidia/bin/cuobjdump; do
  if [ -n "$candidate" ] && [ -x "$candidate" ]; then cuobjdump=$candidate; break; fi
done
if [ -n "$cuobjdump" ]; then
  "$CUDA_HOME/bin/nvcc" -std=c++17 -O3 -gencode=arch=compute_90,code=sm_90 -DL2L_MMA_COUNT_UNROLLED -I "$root/csrc" $ti \
    -c "$root/csrc/cuda/forward_kernels.cu" -o "$work/tmp/forward_counted.sm90.o" 2>/dev/null
  "$cuobjdump" -sass "$work/tmp/forward_counted.sm90.o" >"$work/tmp/forward_counted.sass"
  "$venv/bin/python" "$root/scripts/sass_counts.py" "$work/tmp/forward_counted.sass"
  echo "-- the forward kernels as built (unit loops rolled): a warp tile as run, 5 trips of each unit loop"
  "$cuobjdump" -sass "$work/tmp/forward_kernels.sm90.o" >"$work/tmp/forward_kernels.sass"
  "$venv/bin/python" "$root/scripts/sass_counts.py" --rolled 5 "$work/tmp/forward_kernels.sass"
  echo "-- the backward's loops (variants 0 FFMA, 1 mma weight gradients, 2 every product on mma; NOTES.md \"The mma backward\" turns them into per-coordinate counts)"
  "$cuobjdump" -sass "$work/tmp/backward_kernels.sm90.o" >"$work/tmp/backward_kernels.sass"
  "$venv/bin/python" "$root/scripts/sass_counts.py" --loops "$work/tmp/backward_kernels.sass" "FixedDims<20, 2, 1u>, float"
  echo "-- the mma backward (variant 2) per warp tile as run (NOTES.md \"The mma backward\", part 3)"
  "$venv/bin/python" "$root/scripts/sass_counts.py" --bwd-as-run "$work/tmp/backward_kernels.sass"
else
  echo "no cuobjdump (CUDA toolkit or triton's copy): no counts"
fi

step "done: the CUDA extension compiles, links and registers its kernels ($(( $(date +%s) - start )) s in all)"
