"""Write a meta-training checkpoint's current weights (not its best-validation ones) as a weight file.

`meta-train` keeps the weights with the best validation score in best.pt; when the validation score is not
the measure that matters (e.g. a run meant to improve long-horizon precision, which the suite measures but the
mixed validation score does not), the weights at the end of the run are in checkpoint.pt. This writes them in
best.pt's format, loadable anywhere a weight file is (`--optimizer FILE`, `--init FILE`, ship_pretrained.py):

    python benchmarks/checkpoint_weights.py runs/X/checkpoint.pt runs/X/final.pt
"""
from __future__ import annotations

import argparse
import io

import torch

from l2l_fast.files import load_verified, save_atomic


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a meta-train run's checkpoint.pt")
    parser.add_argument("out", help="the weight file to write")
    args = parser.parse_args(argv)
    payload = load_verified(args.checkpoint)
    if not {"net", "net_kwargs", "meta_optimizer"} <= payload.keys():  # best.pt and exports have no optimizer
        raise SystemExit(f"{args.checkpoint}: not a meta-train checkpoint (no 'net', 'net_kwargs' or "
                         f"'meta_optimizer' entry)")
    save_atomic({"config": payload["config"], "net_kwargs": payload["net_kwargs"], "net": payload["net"],
                 "score": None, "epoch": payload["epoch"], "source": f"{args.checkpoint} (current weights)"},
                args.out)
    print(f"{args.out}: the weights of epoch {payload['epoch']} of {args.checkpoint}")


if __name__ == "__main__":
    main()
