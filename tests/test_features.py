"""The registry of input features (l2l_fast.features): its helpers, its agreement with the kernels' table
(csrc/input_features.h), the moments feature (RNNprop's scale-free inputs) and the running moments it reads,
and the net built for a feature set and output kind (construction, state_dict, files).

The kernels, the gradients, the ops' registration and bad input are tested for every set of FEATURE_SETS by
the test files of those families."""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from conftest import (FEATURE_SETS, VARIANTS, feature_id, make_net, moments_for, random_grad, random_moments,
                      requires_native, variant_id)
from tolerances import assert_elementwise_close
from l2l_fast import CoordinatewiseLSTM, reference
from l2l_fast import features as registry
from l2l_fast.pretrained import load_pretrained, save_pretrained

HEADER = Path(__file__).resolve().parents[1] / "csrc" / "input_features.h"


@requires_native
def test_registry_matches_the_kernels_table():
    """Names, bits, widths and which read the moments, in bit order: what the Python reference computes is what
    the kernels compute."""
    from l2l_fast import _C

    assert ([(f.name, f.bit, f.width, f.reads_moments) for f in registry.REGISTRY.values()]
            == [tuple(t) for t in _C.feature_table()])


def test_moment_constants_and_readers_match_the_kernels_header():
    """BETA1, BETA2, BETA_LONG, EPS, MOMENT_ROWS and which features read moments, as csrc/input_features.h declares them
    (the extension exposes neither)."""
    text = HEADER.read_text()

    def constant(name):
        return float(re.search(rf"constexpr \w+ {name} = ([0-9.e+-]+);", text).group(1))

    assert (constant("kMomentBeta1"), constant("kMomentBeta2"), constant("kMomentBetaLong"), constant("kMomentEps"),
            constant("kMomentRows")) == (registry.BETA1, registry.BETA2, registry.BETA_LONG, registry.EPS,
                                         registry.MOMENT_ROWS)
    readers = dict(re.findall(r'kName = "(\w+)";\s*static constexpr bool kReadsMoments = (true|false);', text))
    assert readers == {f.name: str(f.reads_moments).lower() for f in registry.REGISTRY.values()}


def test_bits_are_consecutive_in_registration_order():
    assert [f.bit for f in registry.REGISTRY.values()] == [1 << k for k in range(len(registry.ALL))]
    assert registry.ALL_MASK == (1 << len(registry.ALL)) - 1
    assert registry.DEFAULT == ("paper",) and registry.DEFAULT_MASK == 1


@pytest.mark.parametrize("features", FEATURE_SETS, ids=feature_id)
def test_helpers_round_trip(features):
    names = registry.names_of(features)
    assert registry.mask_of(names) == registry.mask_of(features) == features
    assert registry.mask_of(tuple(reversed(names))) == features  # a set: order does not matter
    assert registry.input_size(names) == sum(registry.REGISTRY[n].width for n in names)
    if len(names) == 1:
        assert registry.mask_of(names[0]) == features


@pytest.mark.parametrize("features", FEATURE_SETS, ids=feature_id)
def test_compute_is_the_features_in_bit_order(gen, features):
    grad = random_grad(50, gen=gen)
    moments = moments_for(features, grad, gen=gen)
    x = registry.compute(grad, features, 10.0, moments)
    assert x.shape == (50, registry.input_size(features))
    expected = torch.cat([f(grad, 10.0, moments) for f in registry.REGISTRY.values() if features & f.bit], dim=1)
    assert torch.equal(x, expected)
    assert registry.reads_moments(features) == any(f.reads_moments for f in registry.REGISTRY.values()
                                                   if features & f.bit)


def test_a_feature_that_reads_moments_refuses_none(gen):
    with pytest.raises(ValueError, match="^moments: feature 'moments' reads the running moments"):
        registry.compute(random_grad(5, gen=gen), "moments", 10.0)


# ---------------------------------------------------------------------------------------------
# the moments feature and the running moments
# (name, row of its second moment, that moment's decay): the scale-free features
SCALE_FREE = [("moments", 1, registry.BETA2), ("long_moments", 3, registry.BETA_LONG)]
SCALE_FREE_IDS = [name for name, _, _ in SCALE_FREE]


