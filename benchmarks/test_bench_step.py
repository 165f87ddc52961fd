"""pytest-benchmark versions of the main rows of bench_step.py, at one size on the CPU.

  .venv/bin/python -m pytest benchmarks/test_bench_step.py --benchmark-enable
  L2L_BENCH_N=1e6 .venv/bin/python -m pytest benchmarks/test_bench_step.py --benchmark-enable

pyproject's addopts pass --benchmark-disable, so without --benchmark-enable every benchmark runs once: a smoke
test of the workloads. Nothing here asserts on time; bench_step.py prints the full table with the limits.
"""
from __future__ import annotations

import os

import pytest
import torch

import bench_step  # benchmarks/ has no __init__.py: pytest puts it on sys.path
from l2l_fast import ops

N = int(float(os.environ.get("L2L_BENCH_N", "1e5")))
HIDDEN, LAYERS = 20, 2



def run(benchmark, fn, group: str) -> None:
    benchmark.group = f"{group}, N={N:,}"
    benchmark.extra_info["coordinates"] = N
    if not benchmark.disabled:
        fn()  # warm-up: allocator, lazy optimizer state, first-call dispatch
    benchmark(fn)


WORKLOADS = {"step": bench_step.step_fn, "fwd+bwd": bench_step.fwdbwd_fn}


@pytest.mark.parametrize("kind", sorted(WORKLOADS))
@pytest.mark.parametrize("backend", ["native", "reference"], ids=["fused", "eager-reference"])
def test_lstm_optimizer(benchmark, backend, kind):
    if backend == "native" and "cpu" not in ops.native_devices():
        pytest.skip(f"l2l_fast._C has no CPU kernels here ({ops.NATIVE_IMPORT_ERROR})")
    net = bench_step.make_net(HIDDEN, LAYERS, "cpu", backend)
    run(benchmark, WORKLOADS[kind](net, N), kind)


@pytest.mark.parametrize("flags", [{"foreach": True}, {"fused": True}], ids=["foreach", "fused"])
def test_adam_step(benchmark, flags):
    run(benchmark, bench_step.adam_fn(N, "cpu", **flags), "step")


def test_workloads_run_without_autograd_leaks():
    """Smoke check of the builders themselves: the step leaves no graph, fwd+bwd returns one gradient per input."""
    net = bench_step.make_net(HIDDEN, LAYERS, "cpu", "reference")
    grads = bench_step.fwdbwd_fn(net, 7)()
    assert len(grads) == len(net.weights()) + 1
    assert all(torch.isfinite(g).all() for g in grads)


TORCH_LSTM = {"step": bench_step.torch_lstm_step_fn, "fwd+bwd": bench_step.torch_lstm_fwdbwd_fn}


@pytest.mark.parametrize("kind", sorted(TORCH_LSTM))
def test_torch_lstm(benchmark, kind):
    net = bench_step.make_net(HIDDEN, LAYERS, "cpu", "reference")
    run(benchmark, TORCH_LSTM[kind](net, N), kind)


def test_torch_lstm_rows_compute_the_reference():
    """The nn.LSTM rows are the same function as the reference: the same gradients (float32, both sides) to the
    weights and the state, in the same order."""
    net = bench_step.make_net(HIDDEN, LAYERS, "cpu", "reference")
    expected = bench_step.fwdbwd_fn(net, 7)()
    got = bench_step.torch_lstm_fwdbwd_fn(net, 7)()
    assert len(got) == len(expected) + 1
    for g, e in zip(got[:-2], expected[:-1]):
        torch.testing.assert_close(g, e.reshape(g.shape), rtol=1e-4, atol=1e-6)
    h, c = bench_step.torch_lstm_state(expected[-1])
    torch.testing.assert_close(got[-2], h, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got[-1], c, rtol=1e-4, atol=1e-6)
