"""The learned optimizer as an ``nn.Module``: a coordinatewise 2-layer LSTM with shared weights."""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, nn

from . import features as features_
from . import ops, reference
from . import checks
from .checks import check_step_inputs

BACKENDS = ("auto", "native", "reference")
OUTPUTS = ("linear", "tanh")  # the ops' `output` 0 and 1
_GATE_NAMES = ("weight_ih_l{}", "weight_hh_l{}", "bias_ih_l{}", "bias_hh_l{}")


PROGRESS_WIDTH = 2  # inputs of progress_input: the fraction of training done, the horizon's length


def progress_inputs(step: int, total_steps: int) -> tuple[float, float]:
    """The progress inputs of step `step` (0-based) of a run of `total_steps`: (min(step / total_steps, 1),
    log10(total_steps) / 4). The second is 0.5 for 100 steps and 1 for 10,000; steps past total_steps read as its
    last."""
    return min(step / total_steps, 1.0), math.log10(total_steps) / 4


def math_dtype_of(dtype: torch.dtype) -> torch.dtype:
    """The dtype a step of parameters of `dtype` computes in: float64 for float64, float32 for float32,
    bfloat16 and float16."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class LSTMParameters(nn.Module):
    """The parameters of ``torch.nn.LSTM(input_size, hidden_size, num_layers)``, same names, shapes and
    initialisation, without its cuDNN machinery (which torch.compile refuses to trace).

    ``load_state_dict`` works both ways with a real ``nn.LSTM``; :meth:`to_torch` builds one.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int):
        super().__init__()
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        bound = 1.0 / hidden_size**0.5  # torch.nn.LSTM's uniform(-1/sqrt(H), 1/sqrt(H))
        for l in range(num_layers):
            inputs = input_size if l == 0 else hidden_size
            shapes = ((4 * hidden_size, inputs), (4 * hidden_size, hidden_size), (4 * hidden_size,), (4 * hidden_size,))
            for name, shape in zip(_GATE_NAMES, shapes):
                setattr(self, name.format(l), nn.Parameter(torch.empty(shape).uniform_(-bound, bound)))

    def flat(self) -> list[Tensor]:
        return [getattr(self, name.format(l)) for l in range(self.num_layers) for name in _GATE_NAMES]

    def to_torch(self) -> nn.LSTM:
        lstm = nn.LSTM(self.input_size, self.hidden_size, self.num_layers)
        lstm.load_state_dict(self.state_dict())
        return lstm.to(self.weight_ih_l0.device, self.weight_ih_l0.dtype)


