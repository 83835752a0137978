"""The Fashion-MNIST loader on small IDX files made here, the Python source corpus on small
.py trees made here, and their errors."""

import gzip

import numpy as np
import pytest
import torch

from exprune_fx import InputError
from exprune_fx.datasets import (FASHION_MNIST_ROOT, corpus_split_of, load_fashion_mnist, load_python_corpus,
                                 python_corpus_files, read_idx)


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


# -- Python source corpus ---------------------------------------------------------------------
@pytest.fixture
def py_root(tmp_path):
    """Forty small .py files in two packages, plus files the loader must skip."""
    root = tmp_path / "lib"
    for i in range(40):
        path = root / f"pkg{i % 2}" / f"mod{i:02d}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"# file {i:02d}\n".encode() + bytes([65 + i % 26]) * (100 + i))
    for skipped in ("site-packages/x.py", "tests/y.py", "test/z.py", "pkg0/notes.txt"):
        (root / skipped).parent.mkdir(parents=True, exist_ok=True)
        (root / skipped).write_text("skip = True\n")
    return root


def test_python_corpus_shapes_and_values(py_root):
    w = load_python_corpus("train", context=16, root=py_root)
    assert w.dtype == torch.int64 and w.ndim == 2 and w.shape[1] == 17 and len(w) > 0
    assert int(w.min()) >= 0 and int(w.max()) < 256
    files = python_corpus_files("train", py_root)
    data = b"".join(f.read_bytes() for f in files)
    assert len(w) == len(data) // 17
    assert bytes(w.flatten().tolist()) == data[:len(w) * 17]  # non-overlapping, in file order
    assert torch.equal(load_python_corpus("train", context=16, limit=3, root=py_root), w[:3])
    assert len(load_python_corpus("train", context=16, limit=0, root=py_root)) == 0


def test_python_corpus_splits_disjoint_by_file(py_root):
    splits = {s: python_corpus_files(s, py_root) for s in ("train", "val", "test")}
    names = {s: {f.relative_to(py_root).as_posix() for f in fs} for s, fs in splits.items()}
    assert not (names["train"] & names["val"] or names["train"] & names["test"] or names["val"] & names["test"])
    everything = names["train"] | names["val"] | names["test"]
    assert everything == {f"pkg{i % 2}/mod{i:02d}.py" for i in range(40)}  # skipped dirs and non-.py left out
    for split, rels in names.items():
        assert all(corpus_split_of(r) == split for r in rels)
        assert [f.relative_to(py_root).as_posix() for f in splits[split]] == sorted(rels)
    assert names["val"] and names["test"] and len(names["train"]) > len(names["val"])


def test_python_corpus_errors(py_root, tmp_path, monkeypatch):
    with pytest.raises(InputError, match="is not a folder.*EXPRUNE_PYTHON_CORPUS"):
        load_python_corpus("train", root=tmp_path / "nowhere")
    (tmp_path / "empty" / "tests").mkdir(parents=True)
    (tmp_path / "empty" / "tests" / "t.py").write_text("pass\n")
    with pytest.raises(InputError, match="holds no .py files.*EXPRUNE_PYTHON_CORPUS"):
        load_python_corpus("train", root=tmp_path / "empty")
    with pytest.raises(InputError, match="split must be 'train', 'val' or 'test', got 'validation'"):
        load_python_corpus("validation", root=py_root)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(InputError, match="context must be a positive integer"):
            load_python_corpus("train", context=bad, root=py_root)
    with pytest.raises(InputError, match="limit must be"):
        load_python_corpus("train", limit=-1, root=py_root)


def test_python_corpus_env_root(py_root, monkeypatch):
    import importlib

    import exprune_fx.datasets as datasets
    monkeypatch.setenv("EXPRUNE_PYTHON_CORPUS", str(py_root))
    try:
        reloaded = importlib.reload(datasets)
        assert reloaded.PYTHON_CORPUS_ROOT == py_root
        assert torch.equal(reloaded.load_python_corpus("val", context=8), load_python_corpus("val", context=8, root=py_root))
    finally:
        monkeypatch.delenv("EXPRUNE_PYTHON_CORPUS")
        importlib.reload(datasets)
