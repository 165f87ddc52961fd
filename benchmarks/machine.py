"""Shared helpers of the benchmarks: what machine this is, what it can do, what a coordinate costs.

The limits are measured in the same run as the benchmark they judge (same process, same thread count),
never copied from a datasheet:
  compute limit (coordinates/s) = fp32 GEMM FLOP/s (torch.mm) / FLOPs per coordinate
  memory limit  (coordinates/s) = device-to-device copy bytes/s / bytes per coordinate (CUDA only)
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import torch
from torch.utils.benchmark import Measurement, Timer

__all__ = ["flops_per_coord", "state_bytes_per_coord", "bytes_per_coord", "ADAM_BYTES_PER_PARAM",
           "timeit", "gemm_flops", "copy_bandwidth", "machine_lines"]

# torch.optim.Adam, fp32: reads param, grad, exp_avg, exp_avg_sq (16 B) and writes param, exp_avg, exp_avg_sq (12 B).
ADAM_BYTES_PER_PARAM = 28


def flops_per_coord(hidden: int, layers: int, backward: bool = False) -> int:
    """FLOPs of one step for one coordinate, multiply-add = 2 FLOPs; activations and elementwise work not counted.

    Forward: layer 0 gates 4H x (2 inputs + H), layers above 4H x (H + H), output layer H.
    For hidden 20, layers 2: 2 * (1,760 + 3,200 + 20) = 9,960. Forward+backward counts 3x the forward (the
    backward has two products per forward product: one for the input gradient, one for the weight gradient).
    """
    forward = 2 * (4 * hidden * (2 + hidden) + 4 * hidden * (2 * hidden) * (layers - 1) + hidden)
    return 3 * forward if backward else forward


def state_bytes_per_coord(hidden: int, layers: int, element_size: int = 4) -> int:
    """Bytes of one coordinate's LSTM state [L, 2, H]: h and c of every layer."""
    return layers * 2 * hidden * element_size


def bytes_per_coord(hidden: int, layers: int, kind: str, state_element_size: int = 4) -> int:
    """Minimum memory traffic per coordinate (fp32 grad and param), with the weights counted as free (cached).

    step:   grad read 4 + param read and write 8 + state read and write 2 S.
    fwdbwd: forward reads grad and state, writes update and new_state (8 + 2 S); backward reads the two
            output gradients and the saved grad and state, writes d_grad and d_state (12 + 3 S): 20 + 5 S.
    S = state bytes per coordinate (320 for hidden 20, 2 layers, fp32): step 652 B, fwdbwd 1,620 B.
    """
    s = state_bytes_per_coord(hidden, layers, state_element_size)
    if kind == "step":
        return 4 + 8 + 2 * s
    if kind == "fwdbwd":
        return 20 + 5 * s
    raise ValueError(f"kind: expected 'step' or 'fwdbwd', got {kind!r}")


def timeit(fn, *, threads: int, min_run_time: float, min_samples: int = 3) -> Measurement:
    """Median-ready measurement of ``fn()`` with torch.utils.benchmark.Timer (synchronizes CUDA).

    blocked_autorange stops after ``min_run_time`` seconds, which for a call slower than that is a single
    sample; top up with single blocks until there are ``min_samples`` of them.
    """
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    measurement = timer.blocked_autorange(min_run_time=min_run_time)
    while len(measurement.times) < min_samples:
        extra = timer.timeit(measurement.number_per_run)
        measurement = Measurement.merge([measurement, extra])[0]
    return measurement


def gemm_flops(device: str, threads: int, size: int | None = None, min_run_time: float = 1.0) -> tuple[float, int]:
    """fp32 torch.mm FLOP/s of a size x size product on this device (TF32 as torch is set); returns (FLOP/s, size)."""
    size = size or (2048 if device == "cpu" else 8192)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, generator=gen)
    b = torch.randn(size, size, device=device, generator=gen)
    c = torch.empty(size, size, device=device)
    fn = lambda: torch.mm(a, b, out=c)  # noqa: E731
    fn()
    measurement = timeit(fn, threads=threads, min_run_time=min_run_time)
    return 2 * size**3 / measurement.median, size


def copy_bandwidth(device: str, threads: int, nbytes: int = 1 << 30, min_run_time: float = 1.0) -> float:
    """Device-to-device copy rate in bytes/s, counting the read and the write (2 x nbytes per copy)."""
    src = torch.empty(nbytes // 4, device=device).uniform_()
    dst = torch.empty_like(src)
    fn = lambda: dst.copy_(src)  # noqa: E731
    fn()
    measurement = timeit(fn, threads=threads, min_run_time=min_run_time)
    return 2 * nbytes / measurement.median


def cpu_model() -> str:
    """The model name, with the family and model numbers (virtual machines may say only "AMD EPYC": family 25 is
    Zen 3/4, 26 is Zen 5, whose AVX-512 units are twice as wide)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
                if not line.strip():
                    break
    except OSError:
        pass
    if "model name" not in fields:
        return platform.processor() or platform.machine()
    return f"{fields['model name']} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')})"


def _physical_cores() -> int | None:
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return None
    cores, physical_id = set(), None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            physical_id = value.strip()
        elif key == "core id":
            cores.add((physical_id, value.strip()))
    return len(cores) or None


def _nvidia_driver() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True)
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown (nvidia-smi failed)"


def _tf32_note() -> str:
    try:
        return "TF32 on" if torch.backends.cuda.matmul.allow_tf32 else "TF32 off (true fp32)"
    except Exception:  # noqa: BLE001 - newer torch may only have fp32_precision
        return f"fp32_precision={getattr(torch.backends.cuda.matmul, 'fp32_precision', '?')}"


def machine_lines(device: str, threads: int) -> list[str]:
    """Header lines: CPU (model, cores, ISA), torch and python versions, thread count; the GPU for cuda."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    physical = _physical_cores()
    cores = f"{os.cpu_count()} logical CPUs ({usable} usable" + (f", {physical} physical cores)" if physical else ")")
    load = ""
    if hasattr(os, "getloadavg"):  # other work on the machine shows up here before it shows up in the numbers
        load = ", load average (1 min) {:.2f} at start".format(os.getloadavg()[0])
    lines = [
        f"cpu      : {cpu_model()}, {cores}, ISA {torch.backends.cpu.get_cpu_capability()}{load}",
        f"software : torch {torch.__version__}, python {sys.version.split()[0]}, {platform.system()} "
        f"{platform.release()}, torch threads {threads}",
    ]
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        lines.append(f"gpu      : {props.name}, {props.total_memory / 2**30:.0f} GiB, "
                     f"{props.multi_processor_count} SMs, sm_{props.major}{props.minor}, driver {_nvidia_driver()}, "
                     f"CUDA (torch) {torch.version.cuda}, {_tf32_note()}")
    return lines
