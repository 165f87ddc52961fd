"""The learned optimizer as a drop-in ``torch.optim.Optimizer``."""
from .learned import LearnedOptimizer

__all__ = ["LearnedOptimizer"]
