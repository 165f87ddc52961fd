"""A text corpus for character-level models: the fortune cookies of Debian's `fortunes` package.

    text = load_fortunes("train")    # str: 80% of the cookies (cookie i with i % 10 < 8), others val / test

Nothing is downloaded: install the package (``apt-get install fortunes``: quotations, literature, science,
songs and poems, in plain English, about 0.8 MB with the default files), or point ``$L2L_FAST_FORTUNES`` at a
folder of fortune files (cookies separated by lines holding a single ``%``).
"""
from __future__ import annotations

import functools
import os
import re
from pathlib import Path

from .download import DatasetUnavailable

__all__ = ["FORTUNES_ENV", "FORTUNE_DIRS", "DEFAULT_FILES", "VOCAB", "TextUnavailable", "fortunes_folder",
           "load_fortunes", "encode"]

FORTUNES_ENV = "L2L_FAST_FORTUNES"
FORTUNE_DIRS = ("/usr/share/games/fortunes", "/usr/share/fortune", "/usr/share/fortunes")  # Debian first
DEFAULT_FILES = ("literature", "wisdom", "science", "songs-poems", "humorists", "people", "education", "work")
#: the characters kept: newline and printable ASCII; everything else is dropped (tabs become spaces)
VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))
_SPLITS = {"train": range(0, 8), "val": (8,), "test": (9,)}


class TextUnavailable(DatasetUnavailable):
    """The corpus' files are not installed; the message says how to install them."""


def fortunes_folder() -> Path:
    """The folder of fortune files: $L2L_FAST_FORTUNES when set, else the first of FORTUNE_DIRS that exists."""
    given = os.environ.get(FORTUNES_ENV)
    candidates = [Path(given)] if given else [Path(d) for d in FORTUNE_DIRS]
    for folder in candidates:
        if folder.is_dir():
            return folder
    raise TextUnavailable(
        f"the text corpus (Debian's fortune cookies) is not installed: apt-get install fortunes "
        f"(or set {FORTUNES_ENV} to a folder of fortune files). Searched: {', '.join(map(str, candidates))}")


@functools.lru_cache(maxsize=8)
def _cookies(folder: str, files: tuple[str, ...]) -> tuple[str, ...]:
    cookies = []
    for name in files:
        path = Path(folder) / name
        if not path.is_file():
            raise TextUnavailable(f"{path}: no such fortune file (apt-get install fortunes installs "
                                  f"{', '.join(DEFAULT_FILES)})")
        raw = path.read_text(encoding="utf-8", errors="replace")
        raw = re.sub(r".\x08", "", raw).replace("\t", " ")  # overstrike (X backspace X) and tabs
        for cookie in re.split(r"\n%\n", raw):
            kept = "".join(ch for ch in cookie if ch in VOCAB).strip("\n")
            if kept:
                cookies.append(kept)
    return tuple(cookies)


def load_fortunes(split: str = "train", files: tuple[str, ...] = DEFAULT_FILES) -> str:
    """The cookies of `split` ("train", "val", "test": cookie i goes to train when i % 10 < 8, to val at 8,
    to test at 9), each ending with a blank line, in file order; characters outside VOCAB dropped."""
    if split not in _SPLITS:
        raise ValueError(f"split: expected 'train', 'val' or 'test', got {split!r}")
    cookies = _cookies(str(fortunes_folder()), tuple(files))
    return "".join(c + "\n\n" for i, c in enumerate(cookies) if i % 10 in _SPLITS[split])


def encode(text: str):
    """text -> int64 tensor of indices into VOCAB ([len(text)])."""
    import torch

    table = {ch: i for i, ch in enumerate(VOCAB)}
    return torch.tensor([table[ch] for ch in text], dtype=torch.int64)
