"""Evaluation suites: learned optimizers against Adam on a declared list of held-out tasks.

A suite is a named tuple of entries; an entry is a registered task (tasks/registry.py), its options, a horizon
and a label, declared in one line:

    entry("mnist_relu", "mnist", 200, activation="relu", held_out="activation")

On every entry each optimizer runs on the same `problems` test problems (split "test", the run's seed), from
the same initialisations and minibatches, together with two references:

- "adam 1e-3": Adam at its default learning rate, what an untuned user runs;
- "adam tuned": Adam at the learning rate of ADAM_GRID (1e-4 .. 1 in quarter decades) with the lowest mean
  final loss on `tune_problems` validation problems (split "val") over the entry's horizon. While the best rate
  is the highest tried, the grid grows by a quarter decade, up to 10 (evaluate's grid): cut short for speed, it
  must not cap a baseline that wants larger steps. A rate still at an edge is flagged (lr_at_grid_edge).
  Other baselines tune on evaluate.DEFAULT_GRID, extended alike. Grids are cached per (task, options, horizon,
  validation problems, seed) within a run (`cache`), so entries sharing them tune once.

Definitions (what the table, the JSON rows and the summary report):

- divergence: a run (one optimizer on one problem) diverges when its loss is NaN or infinite, or exceeds
  DIVERGENCE_FACTOR (10) times its initial loss, at any step. Counted per optimizer and entry.
- final loss of a run: its loss after the last step; +inf when its loss became NaN or infinite at any step (its
  parameters are then NaN for good: there is no loss to credit it with). A run that passed 10x its initial
  loss but stayed finite keeps its final loss (and counts as a divergence). So one dead run makes the
  optimizer's mean final loss on that entry, and its ratios, inf: a failure no average can hide.
- ratio to a reference: mean final loss / the reference's on the same problems, with a 95% paired bootstrap
  interval over the problems (evaluate.paired_ratio).
- summary, per optimizer other than the two references, over the n entries:
  "better than Adam 1e-3" on an entry: the upper bound of its ratio's interval is < 1;
  "at most tuned Adam's loss": its ratio to tuned Adam is <= 1 (the point estimate);
  "within 1.3x tuned Adam on every task": that ratio is <= WITHIN_FACTOR (1.3) on all n entries;
  divergences: its diverged runs over all entries. A NaN ratio (both runs dead) satisfies none of these.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from .evaluate import BASELINES, DEFAULT_GRID, final_score, paired_ratio, run_baseline, tune_learning_rate
from .unroll import run_learned

DIVERGENCE_FACTOR = 10.0
WITHIN_FACTOR = 1.3
ADAM_DEFAULT_LR = 1e-3
ADAM_DEFAULT, ADAM_TUNED = "adam 1e-3", "adam tuned"
REFERENCES = (ADAM_DEFAULT, ADAM_TUNED)
# Adam's lr grid: evaluate's without the rates above 1, where Adam never wins on these tasks (the grid costs
# a full-horizon run per point: 17 instead of 21)
ADAM_GRID = tuple(10 ** (e / 4) for e in range(-16, 1))
EXTEND_TO = 10.0  # the grids grow upwards to here when their best rate is their highest
# --quick: few problems, short horizons (tests, a first look)
QUICK_STEPS, QUICK_PROBLEMS, QUICK_TUNE_PROBLEMS = 20, 3, 2
PROBLEMS, TUNE_PROBLEMS, SEED = 8, 8, 1


@dataclass(frozen=True)
class SuiteEntry:
    """One task of a suite: `task` (a registered name) with `options` (its factory's keyword arguments, as
    sorted (name, value) pairs: hashable), run for `steps` steps; `held_out` says what meta-training did not see."""

    label: str
    task: str
    steps: int
    options: tuple = ()
    held_out: str = ""

    @property
    def kwargs(self) -> dict:
        return dict(self.options)


def entry(label: str, task: str, steps: int, held_out: str = "", **options) -> SuiteEntry:
    """A SuiteEntry from keyword options (lists become tuples)."""
    frozen = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
    return SuiteEntry(label, task, steps, tuple(sorted(frozen.items())), held_out)


@dataclass(frozen=True)
class Suite:
    name: str
    entries: tuple[SuiteEntry, ...]
    help: str = ""


SUITES: dict[str, Suite] = {}


def register_suite(name: str, entries: Sequence[SuiteEntry], help: str = "") -> Suite:
    labels = [e.label for e in entries]
    if len(set(labels)) != len(labels):
        raise ValueError(f"suite {name!r}: entry labels must be unique, got {labels}")
    if any(e.steps < 1 for e in entries):
        raise ValueError(f"suite {name!r}: every entry needs a positive number of steps")
    SUITES[name] = Suite(name, tuple(entries), help)
    return SUITES[name]


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise ValueError(f"suite: expected one of {tuple(SUITES)}, got {name!r}")
    return SUITES[name]


# `held_out` says how each entry differs from pretrained:mnist's meta-training task: the 784-20-10 sigmoid MNIST
# MLP for 100 steps. For an optimizer meta-trained on the mixed sampler (tasks/mixed.py), the 28x28 MNIST, GELU,
# 3-layer and transformer entries stay held out (its HELD_OUT; the transformer is an architecture family it never
# draws), and every 2,000-step horizon is 10x its longest episode; the quadratic, cnn, charlm and teacher entries
# are held out only if its --families leave those families out.
register_suite("general", [
    entry("mnist_40_sigmoid", "mnist", 200, hidden=(40,), held_out="width, horizon x2"),
    entry("mnist_20x20x20_sigmoid", "mnist", 200, hidden=(20, 20, 20), held_out="depth, horizon x2"),
    entry("mnist_20_relu", "mnist", 200, activation="relu", held_out="activation, horizon x2"),
    entry("mnist_20_tanh", "mnist", 200, activation="tanh", held_out="activation, horizon x2"),
    entry("mnist_64_relu", "mnist", 100, hidden=(64,), activation="relu", held_out="width, activation"),
    entry("mnist_32x32_relu", "mnist", 100, hidden=(32, 32), activation="relu", held_out="depth, activation"),
    entry("mnist_20_sigmoid_2000", "mnist", 2000, held_out="horizon x20"),
    entry("mnist_20_relu_2000", "mnist", 2000, activation="relu", held_out="activation, horizon x20"),
    entry("linreg_20", "quadratic", 200, dim=20, held_out="family (least squares), dimension"),
    entry("linreg_10_2000", "quadratic", 2000, dim=10, held_out="family (least squares), horizon x20"),
    entry("digits_mlp_gelu", "mlp", 500, dataset="digits", hidden=(32,), nonlinearity="gelu",
          held_out="dataset, activation (GELU), horizon x5"),
    entry("digits_cnn", "cnn", 500, dataset="digits", channels=(8, 8), held_out="architecture family (conv)"),
    entry("charlm_20", "charlm", 300, hidden=(20,), held_out="architecture family (recurrent), text"),
    entry("teacher_mse_2000", "mlp", 2000, dataset="teacher_regression", hidden=(32,), nonlinearity="relu",
          held_out="regression (squared error), horizon x20"),
    entry("transformer_32", "chartransformer", 300, d_model=32,
          held_out="architecture family (attention): never meta-trained on, text"),
], help="held-out widths, depths, activations, families and 2,000-step horizons")

# The general suite's models at one short horizon, Adam re-tuned for it: how a horizon-aware optimizer (one told
# total_steps, pretrained.for_horizon) does where the run is short. The paper's task is the first entry.
register_suite("short", [
    entry("mnist_20_sigmoid_100", "mnist", 100, held_out="none for mnist; 28x28 MNIST for general"),
    entry("mnist_40_sigmoid_100", "mnist", 100, hidden=(40,), held_out="width"),
    entry("mnist_20x20x20_sigmoid_100", "mnist", 100, hidden=(20, 20, 20), held_out="depth"),
    entry("mnist_20_relu_100", "mnist", 100, activation="relu", held_out="activation"),
    entry("mnist_20_tanh_100", "mnist", 100, activation="tanh", held_out="activation"),
    entry("mnist_64_relu_100", "mnist", 100, hidden=(64,), activation="relu", held_out="width, activation"),
    entry("mnist_32x32_relu_100", "mnist", 100, hidden=(32, 32), activation="relu", held_out="depth, activation"),
    entry("linreg_20_100", "quadratic", 100, dim=20, held_out="family (least squares), dimension"),
    entry("linreg_10_100", "quadratic", 100, dim=10, held_out="family (least squares)"),
    entry("digits_mlp_gelu_100", "mlp", 100, dataset="digits", hidden=(32,), nonlinearity="gelu",
          held_out="dataset, activation (GELU)"),
    entry("digits_cnn_100", "cnn", 100, dataset="digits", channels=(8, 8), held_out="architecture family (conv)"),
    entry("charlm_20_100", "charlm", 100, hidden=(20,), held_out="architecture family (recurrent), text"),
    entry("teacher_mse_100", "mlp", 100, dataset="teacher_regression", hidden=(32,), nonlinearity="relu",
          held_out="regression (squared error)"),
    entry("transformer_32_100", "chartransformer", 100, d_model=32,
          held_out="architecture family (attention): never meta-trained on, text"),
], help="the general suite's models at 100 steps, Adam tuned for 100 steps")

register_suite("smoke", [
    entry("quadratic_5", "quadratic", 30, dim=5),
    entry("quadratic_20", "quadratic", 60, dim=20),
], help="two small quadratics: the machinery end to end in seconds, no dataset")


def check_suite(suite: Suite) -> None:
    """ValueError unless every entry names a registered task and only options that task declares."""
    from ..tasks import get_task

    for e in suite.entries:
        spec = get_task(e.task)
        unknown = set(e.kwargs) - {o.name for o in spec.options}
        if unknown:
            declared = ", ".join(o.name for o in spec.options) or "none"
            raise ValueError(f"suite {suite.name!r}, entry {e.label!r}: task {e.task!r} has no option "
                             f"{', '.join(map(repr, sorted(unknown)))} (it has {declared})")


# ------------------------------------------------------------------------------------------------- scoring
def diverged_runs(losses: torch.Tensor, factor: float = DIVERGENCE_FACTOR) -> torch.Tensor:
    """losses [steps + 1, P] -> [P] bool: the loss was NaN or infinite, or above `factor` x the initial loss
    (losses[0]), at some step."""
    bad = ~torch.isfinite(losses) | (losses > factor * losses[0])
    return bad.any(0)


def final_losses(losses: torch.Tensor) -> torch.Tensor:
    """losses [steps + 1, P] -> [P] float64: the last loss, +inf for a run whose loss was ever non-finite."""
    finals = losses[-1].double().clone()
    finals[~torch.isfinite(losses).all(0)] = math.inf
    return finals


@dataclass
class Run:
    """One optimizer on one entry's test problems."""

    name: str
    losses: torch.Tensor  # [steps + 1, P]
    lr: float | None = None  # a baseline's learning rate; None for a learned optimizer
    scores: dict = field(default_factory=dict)  # a tuned baseline's grid: lr -> mean final validation loss

    @property
    def lr_at_grid_edge(self) -> bool:
        return bool(self.scores) and self.lr in (min(self.scores), max(self.scores))

    @property
    def finals(self) -> torch.Tensor:
        return final_losses(self.losses)

    @property
    def divergences(self) -> int:
        return int(diverged_runs(self.losses).sum())


