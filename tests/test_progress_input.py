"""CoordinatewiseLSTM(progress_input=True): the LSTM also reads progress_inputs(t, total_steps) = (min(t / T, 1),
log10(T) / 4) as two first-layer inputs after the features' (the last columns of weight_ih_l0, folded into
bias_ih_l0 before the unchanged kernels).

Checked here: the step against its specification, a real torch.nn.LSTM fed cat(features, progress inputs), in
float64 for every feature set and output kind on both backends; gradcheck through the fold; step_ / multi_step_
against forward; the ValueErrors of a missing, unexpected or malformed progress; that the inputs are used (and a
net with zero progress columns ignores them); widening a net without the inputs (or with fewer features) into one
with them; save/load of such nets; LearnedOptimizer's total_steps and its step count (against a hand-written loop,
across a state_dict round trip); meta-training (truncation, also coordinate-sampled, run_learned, PES particles,
the CLI's --progress-input for both estimators); GroupedLSTM.
"""
from __future__ import annotations

import copy
import hashlib
import io
import math

import pytest
import torch
from torch import nn

from conftest import generator, moments_for, random_grad, random_moments, random_state, requires_native
from l2l_fast import CoordinatewiseLSTM, LearnedOptimizer
from l2l_fast import features as registry
from l2l_fast.checks import check_progress
from l2l_fast.cli import main as cli_main
from l2l_fast.files import load_verified
from l2l_fast.grouped import GroupedLSTM, ParamGroup
from l2l_fast.meta.config import MetaTrainConfig
from l2l_fast.meta.pes import PESEpisode, flat_weights
from l2l_fast.meta.train import load_initial_weights, load_widened, widens
from l2l_fast.meta.unroll import (CoordinateSample, initial_state, learned_step_, loss_and_grad, progress_at,
                                  run_learned, truncation)
from l2l_fast.net import PROGRESS_WIDTH, progress_inputs
from l2l_fast.pretrained import load_pretrained, save_pretrained
from l2l_fast.tasks import make_task
from tolerances import assert_elementwise_close, assert_moments_advanced

H, L = 20, 2
FEATURE_SETS = {"paper": ("paper",), "moments+long": ("moments", "long_moments"),
                "all": ("paper", "moments", "long_moments")}
OUTPUTS = ("linear", "tanh")
BACKENDS = [pytest.param("native", marks=requires_native), "reference"]
# (t, total_steps): the start, inside, past the end (clamped), T = 1 (log10 = 0), T = 10^4 (log input 1)
PROGRESSES = [(0, 10), (3, 10), (25, 10), (0, 1), (99, 100), (7, 10_000)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tensors of a few dozen coordinates: one thread is fastest (no pool wake-ups), also on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def progress_net(features=("paper",), output="linear", *, gen, backend="reference", hidden_size=H, num_layers=L,
                 dtype=torch.float64, preprocess_p=10.0, output_scale=0.1):
    """A progress net with random weights (N(0, 1) / sqrt(fan-in), biases N(0, 0.5^2)), its progress columns
    N(0, 1): inputs in [0, 1] then move the gates by O(1)."""
    net = CoordinatewiseLSTM(hidden_size, num_layers, preprocess_p, output_scale, backend=backend,
                             features=features, output=output, progress_input=True)
    fill_random(net, gen)
    with torch.no_grad():
        columns = net.lstm.weight_ih_l0[:, -PROGRESS_WIDTH:]
        columns.copy_(torch.randn(columns.shape, generator=gen, dtype=torch.float64))
    return net.to(dtype)


def fill_random(net, gen):
    with torch.no_grad():
        for w in net.weights():
            r = torch.randn(w.shape, generator=gen, dtype=torch.float64)
            w.copy_(r / math.sqrt(w.shape[1]) if w.dim() == 2 else 0.5 * r)
    return net


def same_net(net, backend):
    """net's weights in a new net with another backend."""
    other = CoordinatewiseLSTM(**net.size_kwargs(), backend=backend).to(net.out.weight.dtype)
    other.load_state_dict(net.state_dict())
    return other


def spec_step(net, grad, state, moments, progress):
    """The specification: x = cat(features, progress inputs) [n, I + 2] as a length-1 sequence through the
    torch.nn.LSTM of the net's weights, h0, c0 = state[:, 0], state[:, 1] as [L, n, H]; update = scale * out(h_top)
    (or scale * tanh of it); new state [L, 2, H, n] from (h, c)."""
    n, (t, total) = grad.shape[0], progress
    inputs = grad.new_tensor([min(t / total, 1.0), math.log10(total) / 4])  # written out: the spec's own
    x = torch.cat([registry.compute(grad, net.features, net.preprocess_p, moments),
                   inputs.expand(n, PROGRESS_WIDTH)], dim=1)
    lstm = net.lstm.to_torch()
    assert lstm.input_size == registry.input_size(net.features) + PROGRESS_WIDTH
    with torch.no_grad():
        _, (h, c) = lstm(x.unsqueeze(0), (state[:, 0].permute(0, 2, 1).contiguous(),
                                          state[:, 1].permute(0, 2, 1).contiguous()))
        y = net.out(h[-1]).squeeze(1)
    update = net.output_scale * (torch.tanh(y) if net.output == "tanh" else y)
    return update, torch.stack([h, c], dim=1).permute(0, 1, 3, 2)


def assert_close64(actual, expected, atol, name):
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual - expected).abs().max().item()
    assert err <= atol, f"{name}: max error {err:.3e} > {atol:.1e}"


