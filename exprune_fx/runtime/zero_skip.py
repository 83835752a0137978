"""Zero-skip linear: a linear layer that reads only the weight rows of its nonzero inputs.

A ReLU's output is mostly zeros, and more so after an ExPrune site (pruned outputs are 0).
The reduction that consumes it, ``y = x @ W^T + b`` with ``x`` [..., K], needs only the
rows ``W^T[i]`` of the inputs ``x_i != 0``: per input row, ``y = sum_{i: x_i != 0} x_i W^T[i]``.
That is an embedding-bag sum with per-sample weights, so the sparse path is one call to
``torch.nn.functional.embedding_bag(indices, weight_t, offsets, mode="sum",
per_sample_weights=values)`` on the weight transposed at compile time (``weight_t`` [K, N],
contiguous: the row of input ``i`` is contiguous).

:func:`zero_skip_linear` picks, per call, the sparse path or the dense one
(``torch.addmm`` / ``x @ weight_t``) with :func:`choose`, from the rows of the call and the
count of nonzero inputs (counting them is one pass over ``x`` and one host synchronisation
per call, which the choice needs anyway). Both paths give the dense linear's result up to
float summation order (for finite weights: the dense product also multiplies the skipped
zeros, so an infinite or NaN weight row of a zero input makes it NaN where the sparse sum
does not).

The cost model (:class:`CostModel`, :data:`COST`). In units of one multiply-accumulate
(MAC) of a single-row dense product, the dense call costs ``K * N * (1 + (rows - 1) /
dense_rows)`` (BLAS reads the weight once and shares it across rows) and the sparse call
``sparse_macs * nonzeros * N + scan * rows * K + overhead`` (the embedding-bag MACs, finding
the nonzero inputs, a fixed cost for building the indices); the sparse path runs when its
cost is at most the dense one. The constants are those of least time lost over a grid
measured on this project's development machine (AMD EPYC, 2 shared cores, torch 2.13 CPU,
2 threads) with::

    python benchmarks/zero_skip.py --grid --runs 5

It times both paths, forced, interleaved, on random inputs (zeros placed uniformly at
random), sweeping the grid 5 times. Sparse / dense time, median of the per-repetition
ratios (the median over the sweeps); ``*`` where :data:`COST` picks the sparse path. It
loses 0.3% of the time of always taking the faster path, over the grid (always dense: 89%):

    | K x N | rows | dense ms | d=0.05 | d=0.1 | d=0.2 | d=0.3 | d=0.5 | d=0.7 | d=0.9 |
    |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|
    | 1024 x 1024 | 1 | 0.073 | 0.40* | 0.37* | 0.44* | 0.54* | 0.75* | 0.89* | 1.04* |
    | 1024 x 1024 | 2 | 0.133 | 0.23* | 0.26* | 0.32* | 0.39* | 0.50* | 0.59* | 0.69* |
    | 1024 x 1024 | 4 | 0.357 | 0.11* | 0.12* | 0.16* | 0.20* | 0.30* | 0.42* | 0.70* |
    | 1024 x 1024 | 8 | 0.354 | 0.14* | 0.18* | 0.27* | 0.36* | 0.60* | 1.00* | 1.27 |
    | 1024 x 1024 | 16 | 0.412 | 0.23* | 0.24* | 0.36* | 0.57* | 0.95* | 1.45 | 1.78 |
    | 1024 x 1024 | 32 | 0.605 | 0.21* | 0.29* | 0.53* | 0.71* | 1.33 | 1.56 | 1.90 |
    | 1024 x 1024 | 64 | 0.903 | 0.20* | 0.29* | 0.52* | 0.78* | 1.52 | 1.92 | 1.96 |
    | 512 x 128 | 1 | 0.011 | 1.52 | 1.56 | 1.59 | 1.59 | 1.66 | 1.72 | 1.76 |
    | 512 x 128 | 2 | 0.017 | 1.36 | 1.40 | 1.40 | 1.45 | 1.52 | 1.59 | 1.68 |
    | 512 x 128 | 4 | 0.022 | 1.17 | 1.18 | 1.24 | 1.25 | 1.41 | 1.68 | 1.64 |
    | 512 x 128 | 8 | 0.023 | 1.19 | 1.26 | 1.34 | 1.51 | 1.90 | 2.06 | 2.24 |
    | 512 x 128 | 16 | 0.030 | 1.14 | 1.20 | 1.37 | 1.72 | 2.05 | 2.36 | 2.70 |
    | 512 x 128 | 32 | 0.049 | 1.08 | 1.16 | 1.66 | 1.89 | 2.57 | 2.72 | 3.32 |
    | 512 x 128 | 64 | 0.084 | 1.40 | 1.14 | 1.87 | 2.36 | 3.11 | 3.39 | 3.70 |
    | 2048 x 512 | 1 | 0.072 | 0.37* | 0.50* | 0.57* | 0.59* | 0.78* | 1.06* | 1.09* |
    | 2048 x 512 | 2 | 0.158 | 0.26* | 0.36* | 0.42* | 0.40* | 0.61* | 0.63* | 0.79* |
    | 2048 x 512 | 4 | 0.284 | 0.15* | 0.17* | 0.22* | 0.28* | 0.57* | 0.68* | 0.87* |
    | 2048 x 512 | 8 | 0.269 | 0.34* | 0.40* | 0.53* | 0.68* | 1.02* | 1.17 | 1.51 |
    | 2048 x 512 | 16 | 0.371 | 0.41* | 0.49* | 0.72* | 1.04* | 1.63 | 1.77 | 2.07 |
    | 2048 x 512 | 32 | 0.569 | 0.32* | 0.42* | 0.71* | 1.07 | 1.76 | 2.00 | 2.33 |
    | 2048 x 512 | 64 | 1.052 | 0.38* | 0.56* | 0.98* | 1.34 | 2.03 | 2.26 | 2.62 |

The sparse path pays on the large layers: 0.1-0.6x the dense time at densities up to 0.2
(1 to 64 rows), and up to density 0.7-0.9 on 1 to 4 rows, where BLAS is least efficient.
It never pays on the 512 x 128 layer, whose whole dense product (0.011-0.084 ms) is about
the sparse path's fixed cost: :meth:`CostModel.can_pay` says so at compile time, and the
pass leaves such layers dense (the op would add its own overhead, about 6 us a call, to a
product that can never get cheaper).

Counters: each zero-skip node has a float64 tensor with :data:`FIELDS`: ``calls``,
``rows``, ``nonzero`` (nonzero inputs seen), ``dense`` (MACs of the dense linear,
``rows * K * N``), ``executed`` (MACs the method needs, ``nonzero * N``), ``computed`` (MACs
the chosen path spent: ``executed`` on the sparse path, ``dense`` on the dense one) and
``sparse_calls``. FLOPs are 2 x MACs. Adding the bias is not counted (as
``torch.utils.flop_counter`` does not count it).

Which path runs is also a process-wide setting, :func:`use` (``"auto"``, the default;
``"sparse"``; ``"dense"``), for tests and measurements.

Example:
    >>> import torch
    >>> x = torch.relu(torch.randn(3, 64))
    >>> w, b = torch.randn(16, 64), torch.randn(16)
    >>> stats = new_counters()
    >>> y = zero_skip_linear(x, w.T.contiguous(), b, stats)
    >>> torch.allclose(y, torch.nn.functional.linear(x, w, b), atol=1e-5)
    True
    >>> c = read(stats)
    >>> c["dense"] == 3 * 64 * 16, c["executed"] == c["nonzero"] * 16
    (True, True)
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from .setting import set_scoped

FIELDS = ("calls", "rows", "nonzero", "dense", "executed", "computed", "sparse_calls")
SETTINGS = ("auto", "sparse", "dense")



class CostModel(NamedTuple):
    """Costs in single-row dense MACs (module docstring); fitted by ``benchmarks/zero_skip.py --grid``."""

    dense_rows: float  # each row after the first costs the dense product K * N / dense_rows
    sparse_macs: float  # one embedding-bag MAC (a nonzero input times one output)
    scan: float  # finding the nonzero inputs, per input element (rows * K)
    overhead: float  # the sparse path's fixed cost per call

    def sparse(self, rows: int, k: int, n: int, nonzero: int) -> bool:
        """Whether the sparse path is expected to be at most as slow as the dense one."""
        dense = k * n * (1.0 + (rows - 1) / self.dense_rows)
        return self.sparse_macs * nonzero * n + self.scan * rows * k + self.overhead <= dense

    def can_pay(self, k: int, n: int) -> bool:
        """Whether the sparse path wins on some call of a K -> N layer: on one all-zero row,
        or on many rows (the dense cost per row, ``k * n / dense_rows``, exceeds the scan's)."""
        return self.sparse(1, k, n, 0) or n / self.dense_rows > self.scan


COST = CostModel(dense_rows=8.0, sparse_macs=0.25, scan=40.0, overhead=50_000.0)

_state = {"setting": "auto"}


def new_counters(device: torch.device | str | None = None) -> torch.Tensor:
    return torch.zeros(len(FIELDS), dtype=torch.float64, device=device)


def read(stats: torch.Tensor) -> dict[str, float]:
    return dict(zip(FIELDS, stats.detach().cpu().tolist()))


def use(setting: str):
    """Pick the path for the whole process: ``"auto"`` (the cost model), ``"sparse"`` or
    ``"dense"``; as a context manager, restore the old setting on exit."""
    return set_scoped(_state, setting, SETTINGS, "zero-skip setting")


def choose(rows: int, k: int, n: int, nonzero: int) -> bool:
    """True for the sparse path: under ``"auto"``, when :data:`COST` says so. Empty calls run dense."""
    setting = _state["setting"]
    if rows == 0 or setting == "dense":
        return False
    return setting == "sparse" or COST.sparse(rows, k, n, nonzero)


def gather_sum(x2: torch.Tensor, weight_t: torch.Tensor, nonzero: int) -> torch.Tensor:
    """``x2 @ weight_t`` for x2 [M, K] with ``nonzero`` nonzero entries, reading only the
    weight rows of those entries: one embedding-bag sum per row of ``x2``."""
    rows, k = x2.shape
    if nonzero == 0:
        return x2.new_zeros(rows, weight_t.shape[1])
    flat = x2.reshape(-1)
    # row-major, so sorted by row; the size is known: no second host sync on CUDA
    index = flat.nonzero().squeeze(1) if flat.is_cpu else torch.nonzero_static(flat, size=nonzero).squeeze(1)
    if rows == 1:
        cols, offsets = index, torch.zeros(1, dtype=index.dtype, device=index.device)
    else:
        cols = index.remainder(k)
        starts = torch.arange(0, rows * k, k, dtype=index.dtype, device=index.device)
        offsets = torch.searchsorted(index, starts)  # first nonzero of each row
    return F.embedding_bag(cols, weight_t, offsets, mode="sum", per_sample_weights=flat.index_select(0, index))


def zero_skip_linear(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None,
                     stats: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight_t.T, bias)`` for x [..., K], weight_t [K, N]; counts into ``stats``."""
    k, n = weight_t.shape
    x2 = x.reshape(-1, k)
    rows = x2.shape[0]
    nonzero = int(torch.count_nonzero(x2)) if rows else 0  # the host sync the choice needs
    sparse = choose(rows, k, n, nonzero)
    if sparse:
        out = gather_sum(x2, weight_t, nonzero)
        if bias is not None:
            out = out.add_(bias)
    elif bias is not None:
        out = torch.addmm(bias, x2, weight_t)
    else:
        out = x2 @ weight_t
    dense, executed = rows * k * n, nonzero * n
    _count(stats, (1, rows, nonzero, dense, executed, executed if sparse else dense, int(sparse)))
    return out if x.dim() == 2 else out.reshape(x.shape[:-1] + (n,))


def _count(stats: torch.Tensor, values: tuple) -> None:
    """``stats += values``; on CPU through a NumPy view (1.4 us instead of 3.9 us a call,
    which matters next to a 5 us batch-1 product)."""
    if stats.is_cpu:
        view = stats.numpy()
        view += np.array(values, dtype=view.dtype)
    else:
        stats.add_(torch.tensor(values, dtype=stats.dtype).to(stats.device, non_blocking=True))
