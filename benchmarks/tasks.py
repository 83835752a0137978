"""The benchmark tasks: a trained model, its validation and test batches, and its metric.

Every task is real data, offline:

* ``resnet``, ``vgg_bn``, ``vgg``: the Fashion-MNIST CNNs of ``benchmarks/checkpoints``
  (the ResNet, the demo's, is shipped in ``exprune_fx/checkpoints``; ``train_cnns.py``); validation = training images 55000-59999 (never trained on), test =
  the 10000 test images; metric = accuracy.
* ``gcn``: node classification on a k-nearest-neighbour graph of Fashion-MNIST images
  (:func:`knn_graph_task`); the GCN is trained here, seeded, in seconds; validation and test
  are disjoint node sets of the same graph; metric = accuracy on the split's nodes.
* ``opt_lm``: the OPT language model of ``benchmarks/checkpoints/opt_lm.pt``
  (``train_lm.py``, byte-level, trained on the Python standard library's sources); split by
  file; metric = next-token accuracy; the LM head is read through argmax (dominance).

    >>> task = build("gcn", val=200, test=200)  # doctest: +SKIP
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from exprune_fx.datasets import load_fashion_mnist
from exprune_fx.demo import load_demo_model
from exprune_fx.zoo import GCN, ResidualCNN, VGGStyle, normalized_adjacency

CHECKPOINTS = Path(__file__).parent / "checkpoints"
CNNS = {"resnet": ResidualCNN, "vgg_bn": lambda: VGGStyle(batch_norm=True), "vgg": lambda: VGGStyle(batch_norm=False)}


@dataclass
class Task:
    """What the calibration benchmark needs to know about one model."""

    name: str
    model: torch.nn.Module
    example: Any  # example inputs for exprune_fx.compile
    val: list  # (inputs, labels) batches to calibrate on
    test: list  # (inputs, labels) batches to report on
    metric: Callable[[Any, torch.Tensor], float] | None = None  # None: exprune_fx.calibrate.accuracy
    metric_name: str = "accuracy"
    outputs: Any = None  # exprune_fx.compile(outputs=...)
    notes: dict = field(default_factory=dict)


def load_cnn(name: str) -> torch.nn.Module:
    if name == "resnet":
        return load_demo_model()
    model = CNNS[name]()
    model.load_state_dict(torch.load(CHECKPOINTS / f"{name}.pt"))
    return model.eval()


def batches(x, y, size: int) -> list:
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def cnn_task(name: str, val: int, test: int) -> Task:
    xv, yv = load_fashion_mnist("train")
    xt, yt = load_fashion_mnist("test", limit=test)
    # small validation batches: the calibration's acceptance margin comes from their spread
    return Task(name, load_cnn(name), xv[55000:55004], batches(xv[55000:55000 + val], yv[55000:55000 + val], 50),
                batches(xt, yt, 500))


def masked_accuracy(outputs: torch.Tensor, labels: torch.Tensor) -> float:
    """Accuracy over the nodes whose label is not -1 (the others belong to another split)."""
    chosen = labels >= 0
    return (outputs[chosen].argmax(-1) == labels[chosen]).float().mean().item()


def knn_graph(features: torch.Tensor, neighbours: int) -> torch.Tensor:
    """Edge list [2, E] linking every node to its ``neighbours`` nearest others (Euclidean)."""
    dist = torch.cdist(features, features)
    dist.fill_diagonal_(float("inf"))
    nearest = dist.topk(neighbours, largest=False).indices
    return torch.stack([torch.arange(len(features)).repeat_interleave(neighbours), nearest.reshape(-1)])


def knn_graph_task(val: int, test: int, train: int = 1000, neighbours: int = 10, hidden: int = 128,
                   layers: int = 4, epochs: int = 100, seed: int = 0, groups: int = 10) -> Task:
    """A GCN on the k-nearest-neighbour graph of ``train + val + test`` Fashion-MNIST images
    (pixels are the node features). Semi-supervised: trained on the ``train`` nodes' labels;
    validation and test are ``groups`` label masks each over the same graph (so the
    calibration sees batch-to-batch spread)."""
    nodes = train + val + test
    x, y = load_fashion_mnist("train", limit=nodes)
    features = x.reshape(nodes, -1)
    adjacency = normalized_adjacency(knn_graph(features, neighbours), nodes, sparse=True)
    torch.manual_seed(seed)
    model = GCN(features=features.shape[1], hidden=hidden, classes=10, layers=layers)
    opt = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=5e-4)
    for _ in range(epochs):
        opt.zero_grad()
        F.cross_entropy(model(features, adjacency)[:train], y[:train]).backward()
        opt.step()
    model.eval()

    def masks(start: int, count: int) -> list:
        out = []
        for g in range(groups):
            labels = torch.full((nodes,), -1)
            part = slice(start + g * count // groups, start + (g + 1) * count // groups)
            labels[part] = y[part]
            out.append(((features, adjacency), labels))
        return out

    return Task("gcn", model, (features, adjacency), masks(train, val), masks(train + val, test), masked_accuracy,
                notes={"nodes": nodes, "edges": int(adjacency.values().numel()), "neighbours": neighbours,
                       "train_nodes": train, "widths": [features.shape[1]] + [hidden] * (layers - 1) + [10]})


def next_token_accuracy(outputs: Any, labels: torch.Tensor) -> float:
    """Fraction of positions whose argmax logit is the next token."""
    logits = getattr(outputs, "logits", outputs)
    return (logits.argmax(-1) == labels).float().mean().item()


def lm_task(val: int, test: int, context: int = 64) -> Task:
    """The byte-level OPT LM of ``checkpoints/opt_lm.pt`` on held-out Python stdlib files;
    ``val``/``test`` count windows of ``context`` tokens."""
    from exprune_fx.datasets import load_python_corpus
    from exprune_fx.zoo import opt_lm

    model = opt_lm()
    model.load_state_dict(torch.load(CHECKPOINTS / "opt_lm.pt"))
    model.eval()

    def split(name: str, count: int, size: int) -> list:
        windows = load_python_corpus(name, context=context, limit=count)
        return [({"input_ids": w[:, :-1], "use_cache": False}, w[:, 1:]) for w in windows.split(size)]

    v = split("val", val, 25)
    meta = json.loads((CHECKPOINTS / "opt_lm.json").read_text())
    return Task("opt_lm", model, {"input_ids": v[0][0]["input_ids"][:2], "use_cache": False}, v,
                split("test", test, 100), next_token_accuracy, "next-token accuracy", {"logits": "argmax"},
                notes={"context": context, "checkpoint": meta})


def build(name: str, val: int, test: int) -> Task:
    """The task ``name`` with ``val`` calibration and ``test`` report items (images, nodes or
    token windows)."""
    if name in CNNS:
        return cnn_task(name, val, test)
    if name == "gcn":
        return knn_graph_task(val, test)
    if name == "opt_lm":
        return lm_task(val, test)
    raise KeyError(f"unknown task {name!r}; known: {[*CNNS, 'gcn', 'opt_lm']}")
