"""File formats of the lowest layer: atomic, verified checkpoints.

A run killed at any moment leaves either the previous complete checkpoint or the new complete one, never a
torn file. The format is a torch file {"format": FORMAT, "sha256": hex digest of body, "body": bytes of
torch.save(payload)}; meta-training writes its checkpoint.pt and best.pt with it and the loader of
pretrained optimizers reads them. Nothing here knows what a payload holds.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import tempfile
from pathlib import Path

import torch

FORMAT = "l2l_fast.meta_checkpoint.v1"


class CheckpointError(RuntimeError):
    """A checkpoint that is corrupt, truncated or made by an incompatible run."""


def save_atomic(payload: dict, path: str | os.PathLike) -> None:
    """Writes `payload` to `path` through a temporary file, fsync and rename, with a checksum."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    body = buffer.getvalue()
    record = {"format": FORMAT, "sha256": hashlib.sha256(body).hexdigest(), "body": body}
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(record, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_error_reason(error: BaseException) -> str:
    """A one-line reason why torch.load failed; torch's own messages run to a dozen lines."""
    if isinstance(error, (pickle.UnpicklingError, IndexError)):
        return "not a torch file of weights: a foreign or damaged file"
    # torch reports a truncated zip as a miniz error, and a non-torch file as a KeyError of its magic number
    if "zip archive" in str(error) or (isinstance(error, KeyError) and error.args and isinstance(error.args[0], int)):
        return "not a torch file, or a truncated one"
    lines = str(error).strip().splitlines()
    first = lines[0] if lines else ""
    return f"{type(error).__name__}: {first[:200]}" if first else type(error).__name__


def load_verified(path: str | os.PathLike) -> dict:
    """Reads a checkpoint written by save_atomic; raises CheckpointError if it is not intact."""
    path = Path(path)
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # torn or foreign file: say so instead of a pickle traceback
        raise CheckpointError(f"{path}: not a readable l2l_fast checkpoint ({load_error_reason(error)})") from error
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an l2l_fast meta-training checkpoint (format {record.get('format')!r})"
                              if isinstance(record, dict) else f"{path}: not an l2l_fast checkpoint")
    body = record["body"]
    if hashlib.sha256(body).hexdigest() != record["sha256"]:
        raise CheckpointError(f"{path}: checksum mismatch, the file is corrupt")
    return torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
