"""PyTorch's generic optimizer tests, run against LearnedOptimizer as a standing check of the torch.optim contract.

The source is ``TestOptimRenewed`` in PyTorch's test/test_optim.py: test bodies driven by an ``OptimizerInfo``
(torch/testing/_internal/common_optimizers.py) that says which options an optimizer has. LearnedOptimizer gets its
own ``OptimizerInfo`` here (``INFO``: inputs with only ``lr`` and our ``state_dtype``; no foreach / fused /
differentiable implementations, no complex or sparse support; torch's generic error inputs), expanded by torch's
own helpers as for SGD. The test bodies are ours, one per generic test's intent, asserting what can fail for a
learned optimizer: bit-equality where torch asserts equality, not only "does not raise".

torch test                                  here: adaptation (why)
------------------------------------------  ----------------------------------------------------------------------
test_optim_infos_do_not_specify_global_     test_optim_info_has_no_global_cliquey_kwargs: as is
  cliquey_kwargs
test_errors                                 test_errors: torch's inputs as is but two. A duplicate parameter in a
                                            group is a ValueError, not torch's UserWarning (stepped twice, its LSTM
                                            state would be corrupt). A Tensor lr is refused whatever its size, with
                                            the message torch's test_tensor_lr accepts. Added: empty list, complex /
                                            sparse / non-leaf / integer params, sets, negative lr, every torch flag
                                            we lack (weight_decay, maximize, capturable, foreach, fused,
                                            differentiable: TypeError), and step errors: sparse, reshaped and
                                            other-dtype gradients, after which nothing has moved
test_forloop_goes_right_direction           test_goes_right_direction: float64 / float32 / bfloat16 / float16
                                            params (torch: float32); no forloop implementation to force
test_forloop_goes_right_direction_multigpu  n/a: one CPU here (a group's tensors are fused per device)
test_param_group_with_lrscheduler_goes_     test_param_group_with_lrscheduler_goes_right_direction: float lr
  right_direction
test_tensor_lr                              test_tensor_lr_is_refused: the kernels take lr as a float, a Tensor lr
                                            would sync the device each step and still recompile a compiled step;
                                            refused from the constructor, add_param_group and load_state_dict
test_rosenbrock_sparse                      n/a: no sparse gradients (refused: test_errors)
test_complex, test_complex_2d               n/a: no complex params (refused naming view_as_real: test_errors)
test_foreach_matches_forloop,               test_grouped_step_matches_per_param_step, test_grouped_mixed_dtypes_*:
test_fused_matches_forloop,                 no foreach / fused flags; the one implementation fuses a group into one
test_mixed_device_dtype (CPU part)          kernel call, so that is compared bit for bit with one group (one call)
                                            per parameter, on torch's model, 0-dim param and freeze / unfreeze /
                                            no-grad schedule, per dtype and with mixed dtypes
test_set_default_dtype_works_with_foreach   n/a: no step counter whose dtype follows the default dtype
test_foreach_large_tensor,                  n/a: CUDA or 64 GB tests of the foreach / fused flags
test_fused_large_tensor,
test_peak_memory_foreach,
test_defaults_changed_to_foreach
test_fused_error_on_params_on_meta,         n/a: no fused flag (GradScaler's Inf skip: tests/test_optimizer.py)
test_fused_cpu_matches_cuda,
test_fused_does_not_step_if_foundinf
test_cpu_load_state_dict,                   test_load_state_dict_into_params_of_another_dtype: the move to CUDA
test_state_dict_with_cuda_params            needs a GPU (not in this CPU suite); the dtype cast is kept
test_param_groups_weight_decay              n/a: no weight_decay (refused: test_errors)
test_param_groups_lr                        test_param_groups_lr: as is; also the "irrelevant" group's LSTM states
                                            still advance while its values stay put
test_step_is_noop_when_params_have_no_grad  test_step_is_noop_when_params_have_no_grad: also the LSTM states
test_step_is_noop_for_zero_grads            test_zero_grad_is_not_no_grad: ADAPTED, a learned optimizer moves a
                                            coordinate whose gradient is 0 (the LSTM of input 0 is not 0): checked
                                            against the net itself; the no-op is a None gradient (zero_grad())
test_optimizer_can_be_printed               test_optimizer_can_be_printed
test_state_dict_deterministic               test_state_dict_deterministic: bit-equal, named x unnamed
test_can_load_older_state_dict              test_can_load_older_state_dict: total_steps was added after the first
                                            release (not_og_supported_flags); the group keys are pinned so that
                                            a new option has to be entered there
test_can_load_from_to_named_state_dict      test_can_load_from_to_named_state_dict: also the LSTM states
test_save_load_equality_with_weights_only   test_save_load_equality_with_weights_only
test_load_nontensor_step                    n/a: no step counter
test_state_dict_pre_hook, _post_hook,       test_state_dict_hooks: also, post hooks see the saved form (net
_pre_post_hook                              signatures), as the caller does
test_load_state_dict_pre_hook_and_prepend,  test_load_state_dict_hooks; test_load_state_dict_pre_hook_runs_before_*:
test_load_state_dict_post_hook,             pre hooks run before the state_dict is validated (they may convert an
test_load_state_dict_pre_post_hook          old format), post hooks once the nets and LSTM states are loaded
test_step_pre_hook, _post_hook, _all_hooks  test_step_hooks; test_step_pre_hook_can_replace_the_closure
test_deepcopy_copies_all_public_attrs       test_deepcopy: also, the copy steps its own parameters
test_second_order_optims_return_*           n/a: step does not require a closure
test_non_empty_state                        test_non_empty_state: the state exists before the first step

Beyond TestOptimRenewed: zero_grad, a param group without gradients, one added later, step under no_grad and
inference_mode, and torch.compile of step (torch's test/inductor/test_compiled_optimizers.py compiles it with
fullgraph=True; the bit-equality with eager is in tests/test_optimizer.py, here: no recompilation between steps).
"""
from __future__ import annotations

