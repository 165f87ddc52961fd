"""Write the weights (1 - alpha) A + alpha B of two optimizers as a weight file (weight-space interpolation).

A fine-tune that trades one skill for another (e.g. least-squares precision for early speed) moves the weights
a short way from where it started; the points between the two often keep part of each skill (Wortsman et al.
2022, WiSE-FT). A may read a subset of B's input features (B a fine-tune of A widened with `--init`): A's new
input columns count as zero, as the fine-tune started them. Everything but the weights (sizes, features,
output) is B's:

    python benchmarks/interpolate_weights.py A.pt B.pt --alpha 0.5 --out mix.pt
"""
from __future__ import annotations

import argparse

import torch

from l2l_fast import CoordinatewiseLSTM
from l2l_fast.meta.train import load_widened, widens
from l2l_fast.pretrained import load_pretrained, save_pretrained


def interpolate(a: CoordinatewiseLSTM, b: CoordinatewiseLSTM, alpha: float) -> CoordinatewiseLSTM:
    """A net like b with weights (1 - alpha) a + alpha b; a widened to b's features first when it reads fewer."""
    if a.size_kwargs() != b.size_kwargs():
        widened = CoordinatewiseLSTM(**b.size_kwargs())
        load_widened(widened, a)
        a = widened
    mixed = CoordinatewiseLSTM(**b.size_kwargs())
    b_state = b.state_dict()
    mixed.load_state_dict({k: torch.lerp(v.double(), b_state[k].double(), alpha).to(b_state[k].dtype)
                           for k, v in a.state_dict().items()})
    return mixed


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", help="weight file (pretrained:NAME, best.pt, an export) at alpha = 0")
    parser.add_argument("b", help="weight file at alpha = 1; its sizes, features and output are the result's")
    parser.add_argument("--alpha", type=float, required=True, help="the fraction of the way from A to B")
    parser.add_argument("--out", required=True, help="the weight file to write")
    args = parser.parse_args(argv)
    a, b = load_pretrained(args.a), load_pretrained(args.b)
    if not (a.size_kwargs() == b.size_kwargs() or widens(a, b)):
        raise SystemExit(f"{args.a} ({a.size_kwargs()}) and {args.b} ({b.size_kwargs()}) are not the same net "
                         "(nor A the same with fewer features)")
    save_pretrained(interpolate(a, b, args.alpha), args.out,
                    record={"interpolation": {"a": args.a, "b": args.b, "alpha": args.alpha}})
    print(f"{args.out}: (1 - {args.alpha}) {args.a} + {args.alpha} {args.b}")


if __name__ == "__main__":
    main()
