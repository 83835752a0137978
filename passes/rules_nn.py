"""Constraint rules for neural-network layers: normalisation, contractions (linear, matmul,
einsum), convolutions, pooling, embeddings and attention. See :mod:`.rules` for the contract.
"""

from __future__ import annotations

import re

import torch
from torch.fx import Node

from .rules import RuleContext, unite_broadcast, rule

aten = torch.ops.aten


# -- normalisation ---------------------------------------------------------------------
@rule(aten.layer_norm, aten.native_layer_norm, aten.rms_norm)
def layer_norm(ctx: RuleContext, node: Node) -> None:
    src = node.args[0]
    ax_in = ctx.axes(src)
    outs = ctx.outputs(node)
    norm = ctx.arg(node, "normalized_shape")
    k = len(norm)
    if outs:
        for a, b in zip(ax_in, outs[0]):
            ctx.unite(a, b, node)
    for name in ("weight", "bias"):
        p = ctx.arg(node, name)
        ax = ctx.axes(p)
        if ax is not None:
            for a, b in zip(ax, ax_in[-k:]):
                ctx.unite(a, b, node)
    for extra in outs[1:]:  # native_layer_norm's mean / rstd: leading axes only
        for a, b in zip(ax_in[: len(ax_in) - k], extra):
            ctx.unite(a, b, node)


@rule(aten.batch_norm, aten._native_batch_norm_legit_no_training, aten.native_batch_norm,
      aten.instance_norm, aten.group_norm)
def batch_norm(ctx: RuleContext, node: Node) -> None:
    """Eval-mode batch norm: the channel axis unites with weight, bias and running stats."""
    name = node.target.overloadpacket
    if name is aten.group_norm:
        return ctx.pin_all(node, "group norm mixes channels within groups")
    if ctx.arg(node, "training", False) and name is not aten.instance_norm:
        return ctx.pin_all(node, "batch norm in training mode")
    src = node.args[0]
    ax_in = ctx.axes(src)
    outs = ctx.outputs(node)
    if outs:
        for a, b in zip(ax_in, outs[0]):
            ctx.unite(a, b, node)
    for pname in ("weight", "bias", "running_mean", "running_var"):
        ax = ctx.axes(ctx.arg(node, pname))
        if ax is not None and len(ax_in) > 1:
            ctx.unite(ax[0], ax_in[1], node)


# -- contractions ----------------------------------------------------------------------
@rule(aten.linear)
def linear(ctx: RuleContext, node: Node) -> None:
    x, w, b = node.args[0], node.args[1], ctx.arg(node, "bias")
    ax_x, ax_w, ax_y = ctx.axes(x), ctx.axes(w), ctx.axes(node)
    for a, c in zip(ax_x[:-1], ax_y[:-1]):
        ctx.unite(a, c, node)
    ctx.unite(ax_x[-1], ax_w[-1], node)
    if len(ax_w) == 2:
        ctx.unite(ax_y[-1], ax_w[0], node)
    if ctx.axes(b) is not None:
        unite_broadcast(ctx, node, b, ax_y)


def _matmul_axes(ctx: RuleContext, node: Node, a: Node, b: Node, y: list[list[int]]) -> None:
    ax_a, ax_b = ctx.axes(a), ctx.axes(b)
    sa, sb = ctx.shape(a), ctx.shape(b)
    a1, b1 = len(ax_a) == 1, len(ax_b) == 1
    ctx.unite(ax_a[-1], ax_b[0] if b1 else ax_b[-2], node)  # contraction
    rows = [] if a1 else [ax_a[-2]]
    cols = [] if b1 else [ax_b[-1]]
    batch_y = y[: len(y) - len(rows) - len(cols)]
    for axes, shape in ((ax_a[:-2] if not a1 else [], sa[:-2]), (ax_b[:-2] if not b1 else [], sb[:-2])):
        off = len(batch_y) - len(axes)
        for i, axis in enumerate(axes):
            if shape[i] != 1:
                ctx.unite(axis, batch_y[i + off], node)
    for axis, out in zip(rows + cols, y[len(batch_y):]):
        ctx.unite(axis, out, node)


@rule(aten.matmul, aten.mm, aten.bmm, aten._sparse_mm, aten.mv, aten.dot)
def matmul(ctx: RuleContext, node: Node) -> None:
    a, b = node.args[0], node.args[1]
    y = ctx.axes(node)
    if y is None or ctx.axes(a) is None or ctx.axes(b) is None:
        return ctx.pin_all(node, "matmul of unexpected operands")
    _matmul_axes(ctx, node, a, b, y)


@rule(aten.addmm, aten.baddbmm, aten.addmv)
def addmm(ctx: RuleContext, node: Node) -> None:
    bias, a, b = node.args[0], node.args[1], node.args[2]
    y = ctx.axes(node)
    _matmul_axes(ctx, node, a, b, y)
    unite_broadcast(ctx, node, bias, y)


@rule(aten.einsum)
def einsum(ctx: RuleContext, node: Node) -> None:
    """Every subscript letter is one set of factors shared by all operands."""
    equation, operands = node.args[0], node.args[1]
    if "..." in equation or "->" not in equation:
        return ctx.pin_all(node, "einsum with ellipsis or implicit output")
    lhs, rhs = equation.replace(" ", "").split("->")
    letters: dict[str, list[int]] = {}
    for subs, value in list(zip(lhs.split(","), operands)) + [(rhs, node)]:
        ax = ctx.axes(value)
        if ax is None or len(ax) != len(subs):
            return ctx.pin_all(node, "einsum operand of unexpected rank")
        for ch, axis in zip(subs, ax):
            if not axis:
                continue  # size-1 (broadcast) axis
            if ch in letters:
                ctx.unite(letters[ch], axis, node)
            else:
                letters[ch] = axis


