"""The registry of input features (l2l_fast.features): its helpers, its agreement with the kernels' table
(csrc/input_features.h), and the net built for a feature set (construction, state_dict, files).

The kernels, the gradients, the ops' registration and bad input are tested for every set of FEATURE_SETS by
the test files of those families."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import FEATURE_SETS, feature_id, make_net, random_grad, requires_native
from tolerances import assert_elementwise_close
from l2l_fast import CoordinatewiseLSTM, reference
from l2l_fast import features as registry
from l2l_fast.pretrained import load_pretrained, save_pretrained


@requires_native
def test_registry_matches_the_kernels_table():
    """Names, bits and widths, in bit order: what the Python reference computes is what the kernels compute."""
    from l2l_fast import _C

    assert [(f.name, f.bit, f.width) for f in registry.REGISTRY.values()] == [tuple(t) for t in _C.feature_table()]


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
    x = registry.compute(grad, features, 10.0)
    assert x.shape == (50, registry.input_size(features))
    expected = torch.cat([f.fn(grad, 10.0) for f in registry.REGISTRY.values() if features & f.bit], dim=1)
    assert torch.equal(x, expected)


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


def test_net_default_is_the_papers_set():
    net = CoordinatewiseLSTM()
    assert net.features == ("paper",) and net.lstm.weight_ih_l0.shape == (80, 2)
    kwargs = net.size_kwargs()
    del kwargs["features"]  # a file written before features existed
    assert CoordinatewiseLSTM(**kwargs).features == ("paper",)


@pytest.mark.parametrize("features", FEATURE_SETS, ids=feature_id)
def test_saved_net_round_trips_its_features(gen, tmp_path, features):
    net = make_net(5, 2, gen=gen, dtype=torch.float32, features=features)
    path = tmp_path / "net.pt"
    save_pretrained(net, path, record={"note": "test"})
    loaded = load_pretrained(str(path))
    assert loaded.features == net.features
    for a, b in zip(loaded.weights(), net.weights()):
        assert torch.equal(a, b)


def test_file_without_features_loads_as_the_papers_set(gen, tmp_path):
    """Files saved before the feature mask existed have no `features` in their net_kwargs."""
    net = make_net(5, 2, gen=gen, dtype=torch.float32)
    kwargs = net.size_kwargs()
    del kwargs["features"]
    path = tmp_path / "old.pt"
    torch.save({"net_kwargs": kwargs, "state_dict": net.state_dict(), "record": {}}, path)
    loaded = load_pretrained(str(path))
    assert loaded.features == ("paper",)
    grad = random_grad(9, gen=gen, dtype=torch.float32)
    assert torch.equal(loaded(grad, loaded.init_state(9))[0], net(grad, net.init_state(9))[0])


@pytest.mark.parametrize("name", ["mnist", "quadratic"])
def test_shipped_nets_load_with_the_papers_set(name):
    net = CoordinatewiseLSTM.from_pretrained(name)
    assert net.features == ("paper",) and net.feature_mask == 1


@requires_native
@pytest.mark.parametrize("features", FEATURE_SETS, ids=feature_id)
def test_native_net_equals_reference_net(gen, features):
    """The module front passes its mask to the ops: native and reference backends agree."""
    net = make_net(6, 2, gen=gen, backend="native", features=features)
    ref = make_net(6, 2, gen=gen, backend="reference", features=features)
    ref.load_state_dict(net.state_dict())
    grad = random_grad(40, gen=gen)
    grad[3] = math.nan
    update, state = net(grad, net.init_state(40))
    e_update, e_state = ref(grad, ref.init_state(40))
    assert_elementwise_close(update, e_update, torch.float64, "update")
    assert_elementwise_close(state, e_state, torch.float64, "new_state")
