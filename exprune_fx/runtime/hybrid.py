"""Hybrid-mode kernels: the statistical test at k terms, then exact early exit on the rest.

At a ReLU site whose input is provably non-negative (where exact mode applies) and whose
contraction is exchangeable (where the statistical test applies), an output

1. sums its first ``k`` terms (the unit terms of :mod:`.kernels`, in the exchangeable order)
   and is tested as in statistical mode; a pruned output is 0 and costs nothing more;
2. otherwise adds the positive (folded) terms of its remaining inputs, then their negative
   terms, most negative first, ``interval`` at a time, checking before each block as in
   :mod:`.exact`: once the running sum is negative it can only fall, so the output is 0.

Step 2 is lossless, so the site prunes what the statistical test prunes, with the same
accuracy, and saves more: a kept output that ends negative stops before its last terms.
The remaining weights arrive as :func:`exact.sign_order` layouts of the folded rest
(``scale * weight[:, k * unit:]``); zero weights in the rest are never computed.

Magnitude order (``Config(order="magnitude")``, threshold test, one element per term): the
head is full width, ``weight`` with every term but each output's k largest zeroed, the test's
sum is one product with it, and the rest (``weight`` with those k terms zeroed) covers all
the inputs. A head as wide as the input tells the kernels which layout they have.

Under ``fast.use("fastest")`` a hybrid site runs dense (no hybrid kernel beats the dense
layer on CPU): one product with its whole folded weight (``scale * head`` joined to the
rest), rebuilt once and cached while the layouts live (:func:`.derived.built_once`), then
the epilogue and the counters of a statistical site run dense (nothing pruned).

Counters: ``partial`` the first k terms of every output; ``test`` the statistical test
(as in :mod:`.kernels`) plus one comparison per exact check; ``remainder`` the positive
rest terms of every kept output plus the negative terms it consumed; ``pruned`` outputs the
test pruned plus those that stopped; ``negative`` kept outputs whose value is negative (those
that stopped, and those that ran to the end and came out negative): what a perfect sign
predictor would also have skipped, as in statistical mode.

Example:
    >>> import torch
    >>> from exprune_fx.runtime.counters import new_counters, read
    >>> from exprune_fx.runtime.exact import sign_order
    >>> w, x = torch.randn(8, 64), torch.rand(4, 64)       # x >= 0, as after a ReLU
    >>> layouts = sign_order(w[:, 16:])                   # scale 1: the folded rest is the rest
    >>> c = new_counters()
    >>> never = torch.tensor(float("-inf"))               # the test prunes nothing
    >>> z = hybrid_relu_linear(x, w[:, :16], torch.ones(8), None, *layouts, 1, 16, 1, never, 8, c)
    >>> torch.allclose(z.relu(), (x @ w.T).relu(), atol=1e-5)
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import fast, observe
from .counters import add
from .derived import built_once
from .exact import conv_blocks, matmul_blocks, unsorted
from .kernels import (STATS, _conv_term_sums, _decide_negative, _dense_call, _flatten_offset, _term_mean,
                      _term_sums, per_channel)


def hybrid_relu_linear(x, head, scale, offset, positive, order, negative, count, unit: int, k: int, test: int,
                       critical, interval: int, stats):
    """Hybrid early exit for ``x @ weight.T`` (x [..., K] >= 0) followed by a ReLU: ``head``
    is ``weight[:, :k * unit]``, the rest arrives folded as sign_order layouts
    (``positive`` [N, K - k * unit]; both [N, K] in magnitude order)."""
    lead, big_k, n_out = x.shape[:-1], x.shape[-1], head.shape[0]
    x2 = x.reshape(-1, big_k)
    m, kh = x2.shape[0], k * unit
    if fast.current() == "fastest":
        weight, ones = _whole(head, scale, positive, order, negative, big_k)
        return _dense_call((x2 @ weight.T).reshape(lead + (n_out,)), ones, offset, stats, big_k, count_negative=True)
    c = _flatten_offset(offset, lead + (n_out,), m, n_out, x2)
    a = scale.to(x2.dtype)
    if head.shape[1] == big_k:  # magnitude order: a full-width head (threshold test), a full-width rest
        s1, s2, x_rest = x2 @ head.T, None, x2
    else:
        s1, s2 = _term_sums(x2[:, :kh], head, k, unit, test)
        x_rest = x2[:, kh:]
    mean = _term_mean(s1, a, c, k, big_k // unit)
    pruned = _decide_negative(mean, s1, s2, a, k, big_k // unit, test, critical)
    running = torch.addcmul(c, a, s1).add_(x_rest @ positive.T)
    stopped, consumed, checks, blocks = matmul_blocks(x_rest, running, order, negative, count, interval, pruned)
    observe.add(stats, mean, running, -1)  # a stopped output's partial sum is negative, as its z is
    kept_per_column = (~pruned).sum(0)
    _count(stats, running, pruned, stopped, consumed, checks, kept_per_column, positive, kh, big_k, k, test,
           computed=m * n_out * big_k + blocks)
    return running.masked_fill_(pruned | stopped, 0).reshape(lead + (n_out,))


def hybrid_relu_conv2d(x, head, scale, offset, positive, order, negative, count, stride, padding, dilation,
                       unit: int, k: int, test: int, critical, interval: int, stats):
    """Hybrid early exit for a 2-d convolution (groups 1, x >= 0) followed by a ReLU: a test
    term is ``unit`` input channels' whole window (``head`` is ``weight[:, :k * unit]``); the
    rest is tap by tap, as in exact mode (``positive`` [cout, cin - k * unit, kh, kw]; both
    [cout, cin, kh, kw] in magnitude order)."""
    kc = k * unit
    cout, cin = head.shape[0], x.shape[1]
    n = cin // unit
    if fast.current() == "fastest":
        weight, ones = _whole(head, scale, positive, order, negative, cin)
        z = F.conv2d(x, weight, None, stride, padding, dilation)
        return _dense_call(z, ones, offset, stats, cin * head.shape[2] * head.shape[3], count_negative=True)
    if head.shape[1] == cin:  # magnitude order: a full-width head (threshold test), a full-width rest
        s1, s2, x_rest = F.conv2d(x, head, None, stride, padding, dilation), None, x.contiguous()
    else:
        s1, s2 = _conv_term_sums(x[:, :kc].unsqueeze(1), head.unsqueeze(0), k, unit, test, stride, padding, dilation)
        x_rest = x[:, kc:].contiguous()  # read once per block convolution: copy it once
    a = scale.to(x.dtype).view(1, cout, 1, 1)
    c = torch.zeros((), dtype=x.dtype, device=x.device) if offset is None else offset.to(x.dtype).expand_as(s1)
    mean = _term_mean(s1, a, c, k, n)
    pruned = _decide_negative(mean, s1, s2, a, k, n, test, per_channel(critical))
    running = torch.addcmul(c, a, s1).add_(F.conv2d(x_rest, positive, None, stride, padding, dilation))
    stopped, consumed, checks, blocks = conv_blocks(x_rest, running, positive.shape, order, negative, count, stride,
                                                    padding, dilation, interval, pruned)
    observe.add(stats, mean, running, 1)
    per_map = s1.shape[0] * s1.shape[2] * s1.shape[3]
    kept_per_channel = (~pruned).sum((0, 2, 3))
    taps = head[0, 0].numel()
    _count(stats, running, pruned, stopped, consumed, checks, kept_per_channel, positive.view(cout, -1), kc * taps,
           cin * taps, k, test, computed=per_map * cout * cin * taps + blocks)
    return running.masked_fill_(pruned | stopped, 0)


def _whole(head, scale, positive, order, negative, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The site's whole folded weight (outputs first, ``width`` terms on axis 1): ``scale *
    head`` joined to the unsorted rest, or added to it where the head is full width
    (magnitude order); and the unit scale of its dense epilogue. Built once per layout (cached)."""
    def build():
        a = scale.to(head.dtype).view((-1,) + (1,) * (head.dim() - 1))
        rest = unsorted(positive, order, negative)
        whole = a * head + rest if head.shape[1] == width else torch.cat([a * head, rest], 1)
        return whole, scale.new_ones(head.shape[0])
    return built_once((positive, order, negative, head, scale), build)


def _count(stats, running, pruned, stopped, consumed, checks, kept_per_output_feature, positive, head_macs: int,
           dense_macs: int, k: int, test: int, computed) -> None:
    """Counters of a hybrid site (see the module docstring); MACs are per output: ``head_macs``
    its first k terms, ``dense_macs`` all of them."""
    outputs = pruned.numel()
    test_macs = outputs * (k + 4 if test == STATS else 2) + checks.sum()
    positive_rest = (kept_per_output_feature.double() * (positive != 0).sum(1).double()).sum()
    kept_negative = stopped | (~pruned & (running < 0))
    add(stats, calls=1, outputs=outputs, pruned=pruned.sum() + stopped.sum(), dense=outputs * dense_macs,
        partial=outputs * head_macs, test=test_macs, remainder=positive_rest + consumed.sum(),
        computed=computed + test_macs, negative=kept_negative.sum())
