"""Does an error thrown inside the extension reach Python as an exception, on every device it has?

scripts/gpu_run.sh runs this in a child process right after the build. On one GPU image, built with
its default compiler (/opt/gcc/bin/g++, which links libstdc++ statically), every C++ error from the
extension was a segfault; if the probe fails, the script prints what tells the toolchains apart.
Prints one line per check; exits 0 only when every bad call raised ValueError with our message.
"""
from __future__ import annotations

import sys

import torch

import l2l_fast  # noqa: F401  (loads the ops)
from l2l_fast import ops


def bad_call(device: str) -> None:
    # a state one coordinate too long: the op's own C++ shape check must reject it
    H, L, n = 20, 1, 5
    weights = [torch.randn(4 * H, 2), torch.randn(4 * H, H), torch.randn(4 * H), torch.randn(4 * H),
               torch.randn(1, H), torch.randn(1)]
    grad, state = torch.randn(n), torch.randn(L, 2, H, n + 1)
    torch.ops.l2l_fast.lstm_step(grad.to(device), state.to(device), [w.to(device) for w in weights], 10.0, 0.1)


def main() -> int:
    ok = True
    for device in sorted(ops.native_devices()):
        if device == "cuda" and not torch.cuda.is_available():
            continue
        try:
            bad_call(device)
            print(f"error_probe: {device}: NO ERROR RAISED")
            ok = False
        except ValueError as e:
            good = "state: expected shape" in str(e)
            note = "" if good else " WITHOUT the expected message"
            print(f"error_probe: {device}: ValueError raised{note}", flush=True)
            ok &= good
    try:  # one of torch's own C++ errors, for comparison
        torch.ones(2) @ torch.ones(3)
    except RuntimeError:
        print("error_probe: torch's own C++ error raised")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
