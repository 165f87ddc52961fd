"""How far is each CPU kernel's float32 sigmoid and tanh from the exact function, over every float32 input?

Runs the kernels' own activations (``activation_f32`` of the kernel table: the functions the tile kernels
inline, for the instruction set and activations chosen) on all 2^32 bit patterns, in C++
(``l2l_fast._C.cpu_activation_scan``), and compares every non-NaN input with the function in double (libm exp
and tanh, within an ulp of double: far below what is measured). Prints, per instruction set, activations and function: the largest absolute error and
the input where it occurs (over every input but NaN; +-inf against the limits), the outputs at +-0 and +-inf,
whether exactly the NaN inputs gave NaN, and whether every output lies in the function's range ([0, 1], [-1, 1]). csrc/cpu/ACTIVATIONS.md records the output;
tests/test_activations.py checks the bounds on a dense subset in every test run.

  python scripts/scan_activations.py                         # every ISA this CPU runs, fast and precise
  python scripts/scan_activations.py --isa avx512 --activations fast --chunk-bits 22
  python scripts/scan_activations.py --stride 4099           # a quick look: every 4099th bit pattern
"""
from __future__ import annotations

import argparse
import platform
import time

import torch

from l2l_fast import _C
from l2l_fast.ops import available_cpu_isas

REFERENCE = {"sigmoid": torch.sigmoid, "tanh": torch.tanh}
RANGE = {"sigmoid": (0.0, 1.0), "tanh": (-1.0, 1.0)}


def scan(which: str, chunk_bits: int, stride: int) -> dict:
    """stride 1: the whole scan in C++ (l2l_fast._C.cpu_activation_scan, libm in double as the exact function);
    stride > 1: a sample through torch (float64 torch.sigmoid / torch.tanh)."""
    worst, worst_x, nan_ok, in_range = 0.0, float("nan"), True, True
    step = 1 << chunk_bits
    lo, hi = RANGE[which]
    for start in range(-(1 << 31), 1 << 31, step * stride):
        if stride == 1:
            err, at_x, chunk_nan_ok, chunk_in_range = _C.cpu_activation_scan(which, start, step)
            nan_ok, in_range = nan_ok and chunk_nan_ok, in_range and chunk_in_range
            if err > worst:
                worst, worst_x = err, at_x
            continue
        bits = torch.arange(start, min(start + step * stride, 1 << 31), stride, dtype=torch.int64).to(torch.int32)
        x = bits.view(torch.float32)
        y = _C.cpu_activation_f32(x, which)
        # float64 error everywhere: NaN exactly where x is NaN (f64 f(+-inf) are the limits), unless y is NaN
        # for a non-NaN x, which the NaN comparison catches
        err = (y.double() - REFERENCE[which](x.double())).abs_()
        nan_x, nan_err = torch.isnan(x), torch.isnan(err)
        nan_ok = nan_ok and bool(torch.equal(nan_x, nan_err))
        in_range = in_range and bool(((y >= lo) & (y <= hi) | nan_x).all())
        err.nan_to_num_(0.0)
        at = int(torch.argmax(err))
        if err[at].item() > worst:
            worst, worst_x = err[at].item(), x[at].item()
    specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf")])
    y = _C.cpu_activation_f32(specials, which).tolist()
    return dict(worst=worst, worst_x=worst_x, nan_ok=nan_ok, in_range=in_range,
                specials=dict(zip(["+0", "-0", "+inf", "-inf"], y)))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--isa", nargs="+", default=None, help="instruction sets (default: every one this CPU runs)")
    parser.add_argument("--activations", nargs="+", default=["fast", "precise"], choices=["fast", "precise"])
    parser.add_argument("--functions", nargs="+", default=["sigmoid", "tanh"], choices=["sigmoid", "tanh"])
    parser.add_argument("--chunk-bits", type=int, default=24, help="log2 of the inputs per call (memory)")
    parser.add_argument("--stride", type=int, default=1, help="scan every stride-th bit pattern (1: all 2^32)")
    args = parser.parse_args(argv)
    isas = args.isa
    if isas is None:
        isas = available_cpu_isas()[::-1]  # widest first
    print(f"scan_activations: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"every {args.stride}th of the 2^32 float32 bit patterns" if args.stride > 1 else
          f"scan_activations: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          "all 2^32 float32 bit patterns")
    print("isa      activations  function  max |error| (non-NaN x) at x               f(+0), f(-0), f(+inf), f(-inf)"
          "          NaN -> NaN  in range  seconds")
    for isa in isas:
        _C.set_cpu_isa(isa)
        for activations in args.activations:
            used = _C.set_cpu_activations(activations)
            if used != activations or (isa == "generic" and activations == "fast"):
                continue  # the generic build has only the precise activations
            for which in args.functions:
                start = time.perf_counter()
                r = scan(which, args.chunk_bits, args.stride)
                s = r["specials"]
                print(f"{isa:8s} {activations:12s} {which:8s}  {r['worst']:.3e}               "
                      f"{r['worst_x']:<+18.9g} {s['+0']:+.3g}, {s['-0']:+.3g}, {s['+inf']:+.3g}, {s['-inf']:+.3g}"
                      f"{'':10s} {str(r['nan_ok']):11s} {str(r['in_range']):9s} {time.perf_counter() - start:.0f}",
                      flush=True)
    _C.set_cpu_activations("fast")


if __name__ == "__main__":
    main()