# ---------------------------------------------------------------------------------------------
# (1) the step against torch.nn.LSTM
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("features", FEATURE_SETS.values(), ids=FEATURE_SETS.keys())
def test_step_is_torch_lstm_fed_features_and_progress(gen, features, output, backend):
    """The update and new state are torch.nn.LSTM's on cat(features, progress inputs), for every progress (past
    the end included); the native kernels agree with the reference."""
    net = progress_net(features, output, gen=gen, backend=backend)
    reference_net = same_net(net, "reference")
    for n in (7, 37):
        grad = random_grad(n, gen=gen)
        moments = moments_for(registry.mask_of(features), grad, gen=gen)
        state = random_state(L, H, n, gen=gen)
        for progress in PROGRESSES:
            expected = spec_step(net, grad, state, moments, progress)
            with torch.no_grad():
                got = net(grad, state, moments, progress=progress)
                if backend == "native":
                    ref = reference_net(grad, state, moments, progress=progress)
            name = f"n={n} progress={progress}"
            if backend == "reference":
                # float64 gate sums of <= 25 terms (inputs |x| <= 32, weights O(1)) round to ~1e-14; two layers
                # of cells (1-Lipschitz in h, |c| a few units) keep it there: 1e-12 absolute is > 100x the rounding
                assert_close64(got[0], expected[0], 1e-12, f"update {name}")
                assert_close64(got[1], expected[1], 1e-12, f"state {name}")
            else:  # the kernels' vectorised exp/tanh: the suite's float64 table (tolerances.py)
                assert_elementwise_close(got[0], expected[0], torch.float64, f"update {name}")
                assert_elementwise_close(got[1], expected[1], torch.float64, f"state {name}")
                assert_elementwise_close(got[0], ref[0], torch.float64, f"update native vs reference {name}")
                assert_elementwise_close(got[1], ref[1], torch.float64, f"state native vs reference {name}")


# ---------------------------------------------------------------------------------------------
# (2) gradcheck through the fold
@requires_native
@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("features", FEATURE_SETS.values(), ids=FEATURE_SETS.keys())
def test_gradcheck_through_the_progress_fold(gen, features, output):
    """Derivatives w.r.t. weight_ih_l0 (its progress columns included), bias_ih_l0 and the gradient, through
    forward at a fixed progress: the fold (b + W_progress @ inputs) is differentiated like the LSTM's own input."""
    p, n, progress = 1.0, 5, (3, 7)
    net = progress_net(features, output, gen=gen, backend="native", hidden_size=3, preprocess_p=p,
                       output_scale=0.3)
    # |g| away from the paper preprocessing's kink at e^-p: alternately [1.3, 130] e^-p and [0, 0.7) e^-p
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    sign = torch.where(torch.rand(n, generator=gen, dtype=torch.float64) < 0.5, -1.0, 1.0)
    grad = sign * math.exp(-p) * torch.where(torch.arange(n) % 2 == 0, torch.pow(10.0, 0.12 + 2 * u), 0.7 * u)
    moments = (random_moments(n, gen=gen, grad=grad, lo=math.exp(-p), hi=10 * math.exp(-p))
               if registry.reads_moments(features) else None)
    state = random_state(L, 3, n, gen=gen)

    def fn(weight_ih, bias_ih, g):
        return torch.func.functional_call(net, {"lstm.weight_ih_l0": weight_ih, "lstm.bias_ih_l0": bias_ih},
                                          (g, state), {"moments": moments, "progress": progress})

    inputs = (net.lstm.weight_ih_l0.detach().clone().requires_grad_(True),
              net.lstm.bias_ih_l0.detach().clone().requires_grad_(True), grad.clone().requires_grad_(True))
    (d_weight,) = torch.autograd.grad(fn(*inputs)[0].sum(), inputs[0])
    assert torch.count_nonzero(d_weight[:, -PROGRESS_WIDTH:]) > 0  # the progress columns are in the graph
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# (3) step_ and multi_step_
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("features, output", [(("paper",), "tanh"), (("paper", "moments", "long_moments"), "linear")],
                         ids=["paper-tanh", "all-linear"])
def test_step_and_multi_step_give_the_forwards_update(gen, features, output, backend):
    """step_ (one flat tensor) and multi_step_ (three tensors of odd sizes, lr 0.5) at a progress write
    param + lr * update and the new state of forward at that progress, and advance the moments alike."""
    net = progress_net(features, output, gen=gen, backend=backend)
    sizes, progress, lr = [7, 13, 5], (4, 9), 0.5
    n = sum(sizes)
    grad = random_grad(n, gen=gen)
    state = random_state(L, H, n, gen=gen)
    moments = random_moments(n, gen=gen) if net.reads_moments else None
    advanced = net.advance_moments(grad, moments)
    with torch.no_grad():
        update, new_state = net(grad, state, advanced, progress=progress)
        other, _ = net(grad, state, advanced, progress=(8, 9))
    assert (update - other).abs().max() > 1e-3  # the progress matters here: the checks below can fail
    param = torch.randn(n, generator=gen, dtype=torch.float64)
    # float64, |update| <= O(1): forward and the in-place kernels differ by operation order only (~1e-15);
    # the suite's float64 table (tolerances.py) bounds it with room
    for name, run in (("step_", None), ("multi_step_", lr)):
        got_param, got_state = param.clone(), state.clone()
        got_moments = None if moments is None else moments.clone()
        if run is None:
            net.step_(got_param, grad, got_state, got_moments, progress=progress)
            expected_param = param + update
        else:
            net.multi_step_(list(got_param.split(sizes)), list(grad.split(sizes)), got_state, lr=lr,
                            moments=got_moments, progress=progress)
            expected_param = param + lr * update
        assert_elementwise_close(got_param - param, expected_param - param, torch.float64, f"{name}: update")
        assert_elementwise_close(got_state, new_state, torch.float64, f"{name}: state")
        if moments is not None:
            assert_moments_advanced(got_moments, grad, advanced)


