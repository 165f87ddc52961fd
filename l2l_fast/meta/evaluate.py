"""Comparing the learned optimizer with tuned hand-designed ones on held-out problems.

Each baseline's learning rate is chosen by grid search on validation problems (lowest mean final
loss); the comparison then runs every optimizer on the same test problems (same initialisations
and minibatches).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .unroll import run_learned, run_torch_optimizer

BASELINES = {
    "sgd": lambda params, lr: torch.optim.SGD(params, lr=lr),
    "nag": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True),
    "rmsprop": lambda params, lr: torch.optim.RMSprop(params, lr=lr),
    "adam": lambda params, lr: torch.optim.Adam(params, lr=lr),
}
# 10^-4 .. 10^1 in quarter decades (SGD on MNIST tunes to ~3, so the grid must reach past it)
DEFAULT_GRID = tuple(10 ** (e / 4) for e in range(-16, 5))


def run_baseline(name: str, lr: float, problems, steps: int) -> torch.Tensor:
    """Baseline `name` at learning rate `lr` on the problems: losses [steps + 1, P]."""
    return run_torch_optimizer(lambda params: BASELINES[name](params, lr), problems, steps)


def final_score(losses: torch.Tensor) -> float:
    """Mean over problems of the last loss; a diverged run scores +inf."""
    value = losses[-1].mean().item()
    return value if math.isfinite(value) else math.inf


def tune_learning_rate(name: str, task, steps: int, num_problems: int, seed: int, grid=DEFAULT_GRID):
    """Grid search on validation problems: returns (best lr, {lr: score})."""
    problems = task.sample(num_problems, seed=seed, split="val")
    scores = {}
    for lr in grid:
        scores[lr] = final_score(run_baseline(name, lr, problems, steps))
    best = min(scores, key=scores.get)
    if not math.isfinite(scores[best]):
        raise RuntimeError(f"{name}: every learning rate of the grid diverged")
    return best, scores


@dataclass
class Curve:
    name: str
    losses: torch.Tensor  # [steps + 1, P]
    detail: str = ""      # e.g. the tuned learning rate

    def row(self) -> dict:
        final = self.losses[-1]
        summed = self.losses[1:].sum(0)
        return {"optimizer": self.name, "final_mean": final.mean().item(), "final_std": final.std().item(),
                "summed_mean": summed.mean().item(), "summed_std": summed.std().item(), "detail": self.detail}


def compare(task, learned: dict, steps: int, num_problems: int, seed: int, tuned_lrs: dict) -> list[Curve]:
    """Runs each learned net ({label: net}) and each tuned baseline ({name: lr}) on the same test problems."""
    problems = task.sample(num_problems, seed=seed, split="test")
    curves = [Curve(label, run_learned(net, problems, steps), "learned") for label, net in learned.items()]
    for name, lr in tuned_lrs.items():
        curves.append(Curve(name, run_baseline(name, lr, problems, steps), f"lr={lr:.3g}"))
    return curves


def final_ratio(curve: Curve, reference: Curve, resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(ratio, low, high): `curve`'s mean final loss over `reference`'s on the same problems, with a 95%
    bootstrap interval (paired_ratio of their last losses)."""
    mine, theirs = curve.losses[-1], reference.losses[-1]
    if mine.shape != theirs.shape:
        raise ValueError(f"final_ratio: {curve.name} and {reference.name} ran on different problems "
                         f"({mine.numel()} vs {theirs.numel()})")
    return paired_ratio(mine, theirs, resamples, seed)


def paired_ratio(mine: torch.Tensor, theirs: torch.Tensor, resamples: int = 2000,
                 seed: int = 0) -> tuple[float, float, float]:
    """(ratio, low, high): mean(mine) / mean(theirs) over problems (mine, theirs [P], the same problems) with a
    95% percentile bootstrap interval. The bootstrap resamples problems in pairs (one index picks both
    optimizers' losses), so a problem's own difficulty, which both share, cancels; the interval shows how
    much the ratio depends on which problems were drawn. A non-finite ratio (a diverged run) has no interval:
    all three are the ratio."""
    mine, theirs = mine.double(), theirs.double()
    if mine.shape != theirs.shape:
        raise ValueError(f"paired_ratio: {mine.numel()} losses against {theirs.numel()}: not the same problems")
    ratio = (mine.mean() / theirs.mean()).item()
    if not math.isfinite(ratio):  # a diverged run: no interval to give
        return ratio, ratio, ratio
    picks = torch.randint(mine.numel(), (resamples, mine.numel()), generator=torch.Generator().manual_seed(seed))
    ratios = mine[picks].mean(1) / theirs[picks].mean(1)
    low, high = torch.quantile(ratios, torch.tensor([0.025, 0.975], dtype=ratios.dtype)).tolist()
    return ratio, low, high


def final_ratios(curves: list[Curve], reference: str = "adam") -> dict[str, tuple[float, float, float]]:
    """final_ratio of every curve to the one named `reference`; {} when there is none."""
    base = next((c for c in curves if c.name == reference), None)
    return {} if base is None else {c.name: final_ratio(c, base) for c in curves}


def markdown_table(curves: list[Curve], step_label: str, ratios: dict | None = None, reference: str = "adam") -> str:
    """One row per optimizer; with a curve named `reference` (tuned Adam), a column of final-loss ratios
    to it with their 95% paired bootstrap intervals over the problems (`ratios`: final_ratios' result,
    when the caller has it already)."""
    ratios = final_ratios(curves, reference) if ratios is None else ratios
    ratio_head = f" final / {reference} (95% CI) |" if ratios else ""
    lines = [f"| optimizer | loss at {step_label} (mean ± std) | summed loss (mean ± std) |{ratio_head} notes |",
             "|---|---|---|---|" + ("---|" if ratios else "")]
    for curve in curves:
        r = curve.row()
        cell = ""
        if ratios:
            ratio, low, high = ratios[curve.name]
            cell = " 1 |" if curve.name == reference else f" {ratio:.3f} ({low:.3f}-{high:.3f}) |"
        lines.append(f"| {r['optimizer']} | {r['final_mean']:.4f} ± {r['final_std']:.4f} | "
                     f"{r['summed_mean']:.2f} ± {r['summed_std']:.2f} |{cell} {r['detail']} |")
    return "\n".join(lines)


def plot_curves(curves: list[Curve], path, title: str) -> None:
    """Mean loss per step with a band of ± one standard error, log scale, as in the paper's figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for curve in curves:
        mean = curve.losses.mean(1)
        err = curve.losses.std(1) / math.sqrt(curve.losses.shape[1])
        steps = torch.arange(len(mean))
        style = "-" if curve.detail == "learned" else "--"
        ax.plot(steps, mean, style, label=f"{curve.name}" + (f" ({curve.detail})" if curve.detail != "learned" else ""))
        ax.fill_between(steps, (mean - err).clamp_min(1e-12), mean + err, alpha=0.2)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