@dataclass
class EntryResult:
    entry: SuiteEntry
    steps: int
    runs: dict[str, Run]  # by optimizer name, the references first
    seconds: float

    def ratio(self, name: str, reference: str) -> tuple[float, float, float]:
        if name == reference:
            return 1.0, 1.0, 1.0
        return paired_ratio(self.runs[name].finals, self.runs[reference].finals)


@dataclass
class SuiteResult:
    suite: Suite
    settings: dict
    entries: list[EntryResult] = field(default_factory=list)

    @property
    def optimizers(self) -> list[str]:
        return list(self.entries[0].runs) if self.entries else []

    def rows(self) -> list[dict]:
        """One JSON row per (entry, optimizer)."""
        rows = []
        for result in self.entries:
            e = result.entry
            for name, run in result.runs.items():
                finals = run.finals
                row = {"entry": e.label, "task": e.task, "options": result.entry.kwargs, "steps": result.steps,
                       "held_out": e.held_out, "optimizer": name, "lr": run.lr,
                       "lr_at_grid_edge": run.lr_at_grid_edge,
                       "validation_scores": {f"{lr:.6g}": score for lr, score in run.scores.items()},
                       "final_mean": finals.mean().item(), "finals": finals.tolist(),
                       "divergences": run.divergences, "problems": finals.numel()}
                for reference, key in ((ADAM_DEFAULT, "vs_adam_1e-3"), (ADAM_TUNED, "vs_adam_tuned")):
                    row[key] = dict(zip(("ratio", "ci95_low", "ci95_high"), result.ratio(name, reference)))
                rows.append(row)
        return rows

    def summaries(self) -> list[dict]:
        return summarize(self.rows())