import copy
import functools
import io

import pytest
import torch
from torch import nn
from torch.nn import Parameter
from torch.optim.lr_scheduler import ReduceLROnPlateau, StepLR
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.testing._internal.common_optimizers import (
    ErrorOptimizerInput,
    OptimizerErrorEnum,
    OptimizerInfo,
    OptimizerInput,
    _get_optim_inputs_including_global_cliquey_kwargs,
    get_error_inputs_for_all_optims,
)

from conftest import requires_native
from l2l_fast import CoordinatewiseLSTM, LearnedOptimizer

pytestmark = requires_native

DEVICE = "cpu"
DTYPES = {"f64": torch.float64, "f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


# ---------------------------------------------------------------------------------------------
# LearnedOptimizer's OptimizerInfo
def optim_inputs_func_learned(device, dtype=None):
    """Constructor kwargs without params, as torch's optim_inputs_func_*: lr and our one optimizer-specific option."""
    return [
        OptimizerInput(params=None, kwargs={}, desc="default"),
        OptimizerInput(params=None, kwargs={"lr": 0.5}, desc="lr"),
        OptimizerInput(params=None, kwargs={"lr": 0.5, "state_dtype": torch.bfloat16}, desc="bf16 state"),
    ]


# torch's generic error inputs that LearnedOptimizer answers differently: desc -> (error type, regex, why)
ADAPTED_ERRORS = {
    "a param group cannot have duplicate parameters": (
        ValueError, "same tensor", "torch warns; LearnedOptimizer would step it twice with two LSTM states"),
    "Tensor lr must be 1-element": (
        ValueError, "lr as a Tensor is not supported", "no Tensor lr at all: the kernels take lr as a float"),
}

TORCH_FLAGS = ("weight_decay", "maximize", "capturable", "foreach", "fused", "differentiable")


def _param(*shape, dtype=torch.float32):
    return Parameter(torch.randn(shape, dtype=dtype))


def _with_grad(p, grad):
    p.grad = torch.zeros_like(p)
    p.grad.data = grad  # behind torch's back: `p.grad = grad` checks the size, `.data` does not
    return p


def optim_error_inputs_func_learned(device, dtype):
    inputs = []
    for error_input in get_error_inputs_for_all_optims(device, dtype):
        desc = error_input.optimizer_error_input.desc
        if desc in ADAPTED_ERRORS:
            error_type, regex, _ = ADAPTED_ERRORS[desc]
            error_input = ErrorOptimizerInput(error_input.optimizer_error_input, error_type=error_type,
                                              error_regex=regex)
        inputs.append(error_input)
    sparse_grad = _param(3, 3)
    sparse_grad.grad = torch.randn(3, 3).to_sparse()
    ours = [
        (OptimizerInput([], {}, "empty parameter list"), ValueError, "empty parameter list"),
        (OptimizerInput([_param(2, 2, dtype=torch.complex64)], {}, "complex param"), TypeError,
         "complex.*view_as_real"),
        (OptimizerInput([_param(2), _param(2, dtype=torch.complex64)], {}, "real and complex"), TypeError, "complex"),
        (OptimizerInput([Parameter(torch.randn(3, 3).to_sparse())], {}, "sparse param"), TypeError, "sparse"),
        (OptimizerInput([_param(3) * 2], {}, "non-leaf param"), ValueError, "non-leaf"),
        (OptimizerInput([torch.zeros(3, dtype=torch.int64)], {}, "integer param"), TypeError, "dtype"),
        (OptimizerInput([{"params": {_param(3)}}], {}, "params in a set"), TypeError, "ordered collections"),
        (OptimizerInput([_param(3)], {"lr": -1.0}, "negative lr"), ValueError, "lr"),
        *((OptimizerInput([_param(3)], {flag: True}, f"{flag} flag"), TypeError, flag) for flag in TORCH_FLAGS),
    ]
    inputs += [ErrorOptimizerInput(optim_input, error_type=error_type, error_regex=regex)
               for optim_input, error_type, regex in ours]
    step_errors = [
        (OptimizerInput([sparse_grad], {}, "sparse grad"), TypeError, "sparse gradients"),
        (OptimizerInput([_with_grad(_param(4, 3), torch.randn(3, 4))], {}, "reshaped grad"), ValueError,
         r"\(4, 3\).*\(3, 4\)"),
        (OptimizerInput([_with_grad(_param(4, 3), torch.randn(4, 3).double())], {}, "grad of another dtype"),
         TypeError, "float64"),
    ]
    inputs += [ErrorOptimizerInput(optim_input, error_on=OptimizerErrorEnum.STEP_ERROR, error_type=error_type,
                                   error_regex=regex)
               for optim_input, error_type, regex in step_errors]
    return inputs


INFO = OptimizerInfo(
    LearnedOptimizer,
    optim_inputs_func=optim_inputs_func_learned,
    optim_error_inputs_func=optim_error_inputs_func_learned,
    supported_impls=(),  # no foreach / fused / differentiable implementations to choose from
    not_og_supported_flags=("total_steps",),  # options added after the first release
    supports_complex=False,
    supports_sparse=False,
)


def all_inputs() -> list[OptimizerInput]:
    """Fresh inputs (tests may edit the kwargs), expanded by torch's helper as for its own optimizers."""
    return _get_optim_inputs_including_global_cliquey_kwargs(DEVICE, torch.float32, INFO)


INPUT_IDS = [optim_input.desc for optim_input in all_inputs()]


@pytest.fixture(params=range(len(INPUT_IDS)), ids=INPUT_IDS)
def kwargs(request) -> dict:
    return all_inputs()[request.param].kwargs


# ---------------------------------------------------------------------------------------------
# helpers
def weight_bias(gen, dtype=torch.float32, contiguous=True):
    if contiguous:
        return (Parameter(torch.randn(10, 5, generator=gen).to(dtype)),
                Parameter(torch.randn(10, generator=gen).to(dtype)))
    return (Parameter(torch.randn(10, 5, 2, generator=gen).to(dtype)[..., 0]),
            Parameter(torch.randn(10, 2, generator=gen).to(dtype)[..., 0]))


def quadratic_closure(optimizer, weight, bias, inputs):
    def closure():
        optimizer.zero_grad()
        loss = (weight.mv(inputs) + bias).pow(2).sum()
        loss.backward()
        return loss
    return closure


def step_schedulers(schedulers, loss):
    for scheduler in schedulers:
        if isinstance(scheduler, ReduceLROnPlateau):
            scheduler.step(loss.item())
        else:
            scheduler.step()


def assert_state_dicts_equal(a, b, path="state_dict"):
    """torch's assertEqual on state_dicts, bit for bit: same keys, tensors equal in values and dtype."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{path}: {sorted(map(str, a))}, {sorted(map(str, b))}"
        for key in a:
            assert_state_dicts_equal(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for k, (x, y) in enumerate(zip(a, b)):
            assert_state_dicts_equal(x, y, f"{path}[{k}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def lstm_states(optimizer, params):
    return [optimizer.state[p]["lstm_state"] for p in params]


def named(params, is_named):
    return [(f"name{i}", p) for i, p in enumerate(params)] if is_named else list(params)


# ---------------------------------------------------------------------------------------------
# construction and errors
def test_optim_info_has_no_global_cliquey_kwargs():
    for optim_input in INFO.optim_inputs_func(device=DEVICE):
        assert not {"foreach", "fused", "differentiable"} & optim_input.kwargs.keys(), optim_input.desc


def test_adapted_error_inputs_still_exist_in_torch():
    """The adaptation table must follow torch: an entry whose torch input disappeared is stale."""
    descs = {e.optimizer_error_input.desc for e in get_error_inputs_for_all_optims(DEVICE, torch.float32)}
    assert ADAPTED_ERRORS.keys() <= descs


ERROR_INPUTS = INFO.optim_error_inputs_func(device=DEVICE, dtype=torch.float32)


@pytest.mark.parametrize("error_input", ERROR_INPUTS, ids=[e.optimizer_error_input.desc for e in ERROR_INPUTS])
def test_errors(error_input):
    optim_input = error_input.optimizer_error_input
    params, kwargs = optim_input.params, optim_input.kwargs
    expect = (pytest.warns if issubclass(error_input.error_type, Warning) else pytest.raises)(
        error_input.error_type, match=error_input.error_regex)
    if error_input.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
        with expect:
            LearnedOptimizer(params, **kwargs)
    else:
        optimizer = LearnedOptimizer(params, **kwargs)
        before = [p.detach().clone() for group in optimizer.param_groups for p in group["params"]]
        with expect:
            optimizer.step()
        after = [p.detach() for group in optimizer.param_groups for p in group["params"]]
        assert all(torch.equal(a, b) for a, b in zip(before, after)), "a refused step changes nothing"


def test_tensor_lr_is_refused(gen):
    """torch's test_tensor_lr accepts "lr as a Tensor is not supported" as an answer; ours for every size, from
    the constructor, add_param_group and load_state_dict."""
    weight, bias = weight_bias(gen)
    for lr in (torch.tensor(0.5), torch.tensor([0.5]), torch.tensor([0.5, 0.5])):
        with pytest.raises(ValueError, match="lr as a Tensor is not supported"):
            LearnedOptimizer([weight], lr=lr)
        optimizer = LearnedOptimizer([weight])
        with pytest.raises(ValueError, match="lr as a Tensor is not supported"):
            optimizer.add_param_group({"params": [bias], "lr": lr})
        state_dict = optimizer.state_dict()
        state_dict["param_groups"][0]["lr"] = lr
        with pytest.raises(ValueError, match="state_dict.*lr as a Tensor is not supported"):
            optimizer.load_state_dict(state_dict)
        assert optimizer.param_groups[0]["lr"] == 1.0 and len(optimizer.param_groups) == 1


def test_optimizer_can_be_printed(kwargs):
    optimizer = LearnedOptimizer([_param(2, 3), _param(2, 3)], **kwargs)
    text = repr(optimizer)
    assert text.startswith("LearnedOptimizer (") and "Parameter Group 0" in text
    assert f"lr: {kwargs.get('lr', 1.0)}" in text and f"state_dtype: {kwargs.get('state_dtype')}" in text


# ---------------------------------------------------------------------------------------------
# the direction of the loss
@pytest.mark.parametrize("scheduled", [False, True], ids=["no_sched", "sched"])
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_goes_right_direction(gen, kwargs, dtype, contiguous, scheduled):
    weight, bias = weight_bias(gen, dtype, contiguous)
    inputs = torch.randn(5, generator=gen).to(dtype)
    optimizer = LearnedOptimizer([weight, bias], **kwargs)
    schedulers = [make(optimizer) for make in INFO.scheduler_inputs[0]] if scheduled else []
    closure = quadratic_closure(optimizer, weight, bias, inputs)
    initial = closure().item()
    for _ in range(20):
        loss = closure()
        optimizer.step()
        step_schedulers(schedulers, loss)
    assert closure().item() < 0.5 * initial  # measured 0.05-0.23 of the initial loss over 5 seeds
    assert weight.dtype == dtype and weight.is_contiguous() == contiguous


def test_param_group_with_lrscheduler_goes_right_direction(gen):
    for make_schedulers in INFO.scheduler_inputs:
        weight, bias = weight_bias(gen)
        inputs = torch.randn(5, generator=gen)
        optimizer = LearnedOptimizer([{"params": [weight]}, {"params": [bias], "lr": 0.01}])
        schedulers = [make(optimizer) for make in make_schedulers]
        closure = quadratic_closure(optimizer, weight, bias, inputs)
        initial = closure().item()
        for _ in range(20):
            loss = optimizer.step(closure)
            step_schedulers(schedulers, loss)
        assert closure().item() < initial


def test_param_groups_lr(gen, kwargs):
    kwargs.setdefault("lr", 1.0)
    weight, bias = weight_bias(gen)
    irrelevant = _param(2)
    irrelevant_clone = irrelevant.detach().clone()
    inputs = torch.randn(5, generator=gen)
    optimizer = LearnedOptimizer([dict(params=[weight, bias], **kwargs), dict(params=[irrelevant])], lr=1e-28)
    state_before = optimizer.state[irrelevant]["lstm_state"].clone()
    closure = quadratic_closure(optimizer, weight, bias, inputs)
    initial = closure().item()
    for _ in range(20):
        closure()
        irrelevant.grad = torch.rand(irrelevant.shape, generator=gen)
        optimizer.step()
    assert closure().item() < initial
    assert torch.equal(irrelevant, irrelevant_clone), "an lr of 1e-28 must not move the parameter"
    assert not torch.equal(optimizer.state[irrelevant]["lstm_state"], state_before), "its LSTM state still runs"


# ---------------------------------------------------------------------------------------------
# no gradient, zero gradient
def test_step_is_noop_when_params_have_no_grad(gen, kwargs):
    params = [torch.randn(2, 3, generator=gen) for _ in range(2)]  # requires_grad=False: never a gradient
    old = [p.clone() for p in params]
    optimizer = LearnedOptimizer(params, **kwargs)
    states = [s.clone() for s in lstm_states(optimizer, params)]
    loss = torch.tensor([1.0])
    assert optimizer.step(lambda: loss) is loss
    assert all(torch.equal(p, o) for p, o in zip(params, old))
    assert all(torch.equal(s, o) for s, o in zip(lstm_states(optimizer, params), states))


def test_param_group_without_grads_is_left_alone(gen, kwargs):
    """A whole group without gradients (a frozen part of the model) next to one with: values and states stay."""
    weight, bias = weight_bias(gen)
    frozen = [_param(3, 2), _param(4)]
    optimizer = LearnedOptimizer([{"params": [weight, bias]}, {"params": frozen, "lr": 2.0}], **kwargs)
    before = [p.detach().clone() for p in frozen], [s.clone() for s in lstm_states(optimizer, frozen)]
    weight_before = weight.detach().clone()
    for _ in range(3):
        optimizer.step(quadratic_closure(optimizer, weight, bias, torch.randn(5, generator=gen)))
    assert not torch.equal(weight, weight_before)
    assert all(torch.equal(p, b) for p, b in zip(frozen, before[0]))
    assert all(torch.equal(s, b) for s, b in zip(lstm_states(optimizer, frozen), before[1]))


def test_zero_grad_is_not_no_grad(gen, kwargs):
    """Adapted test_step_is_noop_for_zero_grads: for SGD/Adam a zero gradient is a no-op; a learned optimizer moves
    a coordinate with gradient 0 by lr * net(0, state), which this checks against the net itself. The no-op is
    a None gradient, what zero_grad() leaves by default."""
    net = CoordinatewiseLSTM.from_pretrained("mnist").double()
    param = torch.randn((5, 1), generator=gen, dtype=torch.float64, requires_grad=True)
    optimizer = LearnedOptimizer([param], net, **{**kwargs, "state_dtype": None})
    lr = kwargs.get("lr", 1.0)
    old = param.detach().clone()
    param.grad = torch.ones_like(param)
    optimizer.zero_grad()  # set_to_none=True: a no-op step
    assert param.grad is None
    optimizer.step()
    assert torch.equal(param, old)
    param.grad = torch.zeros_like(param)
    state = optimizer.state[param]["lstm_state"].reshape(*optimizer.state[param]["lstm_state"].shape[:3], -1).clone()
    with torch.no_grad():
        update, new_state = net(torch.zeros(5, dtype=torch.float64), state)
    optimizer.step()
    torch.testing.assert_close(param.detach().reshape(-1) - old.reshape(-1), lr * update, rtol=1e-12, atol=1e-15)
    assert update.abs().min() > 0, "the premise: a zero gradient moves every coordinate"
    torch.testing.assert_close(optimizer.state[param]["lstm_state"].reshape(state.shape), new_state)


def test_zero_grad_set_to_none_or_zeros(gen):
    params = [_param(3), _param(2, 2)]
    optimizer = LearnedOptimizer(params)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    optimizer.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in params)
    optimizer.zero_grad()
    assert all(p.grad is None for p in params)


# ---------------------------------------------------------------------------------------------
# one fused group vs one group per parameter (torch: foreach / fused vs forloop)
def small_model(dtype, seed=1):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(2, 3), nn.Sigmoid(), nn.Linear(3, 1), nn.Sigmoid()).to(dtype)
    # torch's 0-dim last parameter (pytorch#100701); zeros, not torch's torch.empty: the two runs must start equal
    empty = torch.zeros((), dtype=dtype, requires_grad=True)
    empty.grad = torch.rand_like(empty)
    return model, list(model.parameters()) + [empty]


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_grouped_step_matches_per_param_step(kwargs, dtype):
    inputs = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], dtype=dtype).reshape(3, 2)
    runs = []
    for per_param in (False, True):
        model, params = small_model(dtype)
        groups = [{"params": [p]} for p in params] if per_param else [{"params": params}]
        runs.append((model, params, LearnedOptimizer(groups, **kwargs)))
    for i in range(7):
        for model, params, optimizer in runs:
            optimizer.zero_grad()
            if i == 3:
                model[2].requires_grad_(False)  # frozen: no gradient for two steps
            if i == 5:
                model[2].requires_grad_(True)
            if i != 2:  # no gradient at all: a no-op
                model(inputs).sum().backward()
            optimizer.step()
        (_, params_a, opt_a), (_, params_b, opt_b) = runs
        for k, (a, b) in enumerate(zip(params_a, params_b)):
            assert torch.equal(a, b), f"step {i}: params[{k}]"
            assert torch.equal(opt_a.state[a]["lstm_state"], opt_b.state[b]["lstm_state"]), f"step {i}: state[{k}]"
    assert not torch.equal(runs[0][1][0], small_model(dtype)[1][0]), "the parameters moved"


def test_grouped_mixed_dtypes_match_per_param_step(gen, kwargs):
    """The CPU part of test_mixed_device_dtype: float64, float32, float16 and bfloat16 in one group."""
    dtypes = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
    values = [torch.rand(2, 3, generator=gen).to(d) for d in dtypes]
    grads = [[torch.rand(2, 3, generator=gen).to(d) for d in dtypes] for _ in range(7)]
    runs = []
    for per_param in (False, True):
        params = [v.clone().requires_grad_() for v in values]
        groups = [{"params": [p]} for p in params] if per_param else [{"params": params}]
        runs.append((params, LearnedOptimizer(groups, **kwargs)))
    for step_grads in grads:
        for params, optimizer in runs:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            optimizer.step()
    (params_a, opt_a), (params_b, opt_b) = runs
    for a, b in zip(params_a, params_b):
        assert torch.equal(a, b) and torch.equal(opt_a.state[a]["lstm_state"], opt_b.state[b]["lstm_state"])


# ---------------------------------------------------------------------------------------------
# state_dict
@pytest.mark.parametrize("is_named_optim1", [False, True], ids=["unnamed1", "named1"])
@pytest.mark.parametrize("is_named_optim0", [False, True], ids=["unnamed0", "named0"])
def test_state_dict_deterministic(gen, kwargs, is_named_optim0, is_named_optim1):
    weight, bias = Parameter(torch.randn(2, 3, generator=gen)), Parameter(torch.randn(2, generator=gen))
    inputs = torch.randn(3, generator=gen)
    optimizer = LearnedOptimizer(named([weight, bias], is_named_optim0), **kwargs)
    closure = quadratic_closure(optimizer, weight, bias, inputs)
    for _ in range(10):
        optimizer.step(closure)
    with torch.no_grad():
        weight_c, bias_c = Parameter(weight.clone()), Parameter(bias.clone())
    optimizer_c = LearnedOptimizer(named([weight_c, bias_c], is_named_optim1), **kwargs)
    closure_c = quadratic_closure(optimizer_c, weight_c, bias_c, inputs)
    optimizer_c.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for _ in range(10):
        optimizer.step(closure)
        optimizer_c.step(closure_c)
        assert torch.equal(weight, weight_c) and torch.equal(bias, bias_c)

    def without_names(state_dict):
        state_dict = copy.deepcopy(state_dict)
        for group in state_dict["param_groups"]:
            group.pop("param_names", None)
        return state_dict

    assert_state_dicts_equal(without_names(optimizer.state_dict()), without_names(optimizer_c.state_dict()))
    # repeated parameters have identical representations (pytorch#36831)
    optimizer_c.param_groups.extend(optimizer_c.param_groups)
    assert_state_dicts_equal(without_names(optimizer.state_dict())["param_groups"][-1],
                             without_names(optimizer_c.state_dict())["param_groups"][-1])


def conv_bn_model(dtype=torch.float32):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(4, 2, 1, stride=2), nn.BatchNorm2d(2, eps=1e-05, momentum=0.1)).to(dtype)
    return model, torch.rand(1, 4, 16, 16, dtype=dtype)


def fwd_bwd(optimizer, model, inputs):
    optimizer.zero_grad()
    loss = model(inputs).sum()
    loss.backward()
    return loss


def test_can_load_older_state_dict(kwargs):
    model, inputs = conv_bn_model()
    optimizer = LearnedOptimizer(model.parameters(), **kwargs)
    for _ in range(3):
        fwd_bwd(optimizer, model, inputs)
        optimizer.step()
    old_state_dict = copy.deepcopy(optimizer.state_dict())
    # an option added later must go to not_og_supported_flags, with a default for state_dicts without it
    assert old_state_dict["param_groups"][0].keys() == {"params", "net", "lr", "state_dtype", "total_steps"}
    for group in old_state_dict["param_groups"]:
        for flag in INFO.not_og_supported_flags:
            group.pop(flag, None)
    reference = copy.deepcopy((model, optimizer))
    optimizer.load_state_dict(old_state_dict)
    for which_model, which_optimizer in ((model, optimizer), reference):
        fwd_bwd(which_optimizer, which_model, inputs)
        which_optimizer.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference[0].parameters()))


@pytest.mark.parametrize("is_named_optim1", [False, True], ids=["unnamed1", "named1"])
@pytest.mark.parametrize("is_named_optim0", [False, True], ids=["unnamed0", "named0"])
def test_can_load_from_to_named_state_dict(kwargs, is_named_optim0, is_named_optim1):
    model, inputs = conv_bn_model()
    optimizer = LearnedOptimizer(model.named_parameters() if is_named_optim0 else model.parameters(), **kwargs)
    for _ in range(3):
        fwd_bwd(optimizer, model, inputs)
        optimizer.step()
    old_state_dict = copy.deepcopy(optimizer.state_dict())
    optimizer2 = LearnedOptimizer(model.named_parameters() if is_named_optim1 else model.parameters(), **kwargs)
    optimizer2.load_state_dict(old_state_dict)
    for p in model.parameters():
        assert torch.equal(optimizer2.state[p]["lstm_state"], optimizer.state[p]["lstm_state"])
    fwd_bwd(optimizer2, model, inputs)
    optimizer2.step()
    if is_named_optim0 or is_named_optim1:
        assert optimizer2.state_dict()["param_groups"][0]["param_names"] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    else:
        assert "param_names" not in optimizer2.state_dict()["param_groups"][0]


@pytest.mark.parametrize("is_named_optim", [False, True], ids=["unnamed", "named"])
def test_save_load_equality_with_weights_only(gen, kwargs, is_named_optim):
    weight, bias = Parameter(torch.randn(2, 3, generator=gen)), Parameter(torch.randn(2, generator=gen))
    inputs = torch.randn(3, generator=gen)
    optimizer = LearnedOptimizer(named([weight, bias], is_named_optim), **kwargs)
    closure = quadratic_closure(optimizer, weight, bias, inputs)
    for _ in range(3):
        optimizer.step(closure)
    state_dict = optimizer.state_dict()
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    for weights_only in (False, True):
        buffer.seek(0)
        assert_state_dicts_equal(torch.load(buffer, weights_only=weights_only), state_dict)


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float64), (torch.float64, torch.float32),
                                    (torch.float32, torch.bfloat16)], ids=["f32_to_f64", "f64_to_f32", "f32_to_bf16"])
def test_load_state_dict_into_params_of_another_dtype(gen, dtypes):
    """The dtype half of test_state_dict_with_cuda_params (moving to CUDA needs a GPU): the LSTM states are cast
    to the new parameters' math dtype, the source state_dict is not modified, and both runs continue together
    within the coarser dtype's rounding."""
    source_dtype, target_dtype = dtypes
    params = [Parameter(torch.randn(2, 3, generator=gen).to(source_dtype)) for _ in range(2)]
    optimizer = LearnedOptimizer(params)
    grads = [[torch.randn(2, 3, generator=gen) for _ in params] for _ in range(8)]
    for step_grads in grads[:3]:
        for p, g in zip(params, step_grads):
            p.grad = g.to(source_dtype)
        optimizer.step()
    with torch.no_grad():
        moved = [Parameter(p.to(target_dtype)) for p in params]
    optimizer_moved = LearnedOptimizer(moved)
    state_dict, state_dict_copy = copy.deepcopy(optimizer.state_dict()), copy.deepcopy(optimizer.state_dict())
    optimizer_moved.load_state_dict(state_dict_copy)
    assert_state_dicts_equal(state_dict_copy, state_dict)
    math_dtype = torch.float64 if target_dtype == torch.float64 else torch.float32
    for p, q in zip(params, moved):
        assert optimizer_moved.state[q]["lstm_state"].dtype == math_dtype
        torch.testing.assert_close(optimizer_moved.state[q]["lstm_state"].double(),
                                   optimizer.state[p]["lstm_state"].double(), rtol=1e-6, atol=1e-7)
    for step_grads in grads[3:]:
        for p, q, g in zip(params, moved, step_grads):
            p.grad, q.grad = g.to(source_dtype), g.to(target_dtype)
        optimizer.step()
        optimizer_moved.step()
    coarse = {torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}.get(target_dtype, dict(rtol=1e-4, atol=1e-5))
    for p, q in zip(params, moved):
        assert q.dtype == target_dtype
        torch.testing.assert_close(q.double(), p.double(), **coarse)


# ---------------------------------------------------------------------------------------------
# hooks
def _state_dict_pre_hook(optimizer):
    optimizer.state["test"] = 1


def _state_dict_post_hook(optimizer, state_dict):
    if "test" in state_dict["state"]:
        state_dict["state"].pop("test")
        state_dict["ran_state_dict_pre_hook"] = True
    else:
        state_dict["ran_state_dict_pre_hook"] = False
    state_dict["nets_seen_by_post_hook"] = [type(group["net"]) for group in state_dict["param_groups"]]
    return state_dict


def test_state_dict_hooks(kwargs):
    optimizer = LearnedOptimizer([_param(2, 3)], **kwargs)
    optimizer.register_state_dict_pre_hook(_state_dict_pre_hook)
    assert optimizer.state_dict()["state"]["test"] == 1

    optimizer = LearnedOptimizer([_param(2, 3)], **kwargs)
    optimizer.register_state_dict_post_hook(_state_dict_post_hook)
    state_dict = optimizer.state_dict()
    assert state_dict["ran_state_dict_pre_hook"] is False
    assert state_dict["nets_seen_by_post_hook"] == [dict], "post hooks see the saved form, a net signature"

    optimizer.register_state_dict_pre_hook(_state_dict_pre_hook)
    state_dict = optimizer.state_dict()
    assert "test" not in state_dict["state"] and state_dict["ran_state_dict_pre_hook"] is True
    optimizer.load_state_dict(state_dict)  # the non-parameter entry "test" of optimizer.state round-trips


def _load_state_dict_pre_hook1(optimizer, state_dict):
    state_dict["param_groups"][0]["lr"] = 0.002


def _load_state_dict_pre_hook2(optimizer, state_dict):
    my_state_dict = copy.deepcopy(state_dict)
    my_state_dict["param_groups"][0]["lr"] = 0.003
    return my_state_dict


def _load_state_dict_post_hook(optimizer):
    optimizer.state["ran_load_state_dict_pre_hook2"] = optimizer.param_groups[0]["lr"] == 0.003
    optimizer.state["ran_load_state_dict_post_hook"] = True


def test_load_state_dict_hooks(kwargs):
    optimizer = LearnedOptimizer([_param(2, 3)], **kwargs)
    state_dict = optimizer.state_dict()
    optimizer.register_load_state_dict_pre_hook(_load_state_dict_pre_hook1)
    optimizer.load_state_dict(state_dict)
    assert optimizer.param_groups[0]["lr"] == 0.002
    optimizer.register_load_state_dict_pre_hook(_load_state_dict_pre_hook2, prepend=True)
    optimizer.load_state_dict(state_dict)
    assert optimizer.param_groups[0]["lr"] == 0.002, "prepended: hook1 runs last"

    optimizer = LearnedOptimizer([_param(2, 3)], **kwargs)
    optimizer.register_load_state_dict_post_hook(_load_state_dict_post_hook)
    optimizer.load_state_dict(optimizer.state_dict())
    assert optimizer.state["ran_load_state_dict_pre_hook2"] is False
    assert optimizer.state["ran_load_state_dict_post_hook"] is True

    optimizer = LearnedOptimizer([_param(2, 3)], **kwargs)
    optimizer.register_load_state_dict_pre_hook(_load_state_dict_pre_hook2)
    optimizer.register_load_state_dict_post_hook(_load_state_dict_post_hook)
    optimizer.load_state_dict(optimizer.state_dict())
    assert optimizer.state["ran_load_state_dict_pre_hook2"] is True
    assert optimizer.state["ran_load_state_dict_post_hook"] is True


def test_load_state_dict_pre_hook_runs_before_validation_and_post_hook_after_loading(gen):
    """torch.optim runs load_state_dict pre hooks first, so a hook can convert an older format; post hooks run
    once the optimizer is complete. Here an "old" state_dict keeps the LSTM state under another key."""
    params = [_param(4, 3), _param(5)]
    optimizer = LearnedOptimizer(params)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    optimizer.step()
    old = copy.deepcopy(optimizer.state_dict())
    for entry in old["state"].values():
        entry["h"] = entry.pop("lstm_state")
    target_params = [Parameter(p.detach().clone()) for p in params]
    target = LearnedOptimizer(target_params)
    seen = {}

    def upgrade(optimizer, state_dict):
        state_dict = copy.deepcopy(state_dict)
        for entry in state_dict["state"].values():
            entry["lstm_state"] = entry.pop("h")
        return state_dict

    def post(optimizer):
        seen["nets"] = [type(group["net"]) for group in optimizer.param_groups]
        seen["states"] = [optimizer.state[p]["lstm_state"].clone() for p in target_params]

    target.register_load_state_dict_pre_hook(upgrade)
    target.register_load_state_dict_post_hook(post)
    target.load_state_dict(old)
    assert seen["nets"] == [CoordinatewiseLSTM]
    for p, state in zip(params, seen["states"]):
        assert torch.equal(state, optimizer.state[p]["lstm_state"])


def test_step_hooks():
    params = [torch.tensor([1.0, 1.0])]
    optimizer = LearnedOptimizer(params)
    data = []
    pre = optimizer.register_step_pre_hook(lambda opt, args, kwargs: data.append(("pre", opt)))
    post = optimizer.register_step_post_hook(lambda opt, args, kwargs: data.append(("post", opt)))
    optimizer.step()
    optimizer.step()
    assert data == [("pre", optimizer), ("post", optimizer)] * 2
    pre.remove()
    post.remove()
    optimizer.step()
    assert len(data) == 4

    # global and local hooks, in torch's order, LearnedOptimizer next to SGD
    sgd = torch.optim.SGD(params)
    data = []
    handles = [register_optimizer_step_pre_hook(lambda *a: data.append(0)),
               register_optimizer_step_post_hook(lambda *a: data.append(5))]
    for opt in (optimizer, sgd):
        handles.append(opt.register_step_pre_hook(lambda *a: data.append(1)))
        handles.append(opt.register_step_post_hook(lambda *a: data.append(2)))
    try:
        optimizer.step()
        assert data == [0, 1, 2, 5]
        sgd.step()
        optimizer.step()
        assert data == [0, 1, 2, 5] * 3
    finally:
        for handle in handles:
            handle.remove()
    optimizer.step()
    sgd.step()
    assert data == [0, 1, 2, 5] * 3


def test_step_pre_hook_can_replace_the_closure():
    """torch's contract: a step pre hook may return new (args, kwargs)."""
    optimizer = LearnedOptimizer([_param(3)])
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: (args, {"closure": lambda: "replaced"}))
    assert optimizer.step(closure=lambda: "original") == "replaced"