class CoordinatewiseLSTM(nn.Module):
    """LSTM optimizer of Andrychowicz et al. (2016), applied to every coordinate independently.

    ``state_dict`` keys are those of ``torch.nn.LSTM(I, hidden_size, num_layers)`` under ``lstm.`` and of
    ``torch.nn.Linear(hidden_size, 1)`` under ``out.``, so the weights move to and from plain torch modules
    (``net.lstm.to_torch()`` builds the ``nn.LSTM``). I is the input size of the features (2 for the paper's).

    features: the LSTM's input features, names or a mask (:mod:`l2l_fast.features`); kept as a tuple of names
    in bit order. The default, ``("paper",)``, is the paper's preprocessing of the gradient, and what a file
    saved without a ``features`` entry was made with.

    output: how the output layer's value y becomes the update: "linear" (the paper's, and what a file saved
    without an ``output`` entry was made with), update = output_scale * y, or "tanh", output_scale * tanh(y),
    no step larger than |output_scale|.

    progress_input: the LSTM also reads where training is, from ``progress = (t, total_steps)`` (step t counted
    from 0): :func:`progress_inputs`, the fraction done min(t / total_steps, 1) and the horizon's length
    log10(total_steps) / 4, as PROGRESS_WIDTH = 2 more inputs after the features' (the last columns of
    ``weight_ih_l0``; VeLO's horizon inputs, Metz et al. 2022). A learning rate tuned for a short run differs from
    one tuned for a long run, and the end of a run wants other steps than its start: with these inputs one set of
    weights can serve both. Every call then takes ``progress``. They are the same for every coordinate, so their
    columns fold into the first layer's bias (b + W_progress @ inputs, :meth:`op_weights`) before the kernels
    run: no kernel sees them. False (the default, and what a file saved without a ``progress_input`` entry was
    made with): the net does not know the horizon.

    State layout: one tensor [num_layers, 2, hidden_size, n]; ``state[l, 0]`` is h and ``state[l, 1]`` is c
    of layer l, coordinates last. Make it with :meth:`init_state`. A net whose features read the running
    moments (:attr:`reads_moments`, the "moments" feature) also needs them: [4, n], rows m, v, t, u, from
    :meth:`init_moments`; :meth:`step_` and :meth:`multi_step_` advance them in place, :meth:`forward` takes
    them already advanced (:meth:`advance_moments`).

    backend: "native" (fused C++/CUDA kernels), "reference" (pure PyTorch) or "auto" (native where a
    kernel exists for the tensors' device, else reference).
    """

    def __init__(self, hidden_size: int = 20, num_layers: int = 2, preprocess_p: float = 10.0,
                 output_scale: float = 0.1, backend: str = "auto",
                 features: features_.FeaturesLike = features_.DEFAULT, output: str = "linear",
                 progress_input: bool = False):
        super().__init__()
        if not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size: expected a positive int, got {hidden_size!r}")
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers: expected a positive int, got {num_layers!r}")
        checks.check_constants(preprocess_p, output_scale)  # ValueError naming preprocess_p / output_scale
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        if backend == "native" and not ops.HAS_NATIVE:
            raise RuntimeError(f"backend='native' but the l2l_fast._C extension failed to load: {ops.NATIVE_IMPORT_ERROR}")
        if output not in OUTPUTS:
            raise ValueError(f"output: expected one of {OUTPUTS}, got {output!r}")
        self.features = features_.names_of(features)  # ValueError naming `features` for unknown ones
        self.feature_mask = features_.mask_of(self.features)
        self.reads_moments = features_.reads_moments(self.feature_mask)
        self.output, self.output_kind = output, OUTPUTS.index(output)
        if not isinstance(progress_input, bool):
            raise ValueError(f"progress_input: expected True or False, got {progress_input!r}")
        self.reads_progress = progress_input
        self.hidden_size, self.num_layers = hidden_size, num_layers
        self.preprocess_p, self.output_scale = float(preprocess_p), float(output_scale)
        self.backend = backend
        inputs = features_.input_size(self.features) + (PROGRESS_WIDTH if progress_input else 0)
        self.lstm = LSTMParameters(inputs, hidden_size, num_layers)
        self.out = nn.Linear(hidden_size, 1)
        self._converted: dict = {}  # (device, dtype) -> (source weights' identity and versions, converted copies)

    def size_kwargs(self) -> dict:
        """The sizes and constants this net was built with (not the backend):
        ``CoordinatewiseLSTM(**net.size_kwargs())`` makes a net whose weights load into it. progress_input only
        when True, so that the files and signatures of nets without it read as they always have."""
        kwargs = dict(hidden_size=self.hidden_size, num_layers=self.num_layers, preprocess_p=self.preprocess_p,
                      output_scale=self.output_scale, features=self.features, output=self.output)
        return {**kwargs, "progress_input": True} if self.reads_progress else kwargs

    @classmethod
    def from_pretrained(cls, name_or_path: str, backend: str = "auto") -> "CoordinatewiseLSTM":
        """A shipped optimizer by name ('mnist', 'quadratic') or a file written by save_pretrained."""
        from .pretrained import load_pretrained

        return load_pretrained(name_or_path, backend=backend)

    def extra_repr(self) -> str:
        return (f"features={self.features}, preprocess_p={self.preprocess_p}, output_scale={self.output_scale}, "
                f"output={self.output!r}, " + ("progress_input=True, " if self.reads_progress else "")
                + f"backend={self.backend!r}")

    def weights(self) -> list[Tensor]:
        """The weights in the order the ops take them (see :mod:`l2l_fast.reference`); with progress_input,
        ``weight_ih_l0`` has the two progress columns last, which :meth:`op_weights` folds away."""
        return self.lstm.flat() + [self.out.weight, self.out.bias]

    def op_weights(self, weights: list[Tensor], progress) -> list[Tensor]:
        """`weights` (op order, as :meth:`weights`) as the ops take them at `progress` (t, total_steps): for a net
        with progress_input, weight_ih_l0 without its last PROGRESS_WIDTH columns and bias_ih_l0 + those columns @
        progress_inputs(t, total_steps) (exactly the LSTM's first-layer gates with those inputs last;
        differentiable in the weights); otherwise `weights` itself. Checks `progress` against the net."""
        checks.check_progress(progress, self.reads_progress)
        if not self.reads_progress:
            return weights
        first = weights[0]
        inputs = first.shape[1] - PROGRESS_WIDTH
        values = first.new_tensor(progress_inputs(*progress))
        folded_bias = weights[2] + first[:, inputs:] @ values
        return [first[:, :inputs].contiguous(), weights[1], folded_bias, *weights[3:]]

    def init_state(self, n: int, device=None, dtype: torch.dtype | None = None) -> Tensor:
        """Zero state for n coordinates: [num_layers, 2, hidden_size, n], on the net's device and dtype by default."""
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n: expected a non-negative int, got {n!r}")
        weight = self.out.weight
        return torch.zeros(self.num_layers, 2, self.hidden_size, n, device=device or weight.device,
                           dtype=dtype or weight.dtype)

    def init_moments(self, n: int, device=None, dtype: torch.dtype | None = None) -> Tensor | None:
        """Zero moments for n coordinates, [4, n] (rows m, v, t, u), on the net's device and dtype by default; None
        when the net's features read no moments."""
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n: expected a non-negative int, got {n!r}")
        if not self.reads_moments:
            return None
        weight = self.out.weight
        return torch.zeros(features_.MOMENT_ROWS, n, device=device or weight.device, dtype=dtype or weight.dtype)

    def advance_moments(self, grad: Tensor, moments: Tensor | None) -> Tensor | None:
        """The moments after a step with `grad` (a new tensor, no autograd; a NaN/Inf-gradient coordinate keeps
        its own): what :meth:`forward` takes, and what :meth:`step_` writes in place. None for None."""
        return None if moments is None else features_.advance_moments(grad, moments)

    def weights_for(self, device: torch.device, dtype: torch.dtype) -> list[Tensor]:
        """The weights (op order) on `device` in `dtype`: the net's own tensors when they already are, else
        detached converted copies kept until a weight changes (its version or storage), so that the ops'
        packed-weight cache sees the same tensors on every step of one weight version."""
        weights = self.weights()
        if all(w.device == device and w.dtype == dtype for w in weights):
            return weights
        if torch.compiler.is_compiling():
            return [w.detach().to(device=device, dtype=dtype) for w in weights]
        source = tuple((id(w), w.data_ptr(), w._version) for w in weights)
        cached = self._converted.get((device, dtype))
        if cached is None or cached[0] != source:
            cached = (source, [w.detach().to(device=device, dtype=dtype) for w in weights])
            self._converted[(device, dtype)] = cached
        return cached[1]

    def implementation(self, device: torch.device):
        """The module whose ops run this net on `device`: l2l_fast.ops (native kernels) or l2l_fast.reference."""
        if self.backend == "reference":
            return reference
        if device.type in ops.native_devices():
            return ops
        if self.backend == "native":
            raise RuntimeError(f"backend='native' has no kernel for device {device}; built for {sorted(ops.native_devices())}")
        return reference

    def _check(self, grad, state, moments, param=None) -> None:
        weight = self.out.weight
        check_step_inputs(grad, state, num_layers=self.num_layers, hidden_size=self.hidden_size,
                          dtype=weight.dtype, device=weight.device, param=param)
        checks.check_moments(moments, self.feature_mask, grad.shape[0], weight.dtype, weight.device)

    def forward(self, grad: Tensor, state: Tensor, moments: Tensor | None = None,
                progress: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
        """grad [n], state [L, 2, H, n] (and moments [4, n] advanced with grad, when the net reads them; progress
        (t, total_steps), when it reads that) -> (update [n], new_state [L, 2, H, n]); differentiable (not in the
        moments), inputs untouched."""
        self._check(grad, state, moments)
        weights = self.op_weights(self.weights(), progress)
        impl = self.implementation(grad.device)
        return impl.lstm_step(grad, state, weights, self.preprocess_p, self.output_scale, self.feature_mask,
                              moments, self.output_kind)

    @torch.no_grad()
    def step_(self, param: Tensor, grad: Tensor, state: Tensor, moments: Tensor | None = None,
              progress: tuple[int, int] | None = None) -> None:
        """In-place inference step on a flat parameter: param [n] += update, state (and moments [4, n], when the net
        reads them) advanced; no autograd graph. progress: (t, total_steps), for a net with progress_input."""
        self._check(grad, state, moments, param=param)
        weights = self.op_weights(self.weights(), progress)
        impl = self.implementation(grad.device)
        impl.lstm_step_(param, grad, state, weights, self.preprocess_p, self.output_scale, self.feature_mask,
                        moments, self.output_kind)

    @torch.no_grad()
    def multi_step_(self, params: list[Tensor], grads: list[Tensor], state: Tensor, lr: float = 1.0,
                    moments: Tensor | None = None, progress: tuple[int, int] | None = None) -> None:
        """The optimizer's fused step over many flat tensors sharing one state, in place, no autograd graph:
        params[k] [n_k] += lr * update of grads[k] [n_k]; state [L, 2, H, sum_k n_k] advanced, tensor k's
        coordinates at [offset_k, offset_k + n_k) in list order, and so are the moments' [4, sum_k n_k] (when the
        net reads them), advanced in place.

        The math runs in float64 for float64 params and in float32 for float32, bfloat16 and float16 ones
        (the weights are converted to it, once per weight version); grads[k] in params[k]'s dtype; state in
        the math dtype or bfloat16. A coordinate whose gradient is NaN or +-Inf does not move and keeps its
        state and moments. progress: (t, total_steps), for a net with progress_input."""
        if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
            raise TypeError(f"lr: expected a real number (a multiplier of the update), got {type(lr).__name__}")
        if not math.isfinite(lr):  # the op's scale is output_scale * lr: its own check would name output_scale
            raise ValueError(f"lr: expected a finite number, got {lr!r}")
        if not params:  # nothing to step, but a wrong progress is still refused
            checks.check_progress(progress, self.reads_progress)
            return
        device = params[0].device
        impl = self.implementation(device)
        weights = self.op_weights(self.weights_for(device, math_dtype_of(params[0].dtype)), progress)
        impl.lstm_multi_step_(params, grads, state, weights,
                              self.preprocess_p, self.output_scale * lr, self.feature_mask, moments, self.output_kind)

