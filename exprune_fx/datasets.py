"""Offline datasets: Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package.

``apt-get install dataset-fashion-mnist`` puts the gzipped IDX files in
``/usr/share/datasets/fashion-mnist`` (60000 training and 10000 test images, 28x28).

Example:
    >>> from exprune_fx.datasets import load_fashion_mnist
    >>> images, labels = load_fashion_mnist("test", limit=5)  # doctest: +SKIP
    >>> images.shape, labels.dtype                            # doctest: +SKIP
    (torch.Size([5, 1, 28, 28]), torch.int64)
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

from .errors import InputError

FASHION_MNIST_ROOT = Path(os.environ.get("EXPRUNE_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
# Per-pixel statistics of the training images, to standardise inputs.
MEAN, STD = 0.2860, 0.3530


def read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) IDX file into a numpy array, checking its header."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise InputError(f"{path} does not exist. Install the data with 'apt-get install "
                         f"dataset-fashion-mnist' or point EXPRUNE_FASHION_MNIST at a folder with the IDX files.") from None
    except (OSError, EOFError) as exc:
        raise InputError(f"{path} is not a readable (gzipped) IDX file: {exc}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise InputError(f"{path} is not an IDX file of unsigned bytes (bad magic number)")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise InputError(f"{path} is truncated: header says {dims}, found {body.size} values")
    return body.reshape(dims)


def load_fashion_mnist(split: str = "train", root: str | Path | None = None, limit: int | None = None):
    """``(images, labels)``: float images ``[N, 1, 28, 28]`` standardised with the training
    mean and std, int64 labels ``[N]``."""
    if split not in _FILES:
        raise InputError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root) if root is not None else FASHION_MNIST_ROOT
    if not root.is_dir():
        raise InputError(f"{root} is not a folder. Install the data with 'apt-get install dataset-fashion-mnist' "
                         f"or pass root= / set EXPRUNE_FASHION_MNIST to the folder holding the IDX files.")
    images_file, labels_file = _FILES[split]
    images, labels = read_idx(root / images_file), read_idx(root / labels_file)
    if images.shape[0] != labels.shape[0]:
        raise InputError(f"{root}: {images.shape[0]} images but {labels.shape[0]} labels")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return (x - MEAN) / STD, torch.from_numpy(labels.astype(np.int64))