# ---------------------------------------------------------------------------------------------
# (4) refusals
BAD_PROGRESS = {"missing": None, "float-t": (1.0, 10), "float-T": (1, 10.0), "bool-t": (True, 10),
                "bool-T": (0, True), "negative-t": (-1, 10), "zero-T": (0, 0), "negative-T": (2, -5),
                "triple": (1, 2, 3), "single": (1,), "int": 5, "string": "1/10"}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("verb", ["forward", "step_", "multi_step_"])
@pytest.mark.parametrize("bad", BAD_PROGRESS.values(), ids=BAD_PROGRESS.keys())
def test_a_missing_or_malformed_progress_is_refused_before_anything_moves(gen, bad, verb, backend):
    """A progress net without a well-formed (t >= 0, total_steps >= 1) pair of ints would fold garbage into the
    bias: every verb refuses it with a ValueError naming progress, parameter and state untouched."""
    net = progress_net(gen=gen, backend=backend, hidden_size=4)
    n = 5
    grad, state, param = random_grad(n, gen=gen), random_state(L, 4, n, gen=gen), torch.randn(n, generator=gen,
                                                                                              dtype=torch.float64)
    before = (state.clone(), param.clone())
    call = {"forward": lambda: net(grad, state, progress=bad),
            "step_": lambda: net.step_(param, grad, state, progress=bad),
            "multi_step_": lambda: net.multi_step_([param[:2], param[2:]], [grad[:2], grad[2:]], state,
                                                   progress=bad)}[verb]
    with pytest.raises(ValueError, match="progress"):
        call()
    assert torch.equal(state, before[0]) and torch.equal(param, before[1])
    with pytest.raises(ValueError, match="progress"):
        check_progress(bad, True)


@pytest.mark.parametrize("verb", ["forward", "step_", "multi_step_"])
def test_progress_given_to_a_net_without_the_input_is_refused(gen, verb):
    """A plain net would ignore a progress silently: refused, as a missing one is for a progress net, even when
    multi_step_ has no tensor to step."""
    net = fill_random(CoordinatewiseLSTM(4, L, backend="reference").double(), gen)
    assert not net.reads_progress and "progress_input" not in net.size_kwargs()
    n = 5
    grad, state, param = random_grad(n, gen=gen), random_state(L, 4, n, gen=gen), torch.zeros(n, dtype=torch.float64)
    call = {"forward": lambda: net(grad, state, progress=(0, 10)),
            "step_": lambda: net.step_(param, grad, state, progress=(0, 10)),
            "multi_step_": lambda: net.multi_step_([param], [grad], state, progress=(0, 10))}[verb]
    with pytest.raises(ValueError, match="progress"):
        call()
    net(grad, state)  # and without it the net steps
    with pytest.raises(ValueError, match="progress"):
        net.multi_step_([], [], state[..., :0], progress=(0, 10))  # even with nothing to step
    with pytest.raises(ValueError, match="progress"):
        progress_net(gen=gen, hidden_size=4).multi_step_([], [], state[..., :0])


@pytest.mark.parametrize("value", [1, 0, "yes", None])
def test_a_non_bool_progress_input_is_refused(value):
    """progress_input changes the weights' shapes: only True or False, for the net and the meta-training config."""
    with pytest.raises(ValueError, match="progress_input"):
        CoordinatewiseLSTM(4, progress_input=value)
    with pytest.raises(ValueError, match="progress_input"):
        MetaTrainConfig(task="quadratic", task_kwargs={"dim": 3}, progress_input=value)


def test_size_kwargs_names_progress_input_only_when_on(gen):
    """The files and signatures of plain nets read as before; a progress net's first layer has 2 more inputs."""
    on = progress_net(gen=gen, hidden_size=4)
    assert on.reads_progress and on.size_kwargs()["progress_input"] is True
    assert on.lstm.weight_ih_l0.shape == (16, registry.input_size(("paper",)) + PROGRESS_WIDTH)
    assert on.lstm.to_torch().input_size == 4
    off = CoordinatewiseLSTM(4, progress_input=False)
    assert not off.reads_progress and "progress_input" not in off.size_kwargs()
    assert off.lstm.weight_ih_l0.shape == (16, 2)


