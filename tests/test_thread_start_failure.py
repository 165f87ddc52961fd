"""The CPU ops when a helper thread cannot be started, or a chunk throws (csrc/cpu/chunks.h, run_chunks).

Pins a bug: run_chunks started its helpers with a bare emplace_back, so a std::thread that failed to start
(std::system_error, EAGAIN under a thread or address-space limit) after others had started unwound past joinable
threads: std::terminate, the process aborted. An exception thrown in a helper's chunk called std::terminate too.
Now a chunk whose thread cannot be started runs on the calling thread, every started thread is joined, and the
first exception in chunk order is rethrown; the results stay bit for bit those of the threaded run.

Two ways in: the real ops in a subprocess whose address space is limited (RLIMIT_AS) so that no more thread
stacks can be mapped, and a small C++ harness (tests/run_chunks_harness.cpp) that builds run_chunks alone with
a start that throws at a chosen helper and chunks that throw.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import requires_native

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------
# the real ops under an address-space limit

# The ops' chunks: 8 threads' worth of coordinates (csrc/cpu/chunks.h: kMinCoordinatesPerThread = 16384), so
# 7 helpers. The limit leaves room for one more 8 MiB thread stack (glibc's default: RLIMIT_STACK), not two; the
# probe starts Python threads (the same default stack) until one fails, then joins them and waits until they are
# gone: glibc keeps their stacks and hands them to the next threads, so the ops start as many helpers as the probe
# did, and the next start fails. Inputs, outputs and torch's own OpenMP threads all exist before the limit: nothing else needs memory.
LIMITED_RUN = r"""
import json, os, resource, threading, time, torch
from l2l_fast import ops
from l2l_fast.net import CoordinatewiseLSTM
threads, n = 8, 8 * 16384 + 123
gen = torch.Generator().manual_seed(0)
weights = [p.detach() for p in CoordinatewiseLSTM(hidden_size=20, num_layers=2).parameters()]
grad = torch.randn(n, generator=gen) * 0.1
state = torch.randn(2, 2, 20, n, generator=gen)
sizes = [n // 2, 7, n - n // 2 - 7]  # lstm_multi_step_ over three tensors

def inputs():
    return dict(step=[torch.zeros(n), state.clone()],
                multi=[[torch.zeros(k) for k in sizes], state.clone()])

def run(x):
    ops.lstm_step_(x["step"][0], grad, x["step"][1], weights)
    ops.lstm_multi_step_(x["multi"][0], list(grad.split(sizes)), x["multi"][1], weights)

def flat(x):
    return [x["step"][0], x["step"][1], *x["multi"][0], x["multi"][1]]

one, limited, threaded = inputs(), inputs(), inputs()
torch.set_num_threads(1)
run(one)  # also packs the weights (cached), so the limited run allocates nothing
torch.set_num_threads(threads)
torch.ones(1 << 24).add_(1)  # starts torch's OpenMP threads before the limit

vm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize:"))
soft, hard = resource.getrlimit(resource.RLIMIT_AS)
resource.setrlimit(resource.RLIMIT_AS, (vm + (12 << 20), hard))
tasks = len(os.listdir("/proc/self/task"))
release, probe = threading.Event(), []
try:
    for _ in range(threads):
        probe.append(threading.Thread(target=release.wait))
        probe[-1].start()
except RuntimeError:
    probe.pop()
release.set()
for t in probe:
    t.join()
deadline = time.monotonic() + 10
while len(os.listdir("/proc/self/task")) > tasks and time.monotonic() < deadline:
    time.sleep(0.001)  # join() returns before the (detached) thread has ended and given its stack back
run(limited)
resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
run(threaded)
print(json.dumps({"probe": len(probe),
                  "same_as_threaded": all(map(torch.equal, flat(limited), flat(threaded))),
                  "same_as_one_thread": all(map(torch.equal, flat(limited), flat(one)))}))
"""


@requires_native
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status, glibc's thread stacks")
def test_ops_when_helper_threads_cannot_start():
    """lstm_step_ and lstm_multi_step_ on 8 chunks where only the first helpers can start: before the fix the
    process aborted ("terminate called without an active exception"); now the chunks left over run on the
    calling thread and the results equal the unlimited 8-thread run and the 1-thread run bit for bit."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    run = subprocess.run([sys.executable, "-c", LIMITED_RUN], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"exit code {run.returncode}\n{run.stderr[-3000:]}"
    result = json.loads(run.stdout.splitlines()[-1])
    if result["probe"] >= 7:
        pytest.skip(f"RLIMIT_AS did not stop thread starts here (the probe started {result['probe']})")
    assert result["same_as_threaded"] and result["same_as_one_thread"], result


# ---------------------------------------------------------------------------------------------
# run_chunks alone: which start fails, which chunks throw


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> Path:
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler to build tests/run_chunks_harness.cpp")
    binary = tmp_path_factory.mktemp("run_chunks") / "run_chunks_harness"
    subprocess.run([compiler, "-std=c++17", "-O1", "-pthread", "-I", str(ROOT / "csrc"),
                    str(ROOT / "tests" / "run_chunks_harness.cpp"), "-o", str(binary)], check=True, timeout=120)
    return binary


# (chunks, failing helper start (1-based; 0: none), throwing chunks) -> chunks run on the calling thread, rethrown
CASES = {
    "all-start": (4, 0, [], [0], None),
    "first-fails": (4, 1, [], [0, 1, 2, 3], None),
    "second-fails": (4, 2, [], [0, 2, 3], None),  # one helper running: the old abort
    "last-fails": (4, 3, [], [0, 3], None),
    "helpers-throw": (4, 0, [3, 1], [0], "chunk 1"),  # chunk 3 throws first in time, chunk 1 first in order
    "helper-throws-only": (4, 0, [2], [0], "chunk 2"),
    "caller-and-helper-throw": (4, 0, [2, 0], [0], "chunk 0"),
    "fallback-throws": (4, 2, [3], [0, 2, 3], "chunk 3"),
    "fails-and-helper-throws": (4, 3, [1, 3], [0, 3], "chunk 1"),
    "one-chunk": (1, 0, [0], [0], "chunk 0"),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_run_chunks(harness, case):
    """Every chunk runs exactly once, on a helper unless its start (or an earlier one) failed; no abort; the
    first exception in chunk order is rethrown after all chunks ran."""
    chunks, fail_at, throwing, on_caller, rethrown = case
    run = subprocess.run([str(harness), str(chunks), str(fail_at), *map(str, throwing)], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, f"exit code {run.returncode}\n{run.stderr}"
    result = json.loads(run.stdout)
    assert result["ran"] == [1] * chunks
    assert [c for c in range(chunks) if result["on_caller"][c]] == on_caller
    assert result["tries"] == (fail_at if fail_at else chunks - 1)  # no new start after a failed one
    assert result["rethrown"] == rethrown
