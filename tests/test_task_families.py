"""The problem families of meta-training that generalizes (mlp, logistic, cnn, convex, charlm) and the `mixed`
sampler over them: each samples deterministically, takes learned steps and gives a finite meta-gradient; the
sampler never draws what it declares held out; the datasets behind them."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from l2l_fast.data.text import DEFAULT_FILES, FORTUNES_ENV, VOCAB, TextUnavailable, load_fortunes
from l2l_fast.meta.unroll import loss_and_grad, run_learned, truncation
from l2l_fast.net import CoordinatewiseLSTM
from l2l_fast.tasks import HELD_OUT, MixedBatch, get_task, held_out_tasks
from l2l_fast.tasks.datasets import examples
from l2l_fast.tasks.mixed import FAMILIES, TRAIN_DATASETS, MixedTask

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets"
HAS_MNIST = (SHARED_DATA / "mnist").exists()
COOKIES = ["The quick brown fox jumps over the lazy dog.\n  -- typists", "To be, or not to be:\nthat is the question.",
           "Brevity is the soul of wit.\n  -- Polonius"] * 8


@pytest.fixture
def fortunes(tmp_path, monkeypatch):
    """Small fortune files standing in for Debian's (the real corpus is tested when installed)."""
    for name in DEFAULT_FILES:
        (tmp_path / name).write_text("\n%\n".join(COOKIES) + "\n%\n")
    monkeypatch.setenv(FORTUNES_ENV, str(tmp_path))
    return tmp_path


def needs_mnist(options):
    return "mnist" in (options.get("dataset"), *options.get("datasets", ()))


FAMILY_CASES = [
    ("mlp", {}),
    ("mlp", {"dataset": "teacher_regression", "hidden": (5, 4), "nonlinearity": "gelu", "weight_init": "small"}),
    ("mlp", {"dataset": "teacher_classification", "hidden": (6,), "nonlinearity": "relu"}),
    ("mlp", {"dataset": "breast_cancer", "hidden": (4,), "nonlinearity": "tanh"}),
    ("mlp", {"dataset": "mnist", "hidden": (8,), "image_size": 7}),
    ("logistic", {"dataset": "iris"}),
    ("logistic", {"dataset": "wine", "weight_init": "small"}),
    ("cnn", {"channels": (4,)}),
    ("cnn", {"dataset": "mnist", "channels": (3, 4), "nonlinearity": "sigmoid"}),
    ("convex", {"dim": 7}),
    ("charlm", {"hidden": (6,), "seq_len": 8}),
    ("mixed", {"families": ("mlp", "logistic", "convex", "quadratic", "charlm"),
               "datasets": ("digits", "iris", "teacher_regression")}),
]


@pytest.mark.parametrize("name, options", FAMILY_CASES,
                         ids=[f"{n}-{'-'.join(map(str, o.values())) or 'defaults'}"[:60] for n, o in FAMILY_CASES])
def test_each_family_samples_steps_and_gives_a_finite_meta_gradient(name, options, fortunes):
    if needs_mnist(options) and not HAS_MNIST:
        pytest.skip(f"MNIST not found at {SHARED_DATA}")
    task = get_task(name).make(options, data_dir=str(SHARED_DATA))
    problems = task.sample(2, seed=1)
    again = task.sample(2, seed=1)
    params = problems.init_params()
    assert params.shape == problems.param_shape and sum(problems.problem_sizes()) == params.numel()
    assert torch.equal(params, again.init_params())
    assert torch.equal(problems.loss(params, 3), again.loss(params, 3))  # deterministic minibatches
    val = task.sample(2, seed=1, split="val")
    assert not torch.equal(problems.loss(params, 0), val.loss(val.init_params(), 0))
    torch.manual_seed(0)
    net = CoordinatewiseLSTM(hidden_size=4)
    losses = run_learned(net, problems, 3)
    assert losses.shape == (4, 2) and torch.isfinite(losses).all()
    _, grad = loss_and_grad(problems, params, 0, keep_graph=False)
    meta_loss, history, *_ = truncation(net, problems, params, grad, net.init_state(params.numel()), 0, 3)
    meta_loss.backward()
    assert torch.isfinite(meta_loss) and history.shape == (3, 2)
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in net.parameters())


