"""Warns when the built extension carries its own copy of the C++ runtime.

A compiler wrapper that links libstdc++ statically (seen: the CUDA image's /opt/gcc/bin/g++, torch 2.11)
gives l2l_fast._C a second C++ runtime beside torch's. There, every error the extension raised was a
segfault instead of a Python exception; the same sources built with the system g++ raised cleanly.
The check reads the shared object's DT_NEEDED entries (ELF64 little-endian, i.e. Linux x86-64/arm64).
"""
from __future__ import annotations

import struct
import warnings

_PT_LOAD, _PT_DYNAMIC, _DT_NEEDED, _DT_STRTAB, _DT_STRSZ = 1, 2, 1, 5, 10


def needed_libraries(path: str) -> list[str] | None:
    """The DT_NEEDED names of an ELF64 little-endian shared object; None when it is not one.

    Reads only the headers, the dynamic segment and the string table (a few KB of a many-MB file)."""
    with open(path, "rb") as f:
        def read(offset: int, size: int) -> bytes:
            f.seek(offset)
            data = f.read(size)
            if len(data) != size:
                raise ValueError("truncated ELF file")
            return data

        header = f.read(64)
        if header[:4] != b"\x7fELF" or header[4:6] != b"\x02\x01":
            return None
        if len(header) != 64:
            raise ValueError("truncated ELF file")
        phoff, = struct.unpack_from("<Q", header, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", header, 0x36)
        table = read(phoff, phentsize * phnum)
        loads, dynamic = [], None
        for i in range(phnum):
            p_type, _, p_offset, p_vaddr, _, p_filesz, _, _ = struct.unpack_from("<IIQQQQQQ", table, i * phentsize)
            if p_type == _PT_LOAD:
                loads.append((p_vaddr, p_offset, p_filesz))
            elif p_type == _PT_DYNAMIC:
                dynamic = read(p_offset, p_filesz)
        if dynamic is None:
            return []
        entries = [struct.unpack_from("<qQ", dynamic, k) for k in range(0, len(dynamic) - 15, 16)]
        tags = dict(entries)
        if _DT_STRTAB not in tags or _DT_STRSZ not in tags:
            return None
        vaddr = tags[_DT_STRTAB]
        offset = next((off + vaddr - va for va, off, size in loads if va <= vaddr < va + size), None)
        if offset is None:
            return None
        strings = read(offset, tags[_DT_STRSZ])
    return [strings[v:strings.index(b"\0", v)].decode() for tag, v in entries if tag == _DT_NEEDED]


def warn_if_private_cxx_runtime(path: str) -> bool:
    """Warns (and returns True) when the extension at path does not link libstdc++ dynamically."""
    try:
        needed = needed_libraries(path)
    except (OSError, struct.error, ValueError):
        return False
    if needed is None or any(name.startswith(("libstdc++", "libc++")) for name in needed):
        return False
    warnings.warn(
        f"{path} carries its own copy of the C++ runtime (the compiler that built it linked libstdc++ "
        "statically). Errors raised inside it can then crash the process instead of raising in Python. "
        "Rebuild with the system compiler: CC=gcc CXX=g++ pip install --no-build-isolation -e .",
        RuntimeWarning, stacklevel=3)
    return True