def summarize(rows: list[dict]) -> list[dict]:
    """Per optimizer other than the references, the counts of the module docstring's targets over the entries."""
    summaries = []
    for name in dict.fromkeys(r["optimizer"] for r in rows if r["optimizer"] not in REFERENCES):
        mine = [r for r in rows if r["optimizer"] == name]
        tuned = [r["vs_adam_tuned"]["ratio"] for r in mine]
        summaries.append({
            "optimizer": name, "tasks": len(mine),
            "better_than_adam_1e-3": sum(r["vs_adam_1e-3"]["ci95_high"] < 1 for r in mine),
            "at_most_tuned_adam": sum(t <= 1 for t in tuned),  # False for NaN
            "within_1.3x_tuned_adam_everywhere": all(t <= WITHIN_FACTOR for t in tuned),
            "divergences": sum(r["divergences"] for r in mine),
            "tasks_with_divergences": sum(r["divergences"] > 0 for r in mine)})
    return summaries


def summary_line(s: dict) -> str:
    n = s["tasks"]
    return (f"{s['optimizer']}: better than Adam 1e-3 on {s['better_than_adam_1e-3']} of {n} tasks; at most tuned "
            f"Adam's loss on {s['at_most_tuned_adam']} of {n}; within {WITHIN_FACTOR}x tuned Adam on every task: "
            f"{'yes' if s['within_1.3x_tuned_adam_everywhere'] else 'no'}; divergences: {s['divergences']} "
            f"(on {s['tasks_with_divergences']} of {n} tasks)")