@pytest.mark.parametrize("name,row,beta", SCALE_FREE, ids=SCALE_FREE_IDS)
def test_scale_free_feature_formula(name, row, beta):
    """By hand: (g, m / (1 - b1^t)) / (sqrt(s / (1 - b^t)) + eps), s = v (RNNprop's, b = 0.95) or u (the long one,
    b = 0.999), t below 1 counting as 1."""
    b1, eps = registry.BETA1, registry.EPS
    grad = torch.tensor([0.3, -2.0, 1e-3, 5.0], dtype=torch.float64)
    moments = torch.tensor([[0.1, -0.4, 0.0, 2.0], [0.2, 0.5, 1e-20, 9.0], [1.0, 3.0, 0.0, 40.0],
                            [0.7, 1e-3, 4e-19, 300.0]], dtype=torch.float64)
    x = registry.compute(grad, name, 10.0, moments)
    for j in range(4):
        m, t, second = moments[0, j].item(), max(moments[2, j].item(), 1.0), moments[row, j].item()
        inv = 1 / (math.sqrt(second / (1 - beta**t)) + eps)
        assert x[j, 0].item() == pytest.approx(grad[j].item() * inv, rel=1e-14)
        assert x[j, 1].item() == pytest.approx(m / (1 - b1**t) * inv, rel=1e-14, abs=1e-300)
    assert registry.REGISTRY[name].width == 2 and registry.REGISTRY[name].reads_moments


def test_feature_docs_name_their_source():
    assert "RNNprop" in registry.REGISTRY["moments"].doc and "0.999" in registry.REGISTRY["long_moments"].doc


@pytest.mark.parametrize("name", SCALE_FREE_IDS)
def test_scale_free_features_are_scale_free(gen, name):
    """A gradient history scaled by any factor gives the same inputs (as long as the square roots >> eps)."""
    grads = [random_grad(42, gen=gen, lo=1.0, hi=1e3)[2:] for _ in range(5)]  # not the two forced tiny ones
    inputs = []
    for factor in (1.0, 1e-2, 1e4):  # |g| >= 1e-2: eps is at most 1e-6 of the square roots
        moments = torch.zeros(registry.MOMENT_ROWS, 40, dtype=torch.float64)
        for g in grads:
            moments = registry.advance_moments(factor * g, moments)
        inputs.append(registry.compute(factor * grads[-1], name, 10.0, moments))
    torch.testing.assert_close(inputs[1], inputs[0], rtol=1e-5, atol=0)
    torch.testing.assert_close(inputs[2], inputs[0], rtol=1e-5, atol=0)


def test_long_moments_shrink_as_the_gradient_falls_and_rnnprops_do_not():
    """What the long moment is for: a gradient falling 10x every 100 steps (as near an optimum). RNNprop's input
    is set by the fall per ~20 steps of v's memory: g / sqrt(v_hat) -> sqrt((1 - r^-2 b2) / (1 - b2)) = 0.32
    (r = 10^-0.01), whatever g is. u averages ~500 steps of g^2, ~0.044 (the early gradients), so the long input
    at g = 1e-5 is ~5e-5: it shrinks with the gradient."""
    moments = torch.zeros(registry.MOMENT_ROWS, 1, dtype=torch.float64)
    for step in range(500):
        g = torch.full((1,), 10.0 ** (-step / 100), dtype=torch.float64)
        moments = registry.advance_moments(g, moments)
    short = registry.compute(g, "moments", 10.0, moments)[0, 0].item()
    long = registry.compute(g, "long_moments", 10.0, moments)[0, 0].item()
    assert 0.3 < short < 0.4, short
    assert long < 1e-3 * short, long


