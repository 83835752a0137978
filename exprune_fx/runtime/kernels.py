"""Reference early-exit kernels: the one place where the skipping strategy lives.

Notation (docs/method.md): an output's value after the folded affine epilogue is
``z = a * y + c = sum_i t_i`` with ``t_i = a * xi_i + c / n`` over ``n`` unit terms ``xi_i``.
Each kernel

1. computes the first ``k`` terms of every output (one matmul or convolution) and the sum of
   their squares, without a Python loop over terms;
2. tests every output (``test`` 0 = stats, 1 = threshold; ``critical`` is ``Phi^-1(alpha)``
   or the threshold for ReLU sites, the Bonferroni z or margin for argmax sites);
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


def relu_matmul(x, weight, scale, offset, unit: int, k: int, test: int, critical: float, stats):
    """Early negative prediction for ``x @ weight.T`` (x [..., K], weight [N, K]), or for a
    batched product ``x @ weight.transpose(-1, -2)`` (weight [..., N, K], a run-time value)."""
    if weight.dim() > 2:
        return _relu_batched(x, weight, scale, offset, unit, k, test, critical, stats)
    lead, big_k, n_out = x.shape[:-1], x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, big_k)
    m, n, ku = x2.shape[0], big_k // unit, k * unit
    s1, s2 = _term_sums(x2[:, :ku], weight[:, :ku], k, unit, test)
    c = _flatten_offset(offset, lead + (n_out,), m, n_out, x2)
    a = scale.to(x2.dtype)
    pruned = _decide_negative(a * s1 / k + c / n, s1, s2, a, k, n, test, critical)
    keep = ~pruned
    cols = keep.any(0).nonzero().squeeze(1)
    out = torch.zeros(m, n_out, dtype=x2.dtype, device=x2.device)
    rest_macs = 0
    if cols.numel() == n_out:
        z = a * (s1 + x2[:, ku:] @ weight[:, ku:].T) + c
        out = torch.where(keep, z, out)
        rest_macs = m * n_out * (big_k - ku)
    elif cols.numel():
        cc = c if c.dim() == 0 else c[:, cols]
        z = a[cols] * (s1[:, cols] + x2[:, ku:] @ weight[cols, ku:].T) + cc
        out[:, cols] = torch.where(keep[:, cols], z, 0)
        rest_macs = m * cols.numel() * (big_k - ku)
    _count_relu(stats, m * n_out, pruned, big_k, ku, k, test, rest_macs, out)
    return out.reshape(lead + (n_out,))


def _relu_batched(x, weight, scale, offset, unit: int, k: int, test: int, critical: float, stats):
    """Batched products (both operands run-time values): every output's remainder is
    computed by one batched matmul and masked, since no dense kernel skips columns per batch."""
    big_k = x.shape[-1]
    n, ku = big_k // unit, k * unit
    xk, wk = x[..., :ku], weight[..., :ku]
    if test == THRESHOLD:
        s1, s2 = xk @ wk.transpose(-1, -2), None
    elif unit == 1:
        s1, s2 = xk @ wk.transpose(-1, -2), (xk * xk) @ (wk * wk).transpose(-1, -2)
    else:
        t = torch.einsum("...mku,...nku->...kmn", xk.unflatten(-1, (k, unit)), wk.unflatten(-1, (k, unit)))
        s1, s2 = t.sum(-3), (t * t).sum(-3)
    a = scale.to(x.dtype)
    c = torch.zeros((), dtype=x.dtype, device=x.device) if offset is None else offset.to(x.dtype).expand_as(s1)
    pruned = _decide_negative(a * s1 / k + c / n, s1, s2, a, k, n, test, critical)
    z = a * (s1 + x[..., ku:] @ weight[..., ku:].transpose(-1, -2)) + c
    outputs = s1.numel()
    out = torch.where(pruned, torch.zeros((), dtype=z.dtype, device=z.device), z)
    _count_relu(stats, outputs, pruned, big_k, ku, k, test, outputs * (big_k - ku), out)
    return out


def _count_relu(stats, outputs: int, pruned, big_k: int, ku: int, k: int, test: int, rest_macs: int, out):
    test_per_output = k + 4 if test == STATS else 2
    kept = outputs - pruned.sum()
    add(stats, calls=1, outputs=outputs, pruned=pruned.sum(), dense=outputs * big_k,
        partial=outputs * ku, test=outputs * test_per_output, remainder=kept * (big_k - ku),
        computed=outputs * (ku + test_per_output) + rest_macs, negative=(out < 0).sum())


def relu_conv2d(x, weight, scale, offset, stride, padding, dilation, groups: int, unit: int, k: int,
                test: int, critical: float, stats):
    """Early negative prediction for a 2-d convolution; a term is ``unit`` input channels'
    whole window contribution, counted within each group."""
    b, cin, h, w = x.shape
    cout, cin_g, kh, kw = weight.shape
    g, cout_g = groups, cout // groups
    n, kc = cin_g // unit, k * unit
    xg = x.view(b, g, cin_g, h, w)
    wg = weight.view(g, cout_g, cin_g, kh, kw)
    if test == THRESHOLD:  # the sum alone: one grouped convolution over the first k terms
        xk = xg[:, :, :kc].reshape(b, g * kc, h, w)
        s1 = F.conv2d(xk, wg[:, :, :kc].reshape(cout, kc, kh, kw), None, stride, padding, dilation, g)
        s2, out_hw = None, s1.shape[-2:]
    else:
        s1, s2 = _conv_term_sums(xg[:, :, :kc], wg[:, :, :kc], k, unit, stride, padding, dilation)
        out_hw = s1.shape[-2:]
    outputs = s1.numel()
    a = scale.to(x.dtype).view(1, cout, 1, 1)
    c = torch.zeros((), dtype=x.dtype, device=x.device) if offset is None else offset.to(x.dtype).expand_as(s1)
    pruned = _decide_negative(a * s1 / k + c / n, s1, s2, a, k, n, test, critical)
    keep = ~pruned
    chans = keep.any(3).any(2).any(0).nonzero().squeeze(1)
    out = torch.zeros_like(s1)
    per_output = (cin_g - kc) * kh * kw
    rest_macs = 0
    if chans.numel() and (g > 1 or chans.numel() == cout):
        x_rest = xg[:, :, kc:].reshape(b, g * (cin_g - kc), h, w)
        w_rest = wg[:, :, kc:].reshape(cout, cin_g - kc, kh, kw)
        z = a * (s1 + F.conv2d(x_rest, w_rest, None, stride, padding, dilation, g)) + c
        out = torch.where(keep, z, out)
        rest_macs = outputs * per_output
    elif chans.numel():
        rest = F.conv2d(x[:, kc:], weight[chans, kc:], None, stride, padding, dilation, 1)
        cc = c if c.dim() == 0 else c[:, chans]
        z = a[:, chans] * (s1[:, chans] + rest) + cc
        out[:, chans] = torch.where(keep[:, chans], z, 0)
        rest_macs = b * chans.numel() * out_hw[0] * out_hw[1] * per_output
    _count_relu(stats, outputs, pruned, cin_g * kh * kw, kc * kh * kw, k, test, rest_macs, out)
    return out


def _conv_term_sums(xk, wk, k: int, unit: int, stride, padding, dilation):
    """Sum and sum of squares of the k terms per conv output: xk [B, G, k*unit, H, W],
    wk [G, cout_g, k*unit, kh, kw]. The sum is one convolution; the squares accumulate term
    by term (one small convolution per term, squared in place), so memory stays at the
    output's size: 2-6x faster on CPU than one grouped convolution that writes all k terms."""
    b, g, kc, h, w = xk.shape
    cout_g, kh, kw = wk.shape[1], wk.shape[3], wk.shape[4]
    s1 = F.conv2d(xk.reshape(b, g * kc, h, w), wk.reshape(g * cout_g, kc, kh, kw), None, stride, padding,
                  dilation, g)
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
