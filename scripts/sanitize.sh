#!/usr/bin/env bash
# Builds the kernels with -fsanitize=address,undefined in a copy of the tree with its own venv
# (so the normal build is untouched) and runs the kernel tests there.
# Python is not instrumented: the sanitizer runtimes are preloaded, and leak detection is off
# (CPython's allocator "leaks" by design). Any ASan or UBSan report aborts the run.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="${L2L_SANITIZE_DIR:-/tmp/l2l_fast-sanitize}"
python="${PYTHON:-python3}"
torch_spec="${TORCH_SPEC:-torch==2.13.0}"

mkdir -p "$work"
rsync -a --delete --exclude .venv --exclude .git --exclude build --exclude '*.so' --exclude '*.egg-info' \
  "$root/" "$work/src/"
[ -x "$work/venv/bin/python" ] || "$python" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q "$torch_spec" numpy ninja pybind11 setuptools wheel pytest pytest-benchmark hypothesis expecttest
cd "$work/src"
L2L_FAST_SANITIZE=1 MAX_JOBS=${MAX_JOBS:-2} "$work/venv/bin/python" setup.py -q build_ext --inplace
LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)" \
ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=1 \
UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
  "$work/venv/bin/python" -m pytest -q -x -p no:cacheprovider \
  tests/test_kernel_cpu.py tests/test_gradcheck.py tests/test_bad_input.py tests/test_property.py "$@"
echo "sanitizer run clean"