def _conv_groups(ctx: RuleContext, channels: list[int], groups: int):
    """Split a channel axis into ``([group factor], [per-group factor])`` (size-1 parts empty).

    Returns None when the axis is already split in a way incompatible with the groups.
    """
    if groups == 1:
        return [], channels
    size = 1
    for v in channels:
        size *= ctx.store.size(v)
    per = size // groups
    parts = ctx.store.refine(channels, [s for s in (groups, per) if s > 1])
    if parts is None:
        return None
    return [parts[0]], (parts[1:] if per > 1 else [])


@rule(aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution, aten._convolution)
def conv(ctx: RuleContext, node: Node) -> None:
    """Channels are exchangeable (within groups), spatial axes and kernel taps are not."""
    x, w = node.args[0], node.args[1]
    b = ctx.arg(node, "bias")
    if ctx.arg(node, "transposed", False):
        return ctx.pin_all(node, "transposed convolution is not modelled")
    groups = int(ctx.arg(node, "groups", 1))
    ax_x, ax_w, ax_y = ctx.axes(x), ctx.axes(w), ctx.axes(node)
    batched = len(ax_x) == len(ax_w)
    cx = 1 if batched else 0
    if batched:
        ctx.unite(ax_x[0], ax_y[0], node)
    for axes in (ax_x[cx + 1:], ax_y[cx + 1:], ax_w[2:]):
        for axis in axes:
            ctx.pin(axis, node, "convolution spatial axis / kernel tap")
    xg = _conv_groups(ctx, ax_x[cx], groups)
    yg = _conv_groups(ctx, ax_y[cx], groups)
    wo = _conv_groups(ctx, ax_w[0], groups)
    if xg is None or yg is None or wo is None:
        return ctx.pin_all(node, "grouped convolution with incompatible channel splits")
    ctx.unite(xg[1], ax_w[1], node)  # per-group input channels
    ctx.unite(yg[1], wo[1], node)  # per-group output channels
    ctx.unite(xg[0], yg[0], node)  # groups travel with their channels
    ctx.unite(yg[0], wo[0], node)
    if ctx.axes(b) is not None:
        ctx.unite(ctx.axes(b)[0], ax_y[cx], node)


@rule(aten.max_pool1d, aten.max_pool2d, aten.max_pool3d, aten.avg_pool1d, aten.avg_pool2d,
      aten.avg_pool3d, aten.adaptive_avg_pool1d, aten.adaptive_avg_pool2d,
      aten.adaptive_avg_pool3d, aten.adaptive_max_pool2d, aten.max_pool2d_with_indices,
      aten.upsample_nearest2d, aten.upsample_bilinear2d)
def pool(ctx: RuleContext, node: Node) -> None:
    """Pooling acts per channel: batch and channel axes unite, spatial axes are pinned."""
    src = node.args[0]
    ax_in = ctx.axes(src)
    name = node.target.overloadpacket.__name__
    spatial = int(re.search(r"(\d)d", name).group(1))
    lead = len(ax_in) - spatial
    for out in ctx.outputs(node):
        for d in range(len(ax_in)):
            if d < lead:
                ctx.unite(ax_in[d], out[d], node)
            else:
                ctx.pin(ax_in[d], node, "pooling spatial axis")
                ctx.pin(out[d], node, "pooling spatial axis")


@rule(aten.embedding)
def embedding(ctx: RuleContext, node: Node) -> None:
    """Rows of an embedding table are token/position ids: pinned. Its width is free."""
    w, idx = node.args[0], node.args[1]
    ax_w, ax_i, ax_y = ctx.axes(w), ctx.axes(idx), ctx.axes(node)
    ctx.pin(ax_w[0], node, "embedding vocabulary axis")
    ctx.unite(ax_w[1], ax_y[-1], node)
    for a, b in zip(ax_i or [], ax_y[:-1]):
        ctx.unite(a, b, node)


@rule(aten.scaled_dot_product_attention)
def attention(ctx: RuleContext, node: Node) -> None:
    """SDPA: heads and head dims are exchangeable; with a causal mask the tokens are not."""
    q, k, v = node.args[0], node.args[1], node.args[2]
    ax_q, ax_k, ax_v, ax_y = ctx.axes(q), ctx.axes(k), ctx.axes(v), ctx.axes(node)
    if ctx.shape(q)[:-2] != ctx.shape(k)[:-2] or ctx.shape(k)[:-2] != ctx.shape(v)[:-2]:
        return ctx.pin_all(node, "attention with broadcast or grouped heads")
    for a, b, c, y in zip(ax_q[:-2], ax_k[:-2], ax_v[:-2], ax_y[:-2]):
        for other in (b, c, y):
            ctx.unite(a, other, node)
    ctx.unite(ax_q[-1], ax_k[-1], node)
    ctx.unite(ax_k[-2], ax_v[-2], node)
    ctx.unite(ax_q[-2], ax_y[-2], node)
    ctx.unite(ax_v[-1], ax_y[-1], node)
    mask = ctx.arg(node, "attn_mask")
    ax_m = ctx.axes(mask)
    if ax_m is not None:
        target = ax_y[:-1] + [ax_k[-2]]  # [..., L, S]
        shape_t = ctx.shape(node)[:-1] + (ctx.shape(k)[-2],)
        shape_m = ctx.shape(mask)
        off = len(target) - len(ax_m)
        for i, axis in enumerate(ax_m):
            if i + off >= 0 and shape_m[i] == shape_t[i + off]:
                ctx.unite(axis, target[i + off], node)
    if ctx.arg(node, "is_causal", False):
        for axis in (ax_q[-2], ax_k[-2]):
            ctx.pin(axis, node, "causal attention orders the tokens")
