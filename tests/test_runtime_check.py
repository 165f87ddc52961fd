"""The import-time check for an extension that carries its own C++ runtime (l2l_fast/_runtime_check.py)."""
from __future__ import annotations

import os
import sys
import warnings

import pytest

from conftest import requires_native
from l2l_fast._runtime_check import needed_libraries, warn_if_private_cxx_runtime


@requires_native
def test_built_extension_links_the_shared_cxx_runtime():
    from l2l_fast import _C

    needed = needed_libraries(_C.__file__)
    assert any(name.startswith("libstdc++") for name in needed), needed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_if_private_cxx_runtime(_C.__file__) is False


@requires_native
def test_a_cut_off_extension_is_an_error_not_a_warning(tmp_path):
    from l2l_fast import _C

    cut = tmp_path / "cut.so"
    cut.write_bytes(open(_C.__file__, "rb").read(4096))  # the header, then nothing
    with pytest.raises(ValueError, match="truncated"):
        needed_libraries(str(cut))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_if_private_cxx_runtime(str(cut)) is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF only")
def test_a_binary_without_libstdcxx_warns():
    python = os.path.realpath(sys.executable)  # a C program: libc, no libstdc++
    needed = needed_libraries(python)
    assert needed is not None and any(name.startswith("libc.so") for name in needed), needed
    with pytest.warns(RuntimeWarning, match="own copy of the C\\+\\+ runtime.*CXX=g\\+\\+"):
        assert warn_if_private_cxx_runtime(python) is True


def test_not_an_elf_file_is_left_alone(tmp_path):
    text = tmp_path / "not_elf.so"
    text.write_bytes(b"#!/bin/sh\necho hi\n")
    assert needed_libraries(str(text)) is None
    truncated = tmp_path / "truncated.so"
    truncated.write_bytes(b"\x7fELF\x02\x01\x01" + b"\0" * 9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_if_private_cxx_runtime(str(truncated)) is False
        assert warn_if_private_cxx_runtime(str(tmp_path / "missing.so")) is False
