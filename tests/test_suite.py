"""Evaluation suites (l2l_fast/meta/suite.py): entries, the divergence rule, ratios, the summary, the CLI."""
from __future__ import annotations

import json
import math

import pytest
import torch

import l2l_fast.meta.suite as suite_module
from l2l_fast.cli import main as cli_main
from l2l_fast.meta.evaluate import paired_ratio
from l2l_fast.meta.suite import (ADAM_DEFAULT, ADAM_TUNED, SUITES, Suite, check_suite, diverged_runs, entry,
                                 final_losses, run_suite, summarize, summary_line)
from l2l_fast.meta.suite_report import format_loss, format_ratio, markdown_table, tuning_cache_from_record
from l2l_fast.pretrained import load_pretrained

TINY = Suite("tiny", (entry("q3", "quadratic", 12, dim=3), entry("q6", "quadratic", 8, dim=6)))


class Ascent:
    """A synthetic diverging optimizer: gradient ascent, theta += lr * g (the net interface run_learned uses)."""

    def __init__(self, lr: float):
        self.lr = lr

    def init_state(self, n: int):
        return None

    def step_(self, params, grad, state):
        params.add_(grad, alpha=self.lr)


def test_the_general_suite_is_held_out_and_declared_validly():
    for suite in SUITES.values():
        check_suite(suite)
    general = SUITES["general"].entries
    assert len(general) >= 8 and len({e.label for e in general}) == len(general)
    assert any(e.steps >= 2000 for e in general) and any(e.task != "mnist" for e in general)
    # an architecture family held out entirely: a task of no family the mixed sampler draws (mnist is an MLP)
    from l2l_fast.tasks.mixed import FAMILIES

    assert any(e.task not in FAMILIES + ("mnist",) for e in general)
    # none is pretrained:mnist's own meta-training task: the 784-20-10 sigmoid MLP for 100 steps
    from l2l_fast.tasks import get_task

    trained = get_task("mnist").complete({})
    assert all(not (e.task == "mnist" and get_task("mnist").complete(e.kwargs) == trained and e.steps == 100)
               for e in general)


def test_entries_are_checked_against_the_registry():
    with pytest.raises(ValueError, match="no option 'width'"):
        check_suite(Suite("bad", (entry("x", "quadratic", 5, width=3),)))
    with pytest.raises(ValueError, match="expected one of"):
        check_suite(Suite("bad", (entry("x", "no_such_task", 5),)))
    with pytest.raises(ValueError, match="unique"):
        suite_module.register_suite("dup", [entry("x", "quadratic", 5), entry("x", "quadratic", 6)])
    assert "dup" not in SUITES


def test_divergence_rule_and_final_losses():
    nan, inf = math.nan, math.inf
    losses = torch.tensor([  # steps down, one run per column
        [1.0, 1.0, 1.0, 1.0, 1.0],
        [0.5, 9.9, 10.5, nan, inf],
        [0.25, 0.5, 0.375, nan, inf],
    ])
    assert diverged_runs(losses).tolist() == [False, False, True, True, True]  # 9.9x is not, 10.5x is
    # a run that passed 10x but recovered keeps its final loss; a non-finite one scores inf
    assert final_losses(losses).tolist() == [0.25, 0.5, 0.375, inf, inf]
    recovered_nan = torch.tensor([[1.0], [nan], [0.1]])  # cannot happen with real params, still a dead run
    assert final_losses(recovered_nan).tolist() == [inf]


