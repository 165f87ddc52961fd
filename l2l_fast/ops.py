"""Typed Python front of the native custom ops (``torch.ops.l2l_fast.*``).

The schemas live in ``csrc/ops_schema.cpp``; each backend registers its kernels in its own file.
Here: the fake (meta) kernels that let ``torch.compile`` trace the ops, and the autograd formula,
whose backward is itself a custom op.

Shapes: grad [n], state [L, 2, H, n], weights as in :mod:`l2l_fast.reference`; ``features`` is the mask of the
LSTM's input features (:mod:`l2l_fast.features`; 1, the default, is the paper's preprocessing of the gradient);
``moments`` [4, n] the running moments, given exactly when the features read them (advanced with this step's
gradient for lstm_step, advanced in place by the in-place ops); ``output`` 0 (update = scale * y) or 1
(scale * tanh(y)).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from . import reference
from ._runtime_check import warn_if_private_cxx_runtime
from .checks import check_backward_args, check_inplace_args, check_multi_step_args, check_step_args

try:  # loading the extension runs its TORCH_LIBRARY registrations
    from . import _C  # noqa: F401

    HAS_NATIVE = True
    NATIVE_IMPORT_ERROR: Exception | None = None
    warn_if_private_cxx_runtime(_C.__file__)
except ImportError as error:  # pure-Python install: the reference backend still works
    HAS_NATIVE = False
    NATIVE_IMPORT_ERROR = error

__all__ = ["HAS_NATIVE", "available_cpu_isas", "cpu_cache_bytes", "cpu_products", "empty_cpu_cache", "lstm_multi_step_",
           "lstm_step", "lstm_step_", "native_devices", "set_cpu_products"]


# Fixed at import: a plain constant that torch.compile can trace (a pybind call it cannot).
_NATIVE_DEVICES = frozenset(({"cpu", "cuda"} if _C.has_cuda_kernels() else {"cpu"}) if HAS_NATIVE else ())


def native_devices() -> frozenset[str]:
    """Device types with a native kernel in this build."""
    return _NATIVE_DEVICES


def available_cpu_isas() -> list[str]:
    """Instruction sets whose CPU kernels this build has and this CPU runs, narrowest first (each one can be
    forced with l2l_fast._C.set_cpu_isa); [] without the native extension."""
    if not HAS_NATIVE:
        return []
    if not hasattr(_C, "set_cpu_isa"):
        return [getattr(_C, "cpu_isa", lambda: "default")()]
    current, found = _C.cpu_isa(), []
    for isa in ("generic", "avx2", "avx512"):
        try:
            _C.set_cpu_isa(isa)
            found.append(isa)
        except (RuntimeError, ValueError):
            pass
    _C.set_cpu_isa(current)
    return found


def set_cpu_products(products: str) -> str:
    """Operands of the CPU kernels' float32 gate products: "float32" (default) or "bf16" (each weight and layer input
    rounded to bfloat16, products summed in float32 by AVX512_BF16's vdpbf16ps: about twice the gate throughput,
    pre-activations off by up to ~2^-7 of sum |w z|; csrc/cpu/PRODUCTS.md). Float64 and CUDA are unaffected.

    Keeps the instruction set and activations; also set by the environment variable L2L_FAST_CPU_PRODUCTS.
    "bf16" needs the avx512 kernels with the fast activations on a CPU with AVX512_BF16: otherwise RuntimeError,
    never a silent float32 fallback; while it is on, choosing another instruction set or the precise activations
    is refused. "amx-bf16x3" / "amx-bf16x6": the forward's gate products on AMX tiles (Intel Sapphire Rapids and later)
    with each operand split into 2 / 3 bf16 pieces; bf16x6 keeps float32 accuracy, bf16x3 ~2^-14 of sum |w z|
    (csrc/cpu/PRODUCTS.md, "AMX tiles"). They need AMX-TILE, AMX-BF16 and the OS's tile permission (RuntimeError
    otherwise); the test switch L2L_FAST_CPU_AMX_EMULATE=1 runs them on emulated tiles instead (slow; for tests).
    Returns the products now in use. ValueError for another name."""
    if not HAS_NATIVE:
        raise RuntimeError(f"set_cpu_products: l2l_fast._C is not built ({NATIVE_IMPORT_ERROR})")
    return _C.set_cpu_products(products)


def cpu_products() -> str:
    """Operands of the CPU kernels' float32 gate products in use: "float32", "bf16", "amx-bf16x3" or "amx-bf16x6"
    (set_cpu_products); an AMX one on the emulated tiles reads "amx-bf16x6 (emulated)"."""
    return _C.cpu_products() if HAS_NATIVE else "float32"


def empty_cpu_cache() -> int:
    """Gives the unused blocks of the CPU output cache back to the system; returns the bytes released.

    CPU outputs of 8 MB or more (state-sized outputs of the forward and backward) come from a cache
    of freed blocks, as CUDA memory does from torch's caching allocator: a fresh block costs a page
    fault and a kernel zeroing per page on first touch. The cache keeps at most
    ``L2L_FAST_CPU_CACHE_MB`` MB of unused blocks (default 2048; 0 turns it off).
    """
    return _C.empty_cpu_cache() if HAS_NATIVE else 0


def cpu_cache_bytes() -> int:
    """Bytes held by the CPU output cache in blocks no tensor uses."""
    return _C.cpu_cache_bytes() if HAS_NATIVE else 0


def _forward_mode(tensors: Sequence[Tensor]) -> bool:
    """True under torch.func.jvp (and jacfwd, hessian) or with forward-mode AD dual inputs: the fused kernel
    has no forward-mode rule (torch.library cannot register one), the reference, plain torch ops, has."""
    if torch.compiler.is_compiling():
        return False
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
    from torch._C._functorch import TransformType

    if any(i.key() == TransformType.Jvp for i in retrieve_all_functorch_interpreters()):
        return True
    if fwAD._current_level < 0:
        return False
    return any(fwAD.unpack_dual(t).tangent is not None for t in tensors)


def lstm_step(grad: Tensor, state: Tensor, weights: Sequence[Tensor], preprocess_p: float = 10.0,
              output_scale: float = 0.1, features: int = 1, moments: Tensor | None = None,
              output: int = 0) -> tuple[Tensor, Tensor]:
    """Fused, differentiable step: returns (update [n], new_state [L, 2, H, n]); inputs untouched. moments [4, n],
    already advanced with grad, are data: no gradient flows to them.

    Forward-mode AD (torch.func.jvp, jacfwd, dual tensors) runs the reference instead, which has the
    tangents; the double backward (create_graph=True) is computed through the reference too. The raw
    torch.ops.l2l_fast.lstm_step cannot see forward-mode tangents (torch.library registers no forward-mode
    rule), so call this function, or the net, under forward-mode AD."""
    if _forward_mode([grad, state, *weights]):
        return reference.lstm_step(grad, state, weights, preprocess_p, output_scale, features, moments, output)
    return torch.ops.l2l_fast.lstm_step(grad, state, list(weights), float(preprocess_p), float(output_scale),
                                        int(features), moments, int(output))


def lstm_step_(param: Tensor, grad: Tensor, state: Tensor, weights: Sequence[Tensor], preprocess_p: float = 10.0,
               output_scale: float = 0.1, features: int = 1, moments: Tensor | None = None, output: int = 0) -> None:
    """Fused in-place step, no autograd: param [n] += update; state [L, 2, H, n] and moments [4, n] (when the
    features read them) advanced in place."""
    torch.ops.l2l_fast.lstm_step_(param, grad, state, list(weights), float(preprocess_p), float(output_scale),
                                  int(features), moments, int(output))


def lstm_multi_step_(params: Sequence[Tensor], grads: Sequence[Tensor], state: Tensor, weights: Sequence[Tensor],
                     preprocess_p: float = 10.0, output_scale: float = 0.1, features: int = 1,
                     moments: Tensor | None = None, output: int = 0) -> None:
    """Fused in-place step over many tensors in one call, no autograd: params[k] [n_k] += update of grads[k] [n_k];
    state [L, 2, H, sum_k n_k] and moments [4, sum_k n_k] (when the features read them) advanced in place, tensor
    k's coordinates at [offset_k, offset_k + n_k) (list order).

    Math in the weights' dtype; params may also be bfloat16 / float16 (with float32 weights; rounded to nearest
    on store); grads[k] in params[k]'s dtype; state in the weights' dtype or bfloat16; moments in the weights'
    dtype."""
    torch.ops.l2l_fast.lstm_multi_step_(list(params), list(grads), state, list(weights), float(preprocess_p),
                                        float(output_scale), int(features), moments, int(output))


if HAS_NATIVE:
    # The fake kernels run the ops' checks (l2l_fast.checks mirrors csrc/op_checks.h): mixed meta / real inputs
    # reach them instead of the C++ kernels, and must fail the same way. The trailing arguments have their schema
    # defaults here: the dispatcher drops trailing arguments equal to their defaults.

    @torch.library.register_fake("l2l_fast::lstm_step")
    def _lstm_step_fake(grad, state, weights, preprocess_p, output_scale, features=1, moments=None, output=0):
        check_step_args(grad, state, weights, features, preprocess_p, output_scale, moments, output)
        return grad.new_empty(grad.shape[0]), state.new_empty(state.shape)

    @torch.library.register_fake("l2l_fast::lstm_step_backward")
    def _lstm_step_backward_fake(grad_update, grad_new_state, grad, state, weights, preprocess_p, output_scale,
                                 features=1, moments=None, output=0):
        check_backward_args(grad_update, grad_new_state, grad, state, weights, features, preprocess_p, output_scale,
                            moments, output)
        return grad.new_empty(grad.shape[0]), state.new_empty(state.shape), [w.new_empty(w.shape) for w in weights]

    @torch.library.register_fake("l2l_fast::lstm_step_")
    def _lstm_step_inplace_fake(param, grad, state, weights, preprocess_p, output_scale, features=1, moments=None,
                                output=0):
        check_inplace_args(param, grad, state, weights, features, preprocess_p, output_scale, moments, output)
        return None

    @torch.library.register_fake("l2l_fast::lstm_multi_step_")
    def _lstm_multi_step_fake(params, grads, state, weights, preprocess_p, output_scale, features=1, moments=None,
                              output=0):
        check_multi_step_args(params, grads, state, weights, features, preprocess_p, output_scale, moments, output)
        return None

    _TRAILING_DEFAULTS = (1, None, 0)  # features, moments, output: the ones the dispatcher may drop

    def _setup_context(ctx, inputs, output):
        grad, state, weights, preprocess_p, output_scale, *given = inputs
        features, moments, output_kind = (*given, *_TRAILING_DEFAULTS[len(given):])
        # the moments are data (no gradient); saved for the backward's features
        ctx.save_for_backward(grad, state, moments, *weights)
        ctx.preprocess_p, ctx.output_scale, ctx.features, ctx.output = preprocess_p, output_scale, features, output_kind

    def _backward(ctx, grad_update, grad_new_state):
        grad, state, moments, *weights = ctx.saved_tensors
        # Unused outputs arrive as None; the kernel wants dense zeros there.
        if grad_update is None:
            grad_update = torch.zeros_like(grad)
        if grad_new_state is None:
            grad_new_state = torch.zeros_like(state)
        if torch.is_grad_enabled():  # create_graph=True: a backward that is itself differentiable
            d_grad, d_state, *d_weights = _differentiable_backward(ctx, grad_update, grad_new_state, grad, state,
                                                                    weights, moments)
            return (d_grad, d_state, d_weights) + (None,) * (len(ctx.needs_input_grad) - 3)
        d_grad, d_state, d_weights = torch.ops.l2l_fast.lstm_step_backward(
            grad_update, grad_new_state, grad, state, weights, ctx.preprocess_p, ctx.output_scale, ctx.features,
            moments, ctx.output)
        # One entry per argument as the op received it (None for the constants and the moments): the dispatcher
        # drops trailing arguments equal to their defaults, and needs_input_grad has the received structure.
        return (d_grad, d_state, d_weights) + (None,) * (len(ctx.needs_input_grad) - 3)

    def _differentiable_backward(ctx, grad_update, grad_new_state, grad, state, weights, moments) -> list:
        """The vector-Jacobian product through the reference, with its graph: the fused backward kernel is not
        differentiable. The saved inputs are the ones the forward received, so the graph reaches them."""
        inputs = [grad, state, *weights]
        wanted = [k for k, t in enumerate(inputs) if t.requires_grad]
        result: list = [None] * len(inputs)
        if not wanted:
            return result
        update, new_state = reference.lstm_step(grad, state, weights, ctx.preprocess_p, ctx.output_scale,
                                                ctx.features, moments, ctx.output)
        found = torch.autograd.grad([update, new_state], [inputs[k] for k in wanted], [grad_update, grad_new_state],
                                    create_graph=True, allow_unused=True)
        for k, value in zip(wanted, found):
            result[k] = torch.zeros_like(inputs[k]) if value is None else value
        return result

    torch.library.register_autograd("l2l_fast::lstm_step", _backward, setup_context=_setup_context)
