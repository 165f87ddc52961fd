"""The CPU output cache: state-sized outputs (>= 8 MB) reuse freed blocks instead of a fresh mmap per call.

A reused block still holds the previous call's values, so every test checks the new results against the
reference on fresh inputs, not only that the block was reused.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch

from conftest import random_grad, random_state, random_weights, requires_native
from l2l_fast import ops
from test_kernel_cpu import check_step_against_reference

pytestmark = requires_native

H, L, P, SCALE = 20, 2, 10.0, 0.1
N_CACHED = {torch.float32: 40_003, torch.float64: 20_011}  # states of 12.8 MB: over the 8 MB threshold


def inputs(n, dtype, gen):
    return (random_grad(n, gen=gen, dtype=dtype, p=P), random_state(L, H, n, gen=gen, dtype=dtype),
            random_weights(H, L, gen=gen, dtype=dtype, kind="random"),
            torch.randn(n, generator=gen, dtype=torch.float64).to(dtype),
            torch.randn(L, 2, H, n, generator=gen, dtype=torch.float64).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_freed_outputs_are_reused_and_fully_rewritten(gen, dtype):
    n = N_CACHED[dtype]
    ops.empty_cpu_cache()
    grad, state, weights, up_u, up_s = inputs(n, dtype, gen)
    _, first = ops.lstm_step(grad, state, weights, P, SCALE)
    block = first.data_ptr()
    first.fill_(float("nan"))  # whatever the next output does not write would show up
    del first
    assert ops.cpu_cache_bytes() >= L * 2 * H * n * dtype.itemsize
    grad, state, weights, up_u, up_s = inputs(n, dtype, gen)  # fresh inputs for the reused block
    _, second = ops.lstm_step(grad, state, weights, P, SCALE)
    assert second.data_ptr() == block
    second.fill_(float("nan"))
    del second
    # forward and backward outputs in reused blocks, against the reference
    check_step_against_reference(grad, state, weights, P, SCALE, up_u, up_s)


def test_empty_cpu_cache_gives_blocks_back():
    n = N_CACHED[torch.float32]
    _, new_state = ops.lstm_step(torch.full((n,), 1e-3), torch.zeros(L, 2, H, n),
                                 random_weights(H, L, gen=torch.Generator().manual_seed(1), dtype=torch.float32),
                                 P, SCALE)
    held = new_state.nbytes
    del new_state
    assert ops.cpu_cache_bytes() >= held
    assert ops.empty_cpu_cache() >= held
    assert ops.cpu_cache_bytes() == 0


def test_small_outputs_do_not_use_the_cache(gen):
    ops.empty_cpu_cache()
    grad, state, weights, *_ = inputs(1000, torch.float32, gen)
    _, new_state = ops.lstm_step(grad, state, weights, P, SCALE)
    del new_state
    assert ops.cpu_cache_bytes() == 0


def test_cached_output_resizes_like_any_tensor(gen):
    grad, state, weights, *_ = inputs(N_CACHED[torch.float32], torch.float32, gen)
    _, new_state = ops.lstm_step(grad, state, weights, P, SCALE)
    flat = new_state.reshape(-1).clone()
    grown = new_state.reshape(-1)
    grown.resize_(flat.numel() * 2)
    torch.testing.assert_close(grown[: flat.numel()], flat, rtol=0, atol=0)


def test_concurrent_calls_from_python_threads(gen):
    """Two Python threads allocate and free cached blocks at once; every result matches its own input."""
    n, dtype = N_CACHED[torch.float32], torch.float32
    cases = [inputs(n, dtype, gen)[:3] for _ in range(2)]
    expected = [ops.lstm_step(*case, P, SCALE)[1].clone() for case in cases]
    errors = []

    def work(index):
        try:
            for _ in range(4):
                _, new_state = ops.lstm_step(*cases[index], P, SCALE)
                torch.testing.assert_close(new_state, expected[index], rtol=0, atol=0)
        except Exception as error:  # reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors


def run_with_cache_setting(value: str) -> subprocess.CompletedProcess:
    code = ("import torch; from l2l_fast import ops; n = 40_003\n"
            "w = [torch.rand(s) * 0.2 for s in ((80, 2), (80, 20), (80,), (80,), (80, 20), (80, 20), (80,), (80,),"
            " (1, 20), (1,))]\n"
            "_, s = ops.lstm_step(torch.full((n,), 1e-3), torch.zeros(2, 2, 20, n), w, 10.0, 0.1)\n"
            "del s; print(ops.cpu_cache_bytes())\n")
    env = dict(os.environ, L2L_FAST_CPU_CACHE_MB=value)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_cache_limit_from_the_environment():
    off = run_with_cache_setting("0")
    assert off.returncode == 0, off.stderr
    assert int(off.stdout.split()[-1]) == 0
    small = run_with_cache_setting("4")  # a 14 MB block does not fit a 4 MB cache: freed at once
    assert small.returncode == 0, small.stderr
    assert int(small.stdout.split()[-1]) == 0
    bad = run_with_cache_setting("lots")
    assert bad.returncode != 0
    assert "L2L_FAST_CPU_CACHE_MB" in bad.stderr
