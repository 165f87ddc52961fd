"""The `l2l-fast` command answers what a user can fix with one line on stderr and exit status 2, not a traceback."""
import math

import pytest
import torch
from test_weight_files import RunsCode, flip_a_bit_in_the_weights, small_net, write_net

import l2l_fast.meta.evaluate as evaluate_module
from l2l_fast.cli import load_optimizer_spec, main as cli_main
from l2l_fast.pretrained import SHIPPED_DIR, save_pretrained

TRAIN = ["meta-train", "--task", "quadratic", "--epochs", "1", "--horizon", "4", "--unroll", "2", "--meta-batch", "1",
         "--eval-every", "1", "--eval-problems", "1", "--no-progress"]


def run_failing(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err


def evaluate_argv(spec):
    return ["evaluate", "--task", "quadratic", "--optimizer", spec, "--steps", "3", "--problems", "1",
            "--tune-problems", "1"]


def test_missing_optimizer_file(tmp_path, capsys):
    err = run_failing(evaluate_argv(str(tmp_path / "absent.pt")), capsys)
    assert err.startswith("l2l-fast evaluate: error:") and "No such file" in err and "absent.pt" in err


@pytest.mark.parametrize("content, reason", [
    (b"these are not weights\n", "not a torch file"),
    (None, "truncated"),  # the first 500 bytes of a real optimizer file
])
def test_unreadable_optimizer_file(tmp_path, capsys, content, reason):
    path = tmp_path / "broken.pt"
    path.write_bytes(content if content is not None else (SHIPPED_DIR / "mnist.pt").read_bytes()[:500])
    err = run_failing(evaluate_argv(str(path)), capsys)
    assert "not a valid l2l_fast optimizer file" in err and reason in err


@pytest.mark.parametrize("spec, expected", [
    ("adamw", "expected one of adam, nag, rmsprop, sgd, pretrained:NAME"),
    ("pretrained:nope", "no shipped optimizer named 'nope'"),
])
def test_unknown_optimizer_names_the_choices(capsys, spec, expected):
    err = run_failing(evaluate_argv(spec), capsys)
    assert expected in err and "mnist" in err and "quadratic" in err


def test_a_bad_optimizer_fails_before_any_baseline_is_tuned(tmp_path, capsys, monkeypatch):
    def tuned(*args, **kwargs):
        raise AssertionError("a baseline was tuned before the bad spec was noticed")

    monkeypatch.setattr(evaluate_module, "tune_learning_rate", tuned)
    argv = evaluate_argv("adam") + ["--optimizer", str(tmp_path / "absent.pt")]
    assert "No such file" in run_failing(argv, capsys)


@pytest.mark.parametrize("suite", [False, True], ids=["task", "suite"])
def test_an_out_that_cannot_be_a_directory_fails_before_any_run(tmp_path, capsys, monkeypatch, suite):
    """Regression: `evaluate --out FILE` (an existing file) tuned every baseline and ran every test problem (a
    suite: about 30 minutes) before failing at the directory's mkdir; it now fails first."""
    def tuned(*args, **kwargs):
        raise AssertionError("a baseline was tuned before the bad --out was noticed")

    monkeypatch.setattr(evaluate_module, "tune_learning_rate", tuned)
    import l2l_fast.meta.suite as suite_module
    monkeypatch.setattr(suite_module, "tune_learning_rate", tuned, raising=False)
    not_a_dir = tmp_path / "a_file"
    not_a_dir.write_text("")
    argv = ["evaluate", "--suite", "smoke", "--quick", "--optimizer", "adam"] if suite else evaluate_argv("adam")
    assert "a_file" in run_failing(argv + ["--out", str(not_a_dir)], capsys)


def test_meta_train_refuses_to_overwrite_and_to_resume_another_configuration(tmp_path, capsys):
    out = ["--out", str(tmp_path / "run")]
    assert cli_main(TRAIN + out) == 0
    capsys.readouterr()
    assert "--resume" in run_failing(TRAIN + out, capsys)
    assert "different configuration" in run_failing(TRAIN + out + ["--resume", "--lr", "0.5"], capsys)
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"torn")
    assert "not a readable l2l_fast checkpoint" in run_failing(TRAIN + out + ["--resume"], capsys)


