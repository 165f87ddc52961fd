"""scikit-learn's bundled classification datasets (no download): digits, iris, wine, breast_cancer.

    x, y = load_tabular("digits")    # float32 [1797, 64] (pixel values 0..16), int64 [1797]

The arrays are as scikit-learn ships them; splitting and scaling are the tasks' business
(l2l_fast.tasks.datasets). Cached per process: callers must not modify the tensors in place.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

__all__ = ["TABULAR", "load_tabular"]

#: name -> (scikit-learn loader, number of classes)
TABULAR = {"digits": ("load_digits", 10), "iris": ("load_iris", 3), "wine": ("load_wine", 3),
           "breast_cancer": ("load_breast_cancer", 2)}


@functools.lru_cache(maxsize=None)
def load_tabular(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(features float32 [N, F], labels int64 [N]) of scikit-learn's bundled dataset `name`."""
    if name not in TABULAR:
        raise ValueError(f"name: expected one of {sorted(TABULAR)}, got {name!r}")
    try:
        import sklearn.datasets
    except ImportError as error:  # a declared dependency; say how to get it rather than fail obscurely
        raise ImportError(f"the {name} dataset comes with scikit-learn: pip install scikit-learn") from error
    bunch = getattr(sklearn.datasets, TABULAR[name][0])()
    x = torch.from_numpy(np.asarray(bunch.data, dtype=np.float32))
    y = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    return x, y
