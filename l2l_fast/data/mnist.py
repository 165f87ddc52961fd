"""MNIST from the four standard IDX files, gzip-compressed or raw.

``load_mnist(split)`` returns ``images`` float32 [N, 784] in [0, 1] (row-major 28x28 pixels / 255) and
``labels`` int64 [N] in 0..9, with N = 60000 for "train" and 10000 for "test". Files are looked up as
described in :mod:`l2l_fast.data.download` (``<dir>/mnist/<file>`` or ``<dir>/<file>``) and downloaded
into the cache folder, checksum-verified, when found nowhere.
"""
from __future__ import annotations

import functools
import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from .download import DATA_ENV, DatasetUnavailable, cache_dir, mirrors_from_env, search_dirs
from .download import download as fetch

__all__ = ["IDXError", "MNISTUnavailable", "MIRRORS", "MD5", "FILES", "read_idx", "mnist_paths", "load_mnist"]

#: Mirror base URLs, tried in order; ``$L2L_FAST_MNIST_MIRRORS`` (comma/space separated) replaces them.
MIRRORS = [
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
]
MIRRORS_ENV = "L2L_FAST_MNIST_MIRRORS"

#: Published MD5 of each .gz file; downloads must match.
MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}

#: split -> (images file, labels file), without the optional .gz suffix.
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# IDX type code -> big-endian numpy dtype
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class IDXError(ValueError):
    """An IDX file is corrupt, truncated, or not the MNIST file it should be."""


class MNISTUnavailable(DatasetUnavailable):
    """MNIST files found nowhere and not downloadable; the message says how to provide them."""


def _read_bytes(path: Path) -> bytes:
    """Whole file content, transparently gunzipped (detected from the gzip magic, not the name)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x1f\x8b":
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        raise IDXError(f"{path}: corrupt or truncated gzip stream ({e}); delete it and re-download") from e


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse one IDX file (gzip or raw) into a native-endian numpy array of the shape its header gives.

    Header: two zero bytes, a type code byte, a dimension count byte, then that many big-endian uint32
    sizes. Raises :class:`IDXError` on a bad magic, unknown type, or a body whose length does not match.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise IDXError(f"{path}: {len(data)} bytes, too short for an IDX header (4-byte magic number)")
    zero, code, ndim = struct.unpack_from(">HBB", data)
    if zero != 0 or code not in _IDX_DTYPES or ndim == 0:
        raise IDXError(f"{path}: bad IDX magic number 0x{data[:4].hex()} (expected 0x0000 <type> <ndim>, "
                       f"type one of {', '.join(f'0x{c:02x}' for c in _IDX_DTYPES)}, ndim >= 1); "
                       f"not an IDX file or corrupt")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IDXError(f"{path}: truncated IDX header ({len(data)} bytes, {header} needed for {ndim} dims)")
    dims = struct.unpack_from(f">{ndim}I", data, 4)
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise IDXError(f"{path}: {what}: {len(data)} bytes, but the header (dims {list(dims)}, "
                       f"dtype {dtype.name}) implies {expected}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


@functools.lru_cache(maxsize=8)
def _load(images_path: Path, labels_path: Path, _stamp: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    # _stamp (mtimes and sizes) only keys the cache, so a replaced file is re-read
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise IDXError(f"{images_path}: expected uint8 images of shape [N, 28, 28], "
                       f"got {images.dtype} {list(images.shape)}")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise IDXError(f"{labels_path}: expected uint8 labels of shape [N], got {labels.dtype} {list(labels.shape)}")
    if images.shape[0] != labels.shape[0]:
        raise IDXError(f"{images_path} has {images.shape[0]} images but {labels_path} has {labels.shape[0]} labels")
    if labels.size and labels.max() > 9:
        raise IDXError(f"{labels_path}: label {labels.max()} out of range 0..9")
    x = torch.from_numpy(images.reshape(images.shape[0], 784).astype(np.float32)).div_(255.0)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


def _hint(dirs: list[Path]) -> str:
    names = [n for pair in FILES.values() for n in pair]
    return (f"Provide MNIST yourself: put {', '.join(n + '.gz' for n in names)} (gzip or uncompressed, without "
            f".gz) in <dir>/mnist/ or <dir>/, then set {DATA_ENV}=<dir> or pass --data-dir <dir> "
            f"(data_dir=<dir>). Searched: {', '.join(map(str, dirs))}.")


def _find(name: str, dirs: list[Path]) -> Path | None:
    for d in dirs:
        for candidate in (d / name, d / (name + ".gz")):  # raw first: no decompression
            if candidate.is_file():
                return candidate.resolve()
    return None


def mnist_paths(split: str, data_dir: str | os.PathLike | None = None, *, download_missing: bool = True
                ) -> tuple[Path, Path]:
    """Resolved (images file, labels file) of ``split``, downloading the missing ones if allowed."""
    if split not in FILES:
        raise ValueError(f"split must be one of {sorted(FILES)}, got {split!r}")
    dirs = search_dirs(data_dir, "mnist")
    paths = []
    for name in FILES[split]:
        path = _find(name, dirs)
        if path is None:
            if not download_missing:
                raise MNISTUnavailable(f"MNIST file {name}(.gz) not found. {_hint(dirs)}")
            path = fetch(name + ".gz", MD5[name + ".gz"], cache_dir() / "mnist", mirrors_from_env(MIRRORS_ENV, MIRRORS),
                         hint=_hint(dirs), error=MNISTUnavailable).resolve()
        paths.append(path)
    return paths[0], paths[1]


def load_mnist(split: str = "train", data_dir: str | os.PathLike | None = None, *, download: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST ``split`` ("train" or "test") as (images float32 [N, 784] in [0, 1], labels int64 [N]).

    Cached per process on the resolved file paths: repeated calls return the same tensors, which callers
    must therefore not modify in place (``.clone()`` first).
    """
    images_path, labels_path = mnist_paths(split, data_dir, download_missing=download)
    stamp = tuple((s.st_mtime_ns, s.st_size) for s in (images_path.stat(), labels_path.stat()))
    return _load(images_path, labels_path, stamp)


load_mnist.cache_clear = _load.cache_clear  # type: ignore[attr-defined]
