"""Shipped, meta-trained optimizers (weights-only torch files of a few KB, with how they were trained).

    net = l2l_fast.CoordinatewiseLSTM.from_pretrained("mnist")
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..files import FORMAT as CHECKPOINT_FORMAT, load_error_reason, load_verified
from ..grouped import GroupedLSTM
from ..net import CoordinatewiseLSTM

SHIPPED_DIR = Path(__file__).parent
# The net's constructor arguments among a meta-training run's config entries (fields of MetaTrainConfig, read
# here by name so that loading an optimizer needs no meta-training code): the files of runs made before their
# checkpoints held "net_kwargs" explicitly. `features` appears only in runs that know it.
RUN_CONFIG_NET_KEYS = ("hidden_size", "num_layers", "preprocess_p", "output_scale", "features")


def available() -> list[str]:
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.pt"))


def load_pretrained(name_or_path: str, backend: str = "auto", groups=None, dim: int = 0):
    """By name ('mnist', 'quadratic', also spelt 'pretrained:mnist': files shipped in this folder), by
    path to a file from save_pretrained, or by path to a meta-training run's best.pt / checkpoint.pt
    (its best weights).

    A file with one LSTM per parameter group (a cifar10 run: conv and fc) needs the task's `groups`
    and `dim` and gives a GroupedLSTM; any other gives a CoordinatewiseLSTM. `.record` says how it was
    trained."""
    if name_or_path.startswith("pretrained:"):  # the CLI's spelling of a shipped name
        name_or_path = name_or_path.split(":", 1)[1]
    path = Path(name_or_path)
    if path.suffix != ".pt":
        path = SHIPPED_DIR / f"{name_or_path}.pt"
        if not path.exists():
            raise ValueError(f"pretrained: no shipped optimizer named {name_or_path!r}; available: {available()}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # torch's unpickler fails in many ways on a foreign or torn file
        raise _not_an_optimizer_file(path, error) from error
    try:
        if isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT:
            parts, record = _parts_of_meta_training_run(path)
        elif "groups" in payload:
            parts = {name: (part["net_kwargs"], part["state_dict"]) for name, part in payload["groups"].items()}
            record = payload.get("record", {})
        else:
            parts, record = {None: (payload["net_kwargs"], payload["state_dict"])}, payload.get("record", {})
        nets = {}
        for name, (kwargs, state) in parts.items():
            nets[name] = CoordinatewiseLSTM(**kwargs, backend=backend)
            nets[name].load_state_dict(state)
    except (KeyError, TypeError, AttributeError, RuntimeError, OSError) as error:  # not the layout save_pretrained writes
        raise _not_an_optimizer_file(path, error) from error
    if list(nets) == [None]:
        net = nets[None]
    elif groups is None:
        raise ValueError(f"pretrained: {path} holds one LSTM per parameter group ({', '.join(sorted(nets))}): "
                         "load it for its task (l2l-fast evaluate --task ... --optimizer PATH, or "
                         "load_pretrained(path, groups=..., dim=...))")
    else:
        net = GroupedLSTM(nets, groups, dim)
    net.record = record
    return net


def _not_an_optimizer_file(path: Path, error: BaseException) -> ValueError:
    return ValueError(f"pretrained: {path} is not a valid l2l_fast optimizer file ({load_error_reason(error)})")


def _parts_of_meta_training_run(path: Path):
    """{group name or None: (net kwargs, best weights)} and a record, from an `l2l-fast meta-train --out
    DIR` run's DIR/best.pt or DIR/checkpoint.pt (checksum-verified; CheckpointError if torn)."""
    payload = load_verified(path)
    config = payload["config"]
    best = payload["net"] if "score" in payload else payload.get("best_state") or payload["net"]
    kwargs = run_net_kwargs(payload)
    parts: dict = {}
    for key, value in best.items():
        name, rest = (None, key) if key.startswith(("lstm.", "out.")) else key.split(".", 2)[1:]
        parts.setdefault(name, (kwargs, {}))[1][rest] = value
    record = {"source": str(path), "epoch": payload["epoch"],
              "validation_score": payload.get("score", payload.get("best_score")), "config": config}
    return parts, record


def run_net_kwargs(payload: dict) -> dict:
    """The constructor arguments of the nets of a run's checkpoint.pt / best.pt payload: its "net_kwargs" as
    written (every entry passed on), or for a file written before it held them, the net's entries of its
    config (defaults for those it lacks)."""
    if "net_kwargs" in payload:
        return dict(payload["net_kwargs"])
    config = payload["config"]
    return {key: config[key] for key in RUN_CONFIG_NET_KEYS if key in config}


def save_pretrained(net, path, record: dict | None = None) -> None:
    """Writes the weights in float32 and `record` (command, epochs, seed, held-out score, ...); a
    GroupedLSTM is written as one entry per parameter group."""
    def part(sub: CoordinatewiseLSTM) -> dict:
        state = {k: v.detach().cpu().float().contiguous() for k, v in sub.state_dict().items()}
        return {"net_kwargs": sub.size_kwargs(), "state_dict": state}

    if isinstance(net, GroupedLSTM):
        torch.save({"groups": {name: part(sub) for name, sub in net.nets.items()}, "record": record or {}}, path)
    else:
        torch.save({**part(net), "record": record or {}}, path)