# ---------------------------------------------------------------------------------------------
# (5) the inputs' values, and that they are read
def test_progress_inputs_values_and_clamping():
    """(min(t / T, 1), log10(T) / 4): the fraction clamps at 1 past the end, the length is 0.5 at 100 steps."""
    # exact in binary floating point: 0, 0.5, 1, log10(10^k) = k
    assert progress_inputs(0, 100) == (0.0, 0.5)
    assert progress_inputs(50, 100) == (0.5, 0.5)
    assert progress_inputs(100, 100) == (1.0, 0.5)
    assert progress_inputs(250, 100) == (1.0, 0.5)  # past the end: the last step's
    assert progress_inputs(0, 1) == (0.0, 0.0) and progress_inputs(5, 1) == (1.0, 0.0)
    assert progress_inputs(5000, 10_000) == (0.5, 1.0)
    fraction, length = progress_inputs(3, 7)
    assert fraction == 3 / 7 and length == math.log10(7) / 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_progress_columns_are_read(gen, backend):
    """With non-zero progress columns the update depends on t and on T (same fraction, another length) and
    steps past the end step as the last; with zero columns every progress gives the same bits."""
    net = progress_net(("paper", "moments"), gen=gen, backend=backend)
    n = 9
    grad = random_grad(n, gen=gen)
    moments, state = moments_for(net.feature_mask, grad, gen=gen), random_state(L, H, n, gen=gen)
    with torch.no_grad():
        at = {progress: net(grad, state, moments, progress=progress)
              for progress in [(0, 10), (5, 10), (1, 10), (10, 100), (10, 10), (17, 10)]}
    for a, b in [((0, 10), (5, 10)), ((1, 10), (10, 100)), ((5, 10), (10, 10))]:
        assert (at[a][0] - at[b][0]).abs().max() > 1e-4, (a, b)
        assert (at[a][1] - at[b][1]).abs().max() > 1e-4, (a, b)
    assert torch.equal(at[(10, 10)][0], at[(17, 10)][0]) and torch.equal(at[(10, 10)][1], at[(17, 10)][1])

    with torch.no_grad():
        net.lstm.weight_ih_l0[:, -PROGRESS_WIDTH:] = 0
        blind = [net(grad, state, moments, progress=progress) for progress in PROGRESSES]
    for update, new_state in blind[1:]:
        assert torch.equal(update, blind[0][0]) and torch.equal(new_state, blind[0][1])


# ---------------------------------------------------------------------------------------------
# (6) widening
WIDENINGS = {  # (source features, source reads progress) -> target features (the target reads progress)
    "plain-to-progress": (("paper",), False, ("paper",)),
    "fewer-features-to-progress": (("paper",), False, ("paper", "moments")),
    "moments-to-all": (("moments",), False, ("paper", "moments", "long_moments")),
    "progress-fewer-features": (("long_moments",), True, ("paper", "moments", "long_moments")),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", WIDENINGS.values(), ids=WIDENINGS.keys())
def test_a_widened_net_steps_as_its_source(gen, case, backend):
    """load_widened: the source's columns land at its inputs' places (its progress columns last), the new ones are
    zero, so the progress net steps bit for bit as the source, at any progress."""
    source_features, source_progress, target_features = case
    source = fill_random(CoordinatewiseLSTM(6, L, output="tanh", features=source_features, backend=backend,
                                            progress_input=source_progress).double(), gen)
    target = CoordinatewiseLSTM(6, L, output="tanh", features=target_features, backend=backend,
                                progress_input=True).double()
    fill_random(target, gen)  # load_widened must overwrite all of it
    assert widens(source, target)
    load_widened(target, source)
    n = 11
    for progress in [(0, 5), (4, 5), (9, 5), (2, 1000)]:
        grad = random_grad(n, gen=gen)
        moments = random_moments(n, gen=gen, grad=grad)
        state = random_state(L, 6, n, gen=gen)
        with torch.no_grad():
            expected = source(grad, state, moments if source.reads_moments else None,
                              progress=progress if source_progress else None)
            got = target(grad, state, moments if target.reads_moments else None, progress=progress)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1]), progress
    new_columns = registry.input_size(target_features) - registry.input_size(source_features)
    zero = torch.count_nonzero(target.lstm.weight_ih_l0 == 0).item()
    assert zero == 4 * 6 * (new_columns + (0 if source_progress else PROGRESS_WIDTH))


def test_widens_only_to_more_inputs_of_the_same_sizes():
    """widens: features and progress input may only be added, everything else the same; else load_widened
    refuses."""
    def net(features=("paper",), progress=False, **kwargs):
        return CoordinatewiseLSTM(**{"hidden_size": 6, **kwargs}, features=features, progress_input=progress)

    assert widens(net(), net(progress=True))
    assert widens(net(progress=True), net(("paper", "moments"), progress=True))
    assert not widens(net(progress=True), net())  # dropping the progress input
    assert not widens(net(progress=True), net(progress=True))  # nothing added
    assert not widens(net(("paper", "moments")), net(progress=True))  # a feature dropped
    assert not widens(net(), net(progress=True, hidden_size=7))
    assert not widens(net(), net(progress=True, num_layers=1))
    assert not widens(net(), net(progress=True, output="tanh"))
    assert not widens(net(), net(progress=True, output_scale=0.2))
    with pytest.raises(ValueError, match="more input features"):
        load_widened(net(), net(progress=True))


