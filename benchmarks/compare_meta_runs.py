"""Which meta-training run reached the better validation score per wall minute? Reads the log.csv of each run
folder (`l2l-fast meta-train --out`), sums its epochs' seconds (episodes and evaluations) and prints the best
validation score reached by each mark, as a markdown table.

    .venv/bin/python benchmarks/compare_meta_runs.py runs/baseline runs/curriculum runs/pes --minutes 2.5 5 10
"""
from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path


def best_by_minute(log: Path, marks: list[float]) -> tuple[list[float], int, float, float]:
    """(best score reached by each mark, epochs, wall minutes, epoch of the best) of one run's log.csv."""
    elapsed, best, best_epoch, reached, epochs = 0.0, math.inf, 0, [], 0
    rows = list(csv.DictReader(log.open()))
    pending = sorted(marks)
    for row in rows:
        elapsed += float(row["seconds"])
        while pending and elapsed / 60 > pending[0]:
            reached.append(best)
            pending.pop(0)
        if row["val_score"] != "" and float(row["val_score"]) < best:
            best, best_epoch = float(row["val_score"]), int(row["epoch"])
        epochs = int(row["epoch"])
    reached += [best] * len(pending)  # a run shorter than a mark: its best at its end
    return reached, epochs, elapsed / 60, best_epoch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--minutes", type=float, nargs="+", default=[2.5, 5.0, 7.5, 10.0])
    args = parser.parse_args()
    marks = sorted(args.minutes)
    print("| run | " + " | ".join(f"best by {m:g} min" for m in marks) + " | epochs | minutes | best (epoch) |")
    print("|---|" + "---:|" * (len(marks) + 3))
    for run in args.runs:
        reached, epochs, minutes, best_epoch = best_by_minute(run / "log.csv", marks)
        cells = " | ".join(f"{score:.4f}" for score in reached)
        print(f"| {run.name} | {cells} | {epochs} | {minutes:.1f} | {reached[-1]:.4f} ({best_epoch}) |")


if __name__ == "__main__":
    main()
