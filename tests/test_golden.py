"""Bit-identical trajectories of the shipped nets against tests/golden/trajectories.pt.

Pins the behaviour the redesign of the ops, the net and the optimizer must keep: the LearnedOptimizer
trajectory, the differentiable forward and its weight gradients, on every CPU instruction set this
machine runs, and the float64 reference. Recorded with 2 threads and compared here with 1, which also
checks that the kernels' results do not depend on the thread count. Regenerate with
``python tests/golden/record.py`` only for an intended change of behaviour, and say so in the commit.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from conftest import available_cpu_isas, requires_native

sys.path.insert(0, str(Path(__file__).parent / "golden"))
import record  # noqa: E402


def _flatten(value, prefix=""):
    if isinstance(value, torch.Tensor):
        yield prefix, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _flatten(item, f"{prefix}/{key}")
    else:
        for index, item in enumerate(value):
            yield from _flatten(item, f"{prefix}[{index}]")


@pytest.fixture(scope="module")
def golden():
    return torch.load(record.GOLDEN, weights_only=True)


@pytest.fixture(scope="module")
def replayed():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return record.record()
    finally:
        torch.set_num_threads(threads)


@requires_native
def test_every_recorded_case_is_replayed(golden, replayed):
    """Every case of the file for the instruction sets this CPU runs is replayed, and no case is new."""
    isas = available_cpu_isas()
    expected = [c for c in golden if c.startswith("reference/") or c.split("/")[1] in isas]
    assert sorted(replayed) == sorted(expected)


@requires_native
@pytest.mark.parametrize("kind", ["optimizer", "forward", "reference"])
def test_trajectories_are_bit_identical(golden, replayed, kind):
    checked = 0
    for case in (c for c in golden if c.startswith(kind + "/") and c in replayed):
        expected = dict(_flatten(golden[case]))
        actual = dict(_flatten(replayed[case]))
        assert expected.keys() == actual.keys(), case
        for key, want in expected.items():
            got = actual[key]
            assert got.dtype == want.dtype and got.shape == want.shape, f"{case}{key}"
            same = torch.equal(got, want) or bool(((got == want) | (got.isnan() & want.isnan())).all())
            if not same:
                diff = (got.double() - want.double()).abs().nan_to_num(float("inf")).max().item()
                pytest.fail(f"{case}{key}: not bit-identical to the golden trajectory (max |diff| {diff:.3g})")
            checked += 1
    assert checked > 0
