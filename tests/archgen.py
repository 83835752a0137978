"""Hypothesis strategies that generate small, varied architectures for property tests.

A generated model is a chain of blocks over one of three input kinds: a feature vector
``[B, D]``, an image ``[B, C, H, W]`` or a token sequence ``[B, T, D]``. The blocks cover
what the analysis must get right: linear and conv layers (grouped and depthwise), batch norm
with non-trivial statistics, residual adds, flatten into linear, layer norm, attention-style
head reshapes with explicit matmuls, concatenation and slicing.
"""

from __future__ import annotations

import math

import torch
from hypothesis import strategies as st
from torch import nn


def _randomise_bn(bn: nn.Module) -> nn.Module:
    bn.running_mean.normal_(0, 0.2)
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.uniform_(-1.5, 1.5)
    bn.bias.data.normal_(0, 0.2)
    return bn


class LinearAct(nn.Module):
    def __init__(self, din: int, dout: int, relu: bool = True, bn: bool = False):
        super().__init__()
        self.lin = nn.Linear(din, dout)
        self.bn = _randomise_bn(nn.BatchNorm1d(dout)) if bn else None
        self.relu = relu

    def forward(self, x):
        y = self.lin(x)
        if self.bn is not None:
            y = self.bn(y)
        return torch.relu(y) if self.relu else y


class ResidualMLP(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.l1, self.l2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        return torch.relu(self.l2(torch.relu(self.l1(x))) + x)


class Norm(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.ln.weight.data.uniform_(0.5, 1.5)
        self.ln.bias.data.normal_(0, 0.1)

    def forward(self, x):
        return self.ln(x)


class ConcatFeatures(nn.Module):
    def __init__(self, din: int, a: int, b: int):
        super().__init__()
        self.la, self.lb = nn.Linear(din, a), nn.Linear(din, b)

    def forward(self, x):
        return torch.cat([torch.relu(self.la(x)), torch.relu(self.lb(x))], dim=-1)


class SliceFeatures(nn.Module):
    def __init__(self, keep: int):
        super().__init__()
        self.keep = keep

    def forward(self, x):
        return x[..., : self.keep]


class Attention(nn.Module):
    """Multi-head self-attention with explicit head reshapes and matmuls."""

    def __init__(self, d: int, heads: int, fused: bool, packed_qkv: bool = False):
        super().__init__()
        self.h, self.fused = heads, fused
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.qkv = nn.Linear(d, 3 * d) if packed_qkv else None  # one projection, split in three

    def forward(self, x):
        b, t, d = x.shape
        dh = d // self.h

        def heads(z):
            return z.view(b, t, self.h, dh).transpose(1, 2)

        if self.qkv is not None:
            q, k, v = (heads(z) for z in self.qkv(x).split(d, dim=-1))
        else:
            q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        if self.fused:
            a = nn.functional.scaled_dot_product_attention(q, k, v)
        else:
            a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), dim=-1) @ v
        return x + self.o(a.transpose(1, 2).reshape(b, t, d))


class ConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int, bn: bool, kernel: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, groups=groups, bias=not bn)
        self.bn = _randomise_bn(nn.BatchNorm2d(cout)) if bn else None

    def forward(self, x):
        y = self.conv(x)
        if self.bn is not None:
            y = self.bn(y)
        return torch.relu(y)


class ResidualConv(nn.Module):
    def __init__(self, c: int, groups: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, groups=groups, bias=False)
        self.bn = _randomise_bn(nn.BatchNorm2d(c))

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)) + x)


class ConcatChannels(nn.Module):
    def __init__(self, cin: int, a: int, b: int):
        super().__init__()
        self.ca, self.cb = nn.Conv2d(cin, a, 1), nn.Conv2d(cin, b, 3, padding=1)

    def forward(self, x):
        return torch.cat([torch.relu(self.ca(x)), torch.relu(self.cb(x))], dim=1)


class SliceChannels(nn.Module):
    def __init__(self, keep: int):
        super().__init__()
        self.keep = keep

    def forward(self, x):
        return x[:, : self.keep]


class GeneratedNet(nn.Module):
    def __init__(self, blocks: list[nn.Module], description: list[str]):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.description = description

    def forward(self, x):
        return self.blocks(x)

    def extra_repr(self) -> str:
        return " -> ".join(self.description)


