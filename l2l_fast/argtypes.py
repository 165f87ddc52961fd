"""Value types of command-line options (argparse ``type=`` callables), shared by the task registry, the fields
of MetaTrainConfig and the CLI, which all declare options of the `l2l-fast` command."""
from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """argparse type for counts (steps, problems, epochs, threads, layer sizes): a clear usage error for 0 or
    less, instead of a failure deep inside a run (e.g. an empty plot for --problems 0)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value
