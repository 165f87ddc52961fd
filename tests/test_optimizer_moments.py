"""LearnedOptimizer with a net that reads the gradient's running moments (features "moments", RNNprop's inputs)
and with a tanh output: the moments live next to the LSTM state in the optimizer's state, in the math dtype,
are advanced by the fused step, and round-trip through state_dict; a state_dict without them (or with
mis-shaped ones) is refused."""
from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

from conftest import load_weights, random_grad, random_weights
from l2l_fast import CoordinatewiseLSTM, LearnedOptimizer
from l2l_fast import features as registry
from tolerances import ELEMENTWISE

STEPS = 5
NETS = {  # (features, output)
    "paper+moments_tanh": (("paper", "moments"), "tanh"),
    "moments_linear": (("moments",), "linear"),
    "moments_tanh": (("moments",), "tanh"),
    "moments+long_moments_tanh": (("moments", "long_moments"), "tanh"),
}


def moments_net(features, output, *, gen, hidden_size=6, num_layers=2, backend="reference", dtype=torch.float64,
                output_scale=0.1):
    net = CoordinatewiseLSTM(hidden_size, num_layers, output_scale=output_scale, backend=backend, features=features,
                             output=output).to(dtype)
    return load_weights(net, random_weights(hidden_size, num_layers, gen=gen, dtype=dtype,
                                            features=registry.mask_of(features)))


def make_params(shapes, dtype, gen):
    params = []
    for shape in shapes:
        params.append(nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)))
    return params


def non_contiguous(param):
    """The same values, stored in reversed dim order."""
    reverse = list(reversed(range(param.dim())))
    return nn.Parameter(param.detach().permute(*reverse).contiguous().permute(*reverse))


class HandWritten:
    """The optimizer written out per parameter on the net's own verbs: moments = net.advance_moments(g, moments),
    update, state = net(g, state, moments), p += lr * update, in float64; a coordinate with a NaN/Inf gradient
    keeps its value, state and moments (the ops' policy), a parameter without a gradient is skipped."""

    def __init__(self, groups):
        self.groups = []
        for params, net, lr in groups:
            flat = [p.detach().reshape(-1).double().clone() for p in params]
            self.groups.append(dict(net=net, lr=lr, params=flat,
                                    states=[net.init_state(t.numel(), dtype=torch.float64) for t in flat],
                                    moments=[net.init_moments(t.numel(), dtype=torch.float64) for t in flat]))

    def step(self, grads_per_group):
        for group, grads in zip(self.groups, grads_per_group):
            net = group["net"]
            for k, grad in enumerate(grads):
                if grad is None:
                    continue
                g = grad.reshape(-1).double()
                finite = torch.isfinite(g)
                moments = net.advance_moments(g, group["moments"][k])
                with torch.no_grad():
                    update, state = net(torch.where(finite, g, 0.0), group["states"][k], moments)
                group["params"][k] = torch.where(finite, group["params"][k] + group["lr"] * update, group["params"][k])
                group["states"][k] = torch.where(finite, state, group["states"][k])
                group["moments"][k] = moments