# ------------------------------------------------------------------------------------------------- running
def tune_extending(name: str, task, steps: int, num_problems: int, seed: int, grid,
                   extend_to: float | None = EXTEND_TO) -> tuple[float, dict[float, float]]:
    """evaluate.tune_learning_rate over `grid`; then, while the best rate is the highest tried, the next quarter
    decade above it (10^(k/4), as the grids' rates) is tried too, up to `extend_to` (None: never).
    Returns (best lr, {lr: mean final validation loss})."""
    best, scores = tune_learning_rate(name, task, steps, num_problems, seed=seed, grid=grid)
    while extend_to is not None and best == max(scores):
        higher = 10 ** ((round(4 * math.log10(best)) + 1) / 4)
        if higher > extend_to * (1 + 1e-9):
            break
        problems = task.sample(num_problems, seed=seed, split="val")  # the problems tune_learning_rate draws
        scores[higher] = final_score(run_baseline(name, higher, problems, steps))
        best = min(scores, key=scores.get)
    return best, scores


def run_suite(suite: str | Suite, optimizers: Mapping[str, object], *, baselines: Sequence[str] = (),
              problems: int | None = None, tune_problems: int | None = None, seed: int = SEED, quick: bool = False,
              data_dir=None, grid=ADAM_GRID, baseline_grid=DEFAULT_GRID, extend_to: float | None = EXTEND_TO,
              cache: dict | None = None,
              log: Callable[[str], None] | None = None) -> SuiteResult:
    """Runs every entry of `suite` (a name of SUITES or a Suite).

    optimizers: {label: a learned optimizer (anything with init_state(n) and step_(params, grad, state), as
    CoordinatewiseLSTM; one that reads moments also init_moments(n) and step_(..., moments), which run_learned
    carries), or a function (task, steps) -> one, called per entry with its task and horizon (a file with one LSTM
    per parameter group loads per task; a shipped name with a short-run member picks it by horizon)}.
    baselines: more hand-designed optimizers (BASELINES' names), each tuned as Adam is; "adam" is tuned Adam.
    problems, tune_problems: test and validation problems per entry (defaults 8 and 8; quick: 3 and 2, and
    horizons cut to 20 steps). grid: Adam's learning rates to tune over; baseline_grid: the other baselines';
    extend_to: how far a grid whose best rate is its highest grows (tune_extending).
    cache: tuning results to reuse, {key: (lr, scores)}; filled as tuning runs.
    log: called with one line per finished entry.
    """
    suite = get_suite(suite) if isinstance(suite, str) else suite
    check_suite(suite)
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise ValueError(f"baselines: expected names among {sorted(BASELINES)}, got {unknown}")
    if problems is None:
        problems = QUICK_PROBLEMS if quick else PROBLEMS
    if tune_problems is None:
        tune_problems = QUICK_TUNE_PROBLEMS if quick else TUNE_PROBLEMS
    cache = {} if cache is None else cache
    settings = {"suite": suite.name, "problems": problems, "tune_problems": tune_problems, "seed": seed,
                "quick": quick, "adam_grid": list(grid), "baseline_grid": list(baseline_grid), "extend_to": extend_to,
                "divergence_factor": DIVERGENCE_FACTOR, "within": WITHIN_FACTOR}
    clash = set(optimizers) & (set(REFERENCES) | set(baselines))
    if clash:
        raise ValueError(f"optimizers: labels {sorted(clash)} are taken by the baselines")
    from ..tasks import get_task

    tasks = [get_task(e.task).make(e.kwargs, data_dir=data_dir) for e in suite.entries]
    horizons = [min(e.steps, QUICK_STEPS) if quick else e.steps for e in suite.entries]
    # every learned optimizer resolved for every entry before anything runs: a bad one fails at once
    nets = [{label: (opt(task, steps) if callable(opt) and not hasattr(opt, "step_") else opt)
             for label, opt in optimizers.items()} for task, steps in zip(tasks, horizons)]
    result = SuiteResult(suite, settings)
    for e, task, learned, steps in zip(suite.entries, tasks, nets, horizons):
        started = time.perf_counter()

        def tuned(name):
            rates = tuple(grid if name == "adam" else baseline_grid)
            key = (e.task, e.options, steps, tune_problems, seed, name, rates, extend_to)
            if key not in cache:
                cache[key] = tune_extending(name, task, steps, tune_problems, seed, rates, extend_to)
            return cache[key]

        test = task.sample(problems, seed=seed, split="test")
        baseline_runs: dict[tuple[str, float], torch.Tensor] = {}  # Adam 1e-3 may be the tuned rate too

        def baseline(label, name, lr, scores=None):
            if (name, lr) not in baseline_runs:
                baseline_runs[name, lr] = run_baseline(name, lr, test, steps)
            return Run(label, baseline_runs[name, lr], lr, dict(scores or {}))

        adam_lr, scores = tuned("adam")
        runs = {ADAM_DEFAULT: baseline(ADAM_DEFAULT, "adam", ADAM_DEFAULT_LR),
                ADAM_TUNED: baseline(ADAM_TUNED, "adam", adam_lr, scores)}
        for label, net in learned.items():
            runs[label] = Run(label, run_learned(net, test, steps))
        for name in baselines:
            if name != "adam":
                runs[name] = baseline(name, name, *tuned(name))
        result.entries.append(EntryResult(e, steps, runs, time.perf_counter() - started))
        if log is not None:
            log(f"{e.label}: {steps} steps, {problems} problems, {result.entries[-1].seconds:.1f} s")
    return result