def test_init_from_a_file_without_progress_starts_the_columns_at_zero(gen, tmp_path):
    """meta-train --init from a plain optimizer file into a progress run: load_initial_weights widens it."""
    source = fill_random(CoordinatewiseLSTM(6, L, backend="reference"), gen)
    save_pretrained(source, tmp_path / "plain.pt", record={"note": "test"})
    target = progress_net(gen=gen, hidden_size=6, dtype=torch.float32)
    task_problems = make_task("quadratic", dim=3).sample(2, seed=0, split="val")
    load_initial_weights(target, str(tmp_path / "plain.pt"), task_problems.groups, task_problems.dim)
    assert torch.count_nonzero(target.lstm.weight_ih_l0[:, -PROGRESS_WIDTH:]) == 0
    assert torch.equal(target.lstm.weight_ih_l0[:, :-PROGRESS_WIDTH], source.lstm.weight_ih_l0)
    grad, state = random_grad(7, gen=gen, dtype=torch.float32), random_state(L, 6, 7, gen=gen, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(target(grad, state, progress=(3, 8))[0], source(grad, state)[0])


# ---------------------------------------------------------------------------------------------
# (7) files
def test_save_load_round_trip_keeps_the_progress_input(gen, tmp_path):
    """save_pretrained / load_pretrained: kwargs with progress_input, float32 weights bit for bit, same steps."""
    net = progress_net(("paper", "moments"), "tanh", gen=gen, hidden_size=5, dtype=torch.float32)
    save_pretrained(net, tmp_path / "p.pt", record={"note": "progress"})
    loaded = load_pretrained(tmp_path / "p.pt", backend="reference")
    assert loaded.reads_progress and loaded.size_kwargs() == net.size_kwargs()
    assert loaded.record == {"note": "progress"}
    saved = net.state_dict()
    assert saved.keys() == loaded.state_dict().keys()
    for key, value in loaded.state_dict().items():  # float32 weights: bit for bit
        assert value.dtype == torch.float32 and torch.equal(value, saved[key]), key
    grad = random_grad(6, gen=gen, dtype=torch.float32)
    moments, state = moments_for(net.feature_mask, grad, gen=gen), random_state(L, 5, 6, gen=gen, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(loaded(grad, state, moments, progress=(2, 6))[0],
                           same_net(net, "reference")(grad, state, moments, progress=(2, 6))[0])


def write_verified(path, kwargs, state):
    """An optimizer file in the verified format with these contents, unchecked (what a loader may meet)."""
    buffer = io.BytesIO()
    torch.save({"net_kwargs": kwargs, "state_dict": state, "record": {}}, buffer)
    body = buffer.getvalue()
    torch.save({"format": "l2l_fast.pretrained.v2", "sha256": hashlib.sha256(body).hexdigest(), "body": body}, path)
    return path


@pytest.mark.parametrize("value", [1, 0, "True", None, 1.0])
def test_a_file_with_a_non_bool_progress_input_is_refused(gen, tmp_path, value):
    """A checksummed file whose net_kwargs hold a non-bool progress_input is refused by name; the same weights
    with True load, and without the key the progress columns do not fit."""
    net = progress_net(gen=gen, hidden_size=4, dtype=torch.float32)
    state = net.state_dict()
    path = write_verified(tmp_path / "bad.pt", {**net.size_kwargs(), "progress_input": value}, state)
    with pytest.raises(ValueError, match="progress_input"):
        load_pretrained(path)
    # the same contents with a bool load, and without the key the progress columns do not fit a plain net
    assert load_pretrained(write_verified(tmp_path / "good.pt", net.size_kwargs(), state)).reads_progress
    kwargs = {k: v for k, v in net.size_kwargs().items() if k != "progress_input"}
    with pytest.raises(ValueError, match="weight_ih_l0"):
        load_pretrained(write_verified(tmp_path / "plain.pt", kwargs, state))


# ---------------------------------------------------------------------------------------------
# (8) LearnedOptimizer
def tiny_model(gen):
    """Linear(5, 3), tanh, Linear(3, 1) in float64 (parameters of 15, 3, 3 and 1 coordinates) and its data."""
    model = nn.Sequential(nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 1)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    x, y = torch.randn(9, 5, generator=gen, dtype=torch.float64), torch.randn(9, 1, generator=gen, dtype=torch.float64)
    return model, x, y


def backward(model, x, y):
    model.zero_grad(set_to_none=True)
    ((model(x) - y) ** 2).mean().backward()


def test_total_steps_is_required_checked_and_refused(gen):
    """A progress net cannot step without the run's length; a plain one would ignore it: both are ValueErrors
    naming total_steps, and so is a total_steps that is not a positive int."""
    model, _, _ = tiny_model(gen)
    net = progress_net(gen=gen, hidden_size=4)
    with pytest.raises(ValueError, match="total_steps"):
        LearnedOptimizer(model.parameters(), net=net)
    for bad in (0, -3, 2.5, True, "10", 10.0):
        with pytest.raises(ValueError, match="total_steps"):
            LearnedOptimizer(model.parameters(), net=net, total_steps=bad)
    plain = CoordinatewiseLSTM(4).double()
    with pytest.raises(ValueError, match="total_steps"):
        LearnedOptimizer(model.parameters(), net=plain, total_steps=10)
    with pytest.raises(ValueError, match="total_steps"):  # a group's own net without the input
        LearnedOptimizer([{"params": [model[0].weight]}, {"params": [model[2].weight], "net": plain}], net=net,
                         total_steps=10)
    opt = LearnedOptimizer(model.parameters(), net=net, total_steps=10)
    assert opt.param_groups[0]["total_steps"] == 10 and opt.param_groups[0]["step_count"] == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("manual", ["multi_step_", "step_"])
@pytest.mark.parametrize("features", [("paper",), ("moments", "long_moments")], ids=["paper", "moments+long"])
def test_optimizer_steps_as_a_loop_with_progress_k_of_T(gen, features, manual, backend):
    """The k-th step() (k from 0) is net.multi_step_ (one state over the group's tensors) or step_ per tensor
    with progress (k, T), past T too; bit for bit; the step count is kept; another T gives other steps."""
    T, steps = 4, 6
    lr = 0.7 if manual == "multi_step_" else 1.0  # step_ takes no lr
    net = progress_net(features, "tanh", gen=gen, backend=backend, hidden_size=6)
    model, x, y = tiny_model(gen)
    hand, other_t = copy.deepcopy(model), copy.deepcopy(model)
    opt = LearnedOptimizer(model.parameters(), net=net, lr=lr, total_steps=T)
    other = LearnedOptimizer(other_t.parameters(), net=net, lr=lr, total_steps=T + 3)
    params = list(hand.parameters())
    sizes = [p.numel() for p in params]
    state = net.init_state(sum(sizes))
    moments = net.init_moments(sum(sizes))
    for k in range(steps):
        for m, o in ((model, opt), (other_t, other)):
            backward(m, x, y)
            o.step()
        backward(hand, x, y)
        with torch.no_grad():
            flats, grads = [p.view(-1) for p in params], [p.grad.view(-1) for p in params]
            if manual == "multi_step_":
                net.multi_step_(flats, grads, state, lr=lr, moments=moments, progress=(k, T))
            else:
                for flat, grad, s, mo in zip(flats, grads, state.split(sizes, dim=-1),
                                             [None] * len(sizes) if moments is None else moments.split(sizes, dim=-1)):
                    s_own, mo_own = s.clone(), None if mo is None else mo.clone()
                    net.step_(flat, grad, s_own, mo_own, progress=(k, T))
                    s.copy_(s_own)
                    if mo is not None:
                        mo.copy_(mo_own)
        assert opt.param_groups[0]["step_count"] == k + 1
    for p, q, r in zip(model.parameters(), hand.parameters(), other_t.parameters()):
        assert torch.equal(p, q)
        assert not torch.equal(p, r)  # T matters: the comparison above can fail
    offsets = [0, *torch.tensor(sizes).cumsum(0).tolist()]
    for j, p in enumerate(model.parameters()):
        lstm_state = opt.state[p]["lstm_state"].reshape(L, 2, 6, -1)
        assert torch.equal(lstm_state, state[..., offsets[j]:offsets[j + 1]])
        if moments is not None:
            assert torch.equal(opt.state[p]["moments"].reshape(4, -1), moments[:, offsets[j]:offsets[j + 1]])
    assert opt.state_dict()["param_groups"][0]["step_count"] == steps


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_round_trip_mid_run_continues_bit_identically(gen, backend):
    """Stop after 3 of 7 steps (T = 5: the count runs past T), save the parameters and the optimizer, load them
    into a fresh model, optimizer and net object, continue: the same bits as never stopping; a resumed run whose
    count restarted at 0 differs (so the count is what carries the progress)."""
    T = 5
    net = progress_net(("paper", "moments"), gen=gen, backend=backend, hidden_size=6)
    model, _, _ = tiny_model(gen)
    params = list(model.parameters())
    grads = [[random_grad(p.numel(), gen=gen, lo=1e-6).view(p.shape) for p in params] for _ in range(7)]

    def train(ps, opt, gs):
        for step_grads in gs:
            for p, g in zip(ps, step_grads):
                p.grad = g.clone()
            opt.step()

    straight = [nn.Parameter(p.detach().clone()) for p in params]
    train(straight, LearnedOptimizer(straight, net=net, total_steps=T), grads)
    first = [nn.Parameter(p.detach().clone()) for p in params]
    opt = LearnedOptimizer(first, net=net, total_steps=T)
    train(first, opt, grads[:3])
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in first], "optimizer": opt.state_dict(), "net": net.state_dict()},
               buffer)
    results = {}
    for restart in (False, True):
        buffer.seek(0)
        saved = torch.load(buffer, weights_only=True)
        assert saved["optimizer"]["param_groups"][0]["step_count"] == 3
        fresh = [nn.Parameter(t.clone()) for t in saved["params"]]
        other_net = CoordinatewiseLSTM(**net.size_kwargs(), backend=backend).double()
        other_net.load_state_dict(saved["net"])
        resumed = LearnedOptimizer(fresh, net=other_net, total_steps=T)
        resumed.load_state_dict(saved["optimizer"])
        assert resumed.param_groups[0]["step_count"] == 3 and resumed.param_groups[0]["total_steps"] == T
        if restart:
            resumed.param_groups[0]["step_count"] = 0
        train(fresh, resumed, grads[3:])
        results[restart] = fresh
        assert resumed.param_groups[0]["step_count"] == (4 if restart else 7)
    for a, b, c in zip(straight, results[False], results[True]):
        assert torch.equal(a, b)
        assert not torch.equal(a, c)


