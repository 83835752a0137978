"""Record what each site's threshold test sees, to fit its thresholds from data.

Inside :func:`recording`, every ReLU kernel with a compile-time weight (linear and convolution
sites; statistical single-stage, or hybrid) adds, per call, its outputs' test statistic (the
mean of the first ``k`` folded terms, what the threshold test compares) and their value ``z``
before the ReLU, keyed by the site's counter tensor. (Where a hybrid kernel's exact early exit
stopped an output, ``z`` is the negative partial sum it stopped at: the sign is ``z``'s.) The
reference kernels run throughout (the fast kernels do not record). Record with nothing pruned
(threshold ``-inf``): a pruned output's ``z`` is not computed. Each call keeps at most
``per_call`` positions (rows, or image positions), drawn at random with a seeded generator, so
that memory stays bounded.

An argmax (dominance) kernel under the threshold test records one "output" per site: per row,
the statistic is the leader's smallest mean advantage over another class after k terms (the
row stops when it exceeds the margin), and ``z`` is 1 where that leader is the row's final
argmax and 0 where it is not (:func:`exprune_fx.fitting.fit_margin`).

Example:
    >>> import torch
    >>> from exprune_fx.runtime import kernels
    >>> from exprune_fx.runtime.counters import new_counters
    >>> g = torch.Generator().manual_seed(0)
    >>> x, w = torch.randn(5, 64, generator=g), torch.randn(8, 64, generator=g)
    >>> c = new_counters()
    >>> with recording() as record:
    ...     z = kernels.relu_matmul(x, w, torch.ones(8), None, 1, 16, 1, torch.tensor(float("-inf")), c)
    >>> mean, value = record.samples(c)
    >>> mean.shape, torch.allclose(value, (x @ w.T).T, atol=1e-4)
    (torch.Size([8, 5]), True)
"""

from __future__ import annotations

import contextlib

import torch

from . import fast

_state: dict = {"record": None}


class Recording:
    """Per site (its counter tensor): the test statistics and values seen, [outputs, samples]."""

    def __init__(self, per_call: int, seed: int):
        self.per_call = per_call
        self.generator = torch.Generator().manual_seed(seed)
        self._by_site: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def add(self, stats: torch.Tensor, mean: torch.Tensor, z: torch.Tensor, channel_dim: int) -> None:
        mean = torch.movedim(mean.expand_as(z), channel_dim, 0).reshape(z.shape[channel_dim], -1)
        z = torch.movedim(z, channel_dim, 0).reshape(mean.shape)
        if mean.shape[1] > self.per_call:
            keep = torch.randperm(mean.shape[1], generator=self.generator)[: self.per_call].to(mean.device)
            mean, z = mean[:, keep], z[:, keep]
        # copies: a kernel may go on to write into the tensors it passed
        self._by_site.setdefault(id(stats), []).append((mean.to("cpu", torch.float32, copy=True),
                                                        z.to("cpu", torch.float32, copy=True)))

    def samples(self, stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(statistic, z), each [outputs, samples], for the site counting into ``stats``; None if
        it recorded nothing."""
        parts = self._by_site.get(id(stats))
        if not parts:
            return None
        return torch.cat([m for m, _ in parts], 1), torch.cat([z for _, z in parts], 1)


@contextlib.contextmanager
def recording(per_call: int = 8192, seed: int = 0):
    """Record every call of the ReLU and argmax kernels inside the block (see the module docstring)."""
    if _state["record"] is not None:
        raise RuntimeError("exprune-fx: recordings do not nest")
    record = Recording(per_call, seed)
    _state["record"] = record
    try:
        with fast.use("reference"):
            yield record
    finally:
        _state["record"] = None


def add(stats: torch.Tensor, mean: torch.Tensor, z: torch.Tensor, channel_dim: int) -> None:
    """Called by the kernels: record one call when a recording is on."""
    record = _state["record"]
    if record is not None:
        record.add(stats, mean.detach(), z.detach(), channel_dim)


def active() -> bool:
    return _state["record"] is not None