def test_a_diverging_optimizer_is_counted_and_scored_inf():
    result = run_suite(TINY, {"ascent": Ascent(100.0), "slow ascent": Ascent(0.1)}, problems=4, tune_problems=2)
    rows = {(r["entry"], r["optimizer"]): r for r in result.rows()}
    for label in ("q3", "q6"):
        assert rows[label, "ascent"]["divergences"] == 4
        assert rows[label, ADAM_TUNED]["divergences"] == 0
    slow = rows["q3", "slow ascent"]  # past 10x its initial loss, still finite: counted, and scored as it ends
    assert slow["divergences"] > 0 and math.isfinite(slow["final_mean"]) and slow["vs_adam_tuned"]["ratio"] > 10
    dead = rows["q3", "ascent"]
    assert math.isinf(dead["final_mean"]) and math.isinf(dead["vs_adam_tuned"]["ratio"])
    summary = {s["optimizer"]: s for s in summarize(result.rows())}["ascent"]
    assert summary["divergences"] == 8 and summary["tasks_with_divergences"] == 2
    assert summary["better_than_adam_1e-3"] == 0 and not summary["within_1.3x_tuned_adam_everywhere"]
    assert "divergences: 8 (on 2 of 2 tasks)" in summary_line(summary)
    table = markdown_table(result.rows())
    assert "| inf | inf | inf | 4/4 |" in table


def test_bootstrap_interval_contains_the_point_estimate():
    generator = torch.Generator().manual_seed(3)
    for _ in range(20):
        theirs = torch.exp(torch.randn(8, generator=generator))
        mine = theirs * torch.exp(0.3 * torch.randn(8, generator=generator))
        ratio, low, high = paired_ratio(mine, theirs)
        assert low <= ratio <= high
        assert ratio == pytest.approx((mine.double().mean() / theirs.double().mean()).item())


def test_tuning_is_cached_per_task_horizon_and_seed(monkeypatch):
    calls = []
    real = suite_module.tune_learning_rate

    def counted(name, task, steps, num_problems, seed, grid):
        calls.append((name, task.dim, steps))
        return real(name, task, steps, num_problems, seed=seed, grid=grid)

    monkeypatch.setattr(suite_module, "tune_learning_rate", counted)
    twice = Suite("twice", (entry("a", "quadratic", 6, dim=3), entry("b", "quadratic", 6, dim=3),
                            entry("c", "quadratic", 7, dim=3)))
    cache = {}
    result = run_suite(twice, {}, baselines=["sgd"], problems=2, tune_problems=2, grid=(1e-3, 1e-2),
                       baseline_grid=(1e-2, 1e-1), extend_to=None, cache=cache)
    assert sorted(calls) == [("adam", 3, 6), ("adam", 3, 7), ("sgd", 3, 6), ("sgd", 3, 7)]
    run_suite(twice, {}, problems=2, tune_problems=2, grid=(1e-3, 1e-2), extend_to=None, cache=cache)
    assert len(calls) == 4  # all from the cache
    run_suite(twice, {}, problems=2, tune_problems=2, seed=5, grid=(1e-3, 1e-2), extend_to=None, cache=cache)
    assert len(calls) == 6  # another seed tunes again
    a = result.entries[0]
    scores = a.runs[ADAM_TUNED].scores
    assert set(scores) == {1e-3, 1e-2} and a.runs[ADAM_TUNED].lr == min(scores, key=scores.get)
    if a.runs[ADAM_TUNED].lr == 1e-3:  # the same rate: one run serves both references
        assert a.runs[ADAM_TUNED].losses is a.runs[ADAM_DEFAULT].losses
    assert set(a.runs["sgd"].scores) == {1e-2, 1e-1}
    edge = {(r["entry"], r["optimizer"]): r["lr_at_grid_edge"] for r in result.rows()}
    assert edge["a", ADAM_TUNED] and not edge["a", ADAM_DEFAULT]  # a two-point grid is all edge


def test_a_grid_whose_best_rate_is_its_highest_grows_upwards():
    """Adam wants rates near 0.3 on small quadratics: a grid stopping at 1e-3 grows until its best is inside."""
    from l2l_fast.tasks import make_task

    task = make_task("quadratic", dim=3)
    best, scores = suite_module.tune_extending("adam", task, 20, 2, seed=0, grid=(1e-4, 1e-3))
    assert best == min(scores, key=scores.get) and 1e-3 < best < max(scores)
    assert all(any(math.isclose(lr, 10 ** (k / 4)) for k in range(-16, 5)) for lr in scores)  # the grids' rates
    capped = suite_module.tune_extending("adam", task, 20, 2, seed=0, grid=(1e-4, 1e-3), extend_to=3e-3)
    assert max(capped[1]) == pytest.approx(10 ** -2.75)  # the last quarter decade below the cap
    assert suite_module.tune_extending("adam", task, 20, 2, seed=0, grid=(1e-4, 1e-3), extend_to=None)[1].keys() \
        == {1e-4, 1e-3}


