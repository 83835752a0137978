"""Reference early-exit kernels: the one place where the skipping strategy lives.

Notation (docs/method.md): an output's value after the folded affine epilogue is
``z = a * y + c = sum_i t_i`` with ``t_i = a * xi_i + c / n`` over ``n`` unit terms ``xi_i``.
Each kernel

1. computes the first ``k`` terms of every output (one matmul or convolution) and the sum of
   their squares, without a Python loop over terms;
2. tests every output (``test`` 0 = stats, 1 = threshold; ``critical`` is ``Phi^-1(alpha)``
   or the threshold for ReLU sites, one value or one per output (feature or channel), the
   Bonferroni z or margin for argmax sites);
3. computes the remaining ``n - k`` terms only where needed: for the output columns (linear)
   or channels (conv) that have a surviving output anywhere in the batch, or for the rows of
   an argmax site that did not stop.

ReLU kernels return ``z`` with pruned outputs set to 0 (the decision after them maps 0 to 0).
The argmax kernel returns logits: exact for rows that did not stop, the ``n/k``-scaled
estimate ``a * (n/k) * partial + c`` for rows that stopped (their argmax is final).

Terms are contiguous: the contraction axis is ``n`` blocks of ``unit`` elements (linear), or
``groups`` x ``n`` blocks of ``unit`` input channels (conv). The rewrite pass reorders weights
at compile time to make it so.

Example:
    >>> import torch
    >>> from exprune_fx.runtime.counters import new_counters, read
    >>> x, w = torch.randn(4, 64), torch.randn(8, 64)
    >>> c = new_counters()
    >>> z = relu_matmul(x, w, torch.ones(8), None, 1, 16, 0, float("-inf"), c)  # never prunes
    >>> torch.allclose(z, x @ w.T, atol=1e-5), read(c)["pruned"]
    (True, 0.0)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import fast, observe
from .counters import add

STATS, THRESHOLD = 0, 1
_CHUNK_ELEMENTS = 1 << 24  # bound on the per-term tensor of one matmul chunk (64 MiB of float32)


def _flatten_offset(offset: torch.Tensor | None, shape: tuple, rows: int, cols: int, like: torch.Tensor):
    if offset is None:
        return torch.zeros((), dtype=like.dtype, device=like.device)
    return offset.to(like.dtype).expand(shape).reshape(rows, cols)


def _decide_negative(mean, s1, s2, scale, k: int, n: int, test: int, critical: float):
    """True where the output is predicted negative (to be pruned); the statistics are
    computed in at least float32 (half-precision models)."""
    if test == THRESHOLD:
        return _wide(mean) < critical
    mean, s1, s2, scale = (_wide(t) for t in (mean, s1, s2, scale))
    var_xi = (s2 - s1 * s1 / k).clamp_min(0) / (k - 1)
    se = (scale * scale * var_xi / k * ((n - k) / (n - 1))).sqrt()
    return mean < critical * se


def per_channel(critical):
    """A site's critical value for tests on [B, C, H, W]: one value, or one per output channel
    ([C] viewed as [C, 1, 1], so that it broadcasts over channels, not widths)."""
    return critical.view(-1, 1, 1) if isinstance(critical, torch.Tensor) and critical.dim() == 1 else critical


def _wide(t: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 -> float32, so that squared sums neither overflow nor lose the test."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _term_sums(xk: torch.Tensor, wk: torch.Tensor, k: int, unit: int, test: int):
    """Sum and sum of squares of the k terms per output: xk [M, k*unit], wk [N, k*unit].
    The threshold test needs only the sum (one matmul; the sum of squares is None)."""
    if test == THRESHOLD:
        return xk @ wk.T, None
    if unit == 1:
        xw, ww = _wide(xk), _wide(wk)
        return xk @ wk.T, (xw * xw) @ (ww * ww).T
    m, n_out = xk.shape[0], wk.shape[0]
    w_terms = wk.reshape(n_out, k, unit).permute(1, 2, 0)  # [k, unit, N]
    s1 = xk.new_empty(m, n_out)
    s2 = xk.new_empty(m, n_out)
    step = max(1, _CHUNK_ELEMENTS // max(1, k * n_out))
    for r in range(0, m, step):
        t = torch.bmm(xk[r:r + step].reshape(-1, k, unit).transpose(0, 1), w_terms)  # [k, rows, N]
        s1[r:r + step], s2[r:r + step] = t.sum(0), (t * t).sum(0)
    return s1, s2


def relu_matmul(x, weight, scale, offset, unit: int, k: int, test: int, critical: float, stats,
                stages: int = 1):
    """Early negative prediction for ``x @ weight.T`` (x [..., K], weight [N, K]), or for a
    batched product ``x @ weight.transpose(-1, -2)`` (weight [..., N, K], a run-time value).
    ``stages > 1`` tests the outputs left undecided again at 2k, 4k, ... terms."""
    if weight.dim() > 2:
        return _relu_batched(x, weight, scale, offset, unit, k, test, critical, stats, stages)
    return relu_linear(x, weight, scale, offset, unit, k, test, critical, stats, stages)


def relu_linear(x, weight, scale, offset, unit: int, k: int, test: int, critical: float, stats,
                stages: int = 1):
    """:func:`relu_matmul` for a compile-time weight [N, K]: its first k terms (the "head",
    ``weight[:, :k * unit]``) and the rest are column ranges of it. On float32 CPU tensors a
    fast kernel runs (:mod:`.fast`), as :func:`fast.choose` says."""
    out = fast.relu_linear(x, weight, scale, offset, unit, k, test, critical, stats, stages)
    if out is not None:
        return out
    lead, big_k, n_out = x.shape[:-1], x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, big_k)
    m, n, kh = x2.shape[0], big_k // unit, k * unit
    ks = stage_ks(k, n, stages)
    c = _flatten_offset(offset, lead + (n_out,), m, n_out, x2)
    head, rest = weight[:, :kh], weight[:, kh:]
    s1, s2 = _term_sums(x2[:, :kh], head, k, unit, test)
    a = scale.to(x2.dtype)
    computed = [m * n_out * kh]

    def more(lo: int, hi: int, undecided) -> None:  # terms lo..hi for the columns still undecided
        cols = undecided.any(0).nonzero().squeeze(1)
        d1, d2 = _term_sums(x2[:, lo * unit:hi * unit], rest[cols, (lo - k) * unit:(hi - k) * unit], hi - lo, unit,
                            test)
        s1[:, cols] += d1
        if s2 is not None:
            s2[:, cols] += d2
        computed[0] += m * cols.numel() * (hi - lo) * unit

    pruned, used, tested = _staged_test(s1, s2, a, c, n, test, critical, ks, more)
    keep = ~pruned
    ku = ks[-1] * unit  # every output still kept has consumed this many terms
    x_rest, w_rest = x2[:, ku:], rest[:, ku - kh:]
    cols = keep.any(0).nonzero().squeeze(1)
    rest_macs = 0
    if cols.numel() == n_out:
        out = torch.addcmul(c, a, (x_rest @ w_rest.T).add_(s1)).masked_fill_(pruned, 0)
        rest_macs = m * n_out * (big_k - ku)
    else:
        out = torch.zeros(m, n_out, dtype=x2.dtype, device=x2.device)
    if 0 < cols.numel() < n_out:
        cc = c if c.dim() == 0 else c[:, cols]
        z = a[cols] * (s1[:, cols] + x_rest @ w_rest[cols].T) + cc
        out[:, cols] = torch.where(keep[:, cols], z, 0)
        rest_macs = m * cols.numel() * (big_k - ku)
    _count_relu(stats, pruned, used, tested, unit, big_k, test, computed[0] + rest_macs, out, k)
    if observe.active() and len(ks) == 1:
        observe.add(stats, _term_mean(s1, a, c, k, n), out, -1)
    return out.reshape(lead + (n_out,))


def stage_ks(k: int, n: int, stages: int) -> list[int]:
    """The term counts tested in turn: k, 2k, 4k, ... (``stages`` of them, each below n).

    >>> stage_ks(8, 64, 3), stage_ks(8, 20, 3)
    ([8, 16, 32], [8, 16])
    """
    ks = [k]
    while len(ks) < stages and 2 * ks[-1] < n:
        ks.append(2 * ks[-1])
    return ks


def _term_mean(s1, a, c, k: int, n: int):
    """The mean of the first k folded terms, ``a * s1 / k + c / n``, in two passes."""
    return (s1 * (a / k)).add_(c, alpha=1.0 / n)


def _staged_test(s1, s2, a, c, n: int, test: int, critical: float, ks: list[int], more):
    """The sequential test: decide at ``ks[0]`` terms; the outputs left undecided are tested
    again at each next k, after ``more(lo, hi, undecided)`` has added the sums of terms
    ``lo..hi`` into ``s1``/``s2`` for (at least) them. Every stage is a test at the same
    critical value, so an output's false-prune probability is at most ``len(ks)`` times one
    stage's. Returns the pruned mask and, per output, the terms consumed and the tests run
    (both None with a single stage: every output used ``ks[0]`` terms and one test)."""
    k = ks[0]
    pruned = _decide_negative(_term_mean(s1, a, c, k, n), s1, s2, a, k, n, test, critical)
    if len(ks) == 1:
        return pruned, None, None
    used = torch.full(pruned.shape, float(k), device=pruned.device)
    tested = torch.ones(pruned.shape, device=pruned.device)
    for lo, hi in zip(ks, ks[1:]):
        undecided = ~pruned
        if not bool(undecided.any()):
            break
        more(lo, hi, undecided)
        pruned = pruned | undecided & _decide_negative(_term_mean(s1, a, c, hi, n), s1, s2, a, hi, n, test, critical)
        used = torch.where(undecided, float(hi), used)
        tested = tested + undecided
    return pruned, used, tested


def _batched_term_sums(xk, wk, k: int, unit: int, test: int):
    if test == THRESHOLD:
        return xk @ wk.transpose(-1, -2), None
    if unit == 1:
        return xk @ wk.transpose(-1, -2), (xk * xk) @ (wk * wk).transpose(-1, -2)
    t = torch.einsum("...mku,...nku->...kmn", xk.unflatten(-1, (k, unit)), wk.unflatten(-1, (k, unit)))
    return t.sum(-3), (t * t).sum(-3)


def _relu_batched(x, weight, scale, offset, unit: int, k: int, test: int, critical: float, stats, stages: int):
    """Batched products (both operands run-time values): every output's remainder is
    computed by one batched matmul and masked, since no dense kernel skips columns per batch."""
    big_k = x.shape[-1]
    n = big_k // unit
    ks = stage_ks(k, n, stages)
    s1, s2 = _batched_term_sums(x[..., :k * unit], weight[..., :k * unit], k, unit, test)
    a = scale.to(x.dtype)
    c = torch.zeros((), dtype=x.dtype, device=x.device) if offset is None else offset.to(x.dtype).expand_as(s1)

    def more(lo: int, hi: int, undecided) -> None:  # every output: the batched kernel cannot skip
        d1, d2 = _batched_term_sums(x[..., lo * unit:hi * unit], weight[..., lo * unit:hi * unit], hi - lo, unit, test)
        s1.add_(d1)
        if s2 is not None:
            s2.add_(d2)

    pruned, used, tested = _staged_test(s1, s2, a, c, n, test, critical, ks, more)
    ku = ks[-1] * unit
    z = a * (s1 + x[..., ku:] @ weight[..., ku:].transpose(-1, -2)) + c
    out = torch.where(pruned, torch.zeros((), dtype=z.dtype, device=z.device), z)
    _count_relu(stats, pruned, used, tested, unit, big_k, test, s1.numel() * big_k, out, k)
    return out


def _count_relu(stats, pruned, used, tested, term_macs: int, big_k: int, test: int, computed, out, k: int):
    """Counters of a ReLU site: ``used`` terms (``term_macs`` MACs each) and ``tested`` tests
    per output (None: ``k`` terms and one test each); the stats test accumulates one squared
    term per term used plus 4 per test."""
    outputs = pruned.numel()
    n_pruned = pruned.sum()
    if used is None:
        used_sum, tests, kept_unused = outputs * k, outputs, (outputs - n_pruned) * (big_k - k * term_macs)
    else:
        used_sum, tests = used.sum(), tested.sum()
        kept_unused = torch.where(pruned, 0.0, big_k - used * term_macs).sum()
    test_macs = used_sum + 4 * tests if test == STATS else 2 * tests
    add(stats, calls=1, outputs=outputs, pruned=n_pruned, dense=outputs * big_k, partial=used_sum * term_macs,
        test=test_macs, remainder=kept_unused, computed=computed + test_macs, negative=(out < 0).sum())


def relu_conv2d(x, weight, scale, offset, stride, padding, dilation, groups: int, unit: int, k: int,
                test: int, critical: float, stats, stages: int = 1):
    """Early negative prediction for a 2-d convolution; a term is ``unit`` input channels'
    whole window contribution, counted within each group. ``stages > 1`` tests the outputs
    left undecided again at 2k, 4k, ... terms (for the channels that have any). Under the
    ``"auto"`` and ``"fast"`` settings a single-stage call runs :func:`fast.relu_conv2d` (the
    same decisions and counters but ``computed``, its head and epilogue in C++) unless
    thresholds are being recorded."""
    if fast.current() == "fastest":  # no convolution kernel beats the dense one on CPU (docs/benchmarks.md)
        return dense_conv2d(x, weight, scale, offset, stride, padding, dilation, groups, stats)
    if not observe.active():  # one stage on the fast kernels: two C++ passes around the remainder convolution
        out = fast.relu_conv2d(x, weight, scale, offset, stride, padding, dilation, groups, unit, k, test, critical,
                               stats, stages)
        if out is not None:
            return out
    b, cin, h, w = x.shape
    cout, cin_g, kh, kw = weight.shape
    g, cout_g = groups, cout // groups
    n = cin_g // unit
    ks = stage_ks(k, n, stages)
    xg = x.view(b, g, cin_g, h, w)
    wg = weight.view(g, cout_g, cin_g, kh, kw)
    critical = per_channel(critical)
    s1, s2 = _conv_term_sums(xg[:, :, :k * unit], wg[:, :, :k * unit], k, unit, test, stride, padding, dilation)
    out_hw = s1.shape[-2:]
    per_map = b * out_hw[0] * out_hw[1] * kh * kw  # MACs per output channel and input channel
    computed = [cout * k * unit * per_map]
    a = scale.to(x.dtype).view(1, cout, 1, 1)
    c = torch.zeros((), dtype=x.dtype, device=x.device) if offset is None else offset.to(x.dtype).expand_as(s1)

    def more(lo: int, hi: int, undecided) -> None:  # terms lo..hi, for channels still undecided
        part = slice(lo * unit, hi * unit)
        if g == 1:
            chans = undecided.any(3).any(2).any(0).nonzero().squeeze(1)
            d1, d2 = _conv_term_sums(xg[:, :, part], wg[:, chans][:, :, part], hi - lo, unit, test, stride, padding,
                                     dilation)
        else:  # grouped: every channel (a subset would break the groups' layout)
            chans = torch.arange(cout, device=x.device)
            d1, d2 = _conv_term_sums(xg[:, :, part], wg[:, :, part], hi - lo, unit, test, stride, padding, dilation)
        s1[:, chans] += d1
        if s2 is not None:
            s2[:, chans] += d2
        computed[0] += chans.numel() * (hi - lo) * unit * per_map

    pruned, used, tested = _staged_test(s1, s2, a, c, n, test, critical, ks, more)
    keep = ~pruned
    kc = ks[-1] * unit  # input channels (per group) every kept output has consumed
    chans = keep.any(3).any(2).any(0).nonzero().squeeze(1)
    rest = 0
    if chans.numel() and (g > 1 or chans.numel() == cout):
        x_rest = xg[:, :, kc:].reshape(b, g * (cin_g - kc), h, w)
        w_rest = wg[:, :, kc:].reshape(cout, cin_g - kc, kh, kw)
        z = F.conv2d(x_rest, w_rest, None, stride, padding, dilation, g).add_(s1)
        out = torch.addcmul(c, a, z).masked_fill_(pruned, 0)
        rest = cout * (cin_g - kc) * per_map
    else:
        out = torch.zeros_like(s1)
    if chans.numel() and not (g > 1 or chans.numel() == cout):
        z = F.conv2d(x[:, kc:], weight[chans, kc:], None, stride, padding, dilation, 1)
        cc = c if c.dim() == 0 else c[:, chans]
        z = a[:, chans] * (s1[:, chans] + z) + cc
        out[:, chans] = torch.where(keep[:, chans], z, 0)
        rest = chans.numel() * (cin_g - kc) * per_map
    _count_relu(stats, pruned, used, tested, unit * kh * kw, cin_g * kh * kw, test, computed[0] + rest, out, k)
    if observe.active() and len(ks) == 1:
        observe.add(stats, _term_mean(s1, a, c, k, n), out, 1)
    return out


def dense_conv2d(x, weight, scale, offset, stride, padding, dilation, groups: int, stats, traced: bool = False):
    """A convolution site run dense: the convolution, the folded epilogue and the counters of
    a call that prunes nothing (:func:`_dense_call`; ``traced``: :func:`dense_epilogue`, the
    torch ops inductor compiles)."""
    z = F.conv2d(x, weight, None, stride, padding, dilation, groups)
    terms = weight.shape[1] * weight.shape[2] * weight.shape[3]  # MACs per output
    return (dense_epilogue if traced else _dense_call)(z, scale, offset, stats, terms, count_negative=True)


def _dense_call(z: torch.Tensor, scale: torch.Tensor, offset, stats, terms: int, count_negative: bool,
                per_row: bool = False):
    """A site run dense (the ``"fastest"`` setting, where no early-exit kernel pays): the folded
    epilogue ``scale * z + offset`` (in place on ``z`` where the extension runs it; ``z`` is
    ``[..., N]`` for a linear site, ``[B, C, H, W]`` for a convolution; ``scale`` one value per
    output feature or channel),
    counted as one call that prunes nothing and computes every output's ``terms`` MACs
    (``per_row``: an argmax site, one decision per row). One C++ pass where the extension is
    built (float32 CPU); :func:`dense_epilogue` otherwise."""
    ext = fast.module() if z.dtype == torch.float32 and z.device.type == "cpu" else None
    if ext is not None and z.is_contiguous() and stats.device.type == "cpu":
        ext.dense_site(z, scale, offset, stats, terms, count_negative, per_row)
        return z
    return dense_epilogue(z, scale, offset, stats, terms, count_negative, per_row)


def dense_epilogue(z: torch.Tensor, scale: torch.Tensor, offset, stats, terms: int, count_negative: bool,
                   per_row: bool = False):
    """:func:`_dense_call` in torch ops, out of place: what runs without the extension, and
    what inductor compiles for a site run dense (:mod:`.lowering`)."""
    conv = z.dim() == 4
    n = z.shape[1] if conv else z.shape[-1]
    a = scale.to(z.dtype).reshape(-1)
    z = z * (a.view(-1, 1, 1) if conv else a)
    if offset is not None:
        z = z + offset.to(z.dtype)
    rows = z.shape[0] if conv else z.numel() // max(n, 1)
    macs, outputs = z.numel() * terms, rows if per_row else z.numel()
    add(stats, calls=1, outputs=outputs, untested=outputs, dense=macs, remainder=macs, computed=macs,
        negative=(z < 0).sum() if count_negative else 0)
    return z


def _conv_term_sums(xk, wk, k: int, unit: int, test: int, stride, padding, dilation):
    """Sum and sum of squares of the k terms per conv output: xk [B, G, k*unit, H, W],
    wk [G, cout_g, k*unit, kh, kw]. The sum is one convolution (all the threshold test
    needs); the squares accumulate term by term (one small convolution per term, squared in
    place), so memory stays at the output's size: 2-6x faster on CPU than one grouped
    convolution that writes all k terms."""
    if test == STATS:  # one C++ pass for both sums where the fast kernels run (not "reference")
        sums = fast.conv_term_sums(xk, wk, k, unit, test, stride, padding, dilation)
        if sums is not None:
            return sums
    b, g, kc, h, w = xk.shape
    cout_g, kh, kw = wk.shape[1], wk.shape[3], wk.shape[4]
    s1 = F.conv2d(xk.reshape(b, g * kc, h, w), wk.reshape(g * cout_g, kc, kh, kw), None, stride, padding,
                  dilation, g)
    if test == THRESHOLD:
        return s1, None
    s2 = None
    for i in range(k):
        part = slice(i * unit, (i + 1) * unit)
        t = _wide(F.conv2d(xk[:, :, part].reshape(b, g * unit, h, w), wk[:, :, part].reshape(g * cout_g, unit, kh, kw),
                           None, stride, padding, dilation, g))
        s2 = t * t if s2 is None else s2.addcmul_(t, t)
    return s1, s2


def argmax_matmul(x, weight, scale, offset, unit: int, k: int, test: int, critical: float, stats):
    """Dominance prediction for a prediction head ``x @ weight.T`` read through argmax."""
    lead, big_k, n_out = x.shape[:-1], x.shape[-1], weight.shape[0]
    if fast.current() == "fastest":  # the test costs more than it saves at any stop rate measured so far
        return _dense_call(x @ weight.T, scale, offset, stats, big_k, count_negative=False, per_row=True)
    x2 = x.reshape(-1, big_k)
    m, n, ku = x2.shape[0], big_k // unit, k * unit
    xk, wk = x2[:, :ku], weight[:, :ku]
    a = scale.to(x2.dtype)
    c = _flatten_offset(offset, lead + (n_out,), m, n_out, x2)
    s1 = xk @ wk.T
    partial = a * s1 + c * (k / n)  # sum of the first k folded terms t_i
    leader = partial.argmax(1, keepdim=True)
    gap = (partial.gather(1, leader) - partial) / k  # mean of d_i = t_i(leader) - t_i(c)
    if test == THRESHOLD:
        dominated = gap > critical
        if observe.active():  # per row: the leader's smallest advantage, and whether it is the final leader
            rival = gap.scatter(1, leader, math.inf).amin(1, keepdim=True)
            full = a * (s1 + x2[:, ku:] @ weight[:, ku:].T) + c
            observe.add(stats, rival, (full.argmax(1, keepdim=True) == leader).to(x2.dtype), 1)
    else:
        s2, cross = _leader_moments(x2[:, :ku], wk, leader, k, unit)
        al = a[leader.squeeze(1)].unsqueeze(1)
        sum_d = al * s1.gather(1, leader) - a * s1
        sumsq_d = al * al * s2.gather(1, leader) + a * a * s2 - 2 * al * a * cross
        var_d = (sumsq_d - sum_d * sum_d / k).clamp_min(0) / (k - 1)
        se = (var_d / k * ((n - k) / (n - 1))).sqrt()
        dominated = gap > critical * se
    dominated.scatter_(1, leader, True)
    stop = dominated.all(1)
    go = (~stop).nonzero().squeeze(1)
    out = a * s1 * (n / k) + c  # the estimate, kept where the row stopped
    if go.numel():
        cg = c if c.dim() == 0 else c[go]
        out[go] = a * (s1[go] + x2[go, ku:] @ weight[:, ku:].T) + cg
    test_per_output = 2 * k + 6 if test == STATS else 2
    outputs = m * n_out
    add(stats, calls=1, outputs=m, pruned=stop.sum(), dense=outputs * big_k, partial=outputs * ku,
        test=outputs * test_per_output, remainder=(m - stop.sum()) * n_out * (big_k - ku),
        computed=outputs * (ku + test_per_output) + go.numel() * n_out * (big_k - ku))
    return out.reshape(lead + (n_out,))


def _leader_moments(xk, wk, leader, k: int, unit: int):
    """Per row and class: sum of squared terms, and sum of term x leader's term."""
    if unit == 1:
        x_sq = xk * xk
        return x_sq @ (wk * wk).T, (x_sq * wk[leader.squeeze(1)]) @ wk.T
    m, n_out = xk.shape[0], wk.shape[0]
    w_terms = wk.reshape(n_out, k, unit).permute(1, 2, 0)
    s2, cross = xk.new_empty(m, n_out), xk.new_empty(m, n_out)
    step = max(1, _CHUNK_ELEMENTS // max(1, k * n_out))
    for r in range(0, m, step):
        t = torch.bmm(xk[r:r + step].reshape(-1, k, unit).transpose(0, 1), w_terms)  # [k, rows, N]
        lead_t = t.gather(2, leader[r:r + step].unsqueeze(0).expand(k, -1, 1))
        s2[r:r + step], cross[r:r + step] = (t * t).sum(0), (t * lead_t).sum(0)
    return s2, cross


def valid_k(n: int, k: int) -> bool:
    """A site is worth testing only when some terms remain after the first k."""
    return 2 <= k < n and not math.isinf(n)
