"""``torch.ops.exprune.*``: the early-exit kernels as torch.library custom ops.

``critical`` is a 0-d tensor (a buffer of the rewritten graph, so that a site can be retuned
without recompiling). Each op mutates only its ``stats`` counter tensor and returns a new tensor; its fake
implementation gives the output's shape and dtype, so a rewritten graph can be printed,
exported with torch.export and compiled by inductor (which treats the op as opaque).

Example:
    >>> import torch
    >>> from exprune_fx.runtime import ops  # registers the ops
    >>> from exprune_fx.runtime.counters import new_counters
    >>> x, w = torch.randn(2, 64), torch.randn(8, 64)
    >>> never = torch.tensor(float("-inf"))
    >>> torch.ops.exprune.relu_matmul(x, w, torch.ones(8), None, 1, 16, 0, never, new_counters()).shape
    torch.Size([2, 8])
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import exact, kernels, sparse


@torch.library.custom_op("exprune::relu_matmul", mutates_args=("stats",))
def relu_matmul(x: Tensor, weight: Tensor, scale: Tensor, offset: Optional[Tensor], unit: int, k: int,
                test: int, critical: Tensor, stats: Tensor, stages: int = 1) -> Tensor:
    """Early negative prediction for ``x @ weight.T``; see kernels.relu_matmul."""
    return kernels.relu_matmul(x, weight, scale, offset, unit, k, test, critical, stats, stages)


@relu_matmul.register_fake
def _relu_matmul_fake(x, weight, scale, offset, unit, k, test, critical, stats, stages=1):
    if weight.dim() > 2:
        return torch.matmul(x, weight.transpose(-1, -2))
    return x.new_empty(x.shape[:-1] + (weight.shape[0],))


@torch.library.custom_op("exprune::relu_linear", mutates_args=("stats",))
def relu_linear(x: Tensor, head: Tensor, rest: Tensor, scale: Tensor, offset: Optional[Tensor], unit: int, k: int,
                test: int, critical: Tensor, stats: Tensor, stages: int = 1) -> Tensor:
    """Early negative prediction for ``x @ [head | rest].T`` with the weight split at compile
    time after its first k terms; the fast kernels run here (see kernels.relu_linear)."""
    return kernels.relu_linear(x, head, rest, scale, offset, unit, k, test, critical, stats, stages)


@relu_linear.register_fake
def _relu_linear_fake(x, head, rest, scale, offset, unit, k, test, critical, stats, stages=1):
    return x.new_empty(x.shape[:-1] + (head.shape[0],))


@torch.library.custom_op("exprune::argmax_matmul", mutates_args=("stats",))
def argmax_matmul(x: Tensor, weight: Tensor, scale: Tensor, offset: Optional[Tensor], unit: int, k: int,
                  test: int, critical: Tensor, stats: Tensor) -> Tensor:
    """Dominance prediction for a prediction head; see kernels.argmax_matmul."""
    return kernels.argmax_matmul(x, weight, scale, offset, unit, k, test, critical, stats)


@argmax_matmul.register_fake
def _argmax_matmul_fake(x, weight, scale, offset, unit, k, test, critical, stats):
    return x.new_empty(x.shape[:-1] + (weight.shape[0],))


@torch.library.custom_op("exprune::relu_conv2d", mutates_args=("stats",))
def relu_conv2d(x: Tensor, weight: Tensor, scale: Tensor, offset: Optional[Tensor], stride: list[int],
                padding: list[int], dilation: list[int], groups: int, unit: int, k: int, test: int,
                critical: Tensor, stats: Tensor, stages: int = 1) -> Tensor:
    """Early negative prediction for a 2-d convolution; see kernels.relu_conv2d."""
    return kernels.relu_conv2d(x, weight, scale, offset, stride, padding, dilation, groups, unit, k,
                               test, critical, stats, stages)


@relu_conv2d.register_fake
def _relu_conv2d_fake(x, weight, scale, offset, stride, padding, dilation, groups, unit, k, test,
                      critical, stats, stages=1):
    return torch.nn.functional.conv2d(x, weight, None, stride, padding, dilation, groups)


@torch.library.custom_op("exprune::exact_relu_matmul", mutates_args=("stats",))
def exact_relu_matmul(x: Tensor, positive: Tensor, order: Tensor, negative: Tensor, count: Tensor,
                      offset: Optional[Tensor], k: int, stats: Tensor) -> Tensor:
    """Exact (lossless) early exit for ``x @ weight.T`` on x >= 0; see exact.exact_relu_matmul."""
    return exact.exact_relu_matmul(x, positive, order, negative, count, offset, k, stats)


@exact_relu_matmul.register_fake
def _exact_relu_matmul_fake(x, positive, order, negative, count, offset, k, stats):
    return x.new_empty(x.shape[:-1] + (positive.shape[0],))


@torch.library.custom_op("exprune::exact_relu_conv2d", mutates_args=("stats",))
def exact_relu_conv2d(x: Tensor, positive: Tensor, order: Tensor, negative: Tensor, count: Tensor,
                      offset: Optional[Tensor], stride: list[int], padding: list[int], dilation: list[int], k: int,
                      stats: Tensor) -> Tensor:
    """Exact (lossless) early exit for a 2-d convolution on x >= 0; see exact.exact_relu_conv2d."""
    return exact.exact_relu_conv2d(x, positive, order, negative, count, offset, stride, padding, dilation, k, stats)


@exact_relu_conv2d.register_fake
def _exact_relu_conv2d_fake(x, positive, order, negative, count, offset, stride, padding, dilation, k, stats):
    return torch.nn.functional.conv2d(x, positive, None, stride, padding, dilation)


@torch.library.custom_op("exprune::sparse_relu_matmul", mutates_args=("stats",))
def sparse_relu_matmul(x: Tensor, first: Tensor, first_w: Tensor, rest: Tensor, rest_w: Tensor, nonzero: Tensor,
                       tested: Tensor, scale: Tensor, offset: Optional[Tensor], k: int, test: int, critical: Tensor,
                       stats: Tensor) -> Tensor:
    """Early negative prediction on a statically pruned linear weight; see sparse.sparse_relu_matmul."""
    return sparse.sparse_relu_matmul(x, first, first_w, rest, rest_w, nonzero, tested, scale, offset, k, test,
                                     critical, stats)


@sparse_relu_matmul.register_fake
def _sparse_relu_matmul_fake(x, first, first_w, rest, rest_w, nonzero, tested, scale, offset, k, test, critical,
                             stats):
    return x.new_empty(x.shape[:-1] + (first.shape[0],))


@torch.library.custom_op("exprune::sparse_relu_conv2d", mutates_args=("stats",))
def sparse_relu_conv2d(x: Tensor, first: Tensor, first_w: Tensor, rest_w: Tensor, nonzero: Tensor, tested: Tensor,
                       taps_first: Tensor, taps_all: Tensor, scale: Tensor, offset: Optional[Tensor],
                       stride: list[int], padding: list[int], dilation: list[int], k: int, test: int,
                       critical: Tensor, stats: Tensor) -> Tensor:
    """Early negative prediction on a statically pruned convolution; see sparse.sparse_relu_conv2d."""
    return sparse.sparse_relu_conv2d(x, first, first_w, rest_w, nonzero, tested, taps_first, taps_all, scale,
                                     offset, stride, padding, dilation, k, test, critical, stats)


@sparse_relu_conv2d.register_fake
def _sparse_relu_conv2d_fake(x, first, first_w, rest_w, nonzero, tested, taps_first, taps_all, scale, offset,
                             stride, padding, dilation, k, test, critical, stats):
    return torch.nn.functional.conv2d(x, rest_w, None, stride, padding, dilation)