def _divisors(n: int) -> list[int]:
    return [g for g in range(1, n + 1) if n % g == 0]


@st.composite
def feature_blocks(draw, d: int, depth: int, seq: bool):
    """Blocks acting on the last axis; returns (blocks, names, final width)."""
    blocks, names = [], []
    for _ in range(depth):
        choices = ["linear", "linear_bn", "residual", "norm", "concat", "slice"]
        if seq:
            choices += ["attention", "attention_fused", "attention_packed_qkv"]
            choices.remove("linear_bn")
        kind = draw(st.sampled_from(choices))
        if kind in ("linear", "linear_bn"):
            out = draw(st.integers(2, 12))
            blocks.append(LinearAct(d, out, relu=draw(st.booleans()), bn=kind == "linear_bn"))
            d = out
        elif kind == "residual":
            blocks.append(ResidualMLP(d, draw(st.integers(2, 12))))
        elif kind == "norm":
            blocks.append(Norm(d))
        elif kind == "concat":
            a, b = draw(st.integers(1, 6)), draw(st.integers(1, 6))
            blocks.append(ConcatFeatures(d, a, b))
            d = a + b
        elif kind == "slice":
            if d < 2:
                continue
            keep = draw(st.integers(1, d - 1))
            blocks.append(SliceFeatures(keep))
            d = keep
        else:
            heads = draw(st.sampled_from(_divisors(d)))
            blocks.append(Attention(d, heads, fused=kind == "attention_fused", packed_qkv=kind == "attention_packed_qkv"))
        names.append(kind)
    return blocks, names, d


@st.composite
def conv_blocks(draw, c: int, depth: int):
    blocks, names = [], []
    size = 8
    for _ in range(depth):
        kind = draw(st.sampled_from(["conv", "conv_bn", "grouped", "depthwise", "residual",
                                     "pool", "concat", "slice"]))
        if kind in ("conv", "conv_bn"):
            out = draw(st.integers(2, 8))
            blocks.append(ConvBlock(c, out, 1, kind == "conv_bn", draw(st.sampled_from([1, 3]))))
            c = out
        elif kind == "grouped":
            groups = draw(st.sampled_from(_divisors(c)))
            out = groups * draw(st.integers(1, 3))
            blocks.append(ConvBlock(c, out, groups, draw(st.booleans()), 3))
            c = out
        elif kind == "depthwise":
            blocks.append(ConvBlock(c, c, c, True, 3))
        elif kind == "residual":
            blocks.append(ResidualConv(c, draw(st.sampled_from(_divisors(c)))))
        elif kind == "pool":
            if size < 4:
                continue
            blocks.append(nn.MaxPool2d(2))
            size //= 2
        elif kind == "concat":
            a, b = draw(st.integers(1, 4)), draw(st.integers(1, 4))
            blocks.append(ConcatChannels(c, a, b))
            c = a + b
        else:
            if c < 2:
                continue
            keep = draw(st.integers(1, c - 1))
            blocks.append(SliceChannels(keep))
            c = keep
        names.append(kind)
    return blocks, names, c, size


@st.composite
def architectures(draw):
    """A (model, example_input) pair; the model is in eval mode."""
    torch.manual_seed(draw(st.integers(0, 2**16)))
    kind = draw(st.sampled_from(["vector", "image", "sequence"]))
    names: list[str] = [kind]
    if kind == "image":
        c0 = draw(st.integers(1, 4))
        blocks, more, c, size = draw(conv_blocks(c0, draw(st.integers(1, 4))))
        names += more
        if draw(st.booleans()):
            blocks += [nn.Flatten()]
            d = c * size * size
            names.append("flatten")
        else:
            blocks += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
            d = c
            names.append("global_pool")
        head, more, d = draw(feature_blocks(d, draw(st.integers(1, 2)), seq=False))
        blocks += head
        names += more
        x = torch.randn(2, c0, 8, 8)
    else:
        seq = kind == "sequence"
        d0 = draw(st.integers(2, 12))
        blocks, more, d = draw(feature_blocks(d0, draw(st.integers(1, 5)), seq=seq))
        names += more
        x = torch.randn(2, 5, d0) if seq else torch.randn(3, d0)
    blocks.append(nn.Linear(d, draw(st.integers(1, 4))))
    return GeneratedNet(blocks, names).eval(), x