def grads_for(params, gen, step):
    """Random gradients; at step 2 the first parameter has none and the second has a NaN and an Inf coordinate."""
    grads = []
    for k, p in enumerate(params):
        g = random_grad(p.numel(), gen=gen, lo=1e-6).reshape(p.shape).to(p.dtype)
        if step == 2 and k == 0:
            g = None
        elif step == 2 and k == 1 and p.numel() >= 2:
            g.view(-1)[0], g.view(-1)[-1] = float("nan"), float("inf")
        grads.append(g)
    return grads


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("kind", NETS.values(), ids=NETS.keys())
def test_matches_a_loop_over_advance_moments_and_forward(gen, kind, backend):
    """Two param groups (a moments net of `kind`, lr 1; a paper + moments tanh net, lr 0.5), tensors of several
    shapes (a 0-dim one, a non-contiguous one), a step with a missing gradient and non-finite coordinates: the
    optimizer's parameters, LSTM states and moments equal the hand-written loop in float64."""
    features, output = kind
    nets = [moments_net(features, output, gen=gen, backend=backend),
            moments_net(("paper", "moments"), "tanh", gen=gen, hidden_size=4, num_layers=1, backend=backend,
                        output_scale=0.3)]
    first = make_params([(4, 3), (7,), ()], torch.float64, gen)
    second = make_params([(2, 3, 2), (5, 3)], torch.float64, gen)
    second[1] = non_contiguous(second[1])
    assert not second[1].is_contiguous()
    hand = HandWritten([(first, nets[0], 1.0), (second, nets[1], 0.5)])
    opt = LearnedOptimizer([{"params": first, "net": nets[0]}, {"params": second, "net": nets[1], "lr": 0.5}])
    for step in range(STEPS):
        grads = [grads_for(first, gen, step), grads_for(second, gen, step)]
        for params, group_grads in zip((first, second), grads):
            for p, g in zip(params, group_grads):
                p.grad = g
        opt.step()
        hand.step(grads)
    tol = ELEMENTWISE[torch.float64] if backend == "auto" else dict(rtol=1e-12, atol_rel=0.0, atol=1e-15)
    for g, params in enumerate((first, second)):
        expected = hand.groups[g]
        for k, p in enumerate(params):
            name = f"group {g} param {k}"
            state, moments = opt.state[p]["lstm_state"], opt.state[p]["moments"]
            assert moments.shape == (registry.MOMENT_ROWS, *p.shape) and moments.dtype == torch.float64, name
            assert state.shape == (*state.shape[:3], *p.shape), name
            close(p.detach().reshape(-1), expected["params"][k], tol, f"{name}: value")
            close(state.reshape(*state.shape[:3], -1), expected["states"][k], tol, f"{name}: state")
            close(moments.reshape(registry.MOMENT_ROWS, -1), expected["moments"][k], tol, f"{name}: moments")
    # the step count t: every step but the one where the first tensor of each group had no gradient and the
    # second a NaN and an Inf at its ends (in row-major order)
    for params in (first, second):
        assert torch.equal(opt.state[params[0]]["moments"][2], torch.full(params[0].shape, STEPS - 1.0,
                                                                          dtype=torch.float64))
        t = opt.state[params[1]]["moments"][2].reshape(-1)
        assert t[0] == t[-1] == STEPS - 1 and (t[1:-1] == STEPS).all()
    assert (opt.state[first[2]]["moments"][2] == STEPS).all()


def close(actual, expected, tol, name):
    a, e = actual.detach().double(), expected.detach().double()
    bound = tol["atol_rel"] * e.abs().max() + tol["rtol"] * e.abs() + tol["atol"]
    err = (a - e).abs()
    assert (err <= bound).all(), f"{name}: max error {err.max():.3e}, worst ratio {(err / bound).max():.2f}"


@pytest.mark.parametrize("dtype, state_dtype, math", [
    (torch.float32, None, torch.float32), (torch.float32, torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.bfloat16, torch.float32), (torch.float16, None, torch.float32),
    (torch.float64, None, torch.float64)], ids=["f32", "f32_bf16_state", "bf16", "f16", "f64"])
def test_moments_are_kept_in_the_math_dtype(gen, dtype, state_dtype, math):
    """Never bfloat16, whatever the state's dtype; float64 for float64 parameters."""
    net = moments_net(("paper", "moments"), "tanh", gen=gen, backend="auto", dtype=torch.float32)
    params = make_params([(3, 4), (5,)], dtype, gen)
    opt = LearnedOptimizer(params, net, state_dtype=state_dtype)
    for p in params:
        assert opt.state[p]["moments"].dtype == math and opt.state[p]["moments"].shape == (registry.MOMENT_ROWS, *p.shape)
        assert not opt.state[p]["moments"].any(), "zeros before the first step"
        assert opt.state[p]["lstm_state"].dtype == (state_dtype or math)
    for p in params:
        p.grad = random_grad(p.numel(), gen=gen, lo=1e-3).reshape(p.shape).to(dtype)
    opt.step()
    for p in params:
        m, v, t, u = opt.state[p]["moments"]
        g = p.grad.to(math)
        assert torch.equal(t, torch.ones_like(t))
        torch.testing.assert_close(m, (1 - registry.BETA1) * g)
        torch.testing.assert_close(v, (1 - registry.BETA2) * g * g)
        # 1 - 0.999 as the math dtype holds it (off by 1.3e-5 relative in float32)
        torch.testing.assert_close(u, (1 - torch.tensor(registry.BETA_LONG, dtype=math)) * g * g)


