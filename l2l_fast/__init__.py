"""l2l_fast: the learned LSTM optimizer of "Learning to learn by gradient descent by gradient descent",
with fused native kernels for the step, forward and backward."""
from . import ops, reference
from .net import CoordinatewiseLSTM
from .optim import LearnedOptimizer

__all__ = ["CoordinatewiseLSTM", "LearnedOptimizer", "ops", "reference"]
__version__ = "0.1.0"
