"""File formats of the lowest layer: atomic, verified checkpoints.

A run killed at any moment leaves either the previous complete checkpoint or the new complete one, never a
torn file. The format is a torch file {"format": tag, "sha256": hex digest of body, "body": bytes of
torch.save(payload)}, read with torch's weights-only unpickler at both levels. Meta-training writes its
checkpoint.pt and best.pt with the tag FORMAT; exported optimizers (l2l_fast.pretrained) use the same record
with their own tag. Nothing here knows what a payload holds.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import tempfile
from pathlib import Path

import torch

FORMAT = "l2l_fast.meta_checkpoint.v1"


class CheckpointError(RuntimeError):
    """A checkpoint that is corrupt, truncated or made by an incompatible run: CheckpointError(message) or
    CheckpointError(path, reason), whose `reason` is the message without the file's name."""

    def __init__(self, message_or_path, reason: str | None = None):
        super().__init__(str(message_or_path) if reason is None else f"{message_or_path}: {reason}")
        self.reason = str(message_or_path) if reason is None else reason


def save_atomic(payload: dict, path: str | os.PathLike, tag: str = FORMAT) -> None:
    """Writes `payload` to `path` through a temporary file, fsync and rename, with a checksum, tagged `tag`."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    body = buffer.getvalue()
    record = {"format": tag, "sha256": hashlib.sha256(body).hexdigest(), "body": body}
    _replace_atomically(path, lambda f: torch.save(record, f))


def write_text_atomic(text: str, path: str | os.PathLike) -> None:
    """Writes `text` (UTF-8) to `path` through a temporary file, fsync and rename: a reader never sees part of it."""
    _replace_atomically(path, lambda f: f.write(text.encode()))


def _replace_atomically(path: str | os.PathLike, write) -> None:
    """write(binary file) into a temporary file beside `path`, fsync, rename over `path`, fsync the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, _file_mode(path))  # mkstemp makes 0600; the file gets what open() would give it
        with os.fdopen(fd, "wb") as f:
            write(f)
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


def _file_mode(path: Path) -> int:
    """The permission bits of the file replaced, or for a new one 0666 less the process's umask."""
    try:
        return path.stat().st_mode & 0o777
    except FileNotFoundError:
        pass
    try:  # read without os.umask(), which would change it for every thread for a moment
        status = Path("/proc/self/status").read_text()
        return 0o666 & ~int(re.search(r"^Umask:\s*([0-7]+)", status, re.M).group(1), 8)
    except (OSError, AttributeError):
        return 0o644


def load_error_reason(error: BaseException) -> str:
    """A one-line reason why torch.load failed; torch's own messages run to a dozen lines."""
    text = str(error)
    if "Weights only load failed" in text:  # a pickle of something other than tensors and plain data
        named = re.search(r"GLOBAL ([\w.]+)", text)
        what = f" ({named.group(1)})" if named else ""
        return (f"refused by torch's weights-only unpickler: it holds an object{what} that is not a tensor or "
                "plain data, which could run code if loaded otherwise")
    if isinstance(error, (pickle.UnpicklingError, IndexError)):
        return "not a torch file of weights: a foreign or damaged file"
    # torch reports a truncated zip as a miniz error, and a non-torch file as a KeyError of its magic number
    if "zip archive" in text or (isinstance(error, KeyError) and error.args and isinstance(error.args[0], int)):
        return "not a torch file, or a truncated one"
    lines = text.strip().splitlines()
    first = lines[0] if lines else ""
    return f"{type(error).__name__}: {first[:200]}" if first else type(error).__name__


def read_record(path: str | os.PathLike):
    """torch.load(path) with the weights-only unpickler; CheckpointError (one line) if it cannot be read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # torn or foreign file: say so instead of a pickle traceback
        raise CheckpointError(path, f"not a readable l2l_fast checkpoint ({load_error_reason(error)})") from error


def verified_body(record: dict, path: str | os.PathLike):
    """The payload of a record that save_atomic wrote (whatever its tag), once its checksum matches."""
    body, digest = record.get("body"), record.get("sha256")
    if not isinstance(body, bytes) or not isinstance(digest, str):
        raise CheckpointError(path, f"format {record.get('format')!r} but no body and checksum")
    if hashlib.sha256(body).hexdigest() != digest:
        raise CheckpointError(path, "checksum mismatch, the file is corrupt")
    try:
        return torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
    except Exception as error:  # intact, but written by something else than torch.save of plain data
        raise CheckpointError(path, f"its checksummed body is unreadable ({load_error_reason(error)})") from error


def load_verified(path: str | os.PathLike, tag: str = FORMAT) -> dict:
    """Reads a checkpoint written by save_atomic with `tag`; raises CheckpointError if it is not intact."""
    record = read_record(path)
    if not isinstance(record, dict):
        raise CheckpointError(path, "not an l2l_fast checkpoint")
    if record.get("format") != tag:
        what = "an l2l_fast meta-training checkpoint" if tag == FORMAT else f"a file of format {tag!r}"
        raise CheckpointError(path, f"not {what} (format {record.get('format')!r})")
    return verified_body(record, path)
