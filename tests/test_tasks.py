"""The task registry: each task's name, options and data needs are declared once, and the CLI, make_task and
meta-training read them from there."""
from __future__ import annotations

import json

import pytest

import l2l_fast.tasks.registry as registry
from l2l_fast.cli import _build_parser, main as cli_main
from l2l_fast.files import load_verified
from l2l_fast.tasks import TASKS, QuadraticTask, TaskOption, TaskSpec, get_task, make_task, register, register_task

TRAIN = ["meta-train", "--epochs", "1", "--horizon", "4", "--unroll", "2", "--meta-batch", "2", "--eval-every", "1",
         "--eval-problems", "2", "--no-progress"]


@pytest.fixture
def toy(monkeypatch):
    """Registers a task 'toy' for the test (quadratics of sum(sizes) dimensions) and records its factory's calls."""
    shipped = dict(registry._REGISTRY)
    calls = []

    @register_task("toy", needs_data=True, options=[
        TaskOption("sizes", int, "problem pieces", nargs="+", label=True),
        TaskOption("flavour", str, "a 100% label", choices=("plain", "spicy"), label=True),
        TaskOption("scale", float, "not in the file names")])
    def make_toy(sizes=(2, 3), flavour="plain", scale=1.0, data_dir=None):
        calls.append({"sizes": sizes, "flavour": flavour, "scale": scale, "data_dir": data_dir})
        return QuadraticTask(dim=sum(sizes))

    yield calls
    registry._REGISTRY.clear()
    registry._REGISTRY.update(shipped)


def test_the_shipped_tasks_and_their_options():
    assert list(TASKS) == ["quadratic", "mnist", "cifar10", "mlp", "logistic", "cnn", "convex", "charlm",
                           "chartransformer", "mixed"]  # the order of --task's choices
    assert [o.name for o in TASKS["mnist"].options] == ["hidden", "activation"]
    assert TASKS["mnist"].complete({}) == {"hidden": (20,), "activation": "sigmoid"}  # the factory's defaults
    assert TASKS["quadratic"].complete({"dim": None}) == {"dim": 10}
    assert [spec.name for spec in TASKS.values() if spec.needs_data] == ["mnist", "cifar10", "mlp", "logistic",
                                                                          "cnn", "mixed"]
    assert make_task("quadratic", dim=4).sample(2, seed=0).dim == 4
    with pytest.raises(ValueError, match=r"task: expected one of \('quadratic', 'mnist', 'cifar10', .*'mixed'\), "
                                         r"got 'nope'"):
        make_task("nope")


def test_cli_flags_come_from_the_registry(toy, capsys):
    with pytest.raises(SystemExit):
        cli_main(["meta-train", "--help"])
    text = capsys.readouterr().out
    assert "--task {quadratic,mnist,cifar10,mlp,logistic,cnn,convex,charlm,chartransformer,mixed,toy}" in text
    for flag in ("--dim DIM", "--hidden HIDDEN [HIDDEN ...]", "--activation {sigmoid,relu,tanh}",
                 "--sizes SIZES [SIZES ...]", "--flavour {plain,spicy}", "--scale SCALE", "a 100% label"):
        assert flag in text, flag


def test_a_registered_task_trains_and_evaluates_from_the_cli(toy, tmp_path):
    out, data = tmp_path / "run", str(tmp_path / "data")
    assert cli_main([*TRAIN, "--task", "toy", "--sizes", "1", "4", "--data-dir", data, "--out", str(out)]) == 0
    config = load_verified(out / "checkpoint.pt")["config"]
    assert config["task"] == "toy" and config["task_kwargs"] == {"sizes": (1, 4), "flavour": "plain", "scale": 1.0}
    assert toy[0] == {"sizes": (1, 4), "flavour": "plain", "scale": 1.0, "data_dir": data}
    assert cli_main(["evaluate", "--task", "toy", "--flavour", "spicy", "--optimizer", "sgd", "--steps", "3",
                     "--problems", "2", "--tune-problems", "2", "--out", str(tmp_path / "eval")]) == 0
    assert json.loads((tmp_path / "eval" / "toy_2x3_spicy_3steps.json").read_text())[0]["optimizer"] == "sgd"


def test_evaluate_names_its_files_by_the_labelled_options(tmp_path):
    assert cli_main(["evaluate", "--task", "quadratic", "--dim", "3", "--optimizer", "sgd", "--steps", "2",
                     "--problems", "2", "--tune-problems", "2", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "quadratic_2steps.json").exists()  # dim is no label


def test_a_resumed_run_must_keep_its_task_options(tmp_path):
    out = ["--task", "quadratic", "--out", str(tmp_path / "run")]
    assert cli_main([*TRAIN, *out, "--dim", "4"]) == 0
    with pytest.raises(SystemExit):
        cli_main([*TRAIN, *out, "--resume"])  # dim 10, the default
    assert cli_main([*TRAIN, *out, "--dim", "4", "--resume", "--epochs", "2"]) == 0


def test_two_tasks_may_share_an_option_flag(toy, tmp_path):
    """Same type and nargs: one flag, each task's default applied when it is left out."""
    seen = []

    @register_task("toy2", options=[TaskOption("scale", float, "scale of the second toy")])
    def make_toy2(scale=2.0):
        seen.append(scale)
        return QuadraticTask()

    _, commands = _build_parser()
    action = commands["evaluate"]._option_string_actions["--scale"]
    assert action.default is None and "with --task toy: default 1.0; with --task toy2: default 2.0" in action.help
    evaluate = ["evaluate", "--optimizer", "sgd", "--steps", "2", "--problems", "2", "--tune-problems", "2"]
    assert cli_main([*evaluate, "--task", "toy2", "--out", str(tmp_path / "a")]) == 0
    assert cli_main([*evaluate, "--task", "toy2", "--scale", "3", "--out", str(tmp_path / "b")]) == 0
    assert cli_main([*evaluate, "--task", "toy", "--out", str(tmp_path / "c")]) == 0
    assert seen == [2.0, 3.0] and toy[-1]["scale"] == 1.0


def test_conflicting_declarations_of_one_flag_are_refused(toy):
    register(TaskSpec("toy3", lambda scale=1: QuadraticTask(), (TaskOption("scale", int),)))
    with pytest.raises(TypeError, match="--scale"):
        cli_main(["evaluate", "--optimizer", "sgd"])


def test_task_specs_are_checked_when_registered(toy):
    with pytest.raises(ValueError, match="registered already"):
        register(TaskSpec("toy", QuadraticTask))
    with pytest.raises(TypeError, match="no argument"):
        TaskSpec("bad", QuadraticTask, (TaskOption("width", int),))
    with pytest.raises(TypeError, match="needs a default"):
        TaskSpec("bad", lambda width: QuadraticTask(), (TaskOption("width", int),))
    with pytest.raises(TypeError, match="data_dir"):
        TaskSpec("bad", QuadraticTask, needs_data=True)
    assert TaskSpec("ok", QuadraticTask, (TaskOption("dim", int, default=3),)).complete({}) == {"dim": 3}
    assert get_task("toy").complete({"sizes": [5], "extra": 1}) == {"sizes": (5,), "flavour": "plain", "scale": 1.0,
                                                                     "extra": 1}
