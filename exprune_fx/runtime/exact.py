"""Exact-mode kernels: lossless early termination on non-negative inputs (SnaPEA-style).

When every input ``x_i`` is >= 0, the term ``x_i * f_i`` of an output has the sign of its
folded weight ``f_i = a * w_i`` (``a`` the output's epilogue scale, so a negative batch-norm
scale flips the signs). Each output starts from its offset ``c`` plus all of its positive
terms, then adds its negative terms, most negative weight first, ``k`` at a time. Before
each block it checks the running sum: once it is negative, the rest can only lower it, so the
ReLU after the site makes the output 0 whatever the rest is. The output is then final: set to
0 and its remaining negative terms are never computed. Outputs that never stop get their
exact value (summed in another order: equal to the dense result to float tolerance).

Zero weights are neither positive nor negative: they are never computed (a statically pruned
model pays only for its nonzero terms), and ``dense`` counts only nonzero MACs.

Counters (``counters.py``): ``dense`` nonzero MACs of every output; ``partial`` its positive
terms; ``remainder`` the negative terms it summed; ``test`` one comparison per output and
check; ``pruned`` outputs that stopped with negative terms left; ``negative`` stays 0 (there
is no oracle gap to measure: the mode is already exact).

Example:
    >>> import torch
    >>> from exprune_fx.runtime.counters import new_counters, read
    >>> w = torch.randn(8, 64)
    >>> pos, order, neg, count = sign_order(w)
    >>> x = torch.rand(4, 64)                      # non-negative, as after a ReLU
    >>> c = new_counters()
    >>> z = exact_relu_matmul(x, pos, order, neg, count, None, 8, c)
    >>> torch.allclose(z.relu(), (x @ w.T).relu(), atol=1e-5)
    True
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .counters import add
from .kernels import _CHUNK_ELEMENTS


def sign_order(folded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Compile-time layouts of a folded weight ``[N, T]`` (N outputs, T terms each):
    ``positive`` (the weight with its negative entries zeroed), ``order`` ``[N, L]`` (each
    output's term indices, most negative weight first, L = the largest negative count),
    ``negative`` ``[N, L]`` (those weights; 0 past the output's count) and ``count`` ``[N]``.

    >>> pos, order, neg, count = sign_order(torch.tensor([[1.0, -2.0, -3.0], [0.0, 4.0, -1.0]]))
    >>> order.tolist(), neg.tolist(), count.tolist()
    ([[2, 1], [2, 0]], [[-3.0, -2.0], [-1.0, 0.0]], [2, 1])
    """
    folded = folded.detach()
    count = (folded < 0).sum(1)
    width = int(count.max()) if count.numel() else 0
    order = torch.argsort(folded, dim=1, stable=True)[:, :width].contiguous()
    negative = folded.gather(1, order)
    negative = torch.where(negative < 0, negative, torch.zeros((), dtype=folded.dtype))
    return folded.clamp_min(0), order, negative, count


_WEIGHT_ELEMENTS = 1 << 22  # bound on one group of stacked block weights (16 MiB of float32)