# ---------------------------------------------------------------------------------------------
# (9) meta-training
def quadratic_problems(P=2, seed=5):
    return make_task("quadratic", dim=3).sample(P, seed=seed, split="val")


@pytest.mark.parametrize("features", [("paper",), ("paper", "moments")], ids=["paper", "paper+moments"])
def test_truncation_reads_start_plus_j_of_horizon_and_trains_the_columns(gen, features):
    """truncation(..., horizon=H): step start + j reads (start + j, H), as a hand-written loop of net(...,
    progress=...) (meta-loss and parameters bit for bit); the meta-loss reaches the progress columns."""
    torch.manual_seed(0)
    problems = quadratic_problems()
    net = progress_net(features, gen=gen, backend="auto", hidden_size=6, dtype=torch.float32)
    start, steps, horizon = 2, 3, 8
    params0 = problems.init_params() + 0.3 * torch.randn(problems.init_params().shape, generator=gen)
    _, grad0 = loss_and_grad(problems, params0, start, keep_graph=False)

    def run(h):
        return truncation(net, problems, params0, grad0, initial_state(net, params0.numel()), start, steps,
                          horizon=h)

    meta_loss, history, params, _, _ = run(horizon)
    expected, p, grad = params0.new_zeros(()), params0, grad0
    carried = net.init_state(params0.numel())
    moments = net.init_moments(params0.numel())
    for j in range(steps):
        flat = grad.reshape(-1)
        if moments is not None:
            moments = net.advance_moments(flat, moments)
        update, carried = net(flat, carried, moments, progress=(start + j, horizon))
        p = p + update.view(p.shape)
        losses, grad = loss_and_grad(problems, p, start + j + 1, keep_graph=True)
        expected = expected + losses.sum()
    assert torch.equal(meta_loss.detach(), expected.detach()) and torch.equal(params, p.detach())
    assert not torch.equal(run(2 * horizon)[0].detach(), meta_loss.detach())  # the horizon is read
    net.zero_grad(set_to_none=True)
    meta_loss.backward()
    columns = net.lstm.weight_ih_l0.grad[:, -PROGRESS_WIDTH:]
    assert torch.isfinite(columns).all() and torch.count_nonzero(columns) > 0
    with pytest.raises(ValueError, match="horizon"):
        run(None)
    assert progress_at(net, 3, 8) == (3, 8) and progress_at(CoordinatewiseLSTM(4), 3, 8) is None


