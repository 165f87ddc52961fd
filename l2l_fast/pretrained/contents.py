"""What an optimizer file may hold, read and checked before any net is built from it.

Three layouts are read, all with torch's weights-only unpickler (a pickle that would run code is refused):

* ``FORMAT`` ("l2l_fast.pretrained.v2", written by save_pretrained): the checksummed record of
  :mod:`l2l_fast.files` {"format": FORMAT, "sha256": hex digest of body, "body": bytes of torch.save(payload)},
  payload {"net_kwargs": {...}, "state_dict": {name: tensor}, "record": {...}, "saved_with": {...}} or, one
  LSTM per parameter group, {"groups": {name: {"net_kwargs", "state_dict"}}, "record", "saved_with"}.
* a meta-training run's checkpoint.pt / best.pt (files.FORMAT): its best weights, its "net_kwargs" (or, in
  runs written before they held them, the net's entries of its "config").
* the payload dict itself, untagged: the unverified layout save_pretrained wrote before the checksum.

Every part (net arguments and weights) passes :func:`check_part`; a refusal is an :class:`Invalid` with a
one-line reason, to which the loader adds the file's name.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import check_constants
from ..files import FORMAT as RUN_FORMAT, CheckpointError, load_error_reason, verified_body

FORMAT = "l2l_fast.pretrained.v2"
REQUIRED_NET_KWARGS = ("hidden_size", "num_layers", "preprocess_p", "output_scale")
# Passed on to CoordinatewiseLSTM, whose constructor validates them; a file without them was made with the
# defaults (the paper's features, the linear output).
OPTIONAL_NET_KWARGS = ("features", "output", "progress_input")
NET_KWARGS = REQUIRED_NET_KWARGS + OPTIONAL_NET_KWARGS


class Invalid(ValueError):
    """Why a file's contents are refused (one line, without the file's name)."""


@dataclass
class Contents:
    parts: dict  # {group name, or None for a file of one net: (net kwargs, {weight name: tensor})}
    record: dict
    verified: bool  # False: the untagged layout of before, which has no checksum


def read(path) -> Contents:
    """The parts and record of the file at `path`, each part checked by check_part (not yet against a net)."""
    try:
        outer = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # torch's unpickler fails in many ways on a foreign, torn or unsafe file
        raise Invalid(load_error_reason(error)) from error
    if not isinstance(outer, dict):
        raise Invalid(f"it holds a {type(outer).__name__}, not a dict of save_pretrained or meta-train")
    tag = outer.get("format")
    if tag is None:
        parts, record = _exported(outer)
        return Contents(parts, record, verified=False)
    if tag not in (FORMAT, RUN_FORMAT):
        raise Invalid(f"unknown format {tag!r}: this l2l_fast reads {FORMAT!r} and {RUN_FORMAT!r}")
    try:
        payload = verified_body(outer, path)
    except CheckpointError as error:
        raise Invalid(error.reason) from error
    if not isinstance(payload, dict):
        raise Invalid(f"its body holds a {type(payload).__name__}, not a dict")
    parts, record = _exported(payload) if tag == FORMAT else _run(payload, path)
    return Contents(parts, record, verified=True)


def check_part(kwargs, state, group: str | None = None) -> None:
    """Refuses net arguments that are unknown, missing or out of range, and weights that are not finite
    floating-point tensors. Names and shapes are checked against the net built from the arguments."""
    at = "" if group is None else f"group {group!r}: "
    if not isinstance(kwargs, dict):
        raise Invalid(f"{at}net_kwargs is a {type(kwargs).__name__}, not a dict")
    for key in kwargs:
        if key not in NET_KWARGS:
            raise Invalid(f"{at}unknown net argument {key!r}; the net takes {', '.join(NET_KWARGS)}")
    for key in REQUIRED_NET_KWARGS:
        if key not in kwargs:
            raise Invalid(f"{at}missing net argument {key!r}")
    for key in ("hidden_size", "num_layers"):
        if not (_is_int(kwargs[key]) and kwargs[key] >= 1):
            raise Invalid(f"{at}{key}: expected a positive int, got {kwargs[key]!r}")
    for key in ("preprocess_p", "output_scale"):  # numbers first: check_constants converts with float()
        if not _is_number(kwargs[key]):
            raise Invalid(f"{at}{key}: expected a finite number, got {kwargs[key]!r}")
    if "progress_input" in kwargs and not isinstance(kwargs["progress_input"], bool):
        raise Invalid(f"{at}progress_input: expected True or False, got {kwargs['progress_input']!r}")
    try:  # the ranges the ops, the reference and the net enforce
        check_constants(kwargs["preprocess_p"], kwargs["output_scale"])
    except (ValueError, OverflowError) as error:  # OverflowError: an int too large for a float
        raise Invalid(f"{at}{error}") from error
    if not isinstance(state, dict):
        raise Invalid(f"{at}state_dict is a {type(state).__name__}, not a dict")
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise Invalid(f"{at}weight {name!r} is a {type(value).__name__}, not a tensor")
        if value.layout != torch.strided:
            raise Invalid(f"{at}weight {name!r} is a {value.layout} tensor, not a dense one")
        if not value.is_floating_point():
            raise Invalid(f"{at}weight {name!r} is {value.dtype}, not floating point")
        bad = int((~torch.isfinite(value.to(torch.float32))).sum())  # the net holds float32
        if bad:
            raise Invalid(f"{at}weight {name!r} has {bad} non-finite value{'s' if bad > 1 else ''} "
                          "(NaN or +-Inf as float32)")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _entry(payload: dict, key: str, where: str = ""):
    if key not in payload:
        raise Invalid(f"{where}missing entry {key!r}")
    return payload[key]


def _exported(payload: dict):
    record = payload.get("record", {})
    if not isinstance(record, dict):
        raise Invalid(f"record is a {type(record).__name__}, not a dict")
    if "groups" in payload:
        groups = payload["groups"]
        if not isinstance(groups, dict) or not groups or not all(isinstance(g, dict) for g in groups.values()):
            raise Invalid("groups: expected a non-empty dict {group name: {net_kwargs, state_dict}}")
        parts = {}
        for name, part in groups.items():
            if not isinstance(name, str) or not name:
                raise Invalid(f"groups: a group name must be a non-empty str, got {name!r}")
            at = f"group {name!r}: "
            parts[name] = (_entry(part, "net_kwargs", at), _entry(part, "state_dict", at))
    elif "net_kwargs" in payload or "state_dict" in payload:
        parts = {None: (_entry(payload, "net_kwargs"), _entry(payload, "state_dict"))}
    else:
        raise Invalid("a dict that holds neither 'net_kwargs' and 'state_dict' nor 'groups': not a file of "
                      "save_pretrained or meta-train")
    for name, (kwargs, state) in parts.items():
        check_part(kwargs, state, name)
    return parts, record


def run_net_kwargs(payload: dict):
    """The constructor arguments of the nets of a run's checkpoint.pt / best.pt payload: its "net_kwargs" as
    written, or for a file written before it held them, the net's entries of its config (fields of
    MetaTrainConfig, read here by name so that loading an optimizer needs no meta-training code; `features`
    and `output` only in runs that know them)."""
    if "net_kwargs" in payload:
        return payload["net_kwargs"]
    config = payload["config"]
    return {key: config[key] for key in NET_KWARGS if key in config}


def _run(payload: dict, path):
    """{group name or None: (net kwargs, best weights)} and a record, from a meta-training run's file."""
    config = _entry(payload, "config")
    if not isinstance(config, dict):
        raise Invalid(f"config is a {type(config).__name__}, not a dict")
    if "score" in payload:  # best.pt: its net is the best
        best, score = _entry(payload, "net"), payload["score"]
    else:  # checkpoint.pt: the last net, and the best
        best, score = payload.get("best_state") or _entry(payload, "net"), payload.get("best_score")
    if not isinstance(best, dict) or not best:
        raise Invalid("its best weights are not a non-empty dict")
    kwargs = run_net_kwargs(payload)
    parts: dict = {}
    for key, value in best.items():
        pieces = key.split(".", 2) if isinstance(key, str) else []
        if len(pieces) > 1 and pieces[0] in ("lstm", "out"):
            name, rest = None, key
        elif len(pieces) == 3 and pieces[0] == "nets" and pieces[1]:  # a GroupedLSTM's nets.<group>.<weight>
            name, rest = pieces[1], pieces[2]
        else:
            raise Invalid(f"unexpected weight {key!r}")
        parts.setdefault(name, (kwargs, {}))[1][rest] = value
    if None in parts and len(parts) > 1:
        raise Invalid(f"its weights mix one net's and parameter groups' ({', '.join(sorted(p for p in parts if p))})")
    for name, (part_kwargs, state) in parts.items():
        check_part(part_kwargs, state, name)
    record = {"source": str(path), "epoch": _entry(payload, "epoch"), "validation_score": score, "config": config}
    return parts, record