def test_traceback_on_request(tmp_path, monkeypatch):
    monkeypatch.setenv("L2L_FAST_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError):
        cli_main(evaluate_argv(str(tmp_path / "absent.pt")))


def test_export_directory_is_made_before_the_run(tmp_path, capsys):
    export = tmp_path / "new" / "dir" / "q.pt"
    assert cli_main(TRAIN + ["--out", str(tmp_path / "run"), "--export", str(export)]) == 0
    assert export.exists()
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    err = run_failing(TRAIN + ["--out", str(tmp_path / "run2"), "--export", str(blocked / "q.pt")], capsys)
    assert "a_file" in err
    assert not (tmp_path / "run2").exists()  # refused before any training


def test_a_bare_shipped_name_still_loads():
    label, net = load_optimizer_spec("mnist")
    assert label == "mnist" and net.record



def _flipped(path):
    net = small_net()
    save_pretrained(net, path)
    flip_a_bit_in_the_weights(path, net)


def _nan_weight(path):
    write_net(path, "verified", out__bias=torch.full((1,), math.nan))


def _runs_code(path):
    torch.save({"state_dict": RunsCode(path.parent / "code-ran")}, path)


@pytest.mark.parametrize("make, reason", [
    (_flipped, "checksum mismatch"),
    (_nan_weight, "weight 'out.bias' has 1 non-finite value"),
    (_runs_code, "refused by torch's weights-only unpickler"),
], ids=["bit-flip", "nan-weight", "runs-code"])
def test_a_corrupt_or_unsafe_optimizer_file_is_one_line(tmp_path, capsys, make, reason):
    path = tmp_path / "opt.pt"
    make(path)
    err = run_failing(evaluate_argv(str(path)), capsys)
    assert "not a valid l2l_fast optimizer file" in err and reason in err and str(path) in err
    assert not (tmp_path / "code-ran").exists()


def test_a_pth_file_is_an_optimizer_file(tmp_path):
    """cli.load_optimizer_spec accepted only '.pt' paths before load_pretrained saw them; it asks
    l2l_fast.pretrained.names_a_file(spec) now."""
    save_pretrained(small_net(), tmp_path / "opt.pth")
    label, net = load_optimizer_spec(str(tmp_path / "opt.pth"))
    assert net.hidden_size == 4


@pytest.mark.parametrize("extra, expected", [
    (["--task", "quadratic"], "--task apply to a single --task"),
    (["--steps", "5"], "--steps apply to a single --task"),
    (["--dim", "3"], "--dim apply to a single --task"),
])
def test_a_suite_refuses_single_task_flags(capsys, extra, expected):
    err = run_failing(["evaluate", "--suite", "smoke", "--quick", "--optimizer", "adam", *extra], capsys)
    assert expected in err and "its entries set their tasks" in err


def test_quick_and_unknown_suites_are_refused(capsys, tmp_path):
    assert "--quick: applies to --suite only" in run_failing(["evaluate", "--optimizer", "adam", "--quick"], capsys)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["evaluate", "--suite", "nope", "--optimizer", "adam"])
    assert exit_info.value.code == 2 and "smoke" in capsys.readouterr().err  # argparse names the choices
    err = run_failing(["evaluate", "--suite", "smoke", "--quick", "--optimizer", str(tmp_path / "absent.pt")], capsys)
    assert "No such file" in err


def test_reused_tuning_must_be_a_suite_record(capsys, tmp_path):
    suite = ["evaluate", "--suite", "smoke", "--quick", "--optimizer", "adam", "--out", str(tmp_path), "--reuse-tuning"]
    assert "--reuse-tuning: applies to --suite only" in run_failing(
        ["evaluate", "--optimizer", "adam", "--reuse-tuning", "x.json"], capsys)
    assert "No such file" in run_failing(suite + [str(tmp_path / "absent.json")], capsys)
    torn = tmp_path / "torn.json"
    torn.write_text('{"settings": {')
    assert "Expecting" in run_failing(suite + [str(torn)], capsys)  # json's own message, no traceback
    other = tmp_path / "other.json"
    other.write_text('{"rows": []}')
    assert "not a suite record" in run_failing(suite + [str(other)], capsys)


def test_a_single_task_evaluate_keeps_its_defaults(tmp_path):
    """The flags --suite made optional (--task, --steps, the task options) still default as before."""
    assert cli_main(["evaluate", "--optimizer", "adam", "--problems", "2", "--tune-problems", "1",
                     "--out", str(tmp_path)]) == 0
    assert (tmp_path / "quadratic_100steps.json").exists()


@pytest.mark.parametrize("command, extra, flag, taken_by", [
    ("evaluate", ["--hidden", "40"], "--hidden", "mnist"),
    ("evaluate", ["--image-size", "7"], "--image-size", "cnn"),
    ("meta-train", ["--hidden", "40"], "--hidden", "mnist"),
    ("meta-train", ["--activation", "relu"], "--activation", "mnist"),
])
def test_an_option_of_another_task_is_refused(tmp_path, capsys, command, extra, flag, taken_by):
    """Regression: a task option that --task does not take (--task quadratic --hidden 40) was silently ignored,
    the run made without it; it is refused, naming the flag, the task and the tasks that take it."""
    argv = (evaluate_argv("adam") if command == "evaluate" else TRAIN + ["--out", str(tmp_path / "run")]) + extra
    err = run_failing(argv, capsys)
    assert f"{flag}: not an option of --task quadratic" in err and taken_by in err.split("(it is one of")[1]


def test_every_option_of_every_command_says_what_it_does():
    """Regression: `l2l-fast demo --help` listed --data-dir, --steps, --problems, --seed and --out with no word
    of what they do (and evaluate its --seed and --out)."""
    from l2l_fast.cli import _build_parser

    _, commands = _build_parser()
    silent = [(name, action.option_strings[0]) for name, parser in commands.items() for action in parser._actions
              if action.option_strings and not action.help]
    assert silent == []
