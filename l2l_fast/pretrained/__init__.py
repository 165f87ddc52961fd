"""Shipped, meta-trained optimizers (weights-only torch files of a few KB, with how they were trained).

    net = l2l_fast.CoordinatewiseLSTM.from_pretrained("mnist")
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

from ..meta.checkpoint import FORMAT as CHECKPOINT_FORMAT, load_verified
from ..net import CoordinatewiseLSTM

SHIPPED_DIR = Path(__file__).parent


def available() -> list[str]:
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.pt"))


def load_pretrained(name_or_path: str, backend: str = "auto") -> CoordinatewiseLSTM:
    """By name ('mnist', 'quadratic': files shipped in this folder), by path to a file from
    save_pretrained, or by path to a meta-training run's best.pt / checkpoint.pt (its best weights)."""
    path = Path(name_or_path)
    if path.suffix != ".pt":
        path = SHIPPED_DIR / f"{name_or_path}.pt"
        if not path.exists():
            raise ValueError(f"pretrained: no shipped optimizer named {name_or_path!r}; available: {available()}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT:
            return _from_meta_training_run(path, backend)
        net = CoordinatewiseLSTM(**payload["net_kwargs"], backend=backend)
        net.load_state_dict(payload["state_dict"])
    except FileNotFoundError:
        raise
    except (KeyError, TypeError, RuntimeError, EOFError, OSError, pickle.UnpicklingError) as error:
        raise ValueError(f"pretrained: {path} is not a valid l2l_fast optimizer file ({error})") from error
    net.record = payload.get("record", {})
    return net


def _from_meta_training_run(path: Path, backend: str) -> CoordinatewiseLSTM:
    """The best weights of an `l2l-fast meta-train --out DIR` run (DIR/best.pt or DIR/checkpoint.pt)."""
    payload = load_verified(path)  # checksum-verified; CheckpointError if torn
    config = payload["config"]
    best = payload["net"] if "score" in payload else payload.get("best_state") or payload["net"]
    if any(not key.startswith(("lstm.", "out.")) for key in best):
        raise ValueError(f"pretrained: {path} holds one LSTM per parameter group (task {config['task']!r}); "
                         "only single-LSTM runs load as one optimizer")
    net = CoordinatewiseLSTM(hidden_size=config["hidden_size"], num_layers=config["num_layers"],
                             preprocess_p=config["preprocess_p"], output_scale=config["output_scale"], backend=backend)
    net.load_state_dict(best)
    net.record = {"source": str(path), "epoch": payload["epoch"],
                  "validation_score": payload.get("score", payload.get("best_score")), "config": config}
    return net


def save_pretrained(net: CoordinatewiseLSTM, path, record: dict | None = None) -> None:
    """Writes the weights in float32 and `record` (command, epochs, seed, held-out score, ...)."""
    kwargs = dict(hidden_size=net.hidden_size, num_layers=net.num_layers, preprocess_p=net.preprocess_p,
                  output_scale=net.output_scale)
    state = {k: v.detach().cpu().float().contiguous() for k, v in net.state_dict().items()}
    torch.save({"net_kwargs": kwargs, "state_dict": state, "record": record or {}}, path)