def test_the_sampler_is_deterministic_and_never_draws_the_held_out():
    task = MixedTask(datasets=TRAIN_DATASETS)
    draws = task.draw(3000, seed=0)
    assert draws == task.draw(3000, seed=0) and draws != task.draw(3000, seed=1)
    assert draws[:50] != task.draw(50, seed=0, split="val")
    assert {family for family, _ in draws} == set(FAMILIES)
    for family, options in draws:
        assert options.get("nonlinearity") != "gelu" and options.get("dataset") != "wine"
        if family == "mlp":
            assert 1 <= len(options["hidden"]) <= 2 and max(options["hidden"]) <= 64
        if family == "charlm":
            assert max(options["hidden"]) <= 32
        assert options.get("image_size", 14) in (7, 14)
    mlps = [o for f, o in draws if f == "mlp"]
    assert {o["nonlinearity"] for o in mlps} == {"sigmoid", "tanh", "relu"}
    assert {o["dataset"] for o in mlps} == set(TRAIN_DATASETS)
    assert {len(o["hidden"]) for o in mlps} == {1, 2} and {o["weight_init"] for o in mlps} == {"default", "small"}


def test_a_mixed_batch_groups_equal_draws_and_keeps_each_problems_spec(fortunes):
    task = MixedTask(families=("convex", "quadratic"), datasets=())
    problems = task.sample(40, seed=3)
    assert isinstance(problems, MixedBatch) and problems.num_problems == 40 and problems.relative_scores
    assert sorted(map(repr, problems.specs)) == sorted(map(repr, task.draw(40, seed=3)))
    assert sum(part.num_problems for part in problems.parts) == 40 and len(problems.parts) < 40  # shared draws
    assert problems.problem_sizes() == [spec[1]["dim"] for spec in problems.specs]


def test_held_out_datasets_and_bad_families_are_refused():
    with pytest.raises(ValueError, match="held out"):
        MixedTask(datasets=("digits", "wine"))
    with pytest.raises(ValueError, match="image dataset"):
        MixedTask(families=("cnn",), datasets=("iris",))
    with pytest.raises(ValueError, match="families"):
        MixedTask(families=("resnet",))
    with pytest.raises(ValueError, match="dataset"):
        get_task("cnn").make({"dataset": "iris"})
    with pytest.raises(ValueError, match="regression"):
        get_task("logistic").make({"dataset": "teacher_regression"})


def test_every_held_out_entry_has_a_task_that_samples(fortunes):
    tasks = held_out_tasks()
    named = {"gelu": ["mlp_gelu", "cnn_gelu"], "wine": ["mlp_wine", "logistic_wine"], "deep": ["mlp_deep"],
             "wide": ["mlp_wide", "charlm_wide"], "mnist28": ["mnist28"],
             "attention": ["attention"]}
    assert set(named) == set(HELD_OUT) and sorted(sum(named.values(), [])) == sorted(tasks)
    for label, (name, options) in tasks.items():
        if name == "mnist" or needs_mnist(options):
            if not HAS_MNIST:
                continue
        problems = get_task(name).make(options, data_dir=str(SHARED_DATA)).sample(1, seed=0, split="test")
        assert torch.isfinite(problems.loss(problems.init_params(), 0)).all(), label


def test_scikit_learn_datasets_are_split_and_scaled():
    sizes = {}
    for name in ("digits", "iris", "wine", "breast_cancer"):
        parts = {split: examples(name, split) for split in ("train", "val", "test")}
        sizes[name] = sum(len(parts[s][1]) for s in parts)
        x, y, classes = parts["train"]
        assert y.max() < classes and x.dtype == torch.float32
        if name == "digits":
            assert x.shape[1:] == (1, 8, 8) and 0 <= x.min() and x.max() <= 1
        else:
            torch.testing.assert_close(x.mean(0), torch.zeros(x.shape[1]), atol=1e-4, rtol=0)
    assert sizes == {"digits": 1797, "iris": 150, "wine": 178, "breast_cancer": 569}


def test_the_text_corpus_splits_cookies_and_keeps_the_vocabulary(fortunes):
    train, val, test = (load_fortunes(s, files=("literature",)) for s in ("train", "val", "test"))
    assert train.count("\n\n") == 20 and val.count("\n\n") == 2 and test.count("\n\n") == 2  # i % 10: 8, 9
    assert set(train) <= set(VOCAB) and "Brevity" in train


def test_a_missing_corpus_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv(FORTUNES_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(TextUnavailable, match="apt-get install fortunes"):
        get_task("charlm").make({}).sample(1, seed=0)


@pytest.mark.skipif(not Path("/usr/share/games/fortunes/literature").exists(),
                    reason="Debian's fortunes package is not installed (apt-get install fortunes)")
def test_the_real_corpus(monkeypatch):
    monkeypatch.delenv(FORTUNES_ENV, raising=False)
    text = load_fortunes("val")
    assert len(text) > 50_000 and set(text) <= set(VOCAB)
    problems = get_task("charlm").make({}).sample(1, seed=0)
    assert math.log(len(VOCAB)) - 0.2 < problems.loss(problems.init_params(), 0).item() < math.log(len(VOCAB)) + 0.2
