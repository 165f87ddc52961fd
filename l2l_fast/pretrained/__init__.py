"""Shipped, meta-trained optimizers (weights-only torch files of a few tens of KB, with how they were trained).

    net = l2l_fast.CoordinatewiseLSTM.from_pretrained("general")

DEFAULT ("general", meta-trained over many model families: LearnedOptimizer's default), its member for runs of
at most 200 steps ("general_short", chosen by for_horizon when the run's length is given) and the paper's two
specialists, "mnist" (the 784-20-10 sigmoid MLP) and "quadratic", each with its training record (`net.record`).

save_pretrained writes the verified format FORMAT ("l2l_fast.pretrained.v2"): the checksummed record of
l2l_fast.files, {"format", "sha256" of body, "body": bytes of torch.save(payload)}, with the payload
{"net_kwargs", "state_dict" (float32), "record", "saved_with": {"l2l_fast", "torch"}} or, one LSTM per
parameter group, {"groups": {name: {"net_kwargs", "state_dict"}}, "record", "saved_with"}. load_pretrained
verifies every file before it builds a net (see contents.py): the checksum, the net arguments (known, present,
in range), the weights (names and shapes of the net those arguments build, floating point, finite). Files of
the untagged layout of before (the payload dict itself, no checksum) still load, with a UserWarning;
resave(path) rewrites one in the verified format, weights bit for bit.
"""
from __future__ import annotations

import importlib.metadata
import io
import os
import warnings
from pathlib import Path

import torch

from .. import ops
from ..checks import check_total_steps
from ..files import load_error_reason, save_atomic
from ..grouped import GroupedLSTM
from ..net import BACKENDS, CoordinatewiseLSTM
from .contents import FORMAT, Invalid, check_part, read

SHIPPED_DIR = Path(__file__).parent
DEFAULT = "general"  # what LearnedOptimizer(params) runs: it beat "mnist" on the held-out suite (README)
# Shipped names with a member for short runs: {name: (longest run it serves, member)}. A run declared at most that
# long (LearnedOptimizer(total_steps=T), evaluate's horizon) gets the member, meta-trained on episodes of up to
# that many steps, as Adam's learning rate is tuned for the run's length; any other run, or one of unknown length,
# gets the name's own weights, trained on episodes of up to 1,000 steps and stable far past them.
SHORT_RUN_MEMBERS = {"general": (200, "general_short")}
# A spec with one of these suffixes (any case) names a file; so does one with a path separator, and one that
# is an existing file and no shipped name. Anything else is a shipped name.
PATH_SUFFIXES = (".pt", ".pth", ".bin")


def available() -> list[str]:
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.pt"))


def names_a_file(spec: str) -> bool:
    """Whether `spec` (without a 'pretrained:' prefix) is read as a path rather than a shipped name: it has a
    path separator or a suffix among PATH_SUFFIXES, or it is an existing file and not a shipped name (a file
    named like a shipped optimizer does not shadow it: write './mnist')."""
    if any(sep and sep in spec for sep in ("/", os.sep, os.altsep)):
        return True
    if Path(spec).suffix.lower() in PATH_SUFFIXES:
        return True
    return spec not in available() and Path(spec).is_file()


def resolve(name_or_path: str | os.PathLike) -> Path:
    """The file that a spec names: a path (see names_a_file) or a shipped name ('mnist', also spelt
    'pretrained:mnist'); ValueError listing the shipped names for an unknown one."""
    if isinstance(name_or_path, os.PathLike):
        return Path(name_or_path)
    if not isinstance(name_or_path, str):
        raise TypeError(f"pretrained: expected a shipped name ({', '.join(available())}) or a path, got "
                        f"{type(name_or_path).__name__}")
    spec = _bare(name_or_path)
    if names_a_file(spec):
        return Path(spec)
    if spec not in available():
        raise ValueError(f"pretrained: no shipped optimizer named {spec!r}; available: {available()}")
    return SHIPPED_DIR / f"{spec}.pt"