@pytest.mark.parametrize("name,row,beta", SCALE_FREE, ids=SCALE_FREE_IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_scale_free_features_are_bounded_once_advanced(gen, dtype, name, row, beta):
    """With moments advanced with g: |x0| <= 1 / sqrt(1 - b) (s_hat >= (1 - b) g^2); the first step from zeros
    gives x0 = x1 = g / (|g| + eps)."""
    grad = random_grad(2000, gen=gen, dtype=dtype)
    moments = random_moments(2000, gen=gen, dtype=dtype, grad=grad)
    x = registry.compute(grad, name, 10.0, moments)
    assert x[:, 0].abs().max().item() <= 1 / math.sqrt(1 - beta) * (1 + 1e-5)
    fresh = torch.zeros(registry.MOMENT_ROWS, 2000, dtype=dtype)
    first = registry.compute(grad, name, 10.0, registry.advance_moments(grad, fresh))
    expected = grad.double() / (grad.double().abs() + registry.EPS)
    torch.testing.assert_close(first.double(), torch.stack([expected, expected], 1), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name,row,beta", SCALE_FREE, ids=SCALE_FREE_IDS)
def test_moments_are_data(gen, name, row, beta):
    """Only x0 = g * inv depends on g (d x0 / d g = inv); nothing flows to the moments."""
    grad = random_grad(30, gen=gen).requires_grad_(True)
    moments = random_moments(30, gen=gen, grad=grad.detach()).requires_grad_(True)
    x = registry.compute(grad, name, 10.0, moments)
    d_grad, d_moments = torch.autograd.grad(x.sum(), [grad, moments], allow_unused=True)
    assert d_moments is None
    t, second = moments.detach()[2], moments.detach()[row]
    inv = 1 / (torch.sqrt(second / (1 - beta ** t.clamp(min=1))) + registry.EPS)
    torch.testing.assert_close(d_grad, inv, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["f64", "f32", "bf16_grad"])
def test_advance_moments(gen, dtype):
    """m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2, t + 1, u = b3 u + (1 - b3) g^2 in the moments' dtype (a
    16-bit gradient widened); a NaN/Inf-gradient column kept bit for bit; a new tensor, no autograd."""
    math_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    grad = random_grad(50, gen=gen).to(dtype)
    grad[[3, 7, 11]] = torch.tensor([math.nan, math.inf, -math.inf]).to(dtype)
    moments = random_moments(50, gen=gen, dtype=math_dtype)
    moments.requires_grad_(True)
    advanced = registry.advance_moments(grad, moments)
    assert advanced.dtype == math_dtype and advanced.shape == (4, 50) and not advanced.requires_grad
    g, (m, v, t, u) = grad.to(math_dtype).double(), moments.detach().double()
    # the decays as the moments' dtype holds them (1 - 0.999 in float32 is off by 1.3e-5 relative)
    b1, b2, b3 = (torch.tensor(b, dtype=math_dtype).item() for b in (registry.BETA1, registry.BETA2, registry.BETA_LONG))
    good = torch.isfinite(g)
    rel = 4 * torch.finfo(math_dtype).eps
    torch.testing.assert_close(advanced[0, good].double(), (b1 * m + (1 - b1) * g)[good], rtol=rel,
                               atol=rel * (m.abs() + g.abs())[good].max().item())
    torch.testing.assert_close(advanced[1, good].double(), (b2 * v + (1 - b2) * g * g)[good], rtol=rel, atol=0)
    assert torch.equal(advanced[2, good], moments.detach()[2, good] + 1)
    torch.testing.assert_close(advanced[3, good].double(), (b3 * u + (1 - b3) * g * g)[good], rtol=rel, atol=0)
    assert torch.equal(advanced[:, ~good], moments.detach()[:, ~good])


def test_upgrade_moments_appends_u_started_at_v(gen):
    """[3, ...] moments from files written before u existed: u = v; [4, ...] unchanged; other shapes refused."""
    old = random_moments(12, gen=gen)[:3].reshape(3, 3, 4)
    new = registry.upgrade_moments(old)
    assert new.shape == (4, 3, 4) and torch.equal(new[:3], old) and torch.equal(new[3], old[1])
    assert registry.upgrade_moments(new) is new
    for bad in (torch.zeros(2, 5), torch.zeros(5, 5), torch.zeros(())):
        with pytest.raises(ValueError, match="^moments: expected 4 rows"):
            registry.upgrade_moments(bad)


def test_paper_feature_is_reference_preprocess(gen):
    grad = random_grad(100, gen=gen, p=7.0)
    assert torch.equal(registry.compute(grad, 1, 7.0), reference.preprocess(grad, 7.0))
    assert registry.REGISTRY["paper"].width == 2 and "Appendix A" in registry.REGISTRY["paper"].doc


@pytest.mark.parametrize("bad", [0, -1, registry.ALL_MASK + 1, 1 << 20, (), ("paper", "nope"), "nope", True])
def test_bad_features_name_the_argument(bad):
    with pytest.raises(ValueError, match="features"):
        registry.mask_of(bad)


# ---------------------------------------------------------------------------------------------
# the net
@pytest.mark.parametrize("features", FEATURE_SETS, ids=feature_id)
def test_net_keeps_names_and_builds_its_input_size(features):
    names = registry.names_of(features)
    for given in (features, names, list(reversed(names))):
        net = CoordinatewiseLSTM(4, 2, features=given)
        assert net.features == names and net.feature_mask == features
        assert net.lstm.input_size == registry.input_size(features)
        assert net.lstm.weight_ih_l0.shape == (16, registry.input_size(features))
        assert net.size_kwargs()["features"] == names
        assert f"features={names}" in repr(net)
        assert net.lstm.to_torch().input_size == registry.input_size(features)


@pytest.mark.parametrize("features", FEATURE_SETS, ids=feature_id)
def test_net_makes_and_advances_its_moments(gen, features):
    """init_moments: zeros [4, n] on the net's device and dtype (or those asked for), None for a net that reads
    none; advance_moments: features.advance_moments, None for None."""
    net = CoordinatewiseLSTM(4, 2, features=features).double()
    assert net.reads_moments == registry.reads_moments(features)
    moments = net.init_moments(7)
    grad = random_grad(7, gen=gen)
    if not net.reads_moments:
        assert moments is None and net.advance_moments(grad, moments) is None
        return
    assert moments.shape == (registry.MOMENT_ROWS, 7) and moments.dtype == torch.float64 and torch.count_nonzero(moments) == 0
    assert net.init_moments(7, dtype=torch.float32).dtype == torch.float32
    assert torch.equal(net.advance_moments(grad, moments), registry.advance_moments(grad, moments))
    assert torch.count_nonzero(moments) == 0, "advance_moments returns new moments"
    with pytest.raises(ValueError, match="^n: "):
        net.init_moments(-1)


@pytest.mark.parametrize("output,kind", [("linear", 0), ("tanh", 1)])
def test_net_output_kinds(gen, output, kind):
    """output: a name kept on the net, the ops' int as output_kind; in size_kwargs and the repr. tanh bounds every
    update by |output_scale|."""
    net = make_net(4, 2, gen=gen, output=kind, output_scale=0.5, kind="saturating")
    assert net.output == output and net.output_kind == kind
    assert net.size_kwargs()["output"] == output and f"output={output!r}" in repr(net)
    grad = random_grad(200, gen=gen)
    update, _ = net(grad, net.init_state(200))
    linear_net = make_net(4, 2, gen=gen, output_scale=0.5)
    linear_net.load_state_dict(net.state_dict())
    y = linear_net(grad, linear_net.init_state(200))[0] / 0.5
    torch.testing.assert_close(update, 0.5 * (torch.tanh(y) if output == "tanh" else y), rtol=1e-12, atol=1e-15)


def test_net_default_is_the_papers_set():
    net = CoordinatewiseLSTM()
    assert net.features == ("paper",) and net.lstm.weight_ih_l0.shape == (80, 2) and net.output == "linear"
    kwargs = net.size_kwargs()
    del kwargs["features"], kwargs["output"]  # a file written before features and output existed
    rebuilt = CoordinatewiseLSTM(**kwargs)
    assert rebuilt.features == ("paper",) and rebuilt.output == "linear" and not rebuilt.reads_moments


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_saved_net_round_trips_its_features_and_output(gen, tmp_path, variant):
    features, output = variant
    net = make_net(5, 2, gen=gen, dtype=torch.float32, features=features, output=output)
    path = tmp_path / "net.pt"
    save_pretrained(net, path, record={"note": "test"})
    loaded = load_pretrained(str(path))
    assert loaded.features == net.features and loaded.output == net.output
    for a, b in zip(loaded.weights(), net.weights()):
        assert torch.equal(a, b)


def test_file_without_features_loads_as_the_papers_set(gen, tmp_path):
    """Files saved before the feature mask and the output kind existed have neither in their net_kwargs."""
    net = make_net(5, 2, gen=gen, dtype=torch.float32)
    kwargs = net.size_kwargs()
    del kwargs["features"], kwargs["output"]
    path = tmp_path / "old.pt"
    torch.save({"net_kwargs": kwargs, "state_dict": net.state_dict(), "record": {}}, path)
    loaded = load_pretrained(str(path))
    assert loaded.features == ("paper",) and loaded.output == "linear"
    grad = random_grad(9, gen=gen, dtype=torch.float32)
    assert torch.equal(loaded(grad, loaded.init_state(9))[0], net(grad, net.init_state(9))[0])


@pytest.mark.parametrize("name", ["mnist", "quadratic"])
def test_shipped_nets_load_with_the_papers_set(name):
    net = CoordinatewiseLSTM.from_pretrained(name)
    assert net.features == ("paper",) and net.feature_mask == 1 and net.output == "linear"
    assert net.init_moments(5) is None


@requires_native
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_native_net_equals_reference_net(gen, variant):
    """The module front passes its mask, moments and output kind to the ops: native and reference backends agree."""
    features, output = variant
    net = make_net(6, 2, gen=gen, backend="native", features=features, output=output)
    ref = make_net(6, 2, gen=gen, backend="reference", features=features, output=output)
    ref.load_state_dict(net.state_dict())
    grad = random_grad(40, gen=gen)
    grad[3] = math.nan
    moments = moments_for(features, grad, gen=gen)
    update, state = net(grad, net.init_state(40), moments)
    e_update, e_state = ref(grad, ref.init_state(40), moments)
    assert_elementwise_close(update, e_update, torch.float64, "update")
    assert_elementwise_close(state, e_state, torch.float64, "new_state")