def test_a_coordinate_sampled_truncation_reads_progress_too(gen):
    """--coordinate-fraction: the sampled coordinates (net) and the others (step_) both read (start + j, H): the
    parameters are the full truncation's, and another horizon moves them by far more than the tolerance."""
    problems = quadratic_problems(P=3)
    net = progress_net(("paper", "moments"), gen=gen, backend="auto", hidden_size=6, dtype=torch.float32)
    start, steps, horizon = 1, 3, 5
    params0 = problems.init_params() + 0.3 * torch.randn(problems.init_params().shape, generator=gen)
    _, grad0 = loss_and_grad(problems, params0, start, keep_graph=False)
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))

    def run(h, fraction):
        sample = None if fraction == 1 else CoordinateSample(params0.numel(), fraction, generator(seed))
        return truncation(net, problems, params0, grad0, initial_state(net, params0.numel()), start, steps,
                          sample=sample, horizon=h)[2]

    full, sampled, other = run(horizon, 1), run(horizon, 0.5), run(2 * horizon, 0.5)
    # float32 parameters |.| < 2 (ulp 1.2e-7); forward and step_ may differ by operation order, a few ulp per step
    # over 3 steps: 1e-6 absolute; another horizon moves every coordinate (sampled or not) by more than 1e-5
    assert (full - sampled).abs().max() <= 1e-6
    assert ((other - sampled).abs() > 1e-5).all()


def test_run_learned_reads_t_of_steps(gen):
    """run_learned(net, problems, steps) = a loop of learned_step_ with progress (t, steps); the first steps of a
    longer run read another length and fraction, so they differ."""
    problems = quadratic_problems()
    net = progress_net(("paper", "moments"), gen=gen, backend="auto", hidden_size=6, dtype=torch.float32)
    steps = 5
    got = run_learned(net, problems, steps)
    params = problems.init_params()
    flat, state, history = params.reshape(-1).clone(), initial_state(net, params.numel()), []
    for t in range(steps + 1):
        losses, grad = loss_and_grad(problems, flat.view(params.shape), t, keep_graph=False)
        history.append(losses.detach())
        if t < steps:
            learned_step_(net, flat, grad, state, (t, steps))
    assert torch.equal(got, torch.stack(history))
    longer = run_learned(net, problems, steps + 3)[: steps + 1]
    # theta_0 is the same; from step 0 on the run's length (log10 T / 4) differs, and later the fraction too
    assert torch.equal(longer[0], got[0])
    assert all(not torch.equal(longer[t], got[t]) for t in range(1, steps + 1))