# ---------------------------------------------------------------------------------------------
# deepcopy, state, groups added later
def test_deepcopy(gen, kwargs):
    params = [Parameter(torch.randn(2, 3, generator=gen)) for _ in range(2)]
    optimizer = LearnedOptimizer(params, **kwargs)
    for _ in range(3):
        for p in params:
            p.grad = torch.rand(p.shape, generator=gen)
        optimizer.step()

    def public(obj):
        return {k for k in obj.__dict__ if not k.startswith("_")}

    clone = copy.deepcopy(optimizer)
    assert public(optimizer) == public(clone)
    cloned_params = [p for group in clone.param_groups for p in group["params"]]
    assert all(c is not p and torch.equal(c, p) for c, p in zip(cloned_params, params))
    before = [p.detach().clone() for p in params]
    for p, c in zip(params, cloned_params):
        p.grad = torch.rand(p.shape, generator=gen)
        c.grad = p.grad.clone()
    clone.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before)), "the copy steps its own parameters"
    optimizer.step()
    for p, c in zip(params, cloned_params):
        assert torch.equal(p, c) and torch.equal(optimizer.state[p]["lstm_state"], clone.state[c]["lstm_state"])


def test_non_empty_state(kwargs):
    model = nn.Linear(5, 5)
    optimizer = LearnedOptimizer(model.parameters(), **kwargs)
    assert all(len(state) > 0 for state in optimizer.state.values()) and len(optimizer.state) == 2
    model(torch.rand(2, 5)).sum().backward()
    optimizer.step()
    assert all(len(optimizer.state[p]) > 0 for p in model.parameters())


