"""Instruction counts of the compiled-in kernels' SASS (cuobjdump -sass of an sm_90 object), the figures
csrc/cuda/NOTES.md quotes: per kernel the static count after the weight staging (the last BAR.SYNC: the tile
loop and its cold paths) and its HMMA, FFMA, LDS, MUFU, global loads / stores; with --loops, instead, every
loop (a backward branch) that holds HMMA, FFMA or DADD, with its static counts (the backward: its unit loops,
the weight-gradient loops over a tile's coordinates and their item loops with the float64 adds); with --rolled T,
the forward kernels as they run (unit loops not unrolled): per warp tile the static count after the weight staging
plus T - 1 more trips of each innermost loop that holds HMMA (the mma body's unit loops, T = 5 units per thread).

  python scripts/sass_counts.py forward_kernels.sass [name-regex]
  python scripts/sass_counts.py --loops backward_kernels.sass [name-regex]
  python scripts/sass_counts.py --rolled 5 forward_kernels.sass [name-regex]
  python scripts/sass_counts.py --bwd-as-run backward_kernels.sass

--bwd-as-run: the mma backward (variant 2, paper's net, linear output) per warp tile as run: the static count of
its tile loop (the outermost loop; every other loop once in it) plus trips - 1 more of each per-coordinate loop:
the gate products' k-step loops (3, 5, 3 k-tiles, the first outside the loop), the d inputs' (10), the cell loops (park, layer 1, layer 0:
20 units). The tanh output's y loop and the weight-gradient loops count once (NOTES.md: the latter ~182 per
coordinate as run, unchanged by the per-coordinate work); cold paths count (an upper bound).

Static counts: a loop that is not unrolled counts once. scripts/check_cuda_build.sh also builds the mma body
with its unit loops unrolled (L2L_MMA_COUNT_UNROLLED) so that its counts are those of one warp tile.
"""
from __future__ import annotations

import collections
import re
import subprocess
import sys

INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)")
ADDRESSED = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)([^;]*);")


def print_loops(name: str, code: str) -> None:
    ins = [(int(m.group(1), 16), m.group(2), m.group(3)) for m in ADDRESSED.finditer(code)]
    index = {a: i for i, (a, _, _) in enumerate(ins)}
    print(f"{name}: {len(ins)} instr")
    for i, (address, op, args) in enumerate(ins):
        target = re.search(r"0x([0-9a-f]+)", args) if op.startswith("BRA") else None
        if not target or int(target.group(1), 16) > address or int(target.group(1), 16) not in index:
            continue
        ops = [o for _, o, _ in ins[index[int(target.group(1), 16)]:i + 1]]
        count = collections.Counter(o.split(".")[0] for o in ops)
        if count["HMMA"] or count["FFMA"] or count["DADD"]:
            lds = " ".join(f"{k} {v}" for k, v in sorted(collections.Counter(o for o in ops if o.startswith("LDS")).items()))
            print(f"  loop {target.group(0)}-{address:#x}: {len(ops):5d} instr: HMMA {count['HMMA']:3d} FFMA {count['FFMA']:3d} "
                  f"{lds or 'LDS 0'} FADD {count['FADD']:3d} DADD {count['DADD']:3d} LDG {count['LDG']:3d} STG {count['STG']:3d}")


def loop_spans(code: str) -> list[tuple[int, list[str]]]:
    """(index of the first instruction, ops) of every loop (a backward branch) of `code`."""
    ins = [(int(m.group(1), 16), m.group(2), m.group(3)) for m in ADDRESSED.finditer(code)]
    index = {a: i for i, (a, _, _) in enumerate(ins)}
    spans = []
    for i, (address, op, args) in enumerate(ins):
        target = re.search(r"0x([0-9a-f]+)", args) if op.startswith("BRA") else None
        if target and int(target.group(1), 16) <= address and int(target.group(1), 16) in index:
            spans.append((index[int(target.group(1), 16)], [o for _, o, _ in ins[index[int(target.group(1), 16)]:i + 1]]))
    return spans


