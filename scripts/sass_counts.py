"""Instruction counts of the compiled-in forward kernels' SASS (cuobjdump -sass of an sm_90 object), the figures
csrc/cuda/NOTES.md quotes: per kernel the static count after the weight staging (the last BAR.SYNC: the tile
loop and its cold paths) and its HMMA, FFMA, LDS, MUFU, global loads / stores.

  python scripts/sass_counts.py forward_kernels.sass [name-regex]

Static counts: a loop that is not unrolled counts once. scripts/check_cuda_build.sh also builds the mma body
with its unit loops unrolled (L2L_MMA_COUNT_UNROLLED) so that its counts are those of one warp tile.
"""
from __future__ import annotations

import collections
import re
import subprocess
import sys

INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)")


def main() -> None:
    text = open(sys.argv[1]).read()
    pattern = re.compile(sys.argv[2] if len(sys.argv) > 2 else r"forward_mma_kernel|FixedDims<20, 2, 1u>, float")
    for body in re.split(r"\n\s*Function : ", text)[1:]:
        mangled, code = body.split("\n", 1)
        name = subprocess.run(["c++filt", mangled.strip()], capture_output=True, text=True).stdout.strip()
        name = re.sub(r"l2l_fast::cuda::(\(anonymous namespace\)::)?", "", name).split("(")[0]
        if not pattern.search(name):
            continue
        lines = code.splitlines()
        barriers = [k for k, line in enumerate(lines) if "BAR.SYNC" in line]
        hot = lines[barriers[-1]:] if barriers else lines
        ops = [m.group(1) for line in hot for m in [INSTRUCTION.search(line)] if m]
        count = collections.Counter(op.split(".")[0] for op in ops)
        print(f"{name:50s} {len(ops):5d} instr: HMMA {count['HMMA']:4d} FFMA {count['FFMA']:4d} "
              f"LDS {count['LDS']:3d} MUFU {count['MUFU']:4d} LDG {count['LDG']:3d} STG {count['STG']:3d} "
              f"IMAD {count['IMAD']:4d} FADD {count['FADD']:4d} FMUL {count['FMUL']:4d}")


if __name__ == "__main__":
    main()
