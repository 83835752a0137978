"""Site ops in torch ops where they run dense: what inductor compiles instead of an opaque op.

Inductor cannot see into an ``exprune`` op: it calls it through the dispatcher (3-7 us a call),
cannot fuse the ReLU or the next layer into it, and converts the tensors around it back to
the contiguous layout (it runs convolutions channels-last). Under the ``"fastest"`` kernels
(:mod:`.fast`) many sites run dense on every call, and then the op's work is a dense layer, its
folded epilogue ``scale * z + offset`` and a counter update, all of which inductor can compile:

* convolution and argmax sites, always;
* linear sites whose rows are shorter than ``fast.MIN_TERMS`` terms, or whose call has so many
  rows that the cost model picks the dense layer even if every output is pruned (the cost
  model's fewest reads: the head's terms only).

Each function here has its op's signature and decides while dynamo traces it: under the
``"fastest"`` setting, on a call the cost model would run dense whatever the counters say,
the dense form (the same outputs up to float rounding and the same counters as the op); the
op otherwise. Dynamo guards on what the decision read (the setting, the shapes), so changing
the setting recompiles. :class:`exprune_fx.fastcall.LeanCall` puts these in place of the ops
in the flat function it hands to inductor; eager calls keep the ops.

Example:
    >>> import torch
    >>> from exprune_fx.runtime import fast, lowering
    >>> from exprune_fx.runtime.counters import new_counters, read
    >>> x, w, stats = torch.randn(1, 64), torch.randn(8, 64), new_counters()
    >>> with fast.use("fastest"):  # 64-term rows: always the dense layer
    ...     z = lowering.relu_linear(x, w, torch.ones(8), None, 1, 16, 1, torch.tensor(0.0), stats)
    >>> torch.allclose(z, x @ w.T, atol=1e-5), read(stats)["untested"]
    (True, 8.0)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import fast, ops  # noqa: F401 (ops: registers torch.ops.exprune)
from .kernels import dense_conv2d, dense_epilogue

_ops = torch.ops.exprune


def relu_linear(x, weight, scale, offset, unit: int, k: int, test: int, critical, stats, stages: int = 1):
    """``exprune::relu_linear``, or its dense form where the cost model runs it dense."""
    if _linear_runs_dense(x, weight, unit, k, stats):
        return _dense_linear(x, weight, scale, offset, stats)
    return _ops.relu_linear.default(x, weight, scale, offset, unit, k, test, critical, stats, stages)


def relu_matmul(x, weight, scale, offset, unit: int, k: int, test: int, critical, stats, stages: int = 1):
    """``exprune::relu_matmul``: with a compile-time weight [N, K], as :func:`relu_linear`."""
    if weight.dim() == 2 and _linear_runs_dense(x, weight, unit, k, stats):
        return _dense_linear(x, weight, scale, offset, stats)
    return _ops.relu_matmul.default(x, weight, scale, offset, unit, k, test, critical, stats, stages)


def argmax_matmul(x, weight, scale, offset, unit: int, k: int, test: int, critical, stats):
    """``exprune::argmax_matmul``: dense under ``"fastest"``, one decision per row."""
    if fast.current() == "fastest":
        return _dense_linear(x, weight, scale, offset, stats, argmax=True)
    return _ops.argmax_matmul.default(x, weight, scale, offset, unit, k, test, critical, stats)


def relu_conv2d(x, weight, scale, offset, stride, padding, dilation, groups: int, unit: int, k: int, test: int,
                critical, stats, stages: int = 1):
    """``exprune::relu_conv2d``: dense under ``"fastest"``."""
    if fast.current() == "fastest":
        return dense_conv2d(x, weight, scale, offset, stride, padding, dilation, groups, stats, traced=True)
    return _ops.relu_conv2d.default(x, weight, scale, offset, stride, padding, dilation, groups, unit, k, test,
                                    critical, stats, stages)


def _dense_linear(x, weight, scale, offset, stats, argmax: bool = False):
    """A linear site's dense form: ``x @ weight.T``, the folded epilogue, the counters of a call
    that prunes nothing (an argmax site decides once per row and counts no negatives)."""
    return dense_epilogue(F.linear(x, weight), scale, offset, stats, x.shape[-1], count_negative=not argmax,
                          per_row=argmax)


def _linear_runs_dense(x, weight, unit: int, k: int, stats) -> bool:
    """Whether the op would run this call on the extension's dense layer whatever the site's
    counters say: the ``"fastest"`` setting, a call the extension covers (as
    ``fast_kernels.cpp``'s ``linear_site`` checks it), and ``fast.choose``'s rule failing even
    at its fewest reads (every tested output pruned: ``rows * k_share``)."""
    if fast.current() != "fastest" or not fast.built():
        return False
    covered = (x.device.type == "cpu" and weight.device.type == "cpu" and x.dtype == torch.float32
               and weight.dtype == torch.float32 and x.dim() >= 1 and weight.dim() == 2 and weight.stride(1) == 1
               and stats.device.type == "cpu" and stats.dtype == torch.float64 and stats.is_contiguous())
    big_k = x.shape[-1]
    if not covered or big_k == 0:
        return False
    rows = x.numel() // big_k
    fewest_reads = rows * (k * unit / big_k)
    return big_k < fast.MIN_TERMS or fewest_reads + rows * fast.OUTPUT_COST / big_k > fast.DENSE_BUDGET


TRACEABLE = {
    _ops.relu_linear.default: relu_linear,
    _ops.relu_matmul.default: relu_matmul,
    _ops.argmax_matmul.default: argmax_matmul,
    _ops.relu_conv2d.default: relu_conv2d,
}