def test_quick_mode_cuts_horizons_and_problems():
    result = run_suite(Suite("long", (entry("q", "quadratic", 2000, dim=3),)), {}, quick=True)
    only = result.entries[0]
    assert only.steps == suite_module.QUICK_STEPS
    assert only.runs[ADAM_DEFAULT].losses.shape == (suite_module.QUICK_STEPS + 1, suite_module.QUICK_PROBLEMS)


def _table_cells(text: str) -> dict:
    """{(entry, header): cell} of the markdown table at the start of `text`."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    cells = {}
    for line in lines[2:]:
        row = [c.strip() for c in line.strip("|").split("|")]
        cells.update({(row[0], h): c for h, c in zip(head, row)})
    return cells


def test_tiny_suite_through_the_cli_table_matches_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(SUITES, "tiny", TINY)
    out = tmp_path / "suite"
    assert cli_main(["evaluate", "--suite", "tiny", "--quick", "--optimizer", "pretrained:quadratic", "--optimizer",
                     "adam", "--optimizer", "sgd", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (out / "suite_tiny_quick.png").stat().st_size > 1000
    text = (out / "suite_tiny_quick.md").read_text()
    assert text in printed
    record = json.loads((out / "suite_tiny_quick.json").read_text())
    rows = record["rows"]
    assert record["settings"]["problems"] == suite_module.QUICK_PROBLEMS and record["settings"]["quick"]
    assert [r["optimizer"] for r in rows[:4]] == [ADAM_DEFAULT, ADAM_TUNED, "pretrained:quadratic", "sgd"]
    assert {r["entry"] for r in rows} == {"q3", "q6"} and all(r["steps"] <= 12 for r in rows)
    cells = _table_cells(text)
    for r in rows:
        name, label = r["optimizer"], r["entry"]
        assert cells[label, f"{name}: final"] == format_loss(r["final_mean"])
        assert r["final_mean"] == pytest.approx(sum(r["finals"]) / len(r["finals"]))
        assert cells[label, f"{name}: div."] == f"{r['divergences']}/{r['problems']}"
        for key, reference in (("vs_adam_1e-3", ADAM_DEFAULT), ("vs_adam_tuned", ADAM_TUNED)):
            ratio = r[key]
            if name == reference:
                assert ratio["ratio"] == 1 and (label, f"{name}: / {reference} (95% CI)") not in cells
                continue
            assert cells[label, f"{name}: / {reference} (95% CI)"] == format_ratio(ratio)
            assert ratio["ci95_low"] <= ratio["ratio"] <= ratio["ci95_high"]
        if name == ADAM_TUNED:
            assert cells[label, "tuned lr"] == f"{r['lr']:.3g}" + (" (grid edge)" if r["lr_at_grid_edge"] else "")
    # the summary lines follow from the rows, by the definitions of suite.py's docstring
    for name in ("pretrained:quadratic", "sgd"):
        mine = [r for r in rows if r["optimizer"] == name]
        n = len(mine)
        better = sum(r["vs_adam_1e-3"]["ci95_high"] < 1 for r in mine)
        at_most = sum(r["vs_adam_tuned"]["ratio"] <= 1 for r in mine)
        within = "yes" if all(r["vs_adam_tuned"]["ratio"] <= 1.3 for r in mine) else "no"
        divergences = sum(r["divergences"] for r in mine)
        line = (f"{name}: better than Adam 1e-3 on {better} of {n} tasks; at most tuned Adam's loss on {at_most} "
                f"of {n}; within 1.3x tuned Adam on every task: {within}; divergences: {divergences} ")
        assert line in text
    assert record["summary"] == summarize(rows)


def test_summary_counts_follow_from_rows():
    def row(name, label, low_high_default, tuned_ratio, divergences):
        ratio_default = {"ratio": sum(low_high_default) / 2, "ci95_low": low_high_default[0],
                         "ci95_high": low_high_default[1]}
        return {"optimizer": name, "entry": label, "vs_adam_1e-3": ratio_default, "divergences": divergences,
                "vs_adam_tuned": {"ratio": tuned_ratio, "ci95_low": tuned_ratio, "ci95_high": tuned_ratio}}

    rows = [row(ADAM_TUNED, "a", (0.5, 0.6), 1.0, 0),
            row("lo", "a", (0.7, 0.99), 0.95, 0),   # better, at most, within
            row("lo", "b", (0.8, 1.01), 1.0, 1),    # not better (interval reaches 1), at most (= 1), within
            row("lo", "c", (0.5, 0.9), 1.31, 2),    # better, not at most, not within
            row("lo", "d", (math.nan, math.nan), math.nan, 0)]  # NaN: none of them
    (summary,) = summarize(rows)
    assert summary == {"optimizer": "lo", "tasks": 4, "better_than_adam_1e-3": 2, "at_most_tuned_adam": 2,
                       "within_1.3x_tuned_adam_everywhere": False, "divergences": 3, "tasks_with_divergences": 2}
    (summary,) = summarize(rows[:3])
    assert summary["within_1.3x_tuned_adam_everywhere"]


def test_learned_optimizers_load_per_task_and_labels_must_not_clash():
    net = load_pretrained("quadratic")
    seen = []
    result = run_suite(TINY, {"per task": lambda task, steps: seen.append((task.dim, steps)) or net}, problems=2,
                       tune_problems=1, quick=True)
    assert seen == [(3, 12), (6, 8)] and "per task" in result.entries[0].runs  # each entry's horizon
    with pytest.raises(ValueError, match="taken by the baselines"):
        run_suite(TINY, {ADAM_TUNED: net}, problems=2, tune_problems=1)
    with pytest.raises(ValueError, match="baselines"):
        run_suite(TINY, {}, baselines=["adamw"])


def test_a_later_run_reuses_the_recorded_tuning_and_reproduces_the_baselines(tmp_path, monkeypatch):
    """--reuse-tuning: the JSON record of a run gives the next run its tuned rates (no tuning at all), and the
    baselines' test runs, rerun from those rates, are the recorded ones; other settings tune anew."""
    monkeypatch.setitem(SUITES, "tiny", TINY)
    first, second = tmp_path / "first", tmp_path / "second"
    common = ["evaluate", "--suite", "tiny", "--quick", "--optimizer", "sgd", "--optimizer", "pretrained:quadratic"]
    assert cli_main(common + ["--out", str(first)]) == 0
    record = json.loads((first / "suite_tiny_quick.json").read_text())
    cache = tuning_cache_from_record(record)
    assert len(cache) == 4  # tuned Adam and sgd on two entries
    for (task, options, steps, tune_problems, seed, name, rates, extend_to), (lr, scores) in cache.items():
        assert lr == min(scores, key=scores.get) and lr in scores and name in ("adam", "sgd")

    def no_tuning(*args, **kwargs):
        raise AssertionError("tuned although the record had the rates")

    monkeypatch.setattr(suite_module, "tune_learning_rate", no_tuning)
    assert cli_main(common + ["--out", str(second), "--reuse-tuning", str(first / "suite_tiny_quick.json")]) == 0
    again = json.loads((second / "suite_tiny_quick.json").read_text())
    for old, new in zip(record["rows"], again["rows"], strict=True):
        assert (old["entry"], old["optimizer"], old["lr"]) == (new["entry"], new["optimizer"], new["lr"])
        assert old["finals"] == new["finals"] and old["validation_scores"] == new["validation_scores"]
    with pytest.raises(AssertionError, match="tuned although"):  # another seed: the record does not apply
        cli_main(common + ["--out", str(second), "--seed", "7", "--reuse-tuning",
                           str(first / "suite_tiny_quick.json")])
    with pytest.raises(ValueError, match="not a suite record"):
        tuning_cache_from_record({"rows": []})
