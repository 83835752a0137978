"""The Fashion-MNIST loader on small IDX files made here, and its errors."""

import gzip

import numpy as np
import pytest

from exprune_fx import InputError
from exprune_fx.datasets import FASHION_MNIST_ROOT, load_fashion_mnist, read_idx


def write_idx(path, array, magic=0x08):
    header = bytes([0, 0, magic, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_root(tmp_path):
    rng = np.random.default_rng(0)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (6, 28, 28)))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(6) % 10)
    return tmp_path


def test_loads_and_standardises(tiny_root):
    x, y = load_fashion_mnist("test", root=tiny_root, limit=4)
    assert x.shape == (4, 1, 28, 28) and y.tolist() == [0, 1, 2, 3]
    assert -1.0 < x.mean().item() < 2.0


def test_bad_paths_and_files(tiny_root, tmp_path):
    with pytest.raises(InputError, match="is not a folder.*apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("test", root=tmp_path / "nowhere")
    with pytest.raises(InputError, match="does not exist"):
        load_fashion_mnist("train", root=tiny_root)
    with pytest.raises(InputError, match="split must be"):
        load_fashion_mnist("validation", root=tiny_root)
    bad = tmp_path / "bad.gz"
    write_idx(bad, np.zeros((2, 2)), magic=0x0D)
    with pytest.raises(InputError, match="bad magic"):
        read_idx(bad)
    (tmp_path / "plain.gz").write_bytes(b"not gzip")
    with pytest.raises(InputError, match="not a readable"):
        read_idx(tmp_path / "plain.gz")


@pytest.mark.skipif(not FASHION_MNIST_ROOT.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist():
    x, y = load_fashion_mnist("test")
    assert x.shape == (10000, 1, 28, 28) and set(y.tolist()) == set(range(10))
