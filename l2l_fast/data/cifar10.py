"""CIFAR-10 from the standard python tarball, or from its extracted ``cifar-10-batches-py`` folder.

``load_cifar10(split)`` returns ``images`` float32 [N, 3, 32, 32] in [0, 1] (channels R, G, B; pixel / 255)
and ``labels`` int64 [N] in 0..9, with N = 50000 for "train" (data_batch_1..5 in order) and 10000 for "test"
(test_batch). Accepted layouts in a data folder (see :mod:`l2l_fast.data.download` for which folders):
``cifar-10-batches-py/``, ``cifar-10-python.tar.gz``, or the batch files themselves; each also under
``cifar10/``. When none is found the tarball is downloaded into the cache folder and MD5-verified.
"""
from __future__ import annotations

import functools
import io
import os
import pickle
import tarfile
import zlib
from pathlib import Path

import numpy as np
import torch

from .download import DATA_ENV, DatasetUnavailable, cache_dir, mirrors_from_env, search_dirs
from .download import download as fetch

__all__ = ["CIFAR10Error", "CIFAR10Unavailable", "MIRRORS", "MD5", "TARBALL", "BATCHES", "cifar10_source",
           "load_cifar10"]

#: Mirror base URLs, tried in order; ``$L2L_FAST_CIFAR10_MIRRORS`` (comma/space separated) replaces them.
MIRRORS = ["https://www.cs.toronto.edu/~kriz/"]
MIRRORS_ENV = "L2L_FAST_CIFAR10_MIRRORS"
TARBALL = "cifar-10-python.tar.gz"
FOLDER = "cifar-10-batches-py"
#: Published MD5 of the tarball; downloads must match.
MD5 = {TARBALL: "c58f30108f718f92721af3b95e74349a"}
#: split -> batch files, in concatenation order.
BATCHES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
_ALL_BATCHES = BATCHES["train"] + BATCHES["test"]


class CIFAR10Error(ValueError):
    """A CIFAR-10 tarball or batch file is corrupt, truncated, or of the wrong structure."""


class CIFAR10Unavailable(DatasetUnavailable):
    """CIFAR-10 found nowhere and not downloadable; the message says how to provide it."""


class _BatchUnpickler(pickle.Unpickler):
    """Only the globals a CIFAR-10 batch needs (numpy arrays, bytes): never arbitrary code from a file."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR-10 batch")
        return super().find_class(module, name)


def _parse_batch(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch -> (uint8 [n, 3072], int64 [n])."""
    try:
        # latin1: the official batches are Python 2 pickles holding numpy arrays
        batch = _BatchUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except Exception as e:  # unpickling raises nearly anything on garbage
        raise CIFAR10Error(f"{where}: not a readable CIFAR-10 batch pickle ({type(e).__name__}: {e})") from e
    if not isinstance(batch, dict):
        raise CIFAR10Error(f"{where}: expected a pickled dict, got {type(batch).__name__}")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise CIFAR10Error(f"{where}: batch dict lacks b'data' or b'labels' (keys: {sorted(batch)})")
    data, labels = np.asarray(batch["data"]), np.asarray(batch["labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise CIFAR10Error(f"{where}: expected data uint8 [n, 3072], got {data.dtype} {list(data.shape)}")
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise CIFAR10Error(f"{where}: expected {data.shape[0]} integer labels, got {labels.dtype} {list(labels.shape)}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise CIFAR10Error(f"{where}: labels out of range 0..9")
    return data, labels.astype(np.int64)


def _read_tar(path: Path, names: tuple[str, ...]) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:  # one sequential pass: seeking backwards in a gzip stream is slow
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile() and base in names and base not in found:
                    found[base] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise CIFAR10Error(f"{path}: corrupt or truncated tarball ({type(e).__name__}: {e}); "
                           f"delete it and re-download") from e
    missing = [n for n in names if n not in found]
    if missing:
        raise CIFAR10Error(f"{path}: tarball lacks {FOLDER}/{', '.join(missing)}")
    return found


@functools.lru_cache(maxsize=4)
def _load(source: Path, split: str, _stamp: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    # _stamp (mtimes and sizes) only keys the cache, so a replaced file is re-read
    names = BATCHES[split]
    if source.is_dir():
        raws = {n: (source / n).read_bytes() for n in names}
    else:
        raws = _read_tar(source, names)
    parts = [_parse_batch(raws[n], f"{source}:{n}") for n in names]
    data = np.concatenate([d for d, _ in parts])
    x = torch.from_numpy(data.reshape(-1, 3, 32, 32).astype(np.float32)).div_(255.0)
    y = torch.from_numpy(np.concatenate([l for _, l in parts]))
    return x, y


def _hint(dirs: list[Path]) -> str:
    return (f"Provide CIFAR-10 yourself: put {TARBALL} (or its extracted {FOLDER}/ folder with "
            f"{', '.join(_ALL_BATCHES)}) in <dir>/cifar10/ or <dir>/, then set {DATA_ENV}=<dir> or pass "
            f"--data-dir <dir> (data_dir=<dir>). Searched: {', '.join(map(str, dirs))}.")


def _find(dirs: list[Path]) -> Path | None:
    for d in dirs:
        for folder in (d / FOLDER, d):  # extracted first: no decompression
            if all((folder / n).is_file() for n in _ALL_BATCHES):
                return folder.resolve()
        if (d / TARBALL).is_file():
            return (d / TARBALL).resolve()
    return None


def cifar10_source(data_dir: str | os.PathLike | None = None, *, download_missing: bool = True) -> Path:
    """The resolved batches folder or tarball, downloading the tarball if found nowhere and allowed."""
    dirs = search_dirs(data_dir, "cifar10")
    source = _find(dirs)
    if source is None:
        if not download_missing:
            raise CIFAR10Unavailable(f"CIFAR-10 not found. {_hint(dirs)}")
        source = fetch(TARBALL, MD5[TARBALL], cache_dir() / "cifar10", mirrors_from_env(MIRRORS_ENV, MIRRORS),
                       hint=_hint(dirs), error=CIFAR10Unavailable).resolve()
    return source


def load_cifar10(split: str = "train", data_dir: str | os.PathLike | None = None, *, download: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 ``split`` ("train" or "test") as (images float32 [N, 3, 32, 32] in [0, 1], labels int64 [N]).

    Cached per process on the resolved source: repeated calls return the same tensors, which callers must
    therefore not modify in place (``.clone()`` first).
    """
    if split not in BATCHES:
        raise ValueError(f"split must be one of {sorted(BATCHES)}, got {split!r}")
    source = cifar10_source(data_dir, download_missing=download)
    files = [source / n for n in BATCHES[split]] if source.is_dir() else [source]
    stamp = tuple((s.st_mtime_ns, s.st_size) for s in map(os.stat, files))
    return _load(source, split, stamp)


load_cifar10.cache_clear = _load.cache_clear  # type: ignore[attr-defined]
