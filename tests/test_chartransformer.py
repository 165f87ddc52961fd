"""The chartransformer task: its batched functional loss and gradients are those of torch.nn's transformer
(nn.Embedding, nn.TransformerEncoderLayer(norm_first=True), nn.LayerNorm, nn.Linear) run on each problem's
parameters; its "default" init is those modules' own; it samples deterministically per (seed, split), selects
problems like the whole batch, trains under Adam and under a learned optimizer (a finite meta-gradient) and
refuses bad options."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from l2l_fast.data.text import DEFAULT_FILES, FORTUNES_ENV, VOCAB
from l2l_fast.meta.unroll import loss_and_grad, run_learned, truncation
from l2l_fast.net import CoordinatewiseLSTM
from l2l_fast.tasks import TASKS, make_task
from test_problem_select import assert_same_problems

COOKIES = ["The quick brown fox jumps over the lazy dog.\n  -- typists", "To be, or not to be:\nthat is the question.",
           "Brevity is the soul of wit.\n  -- Polonius"] * 8
SMALL = {"d_model": 8, "layers": 2, "heads": 2, "seq_len": 7, "batch_size": 3}  # two blocks: the residual stream


@pytest.fixture(autouse=True)
def fortunes(tmp_path, monkeypatch):
    """Small fortune files standing in for Debian's (the real corpus is tested when installed)."""
    for name in DEFAULT_FILES:
        (tmp_path / name).write_text("\n%\n".join(COOKIES) + "\n%\n")
    monkeypatch.setenv(FORTUNES_ENV, str(tmp_path))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path
    torch.set_num_threads(threads)


def sample(num_problems, seed=0, split="train", **options):
    return make_task("chartransformer", **{**SMALL, **options}).sample(num_problems, seed, split)


class Reference(nn.Module):
    """One problem's model as a torch.nn user writes it: chars [B, T] -> logits [B, T, 96]."""

    def __init__(self, d_model, layers, heads, seq_len):
        super().__init__()
        self.token, self.position = nn.Embedding(len(VOCAB), d_model), nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.0,
                                                               activation="gelu", batch_first=True, norm_first=True)
                                    for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(d_model), nn.Linear(d_model, len(VOCAB))

    def forward(self, chars):
        T = chars.shape[1]
        x = self.token(chars) + self.position(torch.arange(T))
        mask = nn.Transformer.generate_square_subsequent_mask(T, dtype=x.dtype)
        for block in self.blocks:
            x = block(x, src_mask=mask, is_causal=True)
        return self.head(self.norm(x))


def name_pairs(layers):
    """(the task's name, Reference's name) of every parameter."""
    pairs = [("embed.token", "token.weight"), ("embed.position", "position.weight")]
    block = [("ln1.weight", "norm1.weight"), ("ln1.bias", "norm1.bias"),
             ("attn.qkv.weight", "self_attn.in_proj_weight"), ("attn.qkv.bias", "self_attn.in_proj_bias"),
             ("attn.proj.weight", "self_attn.out_proj.weight"), ("attn.proj.bias", "self_attn.out_proj.bias"),
             ("ln2.weight", "norm2.weight"), ("ln2.bias", "norm2.bias"),
             ("mlp.fc.weight", "linear1.weight"), ("mlp.fc.bias", "linear1.bias"),
             ("mlp.proj.weight", "linear2.weight"), ("mlp.proj.bias", "linear2.bias")]
    for b in range(layers):
        pairs += [(f"block{b}.{mine}", f"blocks.{b}.{theirs}") for mine, theirs in block]
    return pairs + [("ln_f.weight", "norm.weight"), ("ln_f.bias", "norm.bias"), ("head.weight", "head.weight"),
                    ("head.bias", "head.bias")]


def flip(name, value):
    """Between the task's [in, out] weights and torch.nn's [out, in] (embeddings are [vocab, d] in both)."""
    return value.T if value.dim() == 2 and not name.startswith("embed") else value


def reference_losses(problems, params, step):
    """[P] losses of Reference, given each problem's parameters, on its windows of `step`."""
    model = Reference(problems.d_model, problems.layers, problems.heads, problems.seq_len).to(params.dtype)
    named, chars = problems.layout.split(params), problems.batch(step)
    losses = []
    for p in range(problems.num_problems):  # train mode (dropout 0): torch's fused inference path stays off
        state = {theirs: flip(mine, named[mine][p]) for mine, theirs in name_pairs(problems.layers)}
        logits = functional_call(model, state, (chars[p, :, :-1],), strict=True)
        losses.append(F.cross_entropy(logits.reshape(-1, len(VOCAB)), chars[p, :, 1:].reshape(-1)))
    return torch.stack(losses)


@pytest.mark.parametrize("weight_init", ["default", "small"])
def test_loss_and_gradients_match_torch_nn_per_problem(weight_init):
    problems = sample(3, weight_init=weight_init)
    assert [e.name for e in problems.layout.entries] == [mine for mine, _ in name_pairs(2)]
    noise = torch.randn(problems.param_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    # away from the init, so that LayerNorm weights and attention biases are not all 1 or 0
    params = (problems.init_params().double() + 0.3 * noise).requires_grad_()
    for step in (0, 5):
        losses = problems.loss(params, step)
        expected = reference_losses(problems, params, step)
        torch.testing.assert_close(losses, expected, rtol=0, atol=1e-12)
        grad, = torch.autograd.grad(losses.sum(), params)
        expected_grad, = torch.autograd.grad(expected.sum(), params)
        assert grad.abs().max() > 1e-3
        torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-12)
    low = problems.loss(params.detach().float(), 0)  # float32 works too, to its precision
    assert low.dtype == torch.float32
    torch.testing.assert_close(low.double(), problems.loss(params.detach(), 0), rtol=1e-5, atol=1e-5)