def short_run_member(name_or_path) -> tuple[int, str] | None:
    """(longest run it serves, member) of a shipped name with a short-run member (SHORT_RUN_MEMBERS, also spelt
    'pretrained:NAME'); None for anything else (files, other names)."""
    if not isinstance(name_or_path, str):
        return None
    spec = _bare(name_or_path)
    return None if names_a_file(spec) else SHORT_RUN_MEMBERS.get(spec)


def for_horizon(name_or_path, total_steps: int | None):
    """The spec to load for a run of `total_steps` optimizer steps: a shipped name's short-run member when the run
    is at most as long as it serves, else the name itself (without the 'pretrained:' prefix); `name_or_path` as it
    is for files, names without a member and total_steps None. ValueError for a malformed total_steps."""
    check_total_steps(total_steps)
    entry = short_run_member(name_or_path)
    if total_steps is None or entry is None:
        return name_or_path
    longest, member = entry
    return member if total_steps <= longest else _bare(name_or_path)


def _bare(spec: str) -> str:
    """A shipped name's spec without its optional 'pretrained:' prefix."""
    return spec.removeprefix("pretrained:")


def load_pretrained(name_or_path: str | os.PathLike, backend: str = "auto", groups=None, dim: int = 0):
    """By name ('mnist', 'quadratic', also spelt 'pretrained:mnist': files shipped in this folder), by
    path to a file from save_pretrained, or by path to a meta-training run's best.pt / checkpoint.pt
    (its best weights).

    A file with one LSTM per parameter group (a cifar10 run: conv and fc) needs the task's `groups`
    and `dim` and gives a GroupedLSTM; any other gives a CoordinatewiseLSTM. `.record` says how it was
    trained. A file that fails a check is refused with one ValueError naming it and the reason; a missing
    file raises FileNotFoundError."""
    if backend not in BACKENDS:  # the caller's errors, before any of the file's
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "native" and not ops.HAS_NATIVE:
        raise RuntimeError(f"backend='native' but the l2l_fast._C extension failed to load: {ops.NATIVE_IMPORT_ERROR}")
    path = resolve(name_or_path)
    nets, record, verified = _read_nets(path, backend)
    if list(nets) == [None]:
        net = nets[None]
    elif groups is None:
        raise ValueError(f"pretrained: {path} holds one LSTM per parameter group ({', '.join(sorted(nets))}): "
                         "load it for its task (l2l-fast evaluate --task ... --optimizer PATH, or "
                         "load_pretrained(path, groups=..., dim=...))")
    else:
        try:
            net = GroupedLSTM(nets, groups, dim)
        except ValueError as error:
            raise ValueError(f"pretrained: {path}: {error}") from None
    if not verified:  # only once it passed every other check: a refused file needs no advice on re-saving
        warnings.warn(f"pretrained: {path} is in the unverified layout of before (no format tag, no checksum: "
                      "a corrupted weight cannot be detected); it passed the other checks and loads. Re-save it "
                      f"once: python -c \"from l2l_fast.pretrained import resave; resave({str(path)!r})\"",
                      UserWarning, stacklevel=2)
    net.record = record
    return net


def _read_nets(path: Path, backend: str):
    """({group name or None: net}, record, verified) of the file at `path`; ValueError naming it if refused."""
    try:
        contents = read(path)
        nets = {name: _build(kwargs, state, name, backend) for name, (kwargs, state) in contents.parts.items()}
    except Invalid as error:
        raise ValueError(f"pretrained: {path} is not a valid l2l_fast optimizer file ({error})") from error
    return nets, contents.record, contents.verified


