"""A shipped name with a short-run member ("general" -> "general_short" for runs of at most 200 steps): the run's
declared length picks the weights, in the optimizer, in `l2l-fast evaluate` and in the suites; everything else
loads as named."""
from __future__ import annotations

import pytest
import torch

from l2l_fast import CoordinatewiseLSTM, LearnedOptimizer
from l2l_fast.cli import load_optimizer_spec
from l2l_fast.pretrained import SHORT_RUN_MEMBERS, available, for_horizon, load_pretrained, short_run_member

LONGEST, MEMBER = SHORT_RUN_MEMBERS["general"]


def test_the_member_is_shipped_and_differs_from_its_name():
    assert MEMBER in available()
    short, general = load_pretrained(MEMBER), load_pretrained("general")
    assert not short.reads_progress  # nothing but the choice reads the horizon
    assert short.record["wall_minutes"] > 0 and "meta-train" in short.record["command"]
    differs = [not torch.equal(a, b) for a, b in zip(short.state_dict().values(), general.state_dict().values())
               if a.shape == b.shape]
    assert any(differs)


@pytest.mark.parametrize("spec", ["general", "pretrained:general"])
@pytest.mark.parametrize("total_steps, expected", [(1, MEMBER), (LONGEST, MEMBER), (LONGEST + 1, "general"),
                                                   (10_000, "general"), (None, None)])
def test_for_horizon_picks_by_the_runs_length(spec, total_steps, expected):
    assert for_horizon(spec, total_steps) == (spec if expected is None else expected)


@pytest.mark.parametrize("spec", ["mnist", "quadratic", "pretrained:mnist", "runs/x/best.pt", "general.pt"])
def test_names_without_a_member_and_files_load_as_named(spec):
    assert for_horizon(spec, 100) == spec
    assert short_run_member(spec) is None


@pytest.mark.parametrize("bad", [0, -5, True, 1.5, "100"])
def test_for_horizon_refuses_a_malformed_length(bad):
    with pytest.raises(ValueError, match="total_steps"):
        for_horizon("general", bad)


def make_params(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(7, 5, generator=gen).requires_grad_(), torch.randn(11, generator=gen).requires_grad_()]


def run(opt: LearnedOptimizer, params, steps: int = 5):
    gen = torch.Generator().manual_seed(3)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("total_steps, weights", [(100, MEMBER), (LONGEST, MEMBER), (LONGEST + 1, "general")])
def test_the_optimizer_runs_the_weights_its_total_steps_pick(total_steps, weights):
    params, same, other = make_params(0), make_params(0), make_params(0)
    chosen = LearnedOptimizer(params, total_steps=total_steps)
    assert chosen.pretrained == weights
    # a net without the progress input: total_steps chose it and is not kept as an option it would ignore
    assert chosen.defaults["total_steps"] is None and "step_count" not in chosen.param_groups[0]
    after = run(chosen, params)
    assert not all(torch.equal(a, b) for a, b in zip(after, make_params(0)))  # it moved
    named = LearnedOptimizer(same, CoordinatewiseLSTM.from_pretrained(weights))
    assert all(torch.equal(a, b) for a, b in zip(after, run(named, same)))
    if weights == MEMBER:  # and the member really steps differently from general
        general = LearnedOptimizer(other)
        assert not all(torch.equal(a, b) for a, b in zip(after, run(general, other)))


def test_without_total_steps_the_default_is_general():
    opt = LearnedOptimizer(make_params(0))
    assert opt.pretrained == "general" and opt.defaults["total_steps"] is None


def test_total_steps_is_still_refused_where_it_would_change_nothing():
    with pytest.raises(ValueError, match="no progress input"):
        LearnedOptimizer(make_params(0), pretrained="mnist", total_steps=100)
    with pytest.raises(ValueError, match="no progress input"):  # an explicit net: nothing to choose
        LearnedOptimizer(make_params(0), CoordinatewiseLSTM.from_pretrained("general"), total_steps=100)
    with pytest.raises(ValueError, match="total_steps"):
        LearnedOptimizer(make_params(0), total_steps=0)


def test_the_state_dict_resumes_into_the_same_choice():
    params = make_params(0)
    opt = LearnedOptimizer(params, total_steps=100)
    run(opt, params, 3)
    copies = [p.detach().clone().requires_grad_() for p in params]
    resumed = LearnedOptimizer(copies, total_steps=100)
    resumed.load_state_dict(opt.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(run(opt, params, 2), run(resumed, copies, 2)))
    for other in (1000, None):  # the other member's net does not match the saved one; the error says why
        with pytest.raises(ValueError, match="another net.*general_short.*total_steps"):
            LearnedOptimizer([p.detach().clone().requires_grad_() for p in params],
                             total_steps=other).load_state_dict(opt.state_dict())


@pytest.mark.parametrize("steps, weights", [(100, MEMBER), (LONGEST + 1, "general"), (None, "general")])
def test_evaluate_and_the_suites_load_by_the_runs_horizon(steps, weights):
    _, net = load_optimizer_spec("pretrained:general", None, steps)
    expected = load_pretrained(weights)
    assert net.record == expected.record
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), expected.state_dict().values()))


def test_the_cli_says_which_weights_ran(tmp_path, capsys):
    import json

    from l2l_fast.cli import main as cli_main

    assert cli_main(["evaluate", "--task", "quadratic", "--steps", "12", "--problems", "2", "--tune-problems", "2",
                     "--optimizer", "general", "--optimizer", "adam", "--out", str(tmp_path / "one")]) == 0
    assert f"12 steps run {MEMBER!r}" in capsys.readouterr().err
    assert cli_main(["evaluate", "--suite", "smoke", "--quick", "--optimizer", "pretrained:general",
                     "--out", str(tmp_path / "suite")]) == 0
    assert f"entries of at most {LONGEST} steps run {MEMBER!r}" in capsys.readouterr().err
    settings = json.loads((tmp_path / "suite" / "suite_smoke_quick.json").read_text())["settings"]
    assert settings["short_run_members"] == {"pretrained:general": {"longest_run": LONGEST, "member": MEMBER}}
