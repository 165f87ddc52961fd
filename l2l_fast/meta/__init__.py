"""Meta-training (train: MetaTrainer and its config; unroll: truncations and evaluation runs; rescale: randomly
scaled problems) and the comparison with tuned hand-designed optimizers (evaluate).

Above the tasks and the optimizer layers: nothing below imports this package.
"""