def test_param_group_added_later_round_trips(gen, kwargs):
    weight, bias = weight_bias(gen)
    optimizer = LearnedOptimizer([weight], **kwargs)
    grads = [(torch.randn(10, 5, generator=gen), torch.randn(10, generator=gen)) for _ in range(6)]

    def step(opt, w, b, k):
        w.grad, b.grad = grads[k][0].clone(), grads[k][1].clone()
        opt.step()

    for k in range(2):
        step(optimizer, weight, bias, k)
    assert torch.equal(optimizer.state.get(bias, {}).get("lstm_state", torch.ones(1)), torch.ones(1))
    bias_before = bias.detach().clone()
    optimizer.add_param_group({"params": [bias], "lr": 0.25})
    assert not optimizer.state[bias]["lstm_state"].any(), "a new group starts from the zero state"
    step(optimizer, weight, bias, 2)
    assert not torch.equal(bias, bias_before)
    weight_c, bias_c = Parameter(weight.detach().clone()), Parameter(bias.detach().clone())
    resumed = LearnedOptimizer([{"params": [weight_c]}, {"params": [bias_c], "lr": 0.25}], **kwargs)
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for k in range(3, 6):
        step(optimizer, weight, bias, k)
        step(resumed, weight_c, bias_c, k)
    assert torch.equal(weight, weight_c) and torch.equal(bias, bias_c)