CONFIGS = {
    "f32": dict(dtype=torch.float32, state_dtype=None),
    "f32_bf16_state": dict(dtype=torch.float32, state_dtype=torch.bfloat16),
    "bf16_params": dict(dtype=torch.bfloat16, state_dtype=None),
    "f64": dict(dtype=torch.float64, state_dtype=None),
}


def train(params, opt, grads_per_step):
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()
        opt.step()


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_state_dict_round_trip_mid_run_is_bit_identical(gen, config):
    """Stop after 3 of 7 steps, torch.save the parameters and the state_dict, load both into a fresh model and
    optimizer (a new net object of the same weights), continue: the same bits as never stopping, for the
    parameters, the LSTM states and the moments."""
    dtype, state_dtype = config["dtype"], config["state_dtype"]
    net = moments_net(("paper", "moments"), "tanh", gen=gen, backend="auto", dtype=torch.float32, hidden_size=8)
    params = make_params([(6, 5), (5,), (1,), (0,), (3001,)], dtype, gen)
    grads = [[None if (s == 1 and k == 2) else random_grad(p.numel(), gen=gen).to(dtype).reshape(p.shape)
              for k, p in enumerate(params)] for s in range(7)]
    resumed = [nn.Parameter(p.detach().clone()) for p in params]

    straight = LearnedOptimizer(params, net, state_dtype=state_dtype)
    train(params, straight, grads)

    first = LearnedOptimizer(resumed, net, state_dtype=state_dtype)
    train(resumed, first, grads[:3])
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in resumed], "optimizer": first.state_dict(), "net": net.state_dict()},
               buffer)
    del first
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    fresh = [nn.Parameter(t.clone()) for t in saved["params"]]
    other_net = CoordinatewiseLSTM(**net.size_kwargs())
    other_net.load_state_dict(saved["net"])
    second = LearnedOptimizer(fresh, other_net, state_dtype=state_dtype)
    second.load_state_dict(saved["optimizer"])
    train(fresh, second, grads[3:])
    for k, (a, b) in enumerate(zip(params, fresh)):
        assert torch.equal(a, b), f"params[{k}] differs after resuming"
        for key in ("lstm_state", "moments"):
            sa, sb = straight.state[a][key], second.state[b][key]
            assert sa.dtype == sb.dtype and torch.equal(sa, sb), f"{key}[{k}] differs after resuming"
    math = torch.float64 if dtype == torch.float64 else torch.float32
    assert all(second.state[p]["moments"].dtype == math for p in fresh)


def test_state_dict_holds_the_moments_as_views(gen):
    net = moments_net(("moments",), "linear", gen=gen, backend="auto", dtype=torch.float32, hidden_size=5)
    params = make_params([(30, 20), (30,)], torch.float32, gen)
    opt = LearnedOptimizer(params, net)
    state_dict = opt.state_dict()
    assert [tuple(s["moments"].shape) for s in state_dict["state"].values()] == [(4, 30, 20), (4, 30)]
    assert state_dict["param_groups"][0]["net"]["features"] == ("moments",)
    for p in params:  # views of one fused tensor per call
        assert opt.state[p]["moments"].untyped_storage().data_ptr() == \
            opt.state[params[0]]["moments"].untyped_storage().data_ptr()
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    values = (2 * 2 * 5 + 3) * sum(p.numel() for p in params)  # LSTM state and moments, float32
    assert values * 4 < buffer.tell() < values * 4 + 20000, "one storage each for the states and the moments"


def saved(gen, net, shapes=((4, 3), (5,))):
    params = make_params(shapes, torch.float32, gen)
    opt = LearnedOptimizer(params, net)
    for p in params:
        p.grad = random_grad(p.numel(), gen=gen).reshape(p.shape).float()
    opt.step()
    return opt.state_dict()


