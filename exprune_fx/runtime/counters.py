"""Per-site work counters, kept in a float64 tensor that the runtime ops update in place.

Counting is tensor arithmetic on the counter's device: no host synchronisation happens until
somebody reads the counters (``exprune_stats()``).

MACs are multiply-accumulates; FLOPs are reported as 2 x MACs.

* ``dense``: MACs the original reduction performs;
* ``partial``: the first k terms of every output;
* ``test``: the test's overhead. ReLU sites, stats test: ``k + 4`` per output (the k
  squared terms accumulated for the variance; mean, variance, standard error and comparison);
  threshold test: ``2`` per output. Argmax sites: ``2k + 6`` per class and row (stats) or
  ``2`` (threshold);
* ``remainder``: the remaining ``n - k`` terms of every output that was not pruned (the work
  the method requires);
* ``computed``: MACs this kernel actually spent (partial + test + the remainder it computed;
  a dense kernel on a subset of output columns may compute more than ``remainder``);
* ``negative``: outputs that were computed in full and came out negative (the decision
  zeroes them): what a perfect sign predictor at the same k would also have skipped. With
  nothing pruned (alpha = 0) it gives the oracle bound;
* ``untested``: outputs of calls run dense (the ``"fastest"`` kernels' dense layer, where no
  early exit pays): counted in ``outputs``, never tested. The cost model's survivor share is
  ``1 - pruned / (outputs - untested)``, over the outputs that were tested, so calls that ran
  dense do not pull it toward 1.

Example:
    >>> import torch
    >>> c = new_counters(torch.device("cpu"))
    >>> add(c, calls=1, outputs=10, pruned=torch.tensor(4))
    >>> read(c)["pruned"]
    4.0
"""

from __future__ import annotations

import torch

FIELDS = ("calls", "outputs", "pruned", "dense", "partial", "test", "remainder", "computed", "negative",
          "untested")
INDEX = {name: i for i, name in enumerate(FIELDS)}


def new_counters(device: torch.device | str | None = None) -> torch.Tensor:
    return torch.zeros(len(FIELDS), dtype=torch.float64, device=device)


def add(counters: torch.Tensor, **values) -> None:
    """Add Python numbers or 0-d tensors to named counters, without a host sync."""
    inc = torch.zeros_like(counters)
    for name, value in values.items():
        inc[INDEX[name]] = value if not isinstance(value, torch.Tensor) else value.to(counters.dtype)
    counters.add_(inc)


def read(counters: torch.Tensor) -> dict[str, float]:
    return dict(zip(FIELDS, counters.detach().cpu().tolist()))