def _build(kwargs: dict, state: dict, group, backend: str) -> CoordinatewiseLSTM:
    """The net of checked arguments with the file's weights, once their names and shapes are the net's.
    Built on the meta device first, so that sizes which do not match the file allocate nothing."""
    at = "" if group is None else f"group {group!r}: "
    try:
        with torch.device("meta"):
            net = CoordinatewiseLSTM(**kwargs, backend=backend)
    except (TypeError, ValueError, RuntimeError) as error:  # a `features` value it does not know, sizes past int64
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise Invalid(f"{at}the net refuses its arguments: {first}") from error
    expected = net.state_dict()
    for name in expected:
        if name not in state:
            raise Invalid(f"{at}missing weight {name!r}")
    for name in state:
        if name not in expected:
            raise Invalid(f"{at}unexpected weight {name!r}")
    for name, like in expected.items():
        if state[name].shape != like.shape:
            raise Invalid(f"{at}weight {name!r} has shape {tuple(state[name].shape)}, the net arguments give "
                          f"{tuple(like.shape)}")
    # copies: weights shared within the file (or with the caller) must not become shared parameters
    net.load_state_dict({name: state[name].detach().to(like.dtype).contiguous().clone()
                         for name, like in expected.items()}, assign=True)
    left = [name for name, t in [*net.named_parameters(), *net.named_buffers()] if t.is_meta]
    if left:  # a tensor the net does not save: it would have no value
        raise RuntimeError(f"pretrained: CoordinatewiseLSTM holds tensors outside its state_dict ({left}); "
                           "the loader cannot restore them")
    return net


def save_pretrained(net, path, record: dict | None = None) -> None:
    """Writes the weights in float32 and `record` (command, epochs, seed, held-out score, ...) in the verified
    format, atomically (temporary file, fsync, rename); a GroupedLSTM is written as one entry per parameter
    group. Refuses (ValueError, nothing written) a net or record that load_pretrained would refuse."""
    nets = dict(net.nets) if isinstance(net, GroupedLSTM) else {None: net}
    parts = {name: (sub.size_kwargs(), {k: v.detach().cpu().float().contiguous() for k, v in sub.state_dict().items()})
             for name, sub in nets.items()}
    _write(parts, {} if record is None else record, path)


def resave(path, out=None) -> None:
    """Rewrites the optimizer file at `path` (any layout load_pretrained reads, for instance the unverified one
    of before) in the verified format at `out` (default: in place), once it passes every check: the same
    weights bit for bit, net arguments and record. No task needed for a file of parameter groups."""
    path = Path(path)
    nets, record, _ = _read_nets(path, backend="reference")
    parts = {name: (sub.size_kwargs(), sub.state_dict()) for name, sub in nets.items()}
    _write(parts, record, path if out is None else out)


def _version() -> str:
    try:  # the installed distribution's; the package's __init__ is above this layer
        return importlib.metadata.version("l2l_fast")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _write(parts: dict, record: dict, path) -> None:
    try:
        if not isinstance(record, dict):
            raise Invalid(f"record is a {type(record).__name__}, not a dict")
        for name, (kwargs, state) in parts.items():
            check_part(kwargs, state, name)
        saved_with = {"l2l_fast": _version(), "torch": str(torch.__version__)}
        if list(parts) == [None]:
            kwargs, state = parts[None]
            payload = {"net_kwargs": kwargs, "state_dict": state, "record": record, "saved_with": saved_with}
        else:
            groups = {name: {"net_kwargs": kwargs, "state_dict": state} for name, (kwargs, state) in parts.items()}
            payload = {"groups": groups, "record": record, "saved_with": saved_with}
        _readable(payload)
    except Invalid as error:
        raise ValueError(f"pretrained: not writing {path}: {error}") from error
    save_atomic(payload, path, tag=FORMAT)


def _readable(payload: dict) -> None:
    """Refuses a payload the weights-only unpickler would not read back (a record holding a Path, a numpy
    number, ...): a file that cannot be loaded is worse than none."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    buffer.seek(0)
    try:
        torch.load(buffer, map_location="cpu", weights_only=True)
    except Exception as error:
        raise Invalid(f"it would not load back: {load_error_reason(error)}") from error