def bad_state_dicts(gen, net):
    def edit(fn):
        state_dict = copy.deepcopy(saved(gen, net))
        fn(state_dict["state"])
        return state_dict

    paper = CoordinatewiseLSTM(hidden_size=net.hidden_size, num_layers=net.num_layers, output_scale=net.output_scale)
    return {
        "no_moments": edit(lambda state: state[1].pop("moments")),
        "moments_none": edit(lambda state: state[0].update(moments=None)),
        "moments_of_another_shape": edit(lambda state: state[0].update(moments=torch.zeros(registry.MOMENT_ROWS, 3, 4))),
        "moments_of_two_rows": edit(lambda state: state[1].update(moments=torch.zeros(2, 5))),
        "integer_moments": edit(lambda state: state[1].update(moments=torch.zeros(registry.MOMENT_ROWS, 5, dtype=torch.int64))),
        "a_net_without_moments": saved(gen, paper),
    }


@pytest.mark.parametrize("case", ["no_moments", "moments_none", "moments_of_another_shape", "moments_of_two_rows",
                                  "integer_moments", "a_net_without_moments"])
def test_rejects_a_state_dict_without_fitting_moments_and_changes_nothing(gen, case):
    net = moments_net(("paper", "moments"), "tanh", gen=gen, backend="auto", dtype=torch.float32)
    params = make_params([(4, 3), (5,)], torch.float32, gen)
    opt = LearnedOptimizer(params, net)
    for p in params:
        p.grad = random_grad(p.numel(), gen=gen).reshape(p.shape).float()
    opt.step()
    before = copy.deepcopy(opt.state_dict())
    bad = bad_state_dicts(gen, net)[case]
    with pytest.raises(ValueError, match="state_dict") as error:
        opt.load_state_dict(bad)
    if case != "a_net_without_moments":
        assert "moments" in str(error.value)
    after = opt.state_dict()
    for k in before["state"]:
        for key in ("lstm_state", "moments"):
            assert torch.equal(after["state"][k][key], before["state"][k][key]), (case, key)


def test_a_state_dict_from_before_the_long_moment_loads_with_u_started_at_v(gen):
    """A state_dict saved when moments had 3 rows (m, v, t): it loads, u starts at v (the best estimate it holds),
    and stepping continues exactly as from the same state with u = v written out."""
    net = moments_net(("moments", "long_moments"), "tanh", gen=gen, backend="auto", dtype=torch.float32)
    current = saved(gen, net)
    old = copy.deepcopy(current)
    for entry in old["state"].values():
        entry["moments"] = entry["moments"][:3].clone()
    upgraded = copy.deepcopy(current)
    for entry in upgraded["state"].values():
        entry["moments"][3] = entry["moments"][1]
    opts = []
    for state_dict in (old, upgraded):
        params = make_params([(4, 3), (5,)], torch.float32, torch.Generator().manual_seed(5))
        opt = LearnedOptimizer(params, net)
        opt.load_state_dict(state_dict)
        opts.append((opt, params))
    for k, p in enumerate(opts[0][1]):
        moments = opts[0][0].state[p]["moments"]
        assert moments.shape == (registry.MOMENT_ROWS, *p.shape)
        assert torch.equal(moments[:3], old["state"][k]["moments"]) and torch.equal(moments[3], moments[1])
    grads = [random_grad(p.numel(), gen=gen).reshape(p.shape).float() for p in opts[0][1]]
    for opt, params in opts:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    for a, b in zip(opts[0][1], opts[1][1]):
        assert torch.equal(a, b)