# ---------------------------------------------------------------------------------------------
# grad modes and torch.compile
@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode, torch.enable_grad],
                         ids=["no_grad", "inference_mode", "enable_grad"])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_step_under_grad_modes(gen, mode, backend):
    """A step inside no_grad / inference_mode is the plain step; an optimizer built (or its state rebuilt) inside
    inference_mode keeps normal tensors as state, which later steps outside it can update in place."""
    net = CoordinatewiseLSTM.from_pretrained("mnist", backend=backend)
    values = torch.randn(4, 3, generator=gen)
    grads = [torch.randn(4, 3, generator=gen) for _ in range(3)]
    runs = []
    for inside in (False, True):
        param = Parameter(values.clone())
        with mode() if inside else torch.enable_grad():
            optimizer = LearnedOptimizer([param], net)
        for k, g in enumerate(grads):
            param.grad = g.clone()
            if k == 1:
                param.data = param.data.clone()  # new storage: the state is rebuilt at the next step
            with mode() if inside and k < 2 else torch.enable_grad():
                optimizer.step()
        runs.append((param, optimizer))
    (p, opt), (q, opt_inside) = runs
    assert not opt_inside.state[q]["lstm_state"].is_inference()
    assert torch.equal(p, q) and torch.equal(opt.state[p]["lstm_state"], opt_inside.state[q]["lstm_state"])
    assert q.requires_grad and q.grad_fn is None


