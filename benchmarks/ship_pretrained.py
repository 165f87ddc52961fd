"""Writes a meta-training run's best weights as a shipped optimizer, l2l_fast/pretrained/NAME.pt, with the
record of how it was made: the run's command and config, its wall time, the data, and its suite scores.

    python benchmarks/ship_pretrained.py --run runs/general-A/best.pt --name general \
        --command "l2l-fast meta-train ..." --suite-json runs/suite/suite_general.json \
        --suite-label runs/general-A/best.pt --wall-minutes 60 --machine "AMD EPYC, 2 cores"

The file is written in the verified format (checksummed, atomic) by l2l_fast.pretrained.save_pretrained,
and read back through load_pretrained before the script reports success.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import l2l_fast
from l2l_fast.pretrained import SHIPPED_DIR, load_pretrained, save_pretrained


def suite_scores(path: Path, label: str) -> dict:
    """The suite's summary and per-task ratios of the optimizer named `label` in a suite JSON file."""
    report = json.loads(path.read_text())
    summary = [s for s in report["summary"] if s["optimizer"] == label]
    if not summary:
        raise SystemExit(f"{path}: no optimizer {label!r}; it has {[s['optimizer'] for s in report['summary']]}")
    rows = [r for r in report["rows"] if r["optimizer"] == label]
    return {"suite": report["settings"], "summary": summary[0], "rows": rows}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="the run's best.pt (or an exported .pt)")
    parser.add_argument("--name", required=True, help="the shipped name: l2l_fast/pretrained/NAME.pt")
    parser.add_argument("--command", required=True, help="the meta-train command that made the run")
    parser.add_argument("--wall-minutes", type=float, required=True, help="wall time of the run to its best weights")
    parser.add_argument("--machine", required=True, help="the CPU the run used")
    parser.add_argument("--suite-json", type=Path, help="an `l2l-fast evaluate --suite` JSON with this optimizer")
    parser.add_argument("--suite-label", help="the optimizer's name in that JSON (default: --run)")
    parser.add_argument("--note", default="", help="anything else the record should say")
    args = parser.parse_args(argv)

    net = load_pretrained(args.run, backend="reference")
    record = {
        "command": args.command,
        "data": "MNIST from ../shared/datasets, scikit-learn's bundled datasets, the Debian fortunes corpus, "
                "synthetic teachers and quadratics (l2l_fast/tasks/mixed.py)",
        "wall_minutes": args.wall_minutes,
        "machine": args.machine,
        "run": dict(net.record),
        "l2l_fast": l2l_fast.__version__,
    }
    if args.note:
        record["note"] = args.note
    if args.suite_json:
        record["suite_scores"] = suite_scores(args.suite_json, args.suite_label or args.run)
    out = SHIPPED_DIR / f"{args.name}.pt"
    save_pretrained(net, out, record=record)
    back = load_pretrained(args.name)
    print(f"wrote {out} ({out.stat().st_size} bytes): {back.extra_repr()}")


if __name__ == "__main__":
    main()
