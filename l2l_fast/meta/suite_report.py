"""What a suite run reports: a markdown table, JSON rows with the summary, one figure with a panel per entry.

The table and the JSON are made from the same rows (SuiteResult.rows), so their numbers agree; the table
rounds them (final losses to 4 significant digits, ratios to 3 decimals).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from .suite import ADAM_DEFAULT, ADAM_TUNED, REFERENCES, SuiteResult, summary_line

RATIO_KEYS = (("vs_adam_1e-3", ADAM_DEFAULT), ("vs_adam_tuned", ADAM_TUNED))


def format_loss(value: float) -> str:
    return f"{value:.4g}"


def format_ratio(ratio: dict) -> str:
    value, low, high = ratio["ratio"], ratio["ci95_low"], ratio["ci95_high"]
    if not math.isfinite(value) or (low, high) == (value, value):  # no interval (a diverged run)
        return f"{value:.3f}"
    return f"{value:.3f} ({low:.3f}-{high:.3f})"


def _columns(name: str) -> list[tuple[str, str | None]]:
    """(header, ratio key or "final" / "div") of an optimizer's columns; a reference's ratio to itself is left out."""
    ratios = [(key, reference) for key, reference in RATIO_KEYS if reference != name]
    return ([(f"{name}: final", "final")] + [(f"{name}: / {reference} (95% CI)", key) for key, reference in ratios]
            + [(f"{name}: div.", "div")])


def markdown_table(rows: list[dict]) -> str:
    """Rows: the entries; per optimizer its mean final loss, its ratios to Adam 1e-3 and to tuned Adam (95% paired
    bootstrap intervals; a reference's ratio to itself left out) and its diverged runs / problems. Tuned Adam's
    learning rate has a column, marked when it is at the edge of its grid (the grid may be too narrow there)."""
    names = list(dict.fromkeys(r["optimizer"] for r in rows))
    by_entry: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_entry.setdefault(r["entry"], {})[r["optimizer"]] = r
    head = ["task", "steps", "held out", "tuned lr"] + [h for name in names for h, _ in _columns(name)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, found in by_entry.items():
        first = found[names[0]]
        tuned = found[ADAM_TUNED]
        cells = [label, str(first["steps"]), first["held_out"],
                 f"{tuned['lr']:.3g}" + (" (grid edge)" if tuned["lr_at_grid_edge"] else "")]
        for name in names:
            r = found[name]
            for _, key in _columns(name):
                cells.append(format_loss(r["final_mean"]) if key == "final"
                             else f"{r['divergences']}/{r['problems']}" if key == "div" else format_ratio(r[key]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_suite(result: SuiteResult, path, columns: int = 3) -> None:
    """One panel per entry: the mean loss over the test problems at each step, log scale; learned optimizers
    solid, baselines dashed. A diverged run makes its optimizer's mean infinite or NaN: the line stops there."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(result.entries)
    columns = min(columns, n)
    rows = math.ceil(n / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False,
                             layout="constrained")  # constrained: the suptitle gets its own room
    for ax, entry_result in zip(axes.flat, result.entries):
        for name, run in entry_result.runs.items():
            mean = run.losses.double().mean(1)
            label = name + (f" (lr {run.lr:.3g})" if name == ADAM_TUNED else "")
            label += f", {run.divergences} div." if run.divergences else ""
            ax.plot(range(len(mean)), mean, "--" if run.lr is not None else "-", label=label, linewidth=1.2)
        ax.set_yscale("log")
        cut = f" of {entry_result.entry.steps}" if entry_result.steps != entry_result.entry.steps else ""
        ax.set_title(f"{entry_result.entry.label} ({entry_result.steps}{cut} steps)", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    problems = result.settings["problems"]
    fig.suptitle(f"suite {result.suite.name}: mean loss over {problems} test problems", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(result: SuiteResult, out, extra: dict | None = None) -> dict[str, Path]:
    """Writes suite_NAME[_quick].md (table and summary lines), .json (settings, rows, summary) and .png into
    `out`; returns their paths by kind. `extra`: more settings to record (the command, the wall time)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"suite_{result.suite.name}" + ("_quick" if result.settings["quick"] else "")
    rows, summaries = result.rows(), result.summaries()
    paths = {kind: out / f"{stem}.{kind}" for kind in ("md", "json", "png")}
    text = markdown_table(rows) + "\n\n" + "\n".join(summary_line(s) for s in summaries) + "\n"
    paths["md"].write_text(text)
    seconds = {r.entry.label: round(r.seconds, 2) for r in result.entries}
    record = {"settings": {**result.settings, **(extra or {}), "entry_seconds": seconds},
              "rows": rows, "summary": summaries}
    paths["json"].write_text(json.dumps(record, indent=2))
    plot_suite(result, paths["png"])
    return paths


def _grid_rate(text: str) -> float:
    """A rate as the JSON rows key it ("%.6g") -> the grids' exact float 10^(k/4) (suite.ADAM_GRID, tune_extending)."""
    return 10 ** (round(4 * math.log10(float(text))) / 4)


def tuning_cache_from_record(record: dict) -> dict:
    """The tuning results of an earlier suite run (its JSON record) as run_suite's `cache`: {key: (lr, scores)} for
    tuned Adam and every tuned baseline. A later run with the same tuning settings (validation problems, seed,
    grids) then re-runs only the test problems: comparing a new learned optimizer costs no tuning.
    The rates are rebuilt from the rows' 6-digit keys as the grids' exact quarter decades; a record whose rates
    are not on that lattice (a custom grid) is refused, as is a record from an older format."""
    settings = record.get("settings", {})
    needed = ("tune_problems", "seed", "adam_grid", "baseline_grid", "extend_to", "quick")
    missing = [k for k in needed if k not in settings]
    if missing or "rows" not in record:
        raise ValueError(f"not a suite record (its settings lack {missing or 'nothing'}, rows "
                         f"{'present' if 'rows' in record else 'missing'}): pass the .json an evaluate --suite run wrote")
    cache = {}
    for row in record["rows"]:
        name = row["optimizer"]
        if name == ADAM_DEFAULT or (name not in REFERENCES and row["lr"] is None):
            continue  # untuned: Adam at 1e-3, and the learned optimizers
        tuner = "adam" if name == ADAM_TUNED else name
        grid = settings["adam_grid"] if tuner == "adam" else settings["baseline_grid"]
        scores = {_grid_rate(lr): score for lr, score in row["validation_scores"].items()}
        lr = row["lr"]
        if lr not in scores or any(not math.isclose(r, float(text), rel_tol=1e-5)
                                   for r, text in zip(scores, row["validation_scores"])):
            raise ValueError(f"entry {row['entry']!r}, {name}: its rates are not the grids' quarter decades; "
                             f"a record made with a custom grid cannot be reused")
        options = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in row["options"].items()))
        key = (row["task"], options, row["steps"], settings["tune_problems"], settings["seed"], tuner, tuple(grid),
               settings["extend_to"])
        cache[key] = (lr, scores)
    return cache
