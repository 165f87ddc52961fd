"""Where dataset files live, and fetching them when they are missing.

Resolution order for the data folder: an explicit ``data_dir`` argument, else the environment variable
``L2L_FAST_DATA``, else the cache folder (``$XDG_CACHE_HOME/l2l_fast`` or ``~/.cache/l2l_fast``). The cache
folder is always searched last, because that is where missing files are downloaded to.

Downloads use only ``urllib``: each mirror is tried in order, the bytes go to a temporary file in the
destination folder, and only a file whose MD5 matches the published checksum is moved into place with
``os.replace`` -- so a crash or a corrupt mirror never leaves a partial file under the real name.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterable, Sequence

__all__ = ["DatasetUnavailable", "cache_dir", "search_dirs", "mirrors_from_env", "download"]

DATA_ENV = "L2L_FAST_DATA"
_CHUNK = 1 << 20


class DatasetUnavailable(FileNotFoundError):
    """A dataset's files are in none of the searched folders and could not be downloaded (download disabled,
    or no mirror delivered a file with the expected checksum). The message says how to provide them."""


def cache_dir() -> Path:
    """The download folder: ``$XDG_CACHE_HOME/l2l_fast``, else ``~/.cache/l2l_fast``."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "l2l_fast"


def search_dirs(data_dir: str | os.PathLike | None, subdir: str) -> list[Path]:
    """Folders to look for a dataset's files in, best first.

    For each root (``data_dir`` or ``$L2L_FAST_DATA``, then the cache folder) both ``<root>/<subdir>`` and
    ``<root>`` itself are accepted, so ``L2L_FAST_DATA=../shared/datasets`` finds ``datasets/mnist/*``.
    """
    roots = []
    explicit = data_dir if data_dir is not None else os.environ.get(DATA_ENV) or None
    if explicit is not None:
        roots.append(Path(explicit).expanduser())
    roots.append(cache_dir())
    out: list[Path] = []
    for root in roots:
        for d in (root / subdir, root):
            if d not in out:
                out.append(d)
    return out


def mirrors_from_env(var: str, default: Sequence[str]) -> list[str]:
    """Mirror base URLs from ``$var`` (comma- or space-separated) if set, else ``default``."""
    value = os.environ.get(var, "").replace(",", " ").split()
    return value or list(default)


def download(filename: str, md5: str, dest_dir: Path, mirrors: Iterable[str], *, hint: str = "",
             timeout: float = 60.0, error: type[DatasetUnavailable] = DatasetUnavailable) -> Path:
    """Fetch ``<mirror>/<filename>`` into ``dest_dir/filename``, trying the mirrors in order.

    Returns the path of the verified file. Raises ``error`` (a :class:`DatasetUnavailable`, listing every
    mirror's failure and ``hint``, which should say how to provide the file by hand) if no mirror gives bytes
    with MD5 ``md5``; no file is then left in ``dest_dir``. ``timeout`` bounds each blocking socket operation.
    """
    dest_dir = Path(dest_dir)
    target = dest_dir / filename
    failures = []
    for base in mirrors:
        url = base.rstrip("/") + "/" + filename
        print(f"l2l_fast: downloading {url} -> {target}", file=sys.stderr)
        try:
            dest_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{filename}.", suffix=".part", dir=dest_dir)
        except OSError as e:
            raise error(f"cannot write into the download folder {dest_dir} ({e})\n{hint}".rstrip()) from e
        try:
            digest = hashlib.md5(usedforsecurity=False)
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
                while chunk := response.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
            got = digest.hexdigest()
            if got != md5:
                failures.append(f"{url}: md5 {got} does not match the expected {md5}")
                continue
            os.replace(tmp, target)
            return target
        except (OSError, ValueError, http.client.HTTPException) as e:  # URLError is an OSError
            failures.append(f"{url}: {type(e).__name__}: {e}")
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:  # moved into place
                pass
    tried = "\n  ".join(failures) or "(no mirrors configured)"
    raise error(f"could not download {filename} (md5 {md5}); tried:\n  {tried}\n{hint}".rstrip())
