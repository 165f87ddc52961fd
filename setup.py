"""Builds l2l_fast._C: the C++ CPU kernels always, the CUDA kernels when nvcc and a CUDA build of torch exist.

The CUDA decision looks at the toolchain (CUDA_HOME and torch.version.cuda), never at
torch.cuda.is_available(): a build machine without a GPU must still produce the CUDA kernels.
Set L2L_FAST_NO_CUDA=1 to force a CPU-only build, L2L_FAST_SANITIZE=1 for an ASan/UBSan build.
"""
import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def want_cuda() -> bool:
    if os.environ.get("L2L_FAST_NO_CUDA") == "1":
        return False
    return CUDA_HOME is not None and torch.version.cuda is not None and bool(sources("csrc/cuda/*.cu"))


def extension():
    cxx = ["-O3", "-fno-math-errno", "-Wno-psabi"]
    link = []
    if os.environ.get("L2L_FAST_SANITIZE") == "1":
        flags = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g"]
        cxx = ["-O1"] + flags
        link = flags
    cpp_sources = sources("csrc/*.cpp") + sources("csrc/cpu/*.cpp")
    include_dirs = [os.path.join(ROOT, "csrc")]
    if want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        return CUDAExtension("l2l_fast._C", cpp_sources + sources("csrc/cuda/*.cu") + sources("csrc/cuda/*.cpp"),
                             include_dirs=include_dirs, define_macros=[("L2L_FAST_WITH_CUDA", "1")],
                             # -lineinfo: source lines in compute-sanitizer and profiler reports, no run-time cost
                             extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
                             extra_link_args=link)
    return CppExtension("l2l_fast._C", cpp_sources, include_dirs=include_dirs,
                        extra_compile_args={"cxx": cxx}, extra_link_args=link)


setup(ext_modules=[extension()], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
