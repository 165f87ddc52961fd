"""A character-level LSTM language model on real text: Debian's fortune cookies (l2l_fast.data.text;
`apt-get install fortunes`).

Each problem: LSTM layers of `hidden` units over one-hot characters (96 symbols: newline and printable
ASCII), then a linear layer to the next character's logits; the loss is the mean cross-entropy of predicting
each next character of `batch_size` windows of `seq_len + 1` characters drawn from the split's text.
Parameters per layer: weight_ih [inputs, 4H], weight_hh [H, 4H], bias [4H] (gates i, f, g, o as torch.nn.LSTM),
then out.weight [H, 96], out.bias [96].
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from ..argtypes import positive_int
from ..data.text import VOCAB, encode, fortunes_folder, load_fortunes
from .base import ParamGroup, ProblemBatch, Task, check_split, seeded
from .layout import WEIGHT_INITS, Entry, Layout
from .mlp import WEIGHT_INIT_OPTION
from .registry import TaskOption, register_task

_SPLIT_SALT = {"train": 80, "val": 81, "test": 82}


def corpus(split: str) -> Tensor:
    """The split's text as indices into VOCAB: int64 [characters]."""
    return _encoded(split, str(fortunes_folder()))


@functools.lru_cache(maxsize=6)
def _encoded(split: str, folder: str) -> Tensor:  # the folder keys the cache: $L2L_FAST_FORTUNES may change
    return encode(load_fortunes(split))


def text_windows(problems: ProblemBatch, step: int) -> Tensor:
    """The windows of `step` of a batch of language-model problems (charlm, chartransformer): characters
    [P, B, seq_len + 1] of problems.text, drawn for the whole draw from (seed, salt, step) and cut by own_rows,
    so a selected batch sees its problems' windows."""
    generator = seeded(problems.seed, problems.salt, 2, step)
    starts = problems.own_rows(torch.randint(len(problems.text) - problems.seq_len,
                                             (problems.drawn, problems.batch_size), generator=generator))
    return problems.text[starts.unsqueeze(-1) + torch.arange(problems.seq_len + 1)]


class CharLSTMBatch(ProblemBatch):
    def __init__(self, text: Tensor, hidden: tuple[int, ...], weight_init: str, seq_len: int, batch_size: int,
                 num_problems: int, seed: int, salt: int):
        if len(text) <= seq_len + 1:
            raise ValueError(f"text: {len(text)} characters, fewer than a window of seq_len + 1 = {seq_len + 1}")
        self.text, self.hidden, self.seq_len, self.batch_size = text, hidden, seq_len, batch_size
        self.weight_init, self.num_problems, self.seed, self.salt = weight_init, num_problems, seed, salt
        entries, inputs = [], len(VOCAB)
        for layer, units in enumerate(hidden):  # torch.nn.LSTM's default bound is 1/sqrt(hidden): fan_in = units
            entries += [Entry(f"lstm{layer}.weight_ih", (inputs, 4 * units), units),
                        Entry(f"lstm{layer}.weight_hh", (units, 4 * units), units),
                        Entry(f"lstm{layer}.bias", (4 * units,), units)]
            inputs = units
        entries += [Entry("out.weight", (inputs, len(VOCAB)), inputs), Entry("out.bias", (len(VOCAB),), inputs)]
        self.layout = Layout(entries)
        self.dim = self.layout.dim
        self.groups = [ParamGroup("all", 0, self.dim)]

    def init_params(self) -> Tensor:
        return self.own_rows(self.layout.init(self.drawn, self.weight_init, seeded(self.seed, self.salt, 1)))

    def _select(self, start: int, stop: int) -> "CharLSTMBatch":
        return self._rows(start, stop)

    def batch(self, step: int) -> Tensor:
        return text_windows(self, step)

    def loss(self, params: Tensor, step: int) -> Tensor:
        named = self.layout.split(params)
        chars = self.batch(step)
        P, B, T = self.num_problems, self.batch_size, self.seq_len
        problem = torch.arange(P).view(P, 1, 1)
        x = named["lstm0.weight_ih"][problem, chars[..., :-1]]  # one-hot inputs: rows of weight_ih, [P, B, T, 4H]
        for layer, units in enumerate(self.hidden):
            if layer > 0:
                x = torch.bmm(h_all.reshape(P, B * T, -1), named[f"lstm{layer}.weight_ih"]).view(P, B, T, -1)
            x = x + named[f"lstm{layer}.bias"].view(P, 1, 1, -1)
            weight_hh = named[f"lstm{layer}.weight_hh"]
            h = c = x.new_zeros(P, B, units)
            outputs = []
            for t in range(T):
                gates = torch.baddbmm(x[:, :, t], h, weight_hh)
                i, f, g, o = gates.chunk(4, dim=-1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                outputs.append(h)
            h_all = torch.stack(outputs, dim=2)  # [P, B, T, H]
        logits = torch.baddbmm(named["out.bias"].unsqueeze(1), h_all.reshape(P, B * T, -1), named["out.weight"])
        targets = chars[..., 1:].reshape(-1)
        return F.cross_entropy(logits.reshape(-1, len(VOCAB)), targets, reduction="none").view(P, -1).mean(1)


@register_task("charlm", help="a character-level LSTM on Debian's fortune cookies (apt-get install fortunes)",
               options=[TaskOption("hidden", positive_int, "units of each LSTM layer", nargs="+", label=True),
                        WEIGHT_INIT_OPTION,
                        TaskOption("seq_len", positive_int, "characters of each training window")])
class CharLMTask(Task):
    def __init__(self, hidden=(20,), weight_init: str = "default", seq_len: int = 24, batch_size: int = 16):
        if weight_init not in WEIGHT_INITS:
            raise ValueError(f"weight_init: expected one of {WEIGHT_INITS}, got {weight_init!r}")
        hidden = tuple(int(h) for h in hidden)
        kwargs = {"hidden": hidden, "weight_init": weight_init, "seq_len": seq_len, "batch_size": batch_size}
        super().__init__("charlm", kwargs)
        self.options = kwargs

    def sample(self, num_problems: int, seed: int, split: str = "train") -> CharLSTMBatch:
        check_split(split)
        o = self.options
        return CharLSTMBatch(corpus(split), o["hidden"], o["weight_init"], o["seq_len"], o["batch_size"],
                             num_problems, seed, _SPLIT_SALT[split])