def test_compiled_step_does_not_recompile_between_steps(gen):
    """torch.compile(step, fullgraph=True) keeps its graph across steps: new values and states do not recompile
    (a parameter losing its gradient is a second graph, as for torch's optimizers). A float lr is a constant of
    the graph: a scheduler changing it recompiles (torch's remedy, a Tensor lr, needs kernels that take lr as a
    tensor), so lr stays fixed here."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    try:
        params = [Parameter(torch.randn(6, 4, generator=gen)), Parameter(torch.randn(4, generator=gen))]
        eager_params = [Parameter(p.detach().clone()) for p in params]
        optimizer, eager = LearnedOptimizer(params, lr=0.5), LearnedOptimizer(eager_params, lr=0.5)
        counter = CompileCounter()
        compiled_step = torch.compile(optimizer.step, backend=counter, fullgraph=True)
        for k in range(5):
            for p, q in zip(params, eager_params):
                p.grad = torch.randn(p.shape, generator=gen)
                q.grad = p.grad.clone()
            if k == 3:
                params[1].grad = eager_params[1].grad = None
            compiled_step()
            eager.step()
        # one graph for steps with every gradient, one for the step with a None gradient; step 5 reuses the first
        assert counter.frame_count == 2, f"{counter.frame_count} compilations in 5 steps"
        assert all(torch.equal(p, q) for p, q in zip(params, eager_params))
    finally:
        torch._dynamo.reset()
