"""Sparse-aware early-exit kernels: ExPrune on statically pruned weights.

With unstructured zero weights, a zero-weight term is not a sample: an output's ``k`` samples
are its first ``k`` *nonzero* terms (in the exchangeable order of the contraction), and its
population is its ``n_j`` nonzero terms, so the test uses ``n_j`` in the mean's offset share
(``c / n_j``) and in the finite-population correction. An output is tested only when the
test can pay for itself: the work it could skip, ``(n_j - k)`` terms, must be at least the
test's own cost (``k + 4`` MACs for the stats test, ``2`` for the threshold test, in the
units of the counters); other outputs are computed densely. Dense and executed work count
only nonzero multiply-accumulates.

A term of a linear site is one input feature; of a convolution, one input channel's kernel
window (nonzero when any of its taps is). The layouts are built at compile time by
:func:`linear_layout` and :func:`conv_layout`.

The same kernels serve ``Config(order="magnitude")`` on dense weights: there an output's first
k terms are its k terms of largest weight magnitude (a conv term's magnitude is its window's
L1 norm) instead of its first k in the contraction's order.

Example:
    >>> import torch
    >>> from exprune_fx.runtime.counters import new_counters, read
    >>> w = torch.randn(6, 64) * (torch.rand(6, 64) < 0.5)
    >>> layout = linear_layout(w, k=8, test=0)
    >>> x = torch.randn(4, 64)
    >>> c = new_counters()
    >>> z = sparse_relu_matmul(x, *layout, torch.ones(6), None, 8, 0, float("-inf"), c)  # never prunes
    >>> torch.allclose(z, x @ w.T, atol=1e-5), read(c)["dense"] == 4 * (w != 0).sum().item()
    (True, True)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import ORDERS
from . import observe
from .counters import add
from .kernels import _CHUNK_ELEMENTS, STATS, THRESHOLD, _decide_negative, _wide, per_channel



def worth_testing(nonzero_terms: torch.Tensor, term_macs: torch.Tensor | float, k: int, test: int) -> torch.Tensor:
    """The cost rule: test an output only if the remainder it could skip is at least the test's cost."""
    cost = k + 4 if test == STATS else 2
    return (nonzero_terms - k) * term_macs >= cost


def term_magnitude(weight: torch.Tensor) -> torch.Tensor:
    """Each output's term magnitudes [N, T]: ``|w|`` for a linear weight [N, K], an input
    channel window's L1 norm for a conv weight [cout, cin, kh, kw]; 0 exactly for zero terms."""
    return weight.abs() if weight.dim() == 2 else weight.abs().flatten(2).sum(2)


def first_and_rest(magnitude: torch.Tensor, k: int, order: str):
    """Per output (row of ``magnitude`` [N, T], 0 exactly for zero-weight terms): the indices
    of its first k terms and of the others. ``"natural"``: nonzero terms in their original
    order; ``"magnitude"``: largest first (ties in original order). Zero-weight terms last.

    >>> m = torch.tensor([[0.0, 0.5, 2.0, 1.0]])
    >>> first_and_rest(m, 2, "natural"), first_and_rest(m, 2, "magnitude")
    ((tensor([[1, 2]]), tensor([[3, 0]])), (tensor([[2, 3]]), tensor([[1, 0]])))
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS} (got {order!r})")
    key = (magnitude != 0).to(torch.int8) if order == "natural" else magnitude
    ranked = torch.argsort(key, dim=1, descending=True, stable=True)
    return ranked[:, :k].contiguous(), ranked[:, k:].contiguous()


def linear_layout(weight: torch.Tensor, k: int, test: int, order: str = "natural"):
    """Compile-time layout of a linear weight [N, K] (one term per input feature):
    ``(first, first_w, rest, rest_w, nonzero, tested)`` where ``first``/``first_w``
    [N, k] are each output's first k nonzero terms (in ``order``) and their weights,
    ``rest``/``rest_w`` the others (zero weights past the nonzero ones), ``nonzero`` [N] the
    nonzero term counts, ``tested`` [N] the cost rule's verdict."""
    nonzero = weight != 0
    first, rest = first_and_rest(term_magnitude(weight), k, order)
    counts = nonzero.sum(1)
    width = max(int(counts.max()) - k, 0) if counts.numel() else 0
    rest = rest[:, :width].contiguous()
    return (first, weight.gather(1, first), rest, weight.gather(1, rest), counts,
            worth_testing(counts, 1, k, test) & (counts > k))


