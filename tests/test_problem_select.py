"""ProblemBatch.select: problems [start, stop) of a batch are exactly those problems of the whole batch (the
same initial params, minibatches and losses), for every task; what a distributed meta-training run relies on to
give rank r its slice of the global meta-batch (l2l_fast/meta/distributed.py)."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from l2l_fast.meta.rescale import RescaledProblems
from l2l_fast.tasks import ModuleTask, get_task, make_task
from l2l_fast.tasks.base import seeded

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets"
DATA = os.environ.get("L2L_FAST_DATA") or (str(SHARED_DATA) if SHARED_DATA.exists() else None)
HAS_MNIST = DATA is not None and (Path(DATA) / "mnist").exists()
HAS_SKLEARN = importlib.util.find_spec("sklearn") is not None


def _has_fortunes() -> bool:
    try:
        from l2l_fast.data.text import fortunes_folder

        return fortunes_folder() is not None and Path(fortunes_folder()).exists()
    except Exception:  # no fortunes installed
        return False


needs_mnist = pytest.mark.skipif(not HAS_MNIST, reason="MNIST not found (L2L_FAST_DATA, ../shared/datasets)")
needs_sklearn = pytest.mark.skipif(not HAS_SKLEARN, reason="scikit-learn's datasets not installed")
needs_fortunes = pytest.mark.skipif(not _has_fortunes(), reason="fortunes not installed")

TASKS = [
    pytest.param("quadratic", {"dim": 3}, id="quadratic"),
    pytest.param("convex", {"dim": 4}, id="convex"),
    pytest.param("mnist", {"hidden": (5,)}, id="mnist", marks=needs_mnist),
    pytest.param("mlp", {"dataset": "digits", "hidden": (6,)}, id="mlp-digits", marks=needs_sklearn),
    pytest.param("mlp", {"dataset": "teacher_regression", "hidden": (6,)}, id="mlp-teacher"),
    pytest.param("logistic", {"dataset": "teacher_classification"}, id="logistic-teacher"),
    pytest.param("cnn", {"dataset": "digits", "channels": (3,)}, id="cnn-digits", marks=needs_sklearn),
    pytest.param("charlm", {"hidden": (4,), "seq_len": 5}, id="charlm", marks=needs_fortunes),
    pytest.param("chartransformer", {"d_model": 8, "heads": 2, "seq_len": 5}, id="chartransformer",
                 marks=needs_fortunes),
    pytest.param("mixed", {"families": ("mlp", "logistic", "convex", "quadratic"),
                           "datasets": ("teacher_classification", "teacher_regression")}, id="mixed"),
]


def module_task():
    def make_model():  # two widths: a sample mixes layouts (a MixedBatch of ModuleBatches)
        return nn.Sequential(nn.Linear(3, 2 + int(torch.randint(0, 2, ()))), nn.Tanh())

    x, y = torch.randn(40, 3, generator=seeded(1)), torch.randn(40, 1, generator=seeded(2))
    return ModuleTask(make_model, lambda out, t: F.mse_loss(out.sum(-1, keepdim=True), t), data=(x, y), batch_size=5)


def assert_same_problems(whole, part, start, stop):
    """part holds problems [start, stop) of whole: init params, and losses at random params of two steps."""
    first, end = whole.coordinate_range(start, stop)
    assert part.num_problems == stop - start
    assert part.problem_sizes() == whole.problem_sizes()[start:stop]
    init = whole.init_params().reshape(-1)
    assert torch.equal(part.init_params().reshape(-1), init[first:end])
    params = init + 0.1 * torch.randn(init.shape, generator=seeded(3))
    for step in (0, 7):
        expected = whole.loss(params.view(whole.param_shape), step)[start:stop]
        got = part.loss(params[first:end].view(part.param_shape), step)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)  # batched matmuls of other sizes


@pytest.mark.parametrize("task, options", TASKS)
def test_selected_problems_are_those_of_the_whole_batch(task, options):
    data = {"data_dir": DATA} if get_task(task).needs_data else {}
    whole = make_task(task, **options, **data).sample(7, seed=4, split="train")
    for start, stop in [(0, 3), (3, 7), (2, 5), (6, 7)]:
        assert_same_problems(whole, whole.select(start, stop), start, stop)
    assert_same_problems(whole, whole.select(1, 6).select(1, 3), 2, 4)  # a slice of a slice
    assert whole.select(0, 7) is whole


def test_module_task_problems_select_alike():
    for count in (7, 1):  # mixed layouts, and one layout (a ModuleBatch)
        whole = module_task().sample(count, seed=2)
        assert_same_problems(whole, whole.select(count - 1, count), count - 1, count)
        if count > 1:
            assert_same_problems(whole, whole.select(1, 4), 1, 4)


def test_rescaled_problems_select_their_scales():
    for base in (make_task("quadratic", dim=3).sample(6, seed=1),
                 make_task("mixed", families=("convex", "quadratic")).sample(6, seed=1)):
        whole = RescaledProblems.random(base, 2.0, seeded(5))
        assert_same_problems(whole, whole.select(2, 5), 2, 5)


@pytest.mark.parametrize("bounds", [(0, 0), (3, 2), (-1, 2), (0, 8)])
def test_select_refuses_empty_or_out_of_range(bounds):
    whole = make_task("quadratic").sample(7, seed=0)
    with pytest.raises(ValueError, match="select"):
        whole.select(*bounds)