def test_pes_particles_read_start_plus_j_of_horizon(gen):
    """PES: a particle's step start + j reads (start + j, horizon) with its perturbed weights, across two
    truncations (state carried): its parameters and meta-loss are a hand-written run's bit for bit; another horizon
    gives another run."""
    problems = quadratic_problems()
    net = progress_net(("paper",), gen=gen, backend="auto", hidden_size=6, dtype=torch.float32)
    horizon, steps, sigma = 6, 3, 0.05
    seeds = [int(s) for s in torch.randint(0, 2**31, (2,), generator=gen)]

    def episode_of(h):
        episode = PESEpisode(net, problems, pairs=1, sigma=sigma, horizon=h)
        results = [episode.truncation(k * steps, steps, generator(seed)) for k, seed in enumerate(seeds)]
        return episode, results[-1]

    episode, result = episode_of(horizon)
    params = problems.init_params()
    perturbed, theta = copy.deepcopy(net), flat_weights(net)
    flat, state = params.reshape(-1).clone(), initial_state(net, params.numel())
    _, grad = loss_and_grad(problems, params, 0, keep_graph=False)
    for k, seed in enumerate(seeds):
        eps = torch.randn(1, theta.numel(), generator=generator(seed), dtype=torch.float64) * sigma
        torch.nn.utils.vector_to_parameters(theta + eps[0].to(theta.dtype), perturbed.parameters())
        total = 0.0
        for j in range(steps):
            learned_step_(perturbed, flat, grad, state, (k * steps + j, horizon))
            losses, grad = loss_and_grad(problems, flat.view(params.shape), k * steps + j + 1, keep_graph=False)
            total += losses.sum().item()
    assert torch.equal(episode.particles[0].flat, flat) and result.meta_losses[0, 0].item() == total
    assert not torch.equal(episode_of(2 * horizon)[0].particles[0].flat, flat)
    with pytest.raises(ValueError, match="horizon"):
        episode_of(None)


@pytest.mark.parametrize("estimator", ["backprop", "pes", "off"])
def test_cli_meta_train_progress_input(tmp_path, estimator):
    """meta-train --progress-input trains a progress net with either estimator; its checkpoint records
    progress_input and best.pt loads as a net that reads progress (without the flag: neither)."""
    out = tmp_path / "r"
    argv = ["meta-train", "--task", "quadratic", "--dim", "3", "--epochs", "2", "--horizon", "4", "--unroll", "2",
            "--meta-batch", "2", "--eval-every", "1", "--eval-problems", "2", "--no-progress", "--threads", "1",
            "--estimator", "pes" if estimator == "pes" else "backprop", "--pes-pairs", "1", "--out", str(out)]
    on = estimator != "off"
    assert cli_main([*argv, "--progress-input"] if on else argv) == 0
    checkpoint = load_verified(out / "checkpoint.pt")
    assert checkpoint["config"]["progress_input"] is on
    assert checkpoint["net_kwargs"].get("progress_input", False) is on
    net = load_pretrained(out / "best.pt")
    assert net.reads_progress is on
    assert net.lstm.weight_ih_l0.shape[1] == 2 + (PROGRESS_WIDTH if on else 0)
    if on:  # it steps, with the optimizer's total_steps
        theta = nn.Parameter(torch.ones(3))
        opt = LearnedOptimizer([theta], net=net, total_steps=3)
        theta.grad = torch.tensor([0.5, -1.0, 2.0])
        opt.step()
        assert torch.isfinite(theta).all() and not torch.equal(theta, torch.ones(3))


# ---------------------------------------------------------------------------------------------
# (10) GroupedLSTM
def test_grouped_lstm_passes_progress_to_each_group(gen):
    """Each group's net steps its columns with the progress given; step_ writes the same; nets that disagree on
    reading progress are refused."""
    a = progress_net(("paper",), "linear", gen=gen, hidden_size=5)
    b = progress_net(("paper",), "tanh", gen=gen, hidden_size=5)
    groups, dim, P = [ParamGroup("a", 0, 2), ParamGroup("b", 2, 5)], 5, 3
    grouped = GroupedLSTM({"a": a, "b": b}, groups, dim)
    assert grouped.reads_progress
    grad = random_grad(P * dim, gen=gen)
    state = random_state(L, 5, P * dim, gen=gen)
    rows = grad.view(P, dim)
    progress = (2, 7)
    with torch.no_grad():
        update, new_state = grouped(grad, state, progress=progress)
        ua, sa = a(rows[:, :2].reshape(-1), state[..., :P * 2].contiguous(), progress=progress)
        ub, sb = b(rows[:, 2:].reshape(-1), state[..., P * 2:].contiguous(), progress=progress)
        other, _ = grouped(grad, state, progress=(6, 7))
    assert torch.equal(update.view(P, dim), torch.cat([ua.view(P, 2), ub.view(P, 3)], dim=1))
    assert torch.equal(new_state, torch.cat([sa, sb], dim=-1))
    assert not torch.equal(update, other)
    param, stepped = torch.randn(P * dim, generator=gen, dtype=torch.float64), state.clone()
    expected = param + update
    grouped.step_(param, grad, stepped, progress=progress)
    assert torch.equal(param, expected) and torch.equal(stepped, new_state)
    with pytest.raises(ValueError, match="progress"):
        grouped(grad, state)
    plain = CoordinatewiseLSTM(5, L).double()
    with pytest.raises(ValueError, match="progress"):
        GroupedLSTM({"a": a, "b": plain}, groups, dim)
