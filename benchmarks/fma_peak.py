"""What is this CPU's float32 FMA peak, the ceiling the CPU kernels' FMA-port counts are measured against?

torch's GEMM is not it on AMD machines (oneDNN/MKL stay well below the vector units there: on a 2-core Zen 5,
217 GFLOP/s against a measured 539). This compiles a loop of 16 independent AVX-512 (or AVX2) FMA chains with gcc
and OpenMP, runs it on the given threads, and prints the best of 5 rates: the most FMA-port work the cores retire.

  python benchmarks/fma_peak.py --threads 2
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import machine  # noqa: E402

SOURCE = r"""
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#define CHAINS 16  // > latency x pipes, so the FMA ports never wait on a result
int main(int argc, char** argv) {
  const int threads = atoi(argv[1]);
  const long iters = atol(argv[2]);
  double best = 0;
  for (int rep = 0; rep < 5; ++rep) {
    float sink = 0;
    const double t0 = omp_get_wtime();
#pragma omp parallel num_threads(threads) reduction(+ : sink)
    {
      VEC a[CHAINS];
      const VEC x = SET1(0.999999f), y = SET1(1e-7f);
      for (int i = 0; i < CHAINS; ++i) a[i] = SET1((float)i);
      for (long it = 0; it < iters; ++it)
        for (int i = 0; i < CHAINS; ++i) a[i] = FMA(a[i], x, y);
      float lanes[16];
      for (int i = 0; i < CHAINS; ++i) STORE(lanes, a[i]), sink += lanes[0];
    }
    const double seconds = omp_get_wtime() - t0;
    const double flops = 2.0 * WIDTH * CHAINS * (double)iters * threads;
    if (flops / seconds > best) best = flops / seconds;
    if (sink == 42.0f) printf(" ");  // keeps the chains live
  }
  printf("%.1f\n", best / 1e9);
  return 0;
}
"""

FLAVOURS = {
    "avx512": ("-mavx512f -mfma", "-DVEC=__m512 -DSET1=_mm512_set1_ps -DFMA=_mm512_fmadd_ps -DSTORE=_mm512_storeu_ps "
               "-DWIDTH=16"),
    "avx2": ("-mavx2 -mfma", "-DVEC=__m256 -DSET1=_mm256_set1_ps -DFMA=_mm256_fmadd_ps -DSTORE=_mm256_storeu_ps "
             "-DWIDTH=8"),
}


def peak(isa: str, threads: int, iters: int) -> float:
    """GFLOP/s of float32 FMAs (2 FLOP each) over `threads` threads, best of 5."""
    flags, defines = FLAVOURS[isa]
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = os.path.join(tmp, "fma.c"), os.path.join(tmp, "fma")
        with open(src, "w") as f:
            f.write(SOURCE)
        subprocess.run(["gcc", "-O3", *flags.split(), *defines.split(), "-fopenmp", src, "-o", exe], check=True)
        out = subprocess.run([exe, str(threads), str(iters)], check=True, capture_output=True, text=True).stdout
    return float(out.split()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=200_000_000, help="FMA rounds per chain and thread")
    parser.add_argument("--isa", choices=sorted(FLAVOURS), nargs="+", default=["avx512", "avx2"])
    args = parser.parse_args(argv)
    print(f"fma_peak: {machine.cpu_model()}, {args.threads} threads")
    for isa in args.isa:
        print(f"{isa:7s} float32 FMA peak: {peak(isa, args.threads, args.iters):.1f} GFLOP/s")


if __name__ == "__main__":
    main()