def _block_weights(order, negative, k: int, taps: int, first: int, last: int) -> torch.Tensor:
    """Blocks ``first..last`` of every output as rows of one weight ``[(last - first) * N, taps]``:
    row ``(j - first) * N + c`` holds output c's negative terms ``jk..(j+1)k`` (0 elsewhere)."""
    n_out = order.shape[0]
    position = torch.arange(first * k, min(last * k, order.shape[1]), device=order.device)
    rows = (position // k - first).view(1, -1) * n_out + torch.arange(n_out, device=order.device).view(-1, 1)
    stacked = torch.zeros((last - first) * n_out * taps, dtype=negative.dtype, device=negative.device)
    stacked[(rows * taps + order[:, position]).reshape(-1)] = negative[:, position].reshape(-1)
    return stacked.view((last - first) * n_out, taps)


def _early_exit(running, order, negative, count, k: int, skip, taps: int, block_sums):
    """The early-exit loop shared by the kernels, in place on ``running`` ([M, N] or
    [B, N, H, W]: offset + positive terms, per output). Each output's negative terms
    (``order``/``negative``/``count`` of :func:`sign_order`) come in blocks of ``k``, most
    negative first, and the running sum is checked before each block; once it is negative the
    output stops (the rest can only lower it, and the ReLU makes it 0). Outputs where ``skip``
    is True (decided already: hybrid mode's pruned ones) are never checked and consume nothing.

    ``block_sums(weight, lo, hi)`` returns every block's sum for rows ``lo..hi`` given a stacked
    block weight (:func:`_block_weights`), as [rows, blocks * N, ...]: one matmul or
    convolution for a group of blocks. Since block sums are <= 0, the running sum before block
    j only falls with j, so the blocks an output consumes are those it reaches with a running
    sum still >= 0. ``running`` ends as the full sum (the caller zeroes the stopped outputs).

    Returns (stopped, negative terms consumed, checks, MACs computed); an output that
    consumed ``b`` blocks was checked ``b`` times, plus once more if it stopped."""
    n_out, width = order.shape
    blocks = -(-width // k)
    view = (1, -1) + (1,) * (running.dim() - 2)
    count = count.view(view)
    needed = (count + (k - 1)) // k  # blocks an output has
    waiting = needed if skip is None else needed.masked_fill(skip, 0)
    taken = torch.zeros(running.shape, dtype=torch.int64, device=running.device)
    group = max(1, _WEIGHT_ELEMENTS // max(1, n_out * taps))
    computed = 0
    for first in range(0, blocks, group):
        if not bool(((running >= 0) & (waiting > first)).any()):
            break  # every output has stopped or has no blocks left
        last = min(blocks, first + group)
        stacked = _block_weights(order, negative, k, taps, first, last)
        has = torch.arange(first, last, device=running.device).view((1, -1) + (1,) * (running.dim() - 1)) \
            < needed.unsqueeze(1)
        step = max(1, _CHUNK_ELEMENTS // max(1, (last - first) * running[0].numel()))
        for lo in range(0, running.shape[0], step):
            part = running[lo:lo + step]
            sums = block_sums(stacked, lo, lo + step).view((part.shape[0], last - first) + part.shape[1:])
            before = sums.cumsum(1).sub_(sums).add_(part.unsqueeze(1))  # the running sum before each block
            taken[lo:lo + step] += (before >= 0).logical_and_(has).sum(1)
            part += sums.sum(1)
        computed += running.numel() * (last - first) * taps
    if skip is not None:
        taken.masked_fill_(skip, 0)
    stopped = taken < waiting
    consumed = torch.minimum(count, taken * k).double()
    return stopped, consumed, taken.double() + stopped, computed


def matmul_blocks(x2, running, order, negative, count, k: int, skip=None):
    """:func:`_early_exit` for ``running`` [M, N] += x2 [M, K] (>= 0) @ negative terms."""
    return _early_exit(running, order, negative, count, k, skip, x2.shape[1],
                       lambda weight, lo, hi: x2[lo:hi] @ weight.T)


def conv_blocks(x, running, weight_shape, order, negative, count, stride, padding, dilation, k: int, skip=None):
    """:func:`_early_exit` for a convolution (x >= 0, groups 1; ``running`` [B, C, H, W]):
    a term is one weight tap at one output position."""
    taps = math.prod(weight_shape[1:])
    return _early_exit(running, order, negative, count, k, skip, taps,
                       lambda weight, lo, hi: F.conv2d(x[lo:hi], weight.view((-1,) + tuple(weight_shape[1:])), None,
                                                       stride, padding, dilation))


def _count(stats, stopped, consumed, checks, dense, partial, computed) -> None:
    add(stats, calls=1, outputs=stopped.numel(), pruned=stopped.sum(), dense=dense, partial=partial,
        test=checks.sum(), remainder=consumed.sum(), computed=computed + checks.sum(), negative=0)


def exact_relu_matmul(x, positive, order, negative, count, offset, k: int, stats):
    """Exact early exit for ``x @ weight.T`` (x [..., K] >= 0) followed by a ReLU; the
    weight arrives as :func:`sign_order` layouts of its folded form. Returns ``z`` with the
    outputs that stopped set to 0."""
    lead, big_k, n_out = x.shape[:-1], x.shape[-1], positive.shape[0]
    x2 = x.reshape(-1, big_k)
    m = x2.shape[0]
    running = x2 @ positive.T
    if offset is not None:
        running = running + offset.to(x2.dtype).expand(lead + (n_out,)).reshape(m, n_out)
    stopped, consumed, checks, computed = matmul_blocks(x2, running, order, negative, count, k)
    nonzero = (positive != 0).sum() + count.sum()
    _count(stats, stopped, consumed, checks, dense=m * nonzero, partial=m * (positive != 0).sum(),
           computed=m * n_out * big_k + computed)
    return running.masked_fill_(stopped, 0).reshape(lead + (n_out,))


def exact_relu_conv2d(x, positive, order, negative, count, offset, stride, padding, dilation, k: int, stats):
    """Exact early exit for a 2-d convolution (groups 1, x >= 0) followed by a ReLU; a term
    is one weight tap (input channel and kernel position) at one output position.
    ``positive`` is the folded weight with negative taps zeroed; ``order``/``negative`` index
    each output channel's flattened taps (:func:`sign_order` of the weight viewed [cout, -1]);
    the negative taps are added in blocks by :func:`conv_blocks`."""
    running = F.conv2d(x, positive, None, stride, padding, dilation)
    if offset is not None:
        running = running + offset.to(x.dtype)
    per_map = running.shape[0] * running.shape[2] * running.shape[3]  # output positions per channel
    stopped, consumed, checks, computed = conv_blocks(x, running, positive.shape, order, negative, count, stride,
                                                      padding, dilation, k)
    _count(stats, stopped, consumed, checks, dense=per_map * ((positive != 0).sum() + count.sum()),
           partial=per_map * (positive != 0).sum(), computed=per_map * positive.numel() + computed)
    return running.masked_fill_(stopped, 0)
