"""Datasets for meta-training: MNIST (IDX files) and CIFAR-10 (python tarball), as float32 tensors in [0, 1].

    images, labels = load_mnist("train")     # float32 [60000, 784], int64 [60000]
    images, labels = load_cifar10("test")    # float32 [10000, 3, 32, 32], int64 [10000]

Files are found via ``data_dir=`` / ``$L2L_FAST_DATA`` / the cache folder, and downloaded into the cache
(MD5-verified) when missing; see :mod:`l2l_fast.data.download`.
"""
from .cifar10 import CIFAR10Error, CIFAR10Unavailable, load_cifar10
from .download import DatasetUnavailable, cache_dir
from .mnist import IDXError, MNISTUnavailable, load_mnist, read_idx

__all__ = ["load_mnist", "load_cifar10", "read_idx", "cache_dir", "DatasetUnavailable", "MNISTUnavailable",
           "CIFAR10Unavailable", "IDXError", "CIFAR10Error"]
