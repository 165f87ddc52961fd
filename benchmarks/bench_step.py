"""How fast is one step of the coordinatewise LSTM optimizer, next to its baselines?

For every N, in one run and one process, with the same weights and thread count:
  step rows    fused in-place step (``net.step_``, native backend), eager reference step
               (``reference.lstm_step`` under no_grad, then param += update, state copied), torch.compile of
               that reference step, torch.optim.Adam (foreach; fused where the device supports it), step only;
               on CUDA also torch.optim.AdamW(fused=True) and the optimizer's multi-tensor step
               (``lstm_multi_step_`` with one tensor) with float32 and with bfloat16 state; with ``--gates ffma mma mma16``
               the fused step rows once per gate kernel (L2L_FAST_CUDA_GATES, csrc/cuda/gate_variant.h).
  fwd+bwd rows fused differentiable forward + backward (``update, new_state = net(grad, state)``, then
               torch.autograd.grad to the weights and the state with random output gradients), the same through
               the eager reference and through torch.compile of the reference; with ``--backward ffma mma mma_wgrad`` the
               fused row once per variant of the CUDA backward (L2L_FAST_CUDA_BACKWARD).
  precise rows on the CPU, the fused step_ and fwd+bwd again with the precise float activations (Cephes-style exp,
               the kernels' only ones before 2026-12-06: l2l_fast._C.set_cpu_activations("precise")), so that today's
               and the previous kernel are timed in one process; --ab-rounds R then alternates the two R more times
               and prints each round's ratio (fair under a load that drifts).
  bf16 rows    on the CPU, the fused step_ and fwd+bwd with single-bf16 gate products (AVX512_BF16's vdpbf16ps:
               l2l_fast.ops.set_cpu_products("bf16"), csrc/cpu/PRODUCTS.md; "n/a" where the CPU lacks it); --ab-rounds R
               alternates them with the float32 products too.
  nn.LSTM rows the user's alternative, one in each group: the net's weights in ``torch.nn.LSTM(I, H, L)`` and
               ``torch.nn.Linear(H, 1)`` (``net.lstm.to_torch()``), applied to the preprocessed gradients as a batch of
               N sequences of length 1, state (h, c) kept in nn.LSTM's own layout [L, N, H]; the step under no_grad
               (param += output_scale * Linear(output), h and c replaced), fwd+bwd by autograd to the weights and
               (h0, c0). It skips the non-finite policy (a NaN gradient reaches nn.LSTM), which costs the other
               rows a little.

Columns: median time (torch.utils.benchmark.Timer), million coordinates per second, speed-up over the eager
reference of the same group (eager time / row time) and over the nn.LSTM row of the group, % of the machine limit = FLOP/s
/ FLOPs per coordinate, both in the header; the FLOP/s are the larger of the fp32 GEMM rate and, on the CPU, the
measured FMA peak (fma_peak.py: torch's GEMM stays far below the vector units on AMD machines, where the fused rows
would read above 100% of a GEMM limit). On CUDA: billion coordinates per second, also the speed-up over
torch.compile of the reference, achieved GB/s (minimum bytes per coordinate x rate) and % of the HBM roofline
(achieved GB/s / the device-to-device copy bandwidth measured in the same run).

  python benchmarks/bench_step.py --threads 2                   # CPU, N = 1e4 1e5 1e6
  python benchmarks/bench_step.py --sizes 1e5 --markdown
  python benchmarks/bench_step.py --sizes 1e6 --no-compile --ab-rounds 5      # fast vs precise, float32 vs bf16
  python benchmarks/bench_step.py --sizes 1e6 --no-compile --ab-rounds 3 --ab-with bf16   # float32 vs bf16 only
  python benchmarks/bench_step.py --device cuda                 # N = 1e6 1e7 1e8
  python benchmarks/bench_step.py --device cuda --gates ffma mma mma16 --no-compile   # the CUDA gate kernels
  python benchmarks/bench_step.py --device cuda --backward ffma mma --no-compile      # the CUDA backward's reductions
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

try:
    import l2l_fast  # noqa: F401
except ImportError:  # run from a checkout without installing: the package sits next to benchmarks/
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import l2l_fast

from l2l_fast import CoordinatewiseLSTM, features, ops, reference  # noqa: E402

import machine  # noqa: E402

SANITY_ATOL = 1e-4
# one step with bfloat16 state (the stored h and c rounded to 8 bits): param within 1% of the largest update
BF16_SANITY_REL = 1e-2
# one step with bf16 gate products: update within 1% of the largest update (measured ~1e-3, csrc/cpu/PRODUCTS.md)
BF16_PRODUCTS_SANITY_REL = 1e-2


class Unavailable(Exception):
    """A row that cannot run here (missing kernel, unsupported option); its message goes in the table."""


# --------------------------------------------------------------------------------------------- workloads
# Each builder returns a zero-argument callable that does one timed unit of work; the tensors it needs are
# captured in its closure. test_bench_step.py uses the same builders.

def make_net(hidden: int, layers: int, device: str, backend: str) -> CoordinatewiseLSTM:
    """The same weights (seed 0) whatever the backend, so every row computes the same function."""
    torch.manual_seed(0)
    return CoordinatewiseLSTM(hidden, layers, backend=backend).to(device)


def make_inputs(net: CoordinatewiseLSTM, n: int, seed: int = 1):
    """param [n], grad [n], state [L, 2, H, n]; |grad| log-uniform in [1e-8, 10] so both preprocessing branches run."""
    device = net.out.weight.device
    gen = torch.Generator(device=device).manual_seed(seed)
    sign = torch.randint(0, 2, (n,), generator=gen, device=device) * 2 - 1
    magnitude = torch.empty(n, device=device).uniform_(math.log(1e-8), math.log(10.0), generator=gen).exp_()
    grad = sign * magnitude
    state = 0.1 * torch.randn(tuple(net.init_state(0).shape[:3]) + (n,), generator=gen, device=device)
    param = torch.randn(n, generator=gen, device=device)
    return param, grad, state


def step_fn(net: CoordinatewiseLSTM, n: int) -> Callable[[], None]:
    """net.step_(param, grad, state): param and state advance in place on every call."""
    param, grad, state = make_inputs(net, n)
    return lambda: net.step_(param, grad, state)


def fwdbwd_fn(net: CoordinatewiseLSTM, n: int, forward=None) -> Callable[[], object]:
    """Forward, then gradients of a random linear function of (update, new_state) to the weights and the state.

    forward(grad, state, weights) replaces net(grad, state), e.g. with a compiled reference.
    """
    _, grad, state = make_inputs(net, n)
    state.requires_grad_(True)
    weights = net.weights()
    gen = torch.Generator(device=grad.device).manual_seed(2)
    grad_update = torch.randn(grad.shape, generator=gen, device=grad.device)
    grad_state = torch.randn(state.shape, generator=gen, device=grad.device)

    def fn():
        update, new_state = net(grad, state) if forward is None else forward(grad, state, weights)
        return torch.autograd.grad((update, new_state), (*weights, state), (grad_update, grad_state))

    return fn


def torch_lstm_modules(net: CoordinatewiseLSTM) -> tuple[torch.nn.LSTM, torch.nn.Linear]:
    """torch.nn.LSTM(I, H, L) and torch.nn.Linear(H, 1) holding the net's weights."""
    lstm = net.lstm.to_torch()
    out = torch.nn.Linear(net.hidden_size, 1).to(net.out.weight.device)
    out.load_state_dict(net.out.state_dict())
    return lstm, out