def test_a_three_row_checkpoint_through_distributed_checkpoint(gen, tmp_path):
    """torch.distributed.checkpoint loads into a template of today's shapes, so a checkpoint whose moments have 3
    rows (saved before u) fails in dcp.load with its size mismatch, naming the moments entry, before
    load_state_dict can upgrade it (the README said such a state "loads with u started at v" without this
    exception). A template whose moments are cut to 3 rows loads, and load_state_dict then starts u at v."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch built without distributed")
    import torch.distributed.checkpoint as dcp

    net = CoordinatewiseLSTM.from_pretrained("general")
    old = saved(gen, net)
    for entry in old["state"].values():
        entry["moments"] = entry["moments"][:3].clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP warns that no process group is initialized: one process
        dcp.save({"optim": old}, checkpoint_id=str(tmp_path / "old"))
        params = make_params([(4, 3), (5,)], torch.float32, gen)
        opt = LearnedOptimizer(params, net)
        template = {"optim": opt.state_dict()}
        mismatch = r"(?s)Size mismatch.*\[3, 4, 3\].*\[4, 4, 3\].*optim\.state\.0\.moments"
        with pytest.raises(BaseException, match=mismatch):  # DCP's CheckpointException, a BaseException
            dcp.load(template, checkpoint_id=str(tmp_path / "old"))
        for entry in template["optim"]["state"].values():
            entry["moments"] = entry["moments"][:3].clone()
        dcp.load(template, checkpoint_id=str(tmp_path / "old"))
    opt.load_state_dict(template["optim"])
    for k, p in enumerate(params):
        moments = opt.state[p]["moments"]
        assert torch.equal(moments[:3], old["state"][k]["moments"]) and torch.equal(moments[3], moments[1])


def test_moments_for_a_net_that_reads_none_are_refused(gen):
    net = CoordinatewiseLSTM(hidden_size=4)
    state_dict = saved(gen, net)
    state_dict["state"][0]["moments"] = torch.zeros(3, 4, 3)
    params = make_params([(4, 3), (5,)], torch.float32, gen)
    opt = LearnedOptimizer(params, net)
    with pytest.raises(ValueError, match="state_dict: .*'moments'.* reads none"):
        opt.load_state_dict(state_dict)
    assert "moments" not in opt.state[params[0]]


def test_a_group_net_replaced_by_one_with_moments_starts_them_at_zero(gen):
    """Replacing a group's net by one that reads moments (same sizes) keeps the LSTM states and starts the moments
    at zero; replacing it back drops them."""
    params = make_params([(4, 3), (5,)], torch.float32, gen)
    paper = CoordinatewiseLSTM(hidden_size=6)
    opt = LearnedOptimizer(params, paper)
    for p in params:
        p.grad = random_grad(p.numel(), gen=gen).reshape(p.shape).float()
    opt.step()
    assert all("moments" not in opt.state[p] for p in params)
    states = [opt.state[p]["lstm_state"].clone() for p in params]
    opt.param_groups[0]["net"] = moments_net(("paper", "moments"), "tanh", gen=gen, backend="auto", dtype=torch.float32)
    opt.step()
    for p, state in zip(params, states):
        assert torch.equal(opt.state[p]["moments"][2], torch.ones(p.shape)), "one step since the replacement"
        assert not torch.equal(opt.state[p]["lstm_state"], state)
    opt.param_groups[0]["net"] = paper
    opt.step()
    assert all("moments" not in opt.state[p] for p in params)


def test_a_tanh_net_bounds_every_step(gen):
    """output="tanh": |update| <= lr * output_scale, even for huge gradients, where the linear net steps further."""
    steps = {}
    for output in ("linear", "tanh"):
        net = moments_net(("paper",), output, gen=torch.Generator().manual_seed(1), backend="auto",
                          dtype=torch.float32, output_scale=0.1)
        with torch.no_grad():
            net.out.bias.fill_(30.0)  # y around 30: tanh(y) = 1
        p = nn.Parameter(torch.zeros(1000))
        opt = LearnedOptimizer([p], net, lr=0.5)
        p.grad = random_grad(1000, gen=torch.Generator().manual_seed(2)).float()
        opt.step()
        steps[output] = p.detach().abs().max().item()
    assert steps["tanh"] <= 0.5 * 0.1 * (1 + 1e-6) < steps["linear"]


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_step_fullgraph_is_bit_identical(gen, fresh_dynamo):
    """opt.step of a moments net under torch.compile(fullgraph=True): the same bits for values, states, moments."""
    net = moments_net(("paper", "moments"), "tanh", gen=gen, backend="auto", dtype=torch.float32)
    params = make_params([(30, 4), (4,), (9,)], torch.float32, gen)
    params[2].data = params[2].data.bfloat16()
    other = [nn.Parameter(p.detach().clone()) for p in params]
    opt, compiled_opt = LearnedOptimizer(params, net), LearnedOptimizer(other, net)
    compiled_step = torch.compile(compiled_opt.step, fullgraph=True)
    for _ in range(3):
        for p, q in zip(params, other):
            p.grad = random_grad(p.numel(), gen=gen).reshape(p.shape).to(p.dtype)
            q.grad = p.grad.clone()
        opt.step()
        compiled_step()
    for p, q in zip(params, other):
        assert torch.equal(p, q)
        for key in ("lstm_state", "moments"):
            assert torch.equal(opt.state[p][key], compiled_opt.state[q][key]), key