def test_default_init_is_torch_nn_modules_and_small_is_small():
    options, P = {"d_model": 16, "layers": 1, "heads": 2, "seq_len": 8}, 64
    problems = sample(P, **options)
    named = problems.layout.split(problems.init_params())
    with torch.random.fork_rng():
        torch.manual_seed(0)
        modules = [dict(Reference(**options).named_parameters()) for _ in range(P)]
    for mine, theirs in name_pairs(1):
        torch_nn = torch.stack([flip(mine, m[theirs].detach()) for m in modules])
        for statistic in (torch.std, lambda t: t.abs().flatten().quantile(0.9)):
            torch.testing.assert_close(statistic(named[mine]), statistic(torch_nn), rtol=0.06, atol=1e-6, msg=mine)
    small = sample(4, weight_init="small", **options)
    for name, value in small.layout.split(small.init_params()).items():
        if name.endswith(("ln1.weight", "ln2.weight", "ln_f.weight")):
            assert torch.equal(value, torch.ones_like(value)), name
        else:
            assert 0.008 < value.std() < 0.012, name


def test_samples_are_deterministic_per_seed_and_split():
    a, b = sample(2, seed=3), sample(2, seed=3)
    assert torch.equal(a.init_params(), b.init_params()) and torch.equal(a.batch(4), b.batch(4))
    assert torch.equal(a.loss(a.init_params(), 4), b.loss(b.init_params(), 4))
    assert not torch.equal(a.batch(4), a.batch(5))
    for other in (sample(2, seed=3, split="val"), sample(2, seed=4)):
        assert not torch.equal(a.init_params(), other.init_params())
        assert not torch.equal(a.batch(4), other.batch(4))


def test_selected_problems_are_those_of_the_whole_batch():
    whole = sample(7, seed=4)
    for start, stop in [(0, 3), (3, 7), (2, 5), (6, 7)]:
        assert_same_problems(whole, whole.select(start, stop), start, stop)
    assert_same_problems(whole, whole.select(1, 6).select(1, 3), 2, 4)  # a slice of a slice


def test_adam_trains_it():
    problems = sample(2, d_model=16, layers=1, seq_len=12, batch_size=8)
    params = problems.init_params().requires_grad_()
    held_out = [10_000 + s for s in range(4)]  # windows no step trains on
    before = torch.stack([problems.loss(params, s) for s in held_out]).mean(0).detach()
    optimizer = torch.optim.Adam([params], lr=1e-2)
    for step in range(40):
        optimizer.zero_grad()
        problems.loss(params, step).sum().backward()
        optimizer.step()
    after = torch.stack([problems.loss(params, s) for s in held_out]).mean(0).detach()
    assert (after < before - 1.0).all(), (before, after)


def test_options_defaults_and_size():
    spec = TASKS["chartransformer"]
    assert [o.name for o in spec.options] == ["d_model", "layers", "heads", "weight_init", "seq_len"]
    assert [o.name for o in spec.options if o.label] == ["d_model", "weight_init"]
    assert spec.complete({}) == {"d_model": 32, "layers": 1, "heads": 2, "weight_init": "default", "seq_len": 24}
    d, T, V = 32, 24, len(VOCAB)
    assert spec.make({}).sample(1, seed=0).dim == V * d + T * d + (12 * d * d + 13 * d) + 2 * d + d * V + V == 19776


BAD_OPTIONS = {"heads-not-dividing": ({"heads": 3}, "heads: 3 heads do not divide d_model = 32"),
               "d_model-0": ({"d_model": 0}, "d_model"), "layers-0": ({"layers": 0}, "layers"),
               "heads-0": ({"heads": 0}, "heads"), "seq_len-negative": ({"seq_len": -1}, "seq_len"),
               "batch_size-0": ({"batch_size": 0}, "batch_size"), "d_model-float": ({"d_model": 2.0}, "d_model"),
               "weight_init-unknown": ({"weight_init": "xavier"}, "weight_init")}


@pytest.mark.parametrize("options, match", list(BAD_OPTIONS.values()), ids=list(BAD_OPTIONS))
def test_bad_options_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        make_task("chartransformer", **options)


@pytest.mark.skipif(not Path("/usr/share/games/fortunes/literature").exists(),
                    reason="Debian's fortunes package is not installed (apt-get install fortunes)")
def test_the_real_corpus(monkeypatch):
    monkeypatch.delenv(FORTUNES_ENV, raising=False)
    problems = TASKS["chartransformer"].make({}).sample(2, seed=0, split="val")
    losses = problems.loss(problems.init_params(), 0)
    assert ((math.log(len(VOCAB)) - 0.2 < losses) & (losses < math.log(len(VOCAB)) + 0.5)).all(), losses


def test_a_learned_optimizer_steps_it_and_gets_a_finite_meta_gradient():
    problems = sample(2, seed=1)
    torch.manual_seed(0)
    net = CoordinatewiseLSTM(hidden_size=4)
    losses = run_learned(net, problems, 3)
    assert losses.shape == (4, 2) and torch.isfinite(losses).all()
    params = problems.init_params()
    _, grad = loss_and_grad(problems, params, 0, keep_graph=False)
    meta_loss, history, *_ = truncation(net, problems, params, grad, net.init_state(params.numel()), 0, 3)
    meta_loss.backward()
    assert torch.isfinite(meta_loss) and history.shape == (3, 2)
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in net.parameters())