def torch_lstm_state(state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """state [L, 2, H, n] -> (h, c), each [L, n, H] (nn.LSTM's layout), contiguous copies."""
    return state[:, 0].transpose(1, 2).contiguous(), state[:, 1].transpose(1, 2).contiguous()


def torch_lstm_forward(net, lstm, out, grad, h, c):
    """(update [n], h_n, c_n) by nn.LSTM: the features of grad [n] as a batch of n sequences of length 1."""
    x = features.compute(grad, net.feature_mask, net.preprocess_p)  # [n, I]
    y, (h, c) = lstm(x.unsqueeze(0), (h, c))
    return net.output_scale * out(y[0]).squeeze(1), h, c


def torch_lstm_step_fn(net: CoordinatewiseLSTM, n: int) -> Callable[[], None]:
    """The step through nn.LSTM under no_grad: param += update, (h, c) replaced by the new state."""
    if net.reads_moments or net.output != "linear":
        raise Unavailable("the nn.LSTM rows take the paper's features and linear output only")
    param, grad, state = make_inputs(net, n)
    lstm, out = torch_lstm_modules(net)
    hc = list(torch_lstm_state(state))

    def fn():
        with torch.no_grad():
            update, hc[0], hc[1] = torch_lstm_forward(net, lstm, out, grad, hc[0], hc[1])
            param.add_(update)

    return fn


def torch_lstm_fwdbwd_fn(net: CoordinatewiseLSTM, n: int) -> Callable[[], object]:
    """Forward through nn.LSTM, then autograd to its weights, the Linear's and (h0, c0); upstream gradients drawn
    as fwdbwd_fn draws them (moved to nn.LSTM's layout)."""
    if net.reads_moments or net.output != "linear":
        raise Unavailable("the nn.LSTM rows take the paper's features and linear output only")
    _, grad, state = make_inputs(net, n)
    lstm, out = torch_lstm_modules(net)
    h0, c0 = (t.requires_grad_(True) for t in torch_lstm_state(state))
    gen = torch.Generator(device=grad.device).manual_seed(2)
    grad_update = torch.randn(grad.shape, generator=gen, device=grad.device)
    grad_h, grad_c = torch_lstm_state(torch.randn(state.shape, generator=gen, device=grad.device))
    inputs = (*lstm.parameters(), *out.parameters(), h0, c0)

    def fn():
        update, h, c = torch_lstm_forward(net, lstm, out, grad, h0, c0)
        return torch.autograd.grad((update, h, c), inputs, (grad_update, grad_h, grad_c))

    return fn


def _reference_step_(param, grad, state, weights, preprocess_p: float, output_scale: float) -> None:
    # the eager reference's in-place step, written out so that torch.compile sees the mutations
    update, new_state = reference.lstm_step(grad, state, weights, preprocess_p, output_scale)
    param.add_(update)
    state.copy_(new_state)


def compiled_step_fn(net: CoordinatewiseLSTM, n: int) -> Callable[[], None]:
    torch._dynamo.reset()  # a static graph per N, as a user with one parameter size would get
    compiled = torch.compile(_reference_step_, dynamic=False)
    param, grad, state = make_inputs(net, n)
    weights = [w.detach() for w in net.weights()]

    def fn():
        with torch.no_grad():
            compiled(param, grad, state, weights, net.preprocess_p, net.output_scale)

    return fn


def compiled_fwdbwd_fn(net: CoordinatewiseLSTM, n: int) -> Callable[[], object]:
    torch._dynamo.reset()
    compiled = torch.compile(reference.lstm_step, dynamic=False)
    return fwdbwd_fn(net, n, lambda g, s, w: compiled(g, s, w, net.preprocess_p, net.output_scale))


def multi_step_fn(net: CoordinatewiseLSTM, n: int, state_dtype=torch.float32) -> Callable[[], None]:
    """The optimizer's multi-tensor in-place step on one tensor (float32 param, grad and weights), state in
    state_dtype (bfloat16 halves the state traffic); through the op itself: the module's checks want the
    state in the weights' dtype."""
    if not ops.HAS_NATIVE:
        raise Unavailable(f"l2l_fast._C not built ({ops.NATIVE_IMPORT_ERROR})")
    param, grad, state = make_inputs(net, n)
    state = state.to(state_dtype)
    weights = [w.detach() for w in net.weights()]
    op = torch.ops.l2l_fast.lstm_multi_step_
    return lambda: op([param], [grad], state, weights, net.preprocess_p, net.output_scale)


def adam_fn(n: int, device: str, cls=torch.optim.Adam, **flags) -> Callable[[], None]:
    """optimizer.step() on one parameter of n elements with its gradient preset; state created by a warm-up."""
    gen = torch.Generator(device=device).manual_seed(3)
    param = torch.nn.Parameter(torch.randn(n, generator=gen, device=device))
    param.grad = torch.randn(n, generator=gen, device=device)
    optimizer = cls([param], lr=1e-3, **flags)
    return optimizer.step


# --------------------------------------------------------------------------------------------- the table

@dataclasses.dataclass
class Row:
    name: str
    group: str                  # "step" or "fwdbwd": the eager baseline and the FLOP limit it is judged by
    build: Callable[[], Callable[[], object]]
    bytes_per_coord: float      # minimum traffic, for GB/s on CUDA
    counts_flops: bool = True   # False for Adam: the LSTM FLOP limit says nothing about it
    baseline: bool = False
    torch_lstm: bool = False    # the group's nn.LSTM row: the "vs nn.LSTM" column divides by its time
    activations: str | None = None  # CPU fused rows: the float activations to time them with ("precise")
    products: str | None = None     # CPU fused rows: the gate products to time them with ("bf16")
    warmup_calls: int = 1
    gates: str | None = None    # L2L_FAST_CUDA_GATES while the row is built, warmed up and timed
    backward: str | None = None  # L2L_FAST_CUDA_BACKWARD likewise
    compiled: bool = False      # report the (untimed) compile + warm-up time in the note
    seconds: float | None = None
    iqr: float | None = None    # interquartile range of the per-call times: the spread behind the median
    note: str = ""


def precise_rows(args) -> bool:
    """The CPU kernels can switch their float activations (a build from 2026-12-06 on)."""
    return args.device == "cpu" and args.backend == "native" and ops.HAS_NATIVE and hasattr(
        sys.modules.get("l2l_fast._C"), "set_cpu_activations")


class activations_set:
    """Runs the block with the CPU kernels' float activations set to `name` and their gate products to `products`
    (None: unchanged), then restores them."""

    def __init__(self, name: str | None, products: str | None = None):
        self.name, self.products, self.previous, self.previous_products = name, products, None, None

    def __enter__(self):
        from l2l_fast import _C
        if self.name is not None:
            self.previous = _C.cpu_activations()
            _C.set_cpu_activations(self.name)
        if self.products is not None:
            if not hasattr(_C, "set_cpu_products"):
                raise Unavailable("this build has no bf16 products")
            self.previous_products = _C.cpu_products()
            _C.set_cpu_products(self.products)  # RuntimeError where the CPU cannot: the row says so

    def __exit__(self, *exc):
        from l2l_fast import _C
        if self.previous_products is not None:
            _C.set_cpu_products(self.previous_products)
        if self.previous is not None:
            _C.set_cpu_activations(self.previous)


def rows_for(n: int, args, fused_net, ref_net) -> list[Row]:
    """fused_net None: the native extension is missing and the fused rows say so."""
    hidden, layers, device = args.hidden, args.layers, args.device

    def fused_net_or_skip():
        if fused_net is None:
            raise Unavailable(f"l2l_fast._C not built ({ops.NATIVE_IMPORT_ERROR})")
        return fused_net

    step_bytes = machine.bytes_per_coord(hidden, layers, "step")
    fwdbwd_bytes = machine.bytes_per_coord(hidden, layers, "fwdbwd")
    fused = "fused" if args.backend == "native" else "fused [reference backend: harness smoke test]"
    gate_rows = []  # the fused step rows, once per gate kernel asked for (CUDA)
    for gates in (args.gates if device == "cuda" else ["ffma"]):
        tag = "" if gates == "ffma" else f" [{gates}]"
        gate_rows.append(Row(f"{fused} step_{tag}", "step", lambda: step_fn(fused_net_or_skip(), n), step_bytes,
                             gates=gates))
        if device == "cuda":
            bf16_bytes = machine.bytes_per_coord(hidden, layers, "step", state_element_size=2)
            gate_rows += [Row(f"{fused} multi_step_, fp32 state{tag}", "step",
                              lambda: multi_step_fn(fused_net_or_skip(), n), step_bytes, gates=gates),
                          Row(f"{fused} multi_step_, bf16 state{tag}", "step",
                              lambda: multi_step_fn(fused_net_or_skip(), n, torch.bfloat16), bf16_bytes, gates=gates)]
    rows = [
        gate_rows[0],
        Row("eager reference step", "step", lambda: step_fn(ref_net, n), step_bytes, baseline=True),
    ]
    if precise_rows(args):
        rows.append(Row(f"{fused} step_ [precise activations]", "step", lambda: step_fn(fused_net_or_skip(), n),
                        step_bytes, activations="precise"))
        rows.append(Row(f"{fused} step_ [bf16 products]", "step", lambda: step_fn(fused_net_or_skip(), n),
                        step_bytes, products="bf16"))
    rows += [
        Row("torch.nn.LSTM step", "step", lambda: torch_lstm_step_fn(ref_net, n), step_bytes, torch_lstm=True),
    ]
    if not args.no_compile:
        rows.append(Row("torch.compile(reference) step", "step", lambda: compiled_step_fn(ref_net, n), step_bytes,
                        warmup_calls=2, compiled=True))
    rows += gate_rows[1:]
    rows += [
        Row("torch.optim.Adam(foreach=True) step", "step", lambda: adam_fn(n, device, foreach=True),
            machine.ADAM_BYTES_PER_PARAM, counts_flops=False, warmup_calls=2),
        Row("torch.optim.Adam(fused=True) step", "step", lambda: adam_fn(n, device, fused=True),
            machine.ADAM_BYTES_PER_PARAM, counts_flops=False, warmup_calls=2),
    ]
    if device == "cuda":
        rows.append(Row("torch.optim.AdamW(fused=True) step", "step",
                        lambda: adam_fn(n, device, torch.optim.AdamW, fused=True),
                        machine.ADAM_BYTES_PER_PARAM, counts_flops=False, warmup_calls=2))
    for backward in (args.backward if device == "cuda" else ["ffma"]):
        tag = "" if backward == "ffma" else f" [{backward} backward]"
        rows.append(Row(f"{fused} fwd+bwd{tag}", "fwdbwd", lambda: fwdbwd_fn(fused_net_or_skip(), n), fwdbwd_bytes,
                        backward=backward))
    rows += [
        Row("eager reference fwd+bwd", "fwdbwd", lambda: fwdbwd_fn(ref_net, n), fwdbwd_bytes, baseline=True),
    ]
    if precise_rows(args):
        rows.append(Row(f"{fused} fwd+bwd [precise activations]", "fwdbwd", lambda: fwdbwd_fn(fused_net_or_skip(), n),
                        fwdbwd_bytes, activations="precise"))
        rows.append(Row(f"{fused} fwd+bwd [bf16 products]", "fwdbwd", lambda: fwdbwd_fn(fused_net_or_skip(), n),
                        fwdbwd_bytes, products="bf16"))
    rows += [
        Row("torch.nn.LSTM fwd+bwd", "fwdbwd", lambda: torch_lstm_fwdbwd_fn(ref_net, n), fwdbwd_bytes,
            torch_lstm=True),
    ]
    if not args.no_compile:
        rows.append(Row("torch.compile(reference) fwd+bwd", "fwdbwd", lambda: compiled_fwdbwd_fn(ref_net, n),
                        fwdbwd_bytes, warmup_calls=2, compiled=True))
    return rows


def _short(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip().splitlines()[0]
    return text if len(text) <= 110 else text[:107] + "..."


def measure(row: Row, args) -> None:
    """Build, warm up (compile time reported, not timed), time; failures become the row's note."""
    variables = {"L2L_FAST_CUDA_GATES": row.gates, "L2L_FAST_CUDA_BACKWARD": row.backward}
    saved = {name: os.environ.get(name) for name in variables}
    for name, value in variables.items():
        if value is not None:
            os.environ[name] = value
    try:
        with activations_set(row.activations, row.products):
            _measure(row, args)
    except Unavailable as error:
        row.note = f"n/a: {error}"
    except Exception as error:  # noqa: BLE001 - a baseline that fails here is reported, not fatal
        row.note = f"n/a: {_short(error)}"
    finally:
        # restored here: _measure cannot see `saved` (a NameError there was once every row's note)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()


def _measure(row: Row, args) -> None:
    fn = None
    try:
        start = time.perf_counter()
        fn = row.build()
        for _ in range(row.warmup_calls):
            fn()
        if args.device == "cuda":
            torch.cuda.synchronize()
        if row.compiled:
            row.note = f"compile + warm-up {time.perf_counter() - start:.1f} s, excluded"
        measurement = machine.timeit(fn, threads=args.threads, min_run_time=args.min_run_time)
        row.seconds, row.iqr = measurement.median, measurement.iqr
    finally:
        del fn


def render(n: int, rows: list[Row], limits: dict, args) -> str:
    cuda = args.device == "cuda"
    baseline = {r.group: r.seconds for r in rows if r.baseline}
    compiled = {r.group: r.seconds for r in rows if r.compiled}
    torch_lstm = {r.group: r.seconds for r in rows if r.torch_lstm}
    if cuda:
        header = ["row", "time ms (median)", "IQR %", "Gcoord/s", "vs eager", "vs nn.LSTM", "vs compile",
                  "% FLOP limit", "GB/s", "% HBM roofline"]
    else:
        header = ["row", "time ms (median)", "IQR %", "Mcoord/s", "vs eager", "vs nn.LSTM", "% FLOP limit"]
    header.append("note")
    table = []
    for r in rows:
        if r.seconds is None:
            cells = [r.name] + ["-"] * (len(header) - 2) + [r.note]
        else:
            rate = n / r.seconds
            base = baseline.get(r.group)
            cells = [r.name, f"{r.seconds * 1e3:.3f}", f"{100 * r.iqr / r.seconds:.0f}",
                     f"{rate / 1e9:.3f}" if cuda else f"{rate / 1e6:.2f}", f"{base / r.seconds:.2f}x" if base else "-"]
            lstm_time = torch_lstm.get(r.group)
            cells.append(f"{lstm_time / r.seconds:.2f}x" if lstm_time else "-")
            if cuda:
                comp = compiled.get(r.group)
                cells.append(f"{comp / r.seconds:.2f}x" if comp else "-")
            cells.append(f"{100 * rate / limits[r.group]:.1f}%" if r.counts_flops else "-")
            if cuda:
                gbps = rate * r.bytes_per_coord / 1e9
                cells += [f"{gbps:.0f}", f"{100 * gbps * 1e9 / limits['copy']:.1f}%"]
            cells.append(r.note)
        table.append(cells)
    title = f"N = {n:,} coordinates"
    if args.markdown:
        rule = "|" + "|".join(["---"] + ["---:"] * (len(header) - 2) + ["---"]) + "|"
        lines = [f"### {title}", "", "| " + " | ".join(header) + " |", rule]
        lines += ["| " + " | ".join(cells) + " |" for cells in table]
        return "\n".join(lines) + "\n"
    widths = [max(len(c[i]) for c in [header] + table) for i in range(len(header))]
    fmt = lambda cells: "  ".join(  # noqa: E731
        c.ljust(w) if i in (0, len(cells) - 1) else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([title, fmt(header), fmt(["-" * w for w in widths])] + [fmt(c) for c in table]) + "\n"


# --ab-with: each variant is timed alternately with the default kernels (fast activations, float32 products):
# (what is compared, settings of the default, of the variant, names of the two, True: the speed-up is the variant's)
AB_VARIANTS = {
    "precise": ("fast vs precise activations", dict(name="fast"), dict(name="precise"), ("fast", "precise"), False),
    "bf16": ("float32 vs bf16 gate products", dict(name="fast", products="float32"), dict(name="fast", products="bf16"),
             ("float32", "bf16"), True),
}


def ab_rounds(n: int, fused_net, args, variant: str) -> str:
    """The default kernels vs one variant (AB_VARIANTS), alternating (default, variant) args.ab_rounds times per
    workload: a load that drifts during the run hits both alike. Per round the median of each and their ratio."""
    title, default, setting, (a, b), variant_faster = AB_VARIANTS[variant]
    ratio_name = f"{a} / {b}" if variant_faster else f"{b} / {a}"
    lines = [f"A/B at N = {n:,}: fused rows with {title}, {args.ab_rounds} alternating rounds "
             f"(median ms of each; speed-up = {ratio_name})"]
    for name, build in (("step_", step_fn), ("fwd+bwd", fwdbwd_fn)):
        fn, ratios, cells = build(fused_net, n), [], []
        try:
            for _ in range(args.ab_rounds):
                times = []
                for config in (default, setting):
                    with activations_set(**config):
                        fn()
                        times.append(machine.timeit(fn, threads=args.threads, min_run_time=args.min_run_time).median)
                ratios.append(times[0] / times[1] if variant_faster else times[1] / times[0])
                cells.append(f"{times[0] * 1e3:.1f}/{times[1] * 1e3:.1f}")
        except (RuntimeError, Unavailable) as error:  # e.g. no AVX512_BF16 here
            lines.append(f"  {name:8s} n/a: {_short(error)}")
            continue
        finally:
            del fn
            gc.collect()
        lines.append(f"  {name:8s} rounds {a}/{b} ms: {', '.join(cells)}; speed-up per round "
                     f"{', '.join(f'{r:.3f}' for r in ratios)}; median {statistics.median(ratios):.3f}x")
    if hasattr(os, "getloadavg"):
        lines.append(f"  load average (1 min) {os.getloadavg()[0]:.2f} after the rounds")
    return "\n".join(lines) + "\n"


def sanity_check(n: int, fused_net, ref_net) -> str:
    """The fused kernels and the nn.LSTM rows compute the same function as the reference (to SANITY_ATOL): else the
    table means nothing."""
    param, grad, state = make_inputs(fused_net, n)
    with torch.no_grad():
        update_fused, _ = fused_net(grad, state)
        update_ref, _ = ref_net(grad, state)
        lstm, out = torch_lstm_modules(ref_net)
        update_lstm = torch_lstm_forward(ref_net, lstm, out, grad, *torch_lstm_state(state))[0]
        param_fused, state_fused = param.clone(), state.clone()
        fused_net.step_(param_fused, grad, state_fused)
        ref_net.step_(param, grad, state)
    diffs = {"update (forward)": (update_fused - update_ref).abs().max().item(),
             "nn.LSTM update": (update_lstm - update_ref).abs().max().item(),
             "param (step_)": (param_fused - param).abs().max().item(),
             "state (step_)": (state_fused - state).abs().max().item()}
    bad = {k: v for k, v in diffs.items() if not v <= SANITY_ATOL}
    if bad:
        raise SystemExit(f"sanity check failed at N={n}: fused differs from the reference by {bad} > {SANITY_ATOL}")
    return ", ".join(f"{k} {v:.1e}" for k, v in diffs.items())


def bf16_products_sanity_check(n: int, fused_net, ref_net) -> str:
    """The [bf16 products] rows compute the reference's update to within BF16_PRODUCTS_SANITY_REL of the largest
    update (their error: csrc/cpu/PRODUCTS.md); a CPU without AVX512_BF16 says so here and in the rows."""
    _, grad, state = make_inputs(fused_net, n)
    try:
        with activations_set(None, "bf16"), torch.no_grad():
            update_bf16, _ = fused_net(grad, state)
    except (RuntimeError, Unavailable) as error:
        return f"[bf16 products] n/a: {_short(error)}"
    with torch.no_grad():
        update_ref, _ = ref_net(grad, state)
    rel = ((update_bf16 - update_ref).abs().max() / update_ref.abs().max()).item()
    if not rel <= BF16_PRODUCTS_SANITY_REL:
        raise SystemExit(f"sanity check failed at N={n}: bf16 products update off by {rel:.1e} of the largest update "
                         f"(> {BF16_PRODUCTS_SANITY_REL})")
    return f"[bf16 products] update within {rel:.1e} of max |update| of the reference (<= {BF16_PRODUCTS_SANITY_REL})"


def multi_step_sanity_check(n: int, fused_net) -> str:
    """The multi-tensor step rows compute what step_ computes: bit for bit with float32 state, within
    BF16_SANITY_REL of the largest update with bfloat16 state (one step from the same rounded state)."""
    param, grad, state = make_inputs(fused_net, n)
    state = state.to(torch.bfloat16).float()  # a start both state dtypes hold exactly
    weights = [w.detach() for w in fused_net.weights()]
    p, scale = fused_net.preprocess_p, fused_net.output_scale
    param_step, state_step = param.clone(), state.clone()
    fused_net.step_(param_step, grad, state_step)
    param_f32, state_f32 = param.clone(), state.clone()
    torch.ops.l2l_fast.lstm_multi_step_([param_f32], [grad], state_f32, weights, p, scale)
    param_bf16, state_bf16 = param.clone(), state.to(torch.bfloat16)
    torch.ops.l2l_fast.lstm_multi_step_([param_bf16], [grad], state_bf16, weights, p, scale)
    fp32_equal = torch.equal(param_f32, param_step) and torch.equal(state_f32, state_step)
    bf16_rel = ((param_bf16 - param_step).abs().max() / (param_step - param).abs().max()).item()
    if not fp32_equal or not bf16_rel <= BF16_SANITY_REL:
        raise SystemExit(f"sanity check failed at N={n}: multi_step_ fp32 state equal to step_: {fp32_equal}; "
                         f"bf16 state param deviation {bf16_rel:.1e} of the largest update (> {BF16_SANITY_REL})")
    return f"multi_step_ fp32 state == step_ bit for bit, bf16 state param within {bf16_rel:.1e} of max |update|"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=float, nargs="+", default=None,
                        help="numbers of coordinates N (floats like 1e6 are fine; default 1e4 1e5 1e6 on the CPU, "
                             "1e6 1e7 1e8 on CUDA)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help=f"torch CPU threads for every row and the GEMM (default {torch.get_num_threads()})")
    parser.add_argument("--hidden", type=int, default=20)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--min-run-time", type=float, default=1.0,
                        help="seconds of timing per row (Timer.blocked_autorange; at least 3 samples)")
    parser.add_argument("--gemm-size", type=int, default=None,
                        help="side of the fp32 torch.mm that sets the FLOP limit (default 2048 CPU, 8192 CUDA)")
    parser.add_argument("--backend", choices=("native", "reference"), default="native",
                        help="backend of the fused rows; 'reference' only smoke-tests this script without _C")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows (slow to compile)")
    parser.add_argument("--markdown", action="store_true", help="print markdown tables")
    parser.add_argument("--gates", choices=("ffma", "mma", "mma16"), nargs="+", default=["ffma"],
                        help="CUDA: the gate kernels of the fused step rows (L2L_FAST_CUDA_GATES; default ffma)")
    parser.add_argument("--backward", choices=("ffma", "mma", "mma_wgrad"), nargs="+", default=["ffma"],
                        help="CUDA: the backward variants of the fused fwd+bwd rows (L2L_FAST_CUDA_BACKWARD; "
                             "mma: every product on tensor cores, mma_wgrad: the weight gradients only; default ffma)")
    parser.add_argument("--ab-rounds", type=int, default=0,
                        help="CPU: after each table, time the fused step_ and fwd+bwd with the default kernels and "
                             "each --ab-with variant alternately this many more times and print the per-round ratios")
    parser.add_argument("--ab-with", choices=sorted(AB_VARIANTS), nargs="+", default=["precise", "bf16"],
                        help="CPU: the variants of the A/B rounds: the precise activations, the bf16 gate products")
    args = parser.parse_args(argv)
    if args.sizes is None:
        args.sizes = [1e6, 1e7, 1e8] if args.device == "cuda" else [1e4, 1e5, 1e6]
    sizes = []
    for size in args.sizes:
        if not (size >= 1 and float(size).is_integer()):
            parser.error(f"--sizes: expected whole numbers >= 1, got {size}")
        sizes.append(int(size))
    args.sizes = sizes
    if args.threads < 1:
        parser.error(f"--threads: expected >= 1, got {args.threads}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda, but torch.cuda.is_available() is False (torch {torch.__version__}, "
                     f"built for CUDA {torch.version.cuda or 'none: a CPU-only build'}); run on a machine with a GPU "
                     "and a CUDA build of torch, or use --device cpu")
    return args


def cpu_fma_peak(threads: int) -> tuple[str | None, float | None, str]:
    """(ISA, FLOP/s, "") of this CPU's float32 FMA peak at the kernels' vector width (fma_peak.py, compiled with gcc
    here), or (None, None, why not)."""
    import fma_peak
    isa = "avx2"
    if ops.HAS_NATIVE:
        from l2l_fast import _C
        isa = "avx512" if _C.cpu_isa().startswith("avx512") else "avx2"
    try:
        return isa, 1e9 * fma_peak.peak(isa, threads, iters=50_000_000), ""
    except (OSError, subprocess.CalledProcessError, ValueError) as error:
        return None, None, f"{type(error).__name__}: {error}"


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = args.device
    if args.backend == "native" and not ops.HAS_NATIVE:
        native = f"not built ({ops.NATIVE_IMPORT_ERROR}); fused rows are n/a"
    else:
        native = f"kernels for {sorted(ops.native_devices()) or 'none'}"

    gemm, gemm_size = machine.gemm_flops(device, args.threads, args.gemm_size, args.min_run_time)
    fma_isa, fma, fma_note = cpu_fma_peak(args.threads) if device == "cpu" else (None, None, "")
    flop_rate = max(gemm, fma or 0.0)
    fwd_flops = machine.flops_per_coord(args.hidden, args.layers)
    fwdbwd_flops = machine.flops_per_coord(args.hidden, args.layers, backward=True)
    limits = {"step": flop_rate / fwd_flops, "fwdbwd": flop_rate / fwdbwd_flops}
    lines = [f"bench_step: one learned-optimizer step over N coordinates; hidden {args.hidden}, layers {args.layers}, "
             f"fp32, device {device}",
             f"command  : {' '.join([os.path.basename(sys.executable)] + sys.argv)}"]
    lines += machine.machine_lines(device, args.threads)
    lines.append(f"l2l_fast : {l2l_fast.__version__}, native {native}; fused rows use backend={args.backend!r}")
    if precise_rows(args):
        from l2l_fast import _C
        lines.append(f"kernels  : CPU {_C.cpu_isa()}, float activations {_C.cpu_activations()} (the [precise "
                     f"activations] rows: precise), gate products {getattr(_C, 'cpu_products', lambda: 'float32')()} "
                     "(the [bf16 products] rows: bf16)")
    lines.append(f"GEMM     : fp32 torch.mm {gemm_size}x{gemm_size} = {gemm / 1e9:,.1f} GFLOP/s")
    if device == "cpu":
        lines.append(f"FMA peak : {fma_isa} float32 FMAs, {args.threads} threads = {fma / 1e9:,.1f} GFLOP/s "
                     "(benchmarks/fma_peak.py)" if fma else f"FMA peak : not measured ({fma_note})")
    source = "FMA peak" if flop_rate > gemm else "GEMM"
    lines.append(f"limit    : {source} / FLOP: step {fwd_flops:,} FLOP/coord -> {limits['step'] / 1e6:,.2f} Mcoord/s; "
                 f"fwd+bwd {fwdbwd_flops:,} FLOP/coord (3x forward) -> {limits['fwdbwd'] / 1e6:,.2f} Mcoord/s")
    if device == "cuda":
        limits["copy"] = machine.copy_bandwidth(device, args.threads, min_run_time=args.min_run_time)
        step_bytes = machine.bytes_per_coord(args.hidden, args.layers, "step")
        fwdbwd_bytes = machine.bytes_per_coord(args.hidden, args.layers, "fwdbwd")
        lines.append(f"memory   : device copy {limits['copy'] / 1e9:,.0f} GB/s (read + write); "
                     f"step {step_bytes} B/coord -> {limits['copy'] / step_bytes / 1e9:,.2f} Gcoord/s; "
                     f"fwd+bwd {fwdbwd_bytes} B/coord; "
                     f"Adam {machine.ADAM_BYTES_PER_PARAM} B/param")
    if device == "cuda":
        lines.append("columns  : vs eager / vs nn.LSTM / vs compile = eager reference / torch.nn.LSTM / "
                     "torch.compile(reference) time over row time, same group (step rows vs step, fwd+bwd vs fwd+bwd); % FLOP limit = coord/s / limit above; "
                     "GB/s = coord/s x minimum B/coord; % HBM roofline = GB/s / device copy GB/s; IQR % = spread of "
                     "the per-call times / median")
    else:
        lines.append("columns  : vs eager, vs nn.LSTM = eager reference / torch.nn.LSTM time over row time, same group "
                     "(step rows vs the step rows, fwd+bwd rows vs the fwd+bwd rows); % FLOP limit = Mcoord/s / limit above; IQR % = spread of the "
                     "per-call times / median")

    fused_net = None
    if args.backend == "reference" or ops.HAS_NATIVE:
        fused_net = make_net(args.hidden, args.layers, device, args.backend)
    ref_net = make_net(args.hidden, args.layers, device, "reference")
    if args.backend == "reference" or device in ops.native_devices():
        lines.append(f"sanity   : fused vs reference at N={min(args.sizes):,}, max |diff| "
                     f"{sanity_check(min(args.sizes), fused_net, ref_net)} (<= {SANITY_ATOL})")
    if precise_rows(args) and fused_net is not None:
        lines.append(f"sanity   : {bf16_products_sanity_check(min(args.sizes), fused_net, ref_net)}")
    if device == "cuda" and args.backend == "native" and device in ops.native_devices():
        lines.append(f"sanity   : {multi_step_sanity_check(min(args.sizes), fused_net)}")
        for gates in args.gates:
            if gates != "ffma":
                os.environ["L2L_FAST_CUDA_GATES"] = gates
                try:
                    lines.append(f"sanity   : [{gates}] fused vs reference at N={min(args.sizes):,}, max |diff| "
                                 f"{sanity_check(min(args.sizes), fused_net, ref_net)} (<= {SANITY_ATOL})")
                finally:
                    os.environ.pop("L2L_FAST_CUDA_GATES", None)
    print("\n".join(["```text"] + lines + ["```", ""] if args.markdown else lines + [""]), flush=True)

    for n in args.sizes:
        rows = rows_for(n, args, fused_net, ref_net)
        for row in rows:
            measure(row, args)
        print(render(n, rows, limits, args), flush=True)
        if args.ab_rounds > 0 and precise_rows(args) and fused_net is not None:
            for variant in args.ab_with:
                print(ab_rounds(n, fused_net, args, variant), flush=True)
    if hasattr(os, "getloadavg"):  # other work during the run makes every number above pessimistic
        print(f"load average (1 min) {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
