"""A small character-level transformer language model on the text of `charlm` (Debian's fortune cookies,
l2l_fast.data.text; `apt-get install fortunes`): attention, an architecture family the LSTM tasks lack.

Each problem: token and learned position embeddings of width d, `layers` pre-LayerNorm blocks (x + attention of
LayerNorm(x) with `heads` causal heads, then x + MLP d -> 4d -> d with exact GELU of LayerNorm(x)), a final
LayerNorm and a linear layer to the next character's logits; the loss is the mean cross-entropy of predicting
each next character of `batch_size` windows of `seq_len + 1` characters drawn from the split's text.
Parameters, weights as [in, out] (x @ W, the transposes of torch.nn's): embed.token [96, d],
embed.position [seq_len, d]; per block: ln1.weight, ln1.bias [d], attn.qkv.weight [d, 3d] (columns: q, k, v,
each head after head as nn.MultiheadAttention's in_proj), attn.qkv.bias [3d], attn.proj.weight [d, d],
attn.proj.bias [d], ln2.weight, ln2.bias [d], mlp.fc.weight [d, 4d], mlp.fc.bias [4d], mlp.proj.weight [4d, d],
mlp.proj.bias [d]; then ln_f.weight, ln_f.bias [d], head.weight [d, 96], head.bias [96].

weight_init "default" is what torch.nn gives a user of nn.Embedding (N(0, 1)), nn.TransformerEncoderLayer
(norm_first=True: nn.MultiheadAttention's Xavier-uniform in_proj and zero attention biases, nn.Linear's
U(+-1/sqrt(fan_in)) elsewhere, LayerNorm weight 1 and bias 0), nn.LayerNorm and nn.Linear; "small" is the
paper's N(0, 0.01^2) for every entry but the LayerNorm weights, which stay 1 (0.01 would scale away the signal).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..argtypes import positive_int
from ..data.text import VOCAB
from .base import ParamGroup, ProblemBatch, Task, check_split, seeded
from .charlm import corpus, text_windows
from .layout import WEIGHT_INITS, Entry, Layout
from .mlp import WEIGHT_INIT_OPTION
from .registry import TaskOption, register_task

_SPLIT_SALT = {"train": 100, "val": 101, "test": 102}
_SMALL_STD = 0.01


def _normal(std: float):
    return lambda rows, size, generator: std * torch.randn(rows, size, generator=generator)


def _uniform(bound: float):
    return lambda rows, size, generator: (torch.rand(rows, size, generator=generator) * 2 - 1) * bound


def _linear(fan_in: int):  # nn.Linear's weight and bias
    return _uniform(1 / math.sqrt(fan_in))


def _constant(value: float):
    return lambda rows, size, generator: torch.full((rows, size), value)


_ONE, _ZERO = _constant(1.0), _constant(0.0)  # LayerNorm's weight and bias; _ONE also under "small"


class CharTransformerBatch(ProblemBatch):
    def __init__(self, text: Tensor, d_model: int, layers: int, heads: int, weight_init: str, seq_len: int,
                 batch_size: int, num_problems: int, seed: int, salt: int):
        if len(text) <= seq_len + 1:
            raise ValueError(f"text: {len(text)} characters, fewer than a window of seq_len + 1 = {seq_len + 1}")
        self.text, self.d_model, self.layers, self.heads = text, d_model, layers, heads
        self.seq_len, self.batch_size, self.weight_init = seq_len, batch_size, weight_init
        self.num_problems, self.seed, self.salt = num_problems, seed, salt
        d, V = d_model, len(VOCAB)
        spec = [("embed.token", (V, d), _normal(1.0)), ("embed.position", (seq_len, d), _normal(1.0))]
        for b in range(layers):
            spec += [(f"block{b}.ln1.weight", (d,), _ONE), (f"block{b}.ln1.bias", (d,), _ZERO),
                     (f"block{b}.attn.qkv.weight", (d, 3 * d), _uniform(math.sqrt(6 / (d + 3 * d)))),  # Xavier
                     (f"block{b}.attn.qkv.bias", (3 * d,), _ZERO),
                     (f"block{b}.attn.proj.weight", (d, d), _linear(d)),
                     (f"block{b}.attn.proj.bias", (d,), _ZERO),
                     (f"block{b}.ln2.weight", (d,), _ONE), (f"block{b}.ln2.bias", (d,), _ZERO),
                     (f"block{b}.mlp.fc.weight", (d, 4 * d), _linear(d)),
                     (f"block{b}.mlp.fc.bias", (4 * d,), _linear(d)),
                     (f"block{b}.mlp.proj.weight", (4 * d, d), _linear(4 * d)),
                     (f"block{b}.mlp.proj.bias", (d,), _linear(4 * d))]
        spec += [("ln_f.weight", (d,), _ONE), ("ln_f.bias", (d,), _ZERO),
                 ("head.weight", (d, V), _linear(d)), ("head.bias", (V,), _linear(d))]
        # fan_in is Layout.init's, unused here: init_params draws each entry by its torch.nn module's rule
        self.layout = Layout([Entry(name, shape, shape[0]) for name, shape, _ in spec])
        self.inits = [init if weight_init == "default" or init is _ONE else _normal(_SMALL_STD) for *_, init in spec]
        self.dim = self.layout.dim
        self.groups = [ParamGroup("all", 0, self.dim)]

    def init_params(self) -> Tensor:
        generator = seeded(self.seed, self.salt, 1)  # drawn for the whole draw, then cut: select keeps the rows
        columns = [init(self.drawn, e.size, generator) for e, init in zip(self.layout.entries, self.inits)]
        return self.own_rows(torch.cat(columns, dim=1))

    def _select(self, start: int, stop: int) -> "CharTransformerBatch":
        return self._rows(start, stop)

    def batch(self, step: int) -> Tensor:
        return text_windows(self, step)

    def loss(self, params: Tensor, step: int) -> Tensor:
        """params [P, D] -> mean next-character cross-entropy of each problem on its windows of `step`: [P]."""
        named = self.layout.split(params)
        chars = self.batch(step)
        P, B, T, d, H = self.num_problems, self.batch_size, self.seq_len, self.d_model, self.heads

        def norm(x, name):  # LayerNorm with each problem's own weight and bias
            return torch.addcmul(named[f"{name}.bias"].view(P, 1, -1), F.layer_norm(x, (d,)),
                                 named[f"{name}.weight"].view(P, 1, -1))

        def affine(x, name):  # x [P, N, in] @ weight [P, in, out] + bias
            return torch.baddbmm(named[f"{name}.bias"].unsqueeze(1), x, named[f"{name}.weight"])

        problem = torch.arange(P).view(P, 1, 1)
        x = named["embed.token"][problem, chars[..., :-1]] + named["embed.position"].view(P, 1, T, d)
        x = x.reshape(P, B * T, d)  # rows: window b's position t at b * T + t
        for b in range(self.layers):
            qkv = affine(norm(x, f"block{b}.ln1"), f"block{b}.attn.qkv")
            q, k, v = qkv.view(P * B, T, 3, H, d // H).permute(2, 0, 3, 1, 4)  # each [P * B, H, T, d / H]
            heads = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + affine(heads.transpose(1, 2).reshape(P, B * T, d), f"block{b}.attn.proj")
            x = x + affine(F.gelu(affine(norm(x, f"block{b}.ln2"), f"block{b}.mlp.fc")), f"block{b}.mlp.proj")
        logits = affine(norm(x, "ln_f"), "head")
        targets = chars[..., 1:].reshape(-1)
        return F.cross_entropy(logits.reshape(-1, len(VOCAB)), targets, reduction="none").view(P, -1).mean(1)


@register_task("chartransformer",
               help="a small character-level transformer on Debian's fortune cookies (apt-get install fortunes)",
               options=[TaskOption("d_model", positive_int, "width of the embeddings and blocks", label=True),
                        TaskOption("layers", positive_int, "transformer blocks"),
                        TaskOption("heads", positive_int, "attention heads (must divide d_model)"),
                        WEIGHT_INIT_OPTION,
                        TaskOption("seq_len", positive_int, "characters of each training window")])
class CharTransformerTask(Task):
    def __init__(self, d_model: int = 32, layers: int = 1, heads: int = 2, weight_init: str = "default",
                 seq_len: int = 24, batch_size: int = 16):
        kwargs = {"d_model": d_model, "layers": layers, "heads": heads, "weight_init": weight_init,
                  "seq_len": seq_len, "batch_size": batch_size}
        for name, value in kwargs.items():
            if name != "weight_init" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if d_model % heads:
            raise ValueError(f"heads: {heads} heads do not divide d_model = {d_model}")
        if weight_init not in WEIGHT_INITS:
            raise ValueError(f"weight_init: expected one of {WEIGHT_INITS}, got {weight_init!r}")
        super().__init__("chartransformer", kwargs)
        self.options = kwargs

    def sample(self, num_problems: int, seed: int, split: str = "train") -> CharTransformerBatch:
        check_split(split)
        o = self.options
        return CharTransformerBatch(corpus(split), o["d_model"], o["layers"], o["heads"], o["weight_init"],
                                    o["seq_len"], o["batch_size"], num_problems, seed, _SPLIT_SALT[split])