def print_bwd_as_run(name: str, code: str) -> None:
    spans = loop_spans(code)
    tile = max(spans, key=lambda s: len(s[1]))
    total, parts, gates = len(tile[1]), [], 0
    # HMMA of the tile loop outside every inner loop: the gate products' k-tile 0 when it is peeled off the
    # k-step loops (3 x 60; since 2026-12-07), then those loops run 2, 4, 2 trips
    inner = [(start, len(ops)) for start, ops in spans if (start, ops) != tile]
    loose = [o for i, o in enumerate(tile[1])
             if not any(s - tile[0] <= i < s - tile[0] + n for s, n in inner) and o.startswith("HMMA")]
    gate_trips = [2, 4, 2] if len(loose) >= 180 else [3, 5, 3]
    for start, ops in spans:
        if (start, ops) == tile:
            continue
        count = collections.Counter(o.split(".")[0] for o in ops)
        lds32 = sum(1 for o in ops if o == "LDS")
        if not (count["HMMA"] or count["FFMA"] or count["DADD"]):
            continue  # the zero-fill and staging loops (cold paths, features): once
        if count["HMMA"] == 60:
            trips, what = gate_trips[gates], "gates"
            gates += 1
        elif count["HMMA"] in (30, 18) and not count["DADD"]:
            trips, what = 10, "dx"
        elif not count["HMMA"] and not count["DADD"] and not lds32:
            trips, what = 20, "cell"
        else:
            trips, what = 1, "once"
        total += len(ops) * (trips - 1)
        if trips > 1:
            parts.append(f"{what} {len(ops)} x {trips}")
    print(f"{name}: as run {total} per warp tile = {total / 32:.1f} per coordinate (tile loop static {len(tile[1])}; "
          + ", ".join(parts) + ")")


def innermost_hmma_loops(hot: list[str]) -> list[list[str]]:
    """The ops of each innermost loop (a backward branch enclosing no other) of `hot` that holds HMMA."""
    ins = [(int(m.group(1), 16), m.group(2), m.group(3)) for line in hot for m in [ADDRESSED.search(line)] if m]
    index = {a: i for i, (a, _, _) in enumerate(ins)}
    spans = []
    for i, (address, op, args) in enumerate(ins):
        target = re.search(r"0x([0-9a-f]+)", args) if op.startswith("BRA") else None
        if target and int(target.group(1), 16) <= address and int(target.group(1), 16) in index:
            spans.append((index[int(target.group(1), 16)], i))
    inner = [s for s in spans if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in spans)]
    return [[op for _, op, _ in ins[a:b + 1]] for a, b in inner if any(op.startswith("HMMA") for _, op, _ in ins[a:b + 1])]


def main() -> None:
    bwd = sys.argv[1] == "--bwd-as-run"
    if bwd:
        sys.argv[1] = "--loops"
        if len(sys.argv) == 3:
            sys.argv.append(r"backward_kernel<2, FixedDims<20, 2, 1u>, float>")
    loops = sys.argv[1] == "--loops"
    trips = int(sys.argv[2]) if sys.argv[1] == "--rolled" else 1
    args = sys.argv[2:] if loops else sys.argv[3:] if trips > 1 or sys.argv[1] == "--rolled" else sys.argv[1:]
    text = open(args[0]).read()
    pattern = re.compile(args[1] if len(args) > 1 else r"forward_mma_kernel|FixedDims<20, 2, 1u>, float")
    for body in re.split(r"\n\s*Function : ", text)[1:]:
        mangled, code = body.split("\n", 1)
        name = subprocess.run(["c++filt", mangled.strip()], capture_output=True, text=True).stdout.strip()
        name = re.sub(r"l2l_fast::cuda::(\(anonymous namespace\)::)?", "", name).split("(")[0]
        if not pattern.search(name):
            continue
        if bwd:
            print_bwd_as_run(name, code)
            continue
        if loops:
            print_loops(name, code)
            continue
        lines = code.splitlines()
        barriers = [k for k, line in enumerate(lines) if "BAR.SYNC" in line]
        hot = lines[barriers[-1]:] if barriers else lines
        ops = [m.group(1) for line in hot for m in [INSTRUCTION.search(line)] if m]
        if sys.argv[1] == "--rolled":
            for loop in innermost_hmma_loops(hot):
                ops += loop * (trips - 1)
        count = collections.Counter(op.split(".")[0] for op in ops)
        print(f"{name:50s} {len(ops):5d} instr: HMMA {count['HMMA']:4d} FFMA {count['FFMA']:4d} "
              f"LDS {count['LDS']:3d} MUFU {count['MUFU']:4d} LDG {count['LDG']:3d} STG {count['STG']:3d} "
              f"IMAD {count['IMAD']:4d} FADD {count['FADD']:4d} FMUL {count['FMUL']:4d}")


if __name__ == "__main__":
    main()
