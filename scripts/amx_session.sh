#!/usr/bin/env bash
# Issue 21's open part in one command, for the first session on an Intel CPU with AMX (csrc/cpu/PRODUCTS.md,
# "What the next Intel (AMX) session must run"): the AMX tests with their hardware-tile cases, then the products
# side by side on this build, then this build's float32 and amx-bf16x6 against the kernel before the issue
# (ba97182, built in a worktree outside the checkout), for step_ / fwd+bwd at N = 1e6 and the drop-in optimizer.
# Logs and the tables under $OUT (default /tmp/amx_session); the decision is printed last. About 40 minutes on
# 2 cores (the worktree's build ~6, the tests ~10, the benchmarks ~20). Run on a quiet machine (uptime first).
#
#   bash scripts/amx_session.sh                  # from the repository root, after `make build`
#   AMX_SKIP_TESTS=1 bash scripts/amx_session.sh # the benchmarks only
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
PY="${PYTHON:-$root/.venv/bin/python}"
OUT="${OUT:-/tmp/amx_session}"
BASE_COMMIT=ba97182  # the kernel before issue 21 (its "today's kernel")
BASE="${AMX_BASE_CHECKOUT:-/tmp/l2l-base-$BASE_COMMIT}"
mkdir -p "$OUT"
step() { echo; echo "== $* ($(date +%T), load $(cut -d' ' -f1 /proc/loadavg))"; }

step "the CPU"
lscpu | grep -E 'Model name|^CPU\(s\)' | tee "$OUT/cpu.txt"
flags=$(grep -o 'amx[a-z_0-9]*' /proc/cpuinfo | sort -u | tr '\n' ' ' || true)
echo "AMX flags: ${flags:-none}" | tee -a "$OUT/cpu.txt"
if [[ "$flags" != *amx_tile* || "$flags" != *amx_bf16* ]]; then
  echo "no amx_tile / amx_bf16 on this CPU: nothing to measure (issue 21's AMX part needs an Intel session)" >&2
  exit 2
fi

if [[ -z "${AMX_SKIP_TESTS:-}" ]]; then
  step "AMX tests, hardware tiles included (none may skip for want of AMX)"
  PYTHONPATH=. "$PY" -m pytest tests/test_amx_products.py tests/test_amx_backward.py -q -rs 2>&1 | tee "$OUT/tests_amx.txt"
  # one case skips exactly where the tiles run (it checks the skip on machines without them)
  if grep "^SKIPPED" "$OUT/tests_amx.txt" | grep -qv "this CPU and OS run the AMX tiles"; then
    echo "AMX cases skipped on an AMX CPU: the kernel did not get the tile state (see tests_amx.txt)" >&2
    exit 1
  fi
  step "the float and bf16 kernels' tests"
  PYTHONPATH=. "$PY" -m pytest tests/test_bf16_products.py tests/test_kernel_cpu.py tests/test_nonfinite_policy.py \
    -q 2>&1 | tail -3 | tee "$OUT/tests_cpu.txt"
fi

step "the base checkout ($BASE_COMMIT) at $BASE"
if [[ ! -f "$BASE/l2l_fast/__init__.py" ]]; then
  git worktree add -f "$BASE" "$BASE_COMMIT"
fi
if ! ls "$BASE"/l2l_fast/_C*.so >/dev/null 2>&1; then
  (cd "$BASE" && MAX_JOBS=2 "$PY" setup.py build_ext --inplace >"$OUT/base_build.txt" 2>&1)
fi

step "products side by side on this build (N = 1e6, 2 threads, 5 rounds)"
"$PY" benchmarks/ab_builds.py . .@float32 .@amx-bf16x3 .@amx-bf16x6 --sizes 1e6 --rounds 5 --threads 2 \
  2>&1 | tee "$OUT/products.txt"
step "against the kernel before the issue: step_ and fwd+bwd"
"$PY" benchmarks/ab_builds.py "$BASE" .@float32 .@amx-bf16x6 --sizes 1e6 --rounds 5 --threads 2 \
  2>&1 | tee "$OUT/against_base.txt"
step "against the kernel before the issue: the drop-in optimizer"
"$PY" benchmarks/ab_builds.py "$BASE" .@float32 .@amx-bf16x6 --optimizer --rounds 3 --threads 2 \
  2>&1 | tee "$OUT/optimizer.txt"
step "torch.nn.LSTM beside the fused kernels (one run)"
"$PY" benchmarks/bench_step.py --sizes 1e6 --no-compile --markdown --threads 2 2>&1 | tee "$OUT/bench_step.txt"

step "decision"
cat <<EOF | tee "$OUT/decision.txt"
The issue's targets on an AMX machine: step_ and fwd+bwd >= 2x $BASE_COMMIT at N = 1e6 (against_base.txt's
speed-ups), the drop-in optimizer likewise (optimizer.txt). If amx-bf16x6 beats float32 in products.txt in every
round for both step_ and fwd+bwd, make it the default where the CPU has AMX (csrc/cpu/isa_select.cpp, the
products' default; the tests' bounds already cover it), re-run this script, and put the tables in RESULTS
section 1 with this CPU's name. Otherwise float32 stays the default and the log says by how much AMX lost.
EOF
echo "logs: $OUT"