def _scattered(idx: torch.Tensor, w: torch.Tensor, width: int) -> torch.Tensor:
    """The weight [N, width, ...] that holds term ``w[j, t]`` (a value, or a conv window) at
    position ``idx[j, t]`` (distinct per row) and zeros elsewhere: a product with it sums only
    those terms, at a dense product's speed."""
    index = idx.view(idx.shape + (1,) * (w.dim() - 2)).expand_as(w)
    return w.new_zeros((idx.shape[0], width) + w.shape[2:]).scatter_(1, index, w)


def _gathered_sums(x2, idx, w, test: int):
    """Sum (and sum of squares unless threshold) of x2[:, idx[j]] * w[j] per row and output.
    The threshold test's sum is one dense product with the terms scattered into a full-width
    weight (far faster on CPU than gathering [rows, N, terms] products)."""
    m = x2.shape[0]
    if test == THRESHOLD:
        return x2 @ _scattered(idx, w.to(x2.dtype), x2.shape[1]).T, None
    s1, s2 = x2.new_empty(m, idx.shape[0]), x2.new_empty(m, idx.shape[0])
    step = max(1, _CHUNK_ELEMENTS // max(1, idx.numel()))
    for r in range(0, m, step):
        t = x2[r:r + step, idx] * w  # [rows, N, terms]
        s1[r:r + step] = t.sum(-1)
        tw = _wide(t)
        s2[r:r + step] = (tw * tw).sum(-1)
    return s1, s2


def sparse_relu_matmul(x, first, first_w, rest, rest_w, nonzero, tested, scale, offset, k: int,
                       test: int, critical: float, stats):
    """Early negative prediction for ``x @ weight.T`` whose weight has zero terms (given as
    :func:`linear_layout`): the test reads each output's first k nonzero terms."""
    lead, big_k, n_out = x.shape[:-1], x.shape[-1], first.shape[0]
    x2 = x.reshape(-1, big_k)
    m = x2.shape[0]
    a = scale.to(x2.dtype)
    c = torch.zeros((), dtype=x2.dtype, device=x2.device) if offset is None else \
        offset.to(x2.dtype).expand(lead + (n_out,)).reshape(m, n_out)
    s1, s2 = _gathered_sums(x2, first, first_w, test)
    n = nonzero.clamp_min(k + 1).to(s1.dtype)
    mean = s1 * (a / k) + c / n
    pruned = _decide_negative(mean, s1, s2, a, k, n, test, critical) & tested
    keep = ~pruned
    cols = keep.any(0).nonzero().squeeze(1)
    out = torch.zeros(m, n_out, dtype=x2.dtype, device=x2.device)
    if cols.numel():
        rest_sum, _ = _gathered_sums(x2, rest[cols], rest_w[cols], THRESHOLD)
        cc = c if c.dim() == 0 else c[:, cols]
        z = a[cols] * (s1[:, cols] + rest_sum) + cc
        out[:, cols] = torch.where(keep[:, cols], z, 0)
    first_macs = nonzero.clamp(max=k)
    n_tested = tested.sum()
    test_macs = m * n_tested * ((k + 4) if test == STATS else 2)
    remainder = (keep.sum(0) * (nonzero - first_macs)).sum()
    add(stats, calls=1, outputs=m * n_out, pruned=pruned.sum(), dense=m * nonzero.sum(),
        partial=m * first_macs.sum(), test=test_macs, remainder=remainder,
        computed=m * first_macs.sum() + test_macs + m * cols.numel() * rest.shape[1],
        negative=(out < 0).sum())
    observe.add(stats, mean, out, -1)
    return out.reshape(lead + (n_out,))


def conv_layout(weight: torch.Tensor, k: int, test: int, order: str = "natural"):
    """Compile-time layout of a conv weight [cout, cin, kh, kw] (a term is one input channel's
    window): ``(first, first_w, rest_w, nonzero, tested, taps_first, taps_all)`` with ``first``
    [cout, k] each output channel's first k nonzero input channels (in ``order``; a window's
    magnitude is its L1 norm), ``first_w`` [cout, k, kh, kw]
    their windows, ``rest_w`` the weight with those k channels zeroed, ``nonzero`` [cout] the
    nonzero channel counts, ``tested`` the cost rule's verdict, and the nonzero taps in the
    first k channels and in all of them, per output channel."""
    cout, cin = weight.shape[:2]
    taps = (weight != 0).flatten(2).sum(2)  # [cout, cin]
    first, _ = first_and_rest(term_magnitude(weight), k, order)
    counts = (taps > 0).sum(1)
    first_w = weight.gather(1, first[:, :, None, None].expand(-1, -1, *weight.shape[2:]))
    rest_w = weight.clone()
    rest_w.scatter_(1, first[:, :, None, None].expand(-1, -1, *weight.shape[2:]), 0.0)
    taps_first = taps.gather(1, first).sum(1)
    taps_all = taps.sum(1)
    term_macs = taps_all.double() / counts.clamp_min(1)
    return (first, first_w, rest_w, counts, worth_testing(counts, term_macs, k, test) & (counts > k),
            taps_first, taps_all)


def _gathered_conv_sums(x, first, first_w, stride, padding, dilation):
    """Sum and sum of squares of each output channel's k terms, one depthwise convolution of
    the gathered input channels per term."""
    s1 = s2 = None
    for r in range(first.shape[1]):  # k, or fewer when the layer has fewer input channels
        t = _wide(F.conv2d(x[:, first[:, r]], first_w[:, r:r + 1], None, stride, padding, dilation, first.shape[0]))
        s1 = t if s1 is None else s1.add_(t)
        s2 = t * t if s2 is None else s2.addcmul_(t, t)
    return s1.to(x.dtype), s2


def sparse_relu_conv2d(x, first, first_w, rest_w, nonzero, tested, taps_first, taps_all, scale, offset,
                       stride, padding, dilation, k: int, test: int, critical: float, stats):
    """Early negative prediction for a 2-d convolution (groups 1) whose weight has zero
    channel windows, or whose terms are read in magnitude order: output channel j's samples
    are its first k nonzero input channels (:func:`conv_layout`). The threshold test needs
    only their sum: one convolution with every other channel's window zeroed (a dense
    layer's wall-clock; the counters count the k terms). The stats test also needs their
    squares: one depthwise convolution over the gathered channels per term."""
    cout = first.shape[0]
    if test == THRESHOLD:  # the sum only: one convolution with every other channel's window zeroed
        s1, s2 = F.conv2d(x, _scattered(first, first_w, rest_w.shape[1]), None, stride, padding, dilation), None
    else:
        s1, s2 = _gathered_conv_sums(x, first, first_w, stride, padding, dilation)
    a = scale.to(x.dtype).view(1, cout, 1, 1)
    c = torch.zeros((), dtype=x.dtype, device=x.device) if offset is None else offset.to(x.dtype).expand_as(s1)
    n = nonzero.clamp_min(k + 1).to(s1.dtype).view(1, cout, 1, 1)
    mean = s1 * (a / k) + c / n
    pruned = _decide_negative(mean, s1, s2, a, k, n, test, per_channel(critical)) & tested.view(1, cout, 1, 1)
    keep = ~pruned
    chans = keep.any(3).any(2).any(0).nonzero().squeeze(1)
    out = torch.zeros_like(s1)
    if chans.numel():
        z = F.conv2d(x, rest_w[chans], None, stride, padding, dilation).add_(s1[:, chans])
        cc = c if c.dim() == 0 else c[:, chans]
        out[:, chans] = torch.where(keep[:, chans], a[:, chans] * z + cc, 0)
    per_map = s1.shape[0] * s1.shape[2] * s1.shape[3]
    tests = per_map * tested.sum()
    test_macs = tests * ((k + 4) if test == STATS else 2)
    remainder = (keep * (taps_all - taps_first).view(1, cout, 1, 1)).sum()
    add(stats, calls=1, outputs=s1.numel(), pruned=pruned.sum(), dense=per_map * taps_all.sum(),
        partial=per_map * taps_first.sum(), test=test_macs, remainder=remainder,
        computed=per_map * taps_first.sum() + test_macs + per_map * chans.numel() * rest_w[0].numel(),
        negative=(out < 0).sum())
    observe.add(stats, mean, out, 1)
    return out
