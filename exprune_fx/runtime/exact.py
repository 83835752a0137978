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

Under ``fast.use("fastest")`` an exact site runs dense (no exact kernel beats the dense
layer on CPU): one product with its folded weight, rebuilt from the layouts once and cached
while they live (:func:`.derived.built_once`), counted as a dense call (nothing stopped).

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

from . import fast
from .counters import add
from .derived import built_once
from .kernels import _CHUNK_ELEMENTS

def unsorted(positive: torch.Tensor, order: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """The folded weight that :func:`sign_order` laid out, in ``positive``'s shape (its first
    axis the outputs; ``order`` indexes each output's flattened terms).

    >>> w = torch.tensor([[1.0, -2.0, -3.0], [0.0, 4.0, -1.0]])
    >>> torch.equal(unsorted(*sign_order(w)[:3]), w)
    True
    """
    flat = positive.reshape(positive.shape[0], -1).clone()
    return flat.scatter_add_(1, order, negative).view_as(positive)


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


def _check_blocks(running, count, k: int, width: int, add_block, skip=None):
    """The early-exit loop of the matmul kernels. ``running`` holds offset + positive terms;
    ``add_block(lo, hi, active)`` adds negative terms ``lo..hi`` where ``active``. Returns
    (stopped, negative terms consumed, checks), the last two as per-output float64 tensors.
    Outputs where ``skip`` is True (decided already: hybrid mode's pruned ones) are never
    checked, consume nothing and are not counted as stopped.

    Blocks are consumed in order, so an output that took ``b`` blocks consumed
    ``min(count, b * k)`` terms and was checked ``b`` times, plus once more if it stopped."""
    count = count.view((1, -1) + (1,) * (running.dim() - 2))
    stopped = torch.zeros(running.shape, dtype=torch.bool, device=running.device)
    if skip is not None:
        stopped |= skip  # excluded like stopped outputs, then removed from the result
    blocks = torch.zeros(running.shape, dtype=torch.int32, device=running.device)
    for lo in range(0, width, k):
        live = (count > lo) & ~stopped
        stop = live & (running < 0)
        stopped |= stop
        active = live.logical_xor_(stop)
        if not bool(active.any()):
            break
        add_block(lo, min(lo + k, width), active)
        blocks += active
    if skip is not None:
        stopped &= ~skip
    consumed = torch.minimum(count.double(), blocks.double() * k)
    return stopped, consumed, blocks.double() + stopped


def matmul_blocks(x2, running, order, negative, count, k: int, skip=None):
    """Add each output's negative terms (``order``/``negative``/``count`` of
    :func:`sign_order`) to ``running`` [M, N] in blocks of ``k``, checking before each block
    (:func:`_check_blocks`); x2 [M, K] >= 0. Returns (stopped, consumed, checks, MACs computed)."""
    m = x2.shape[0]
    computed = [0]

    def add_block(lo: int, hi: int, active) -> None:
        cols = active.any(0).nonzero().squeeze(1)
        idx, val = order[cols, lo:hi], negative[cols, lo:hi]
        step = max(1, _CHUNK_ELEMENTS // max(1, cols.numel() * (hi - lo)))
        for r in range(0, m, step):
            part = (x2[r:r + step, idx] * val).sum(-1)  # [rows, cols]
            running[r:r + step, cols] += torch.where(active[r:r + step, cols], part, 0)
        computed[0] += m * cols.numel() * (hi - lo)

    stopped, consumed, checks = _check_blocks(running, count, k, order.shape[1], add_block, skip)
    return stopped, consumed, checks, computed[0]


def conv_blocks(x, running, weight_shape, order, negative, count, stride, padding, dilation, k: int, skip=None):
    """:func:`matmul_blocks` for a convolution (x >= 0, groups 1; ``running`` [B, C, H, W]):
    each block of negative taps is one convolution over every output (a block weight holds k
    taps per output channel). Since every term it adds is <= 0, the running sum only falls,
    an output that was negative before a block stays negative, and adding blocks to outputs
    that already stopped changes nothing that is read (the caller zeroes them). So the loop
    only counts, per output, the blocks it would have consumed: those checked with a running
    sum still >= 0 (and not in ``skip``). Returns (stopped, consumed, checks, MACs computed).
    (Stacking the blocks into one convolution measured 10-25% slower on CPU.)"""
    taps = math.prod(weight_shape[1:])
    per_map = running.shape[0] * running.shape[2] * running.shape[3]  # output positions per channel
    count4 = count.view(1, -1, 1, 1)
    taken = torch.zeros(running.shape, dtype=torch.int32, device=running.device)
    width, computed = order.shape[1], 0
    for lo in range(0, width, k):
        going = (running >= 0).logical_and_(count4 > lo)  # checked and not negative: consumes this block
        if skip is not None:
            going &= ~skip
        if not bool(going.any()):
            break
        taken += going
        hi = min(lo + k, width)
        block = torch.zeros((order.shape[0], taps), dtype=negative.dtype, device=negative.device)
        block.scatter_(1, order[:, lo:hi], negative[:, lo:hi])
        running += F.conv2d(x, block.view(weight_shape), None, stride, padding, dilation)
        computed += per_map * order.shape[0] * taps
    needed = (count4 + (k - 1)) // k  # blocks an output has
    stopped = taken < needed
    if skip is not None:
        stopped &= ~skip
    consumed = torch.minimum(count4.double(), taken.double() * k)
    return stopped, consumed, taken.double() + stopped, computed


def _count(stats, stopped, consumed, checks, dense, partial, computed) -> None:
    add(stats, calls=1, outputs=stopped.numel(), pruned=stopped.sum(), dense=dense, partial=partial,
        test=checks.sum(), remainder=consumed.sum(), computed=computed + checks.sum(), negative=0)


def _dense(positive, order, negative, count) -> tuple[torch.Tensor, int]:
    """An exact site's folded weight and its count of nonzero terms (cached)."""
    return built_once((positive, order, negative, count),
                      lambda: (unsorted(positive, order, negative), int((positive != 0).sum() + count.sum())))


def _count_dense(stats, outputs: int, dense, computed) -> None:
    """An exact site's call run dense: every nonzero term of every output, nothing stopped."""
    add(stats, calls=1, outputs=outputs, untested=outputs, dense=dense, partial=dense, computed=computed)


def exact_relu_matmul(x, positive, order, negative, count, offset, k: int, stats):
    """Exact early exit for ``x @ weight.T`` (x [..., K] >= 0) followed by a ReLU; the
    weight arrives as :func:`sign_order` layouts of its folded form. Returns ``z`` with the
    outputs that stopped set to 0."""
    lead, big_k, n_out = x.shape[:-1], x.shape[-1], positive.shape[0]
    x2 = x.reshape(-1, big_k)
    m = x2.shape[0]
    if fast.current() == "fastest":
        weight, nonzero = _dense(positive, order, negative, count)
        running = x2 @ weight.T
        if offset is not None:
            running += offset.to(x2.dtype).expand(lead + (n_out,)).reshape(m, n_out)
        _count_dense(stats, running.numel(), m * nonzero, m * n_out * big_k)
        return running.reshape(lead + (n_out,))
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
    if fast.current() == "fastest":
        weight, nonzero = _dense(positive, order, negative, count)
        running = F.conv2d(x, weight, None, stride, padding, dilation)
        if offset is not None:
            running += offset.to(x.dtype)
        per_map = running.shape[0] * running.shape[2] * running.shape[3]
        _count_dense(stats, running.numel(), per_map * nonzero, per_map * positive.numel())
        return running
    running = F.conv2d(x, positive, None, stride, padding, dilation)
    if offset is not None:
        running = running + offset.to(x.dtype)
    per_map = running.shape[0] * running.shape[2] * running.shape[3]  # output positions per channel
    stopped, consumed, checks, computed = conv_blocks(x, running, positive.shape, order, negative, count, stride,
                                                      padding, dilation, k)
    _count(stats, stopped, consumed, checks, dense=per_map * ((positive != 0).sum() + count.sum()),
           partial=per_map * (positive != 0).sum(), computed=per_map * positive.numel() + computed)
    return running.masked_fill_(stopped, 0)
