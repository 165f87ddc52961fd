"""How fast is LearnedOptimizer on a real model, next to a naive learned optimizer and Adam?

A small decoder-style transformer built from torch.nn (token embedding, pre-norm TransformerEncoderLayers with a
causal mask, LM head; >= 10M parameters, ~100 tensors of very different sizes), next-token cross-entropy.
In one run and one process, with the same thread count, for every optimizer:
  optimizer step  opt.step() alone, gradients of one backward kept fixed (state and parameters advance per call)
  training step   zero_grad, forward, backward, opt.step() on a fixed batch

Optimizers: LearnedOptimizer (fused lstm_multi_step_, one call for all tensors) with float32 and bfloat16 state;
a naive per-tensor learned optimizer (a Python loop calling l2l_fast.reference.lstm_step on each parameter
tensor: the same function, written the obvious way); torch.optim.Adam(foreach=True) and Adam(fused=True).
The learned optimizers use the shipped MNIST net (hidden 20, 2 layers).

Rounds: every row is timed once per round, rows in turn, so that load from other work on a shared machine falls
on all rows alike (the naive row takes most of a minute per call). Columns: median time
(torch.utils.benchmark.Timer), million parameters stepped per second, speed-up over the naive learned optimizer
(naive time / row time), optimizer state bytes per parameter.

  python benchmarks/bench_optimizer.py --markdown
  python benchmarks/bench_optimizer.py --layers 2 --d-model 128 --min-run-time 0.5   # quick smoke run
  python benchmarks/bench_optimizer.py --rows "bf16 state" --step-only   # one row, for A/B runs of two builds
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Callable

import torch
from torch import nn
from torch.utils.benchmark import Measurement

try:
    import l2l_fast  # noqa: F401
except ImportError:  # run from a checkout without installing: the package sits next to benchmarks/
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import l2l_fast

from l2l_fast import CoordinatewiseLSTM, LearnedOptimizer, ops, reference  # noqa: E402

import machine  # noqa: E402

SANITY_ATOL = 1e-4


class TinyTransformer(nn.Module):
    """Token + position embedding, `layers` pre-norm encoder layers under a causal mask, final norm, LM head."""

    def __init__(self, vocab: int, d_model: int, layers: int, heads: int, seq: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.position = nn.Parameter(0.02 * torch.randn(seq, d_model))
        layer = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)

    def forward(self, tokens):
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        x = self.blocks(x, mask=self.mask[: tokens.shape[1], : tokens.shape[1]], is_causal=True)
        return self.head(self.norm(x))


class NaiveLearnedOptimizer(torch.optim.Optimizer):
    """The same learned optimizer written the obvious way: per parameter tensor, l2l_fast.reference.lstm_step on
    its flattened gradient and its own state [L, 2, H, numel], then param += update."""

    def __init__(self, params, net: CoordinatewiseLSTM):
        super().__init__(params, dict(net=net))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            net = group["net"]
            weights = [w.detach() for w in net.weights()]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "lstm_state" not in state:
                    state["lstm_state"] = net.init_state(p.numel())
                update, new_state = reference.lstm_step(p.grad.reshape(-1), state["lstm_state"], weights,
                                                        net.preprocess_p, net.output_scale)
                p.add_(update.view_as(p))
                state["lstm_state"] = new_state


@dataclasses.dataclass
class Row:
    name: str
    make: Callable[[nn.Module], torch.optim.Optimizer]
    state_bytes: str
    step: Measurement | None = None
    train: Measurement | None = None
    note: str = ""
    model: nn.Module | None = None
    opt: torch.optim.Optimizer | None = None


def make_model(args) -> nn.Module:
    torch.manual_seed(0)
    return TinyTransformer(args.vocab, args.d_model, args.layers, args.heads, args.seq)


def make_batch(args):
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def loss_of(model, batch):
    inputs, targets = batch
    logits = model(inputs)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def rows_for(net: CoordinatewiseLSTM) -> list[Row]:
    return [
        Row("LearnedOptimizer (fp32 state)", lambda m: LearnedOptimizer(m.parameters(), net), "320"),
        Row("LearnedOptimizer (bf16 state)", lambda m: LearnedOptimizer(m.parameters(), net,
                                                                         state_dtype=torch.bfloat16), "160"),
        Row("naive per-tensor learned (reference)", lambda m: NaiveLearnedOptimizer(m.parameters(), net), "320"),
        Row("torch.optim.Adam(foreach=True)", lambda m: torch.optim.Adam(m.parameters(), 1e-4, foreach=True), "8"),
        Row("torch.optim.Adam(fused=True)", lambda m: torch.optim.Adam(m.parameters(), 1e-4, fused=True), "8"),
    ]


def set_up(row: Row, args, batch) -> None:
    """Model, optimizer, gradients of one backward, one warm-up step (creates lazy state)."""
    row.model = make_model(args)
    try:
        row.opt = row.make(row.model)
    except (RuntimeError, ValueError) as error:  # e.g. a fused Adam this build lacks
        row.note = f"unavailable: {error}"
        return
    row.opt.zero_grad()
    loss_of(row.model, batch).backward()
    started = time.perf_counter()
    row.opt.step()
    row.note = f"first step {1e3 * (time.perf_counter() - started):,.0f} ms"


def measure_round(row: Row, args, batch) -> None:
    """One round: opt.step() alone (gradients kept), then whole training steps; merged into the row's
    measurements. Rounds alternate between the rows, so load from other work on the machine spreads over all."""
    if row.opt is None:
        return
    model, opt = row.model, row.opt

    def train_step():
        opt.zero_grad()
        loss_of(model, batch).backward()
        opt.step()

    budget = args.min_run_time / args.rounds
    step = machine.timeit(opt.step, threads=args.threads, min_run_time=budget, min_samples=1)
    row.step = step if row.step is None else Measurement.merge([row.step, step])[0]
    if args.step_only:
        return
    train_step()  # restores the gradients opt.step above kept reusing
    train = machine.timeit(train_step, threads=args.threads, min_run_time=budget, min_samples=1)
    row.train = train if row.train is None else Measurement.merge([row.train, train])[0]


def sanity_check(args, net, batch) -> str:
    """One step of LearnedOptimizer and of the naive optimizer from the same model and gradients agree."""
    fused_model, naive_model = make_model(args), make_model(args)
    for model in (fused_model, naive_model):
        loss_of(model, batch).backward()
    LearnedOptimizer(fused_model.parameters(), net).step()
    NaiveLearnedOptimizer(naive_model.parameters(), net).step()
    diff = max((p - q).abs().max().item() for p, q in zip(fused_model.parameters(), naive_model.parameters()))
    moved = max((p - q).abs().max().item() for p, q in zip(fused_model.parameters(), make_model(args).parameters()))
    if not diff <= SANITY_ATOL or not moved > 0:
        raise SystemExit(f"sanity check failed: fused vs naive max |diff| {diff:.2e} (> {SANITY_ATOL}), moved {moved}")
    return f"fused vs naive after one step: max |param diff| {diff:.1e} (<= {SANITY_ATOL}); largest update {moved:.1e}"


def render(rows: list[Row], n_params: int, markdown: bool) -> str:
    naive = next((r for r in rows if r.name.startswith("naive")), Row("naive", None, ""))
    header = ["optimizer", "opt step ms", "IQR %", "Mparam/s", "step vs naive", "train step ms", "IQR %",
              "train vs naive", "opt share of train step", "state B/param", "samples", "note"]
    table = []
    for r in rows:
        if r.step is None:
            table.append([r.name] + ["-"] * (len(header) - 4) + [r.state_bytes, "-", r.note])
            continue
        step = r.step.median
        train_cells = ["-"] * 4
        if r.train is not None:
            train = r.train.median
            train_cells = [f"{1e3 * train:,.1f}", f"{100 * r.train.iqr / train:.0f}",
                           f"{naive.train.median / train:.1f}x" if naive.train else "-", f"{100 * step / train:.0f}%"]
        table.append([r.name, f"{1e3 * step:,.1f}", f"{100 * r.step.iqr / step:.0f}", f"{n_params / step / 1e6:,.1f}",
                      f"{naive.step.median / step:.1f}x" if naive.step else "-", *train_cells, r.state_bytes,
                      f"{len(r.step.times)} / {len(r.train.times) if r.train else 0}", r.note])
    if markdown:
        rule = "|" + "|".join(["---"] + ["---:"] * (len(header) - 2) + ["---"]) + "|"
        return "\n".join(["| " + " | ".join(header) + " |", rule] + ["| " + " | ".join(c) + " |" for c in table])
    widths = [max(len(c[i]) for c in [header] + table) for i in range(len(header))]
    fmt = lambda cells: "  ".join(c.ljust(w) if i in (0, len(cells) - 1) else c.rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(c) for c in table])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help=f"torch CPU threads for every row (default {torch.get_num_threads()})")
    parser.add_argument("--min-run-time", type=float, default=3.0,
                        help="seconds of timing per row and measurement, spread over the rounds")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of measurement, each over every row in turn (at least one sample per round)")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument("--rows", nargs="+", default=None, metavar="TEXT",
                        help="time only the rows whose name contains one of these (the sanity check needs the naive row)")
    parser.add_argument("--step-only", action="store_true", help="time the optimizer step alone, not the training step")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads: expected >= 1, got {args.threads}")
    if args.rounds < 1:
        parser.error(f"--rounds: expected >= 1, got {args.rounds}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if not ops.HAS_NATIVE:
        raise SystemExit(f"l2l_fast._C is not built ({ops.NATIVE_IMPORT_ERROR}); this benchmark times the native step")
    net = CoordinatewiseLSTM.from_pretrained("mnist")
    model = make_model(args)
    n_params = sum(p.numel() for p in model.parameters())
    n_tensors = len(list(model.parameters()))
    largest = max(p.numel() for p in model.parameters())
    batch = make_batch(args)
    lines = [f"bench_optimizer: optimizer step and training step of a {n_params / 1e6:.1f}M-parameter transformer "
             f"({n_tensors} tensors, largest {largest:,}); vocab {args.vocab}, d_model {args.d_model}, layers "
             f"{args.layers}, heads {args.heads}, batch {args.batch} x {args.seq} tokens, fp32, cpu",
             f"command  : {' '.join([os.path.basename(sys.executable)] + sys.argv)}"]
    lines += machine.machine_lines("cpu", args.threads)
    lines.append(f"l2l_fast : {l2l_fast.__version__}, learned optimizers use the shipped MNIST net "
                 f"(hidden {net.hidden_size}, layers {net.num_layers})")
    rows = [r for r in rows_for(net) if args.rows is None or any(text in r.name for text in args.rows)]
    if any(r.name.startswith("naive") for r in rows):
        lines.append(f"sanity   : {sanity_check(args, net, batch)}")
    lines.append(f"columns  : medians of torch.utils.benchmark.Timer samples from {args.rounds} rounds (each round "
                 "times every row in turn); Mparam/s = parameters / optimizer step time; x vs naive = naive time / "
                 "row time; IQR % = spread of the samples / median; samples = step / train-step samples")
    print("\n".join(["```text"] + lines + ["```", ""] if args.markdown else lines + [""]), flush=True)
    for row in rows:
        set_up(row, args, batch)
    for round_ in range(args.rounds):
        for row in rows:
            measure_round(row, args, batch)
        print(f"  round {round_ + 1} of {args.rounds} done", file=sys.stderr, flush=True)
    print(render(rows, n_params, args.markdown))
    if hasattr(os, "getloadavg"):  # other work during the run makes every number above pessimistic
        print(f"\nload average (1 min) {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
