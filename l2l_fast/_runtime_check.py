"""Warns when the built extension carries its own copy of the C++ runtime.

A compiler wrapper that links libstdc++ statically (seen: the CUDA image's /opt/gcc/bin/g++, torch 2.11)
gives l2l_fast._C a second C++ runtime beside torch's. There, every error the extension raised was a
segfault instead of a Python exception; the same sources built with the system g++ raised cleanly.
The check reads the shared object's DT_NEEDED entries (ELF64 little-endian, i.e. Linux x86-64/arm64).
"""
from __future__ import annotations

import struct
import warnings

_PT_LOAD, _PT_DYNAMIC, _DT_NEEDED, _DT_STRTAB = 1, 2, 1, 5


def needed_libraries(path: str) -> list[str] | None:
    """The DT_NEEDED names of an ELF64 little-endian shared object; None when it is not one."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    loads, dynamic = [], None
    for i in range(phnum):
        p_type, _, p_offset, p_vaddr, _, p_filesz, _, _ = struct.unpack_from("<IIQQQQQQ", data, phoff + i * phentsize)
        if p_type == _PT_LOAD:
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == _PT_DYNAMIC:
            dynamic = (p_offset, p_filesz)
    if dynamic is None:
        return []
    entries = [struct.unpack_from("<qQ", data, dynamic[0] + k) for k in range(0, dynamic[1], 16)]
    strtab_vaddr = next((v for tag, v in entries if tag == _DT_STRTAB), None)
    strtab = next((off + strtab_vaddr - va for va, off, size in loads if va <= strtab_vaddr < va + size), None) \
        if strtab_vaddr is not None else None
    if strtab is None:
        return None
    return [data[strtab + v:data.index(b"\0", strtab + v)].decode() for tag, v in entries if tag == _DT_NEEDED]


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
