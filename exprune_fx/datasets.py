"""Offline datasets: Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package, and a
byte-level text corpus made of the Python standard library's own ``.py`` sources.

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
import sysconfig
import zlib
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


# -- Python source corpus -------------------------------------------------------------------
PYTHON_CORPUS_ROOT = Path(os.environ.get("EXPRUNE_PYTHON_CORPUS", sysconfig.get_paths()["stdlib"]))
# Folders never read: installed third-party packages, and the (large, unusual) test suites.
_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"})
_CORPUS_SPLITS = ("train", "val", "test")


def corpus_split_of(relative_path: str) -> str:
    """The split of a file, from a stable hash of its relative path (``/``-separated):
    about 10% of the files are ``"val"``, 10% ``"test"``, the rest ``"train"``."""
    bucket = zlib.crc32(relative_path.encode("utf-8", "surrogateescape")) % 10
    return "val" if bucket == 0 else "test" if bucket == 1 else "train"


def python_corpus_files(split: str, root: str | Path | None = None) -> list[Path]:
    """The ``.py`` files of one split under ``root`` (default: the standard library, or
    ``EXPRUNE_PYTHON_CORPUS``), sorted by relative path. Files in ``site-packages``,
    ``dist-packages``, ``test``, ``tests`` and ``idlelib`` folders are left out."""
    if split not in _CORPUS_SPLITS:
        raise InputError(f"split must be 'train', 'val' or 'test', got {split!r}")
    root = Path(root) if root is not None else PYTHON_CORPUS_ROOT
    if not root.is_dir():
        raise InputError(f"{root} is not a folder. Pass root= or set EXPRUNE_PYTHON_CORPUS to a folder "
                         f"holding .py files (the standard library, {sysconfig.get_paths()['stdlib']}, by default).")
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIPPED_DIRS]  # prune: never walk into them
        for name in names:
            path = Path(folder) / name
            if name.endswith(".py") and path.is_file():
                files.append((path.relative_to(root).as_posix(), path))
    if not files:
        raise InputError(f"{root} holds no .py files (outside {', '.join(sorted(_SKIPPED_DIRS))} folders). "
                         f"Pass root= or set EXPRUNE_PYTHON_CORPUS to a folder of Python sources.")
    files.sort()
    return [path for rel, path in files if corpus_split_of(rel) == split]


def load_python_corpus(split: str, context: int = 64, limit: int | None = None,
                       root: str | Path | None = None) -> torch.Tensor:
    """Non-overlapping byte windows of one split of the Python source corpus, int64
    ``[N, context + 1]`` with values in [0, 256): the model reads ``w[:, :-1]`` and predicts
    ``w[:, 1:]``.

    The split's files (see :func:`python_corpus_files`; splits never share a file) are
    concatenated in sorted order and cut into windows; the incomplete last one is dropped.
    ``limit`` keeps the first ``limit`` windows (and reads only the files they need).

    Example:
        >>> from exprune_fx.datasets import load_python_corpus
        >>> w = load_python_corpus("val", context=32, limit=4)
        >>> w.shape, w.dtype
        (torch.Size([4, 33]), torch.int64)
        >>> bool(((w >= 0) & (w < 256)).all())
        True
    """
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise InputError(f"context must be a positive integer (tokens the model reads per window), got {context!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise InputError(f"limit must be None or a non-negative integer, got {limit!r}")
    files = python_corpus_files(split, root)
    size = context + 1
    needed = None if limit is None else limit * size
    chunks, total = [], 0
    for path in files:
        if needed is not None and total >= needed:
            break
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise InputError(f"cannot read {path}: {exc}. Fix its permissions or point "
                             f"EXPRUNE_PYTHON_CORPUS at another folder.") from None
        chunks.append(data)
        total += len(data)
    data = b"".join(chunks)
    n = len(data) // size if limit is None else min(limit, len(data) // size)
    body = np.frombuffer(data, dtype=np.uint8, count=n * size)
    return torch.from_numpy(body.astype(np.int64).reshape(n, size))
