"""Seeded random inputs shaped like a model's example inputs (``exprune-fx stats``, ``--input-shape``).

Example:
    >>> import torch
    >>> args, kwargs = random_batch(((torch.zeros(2, 4),), {"ids": torch.tensor([[3, 7]])}),
    ...                             torch.Generator().manual_seed(0), batch_size=5)
    >>> args[0].shape, kwargs["ids"].shape, int(kwargs["ids"].max()) < 8
    (torch.Size([5, 4]), torch.Size([5, 2]), True)
    >>> describe_inputs(((torch.zeros(2, 4),), {"ids": torch.tensor([[3, 7]])}), batch_size=5)
    'arg0 f32[5, 4] ~ N(0, 1), ids i64[5, 2] uniform in [0, 8)'
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.utils._pytree import keystr, tree_flatten_with_path, tree_map

from .dump import dtype_short
from .lifting import normalize_inputs

_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def random_inputs(shapes: Sequence[tuple[int, ...]], seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Seeded standard-normal float32 tensors, one per shape."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=gen, dtype=torch.float32) for shape in shapes)


def _random_like(value: Any, gen: torch.Generator, batch_size: int | None) -> Any:
    """A random tensor like ``value`` (see :func:`random_batch`); non-tensors unchanged."""
    if not isinstance(value, torch.Tensor):
        return value
    shape = tuple(value.shape)
    if batch_size is not None and shape:
        shape = (batch_size,) + shape[1:]
    if value.is_floating_point() or value.is_complex():
        return torch.randn(shape, generator=gen, dtype=value.dtype).to(value.device)
    if _is_integer(value.dtype):
        high = int(value.max()) + 1 if value.numel() else 1
        return torch.randint(0, max(high, 1), shape, generator=gen, dtype=value.dtype).to(value.device)
    if shape != tuple(value.shape) and value.dim() and value.shape[0]:  # repeat the example's rows
        return value[torch.arange(shape[0], device=value.device) % value.shape[0]]
    return value


def _is_integer(dtype: torch.dtype) -> bool:
    return dtype in _INTEGER_DTYPES


def random_batch(example: Any, gen: torch.Generator, batch_size: int | None = None) -> tuple[tuple, dict]:
    """``(args, kwargs)`` shaped like the example inputs, drawn from ``gen``.

    Float tensors are standard normal, integer tensors uniform in ``[0, max(example) + 1)``;
    bool tensors and non-tensor values are the example's. ``batch_size`` replaces the size
    of axis 0 of every tensor (a bool tensor's rows are repeated from the example).
    """
    args, kwargs = normalize_inputs(example)
    return tree_map(lambda v: _random_like(v, gen, batch_size), (tuple(args), dict(kwargs)))


def describe_inputs(example: Any, batch_size: int | None = None) -> str:
    """``x f32[B, 4] ~ N(0, 1), input_ids i64[B, 8] uniform in [0, 96), use_cache=False``."""
    args, kwargs = normalize_inputs(example)
    parts = []
    for name, value in [(f"arg{i}", a) for i, a in enumerate(args)] + list(kwargs.items()):
        for path, leaf in tree_flatten_with_path(value)[0]:
            label = name + keystr(path)
            if not isinstance(leaf, torch.Tensor):
                parts.append(f"{label}={leaf!r}")
                continue
            dims = [str(d) for d in leaf.shape]
            if batch_size is not None and dims:
                dims[0] = str(batch_size)
            text = f"{label} {dtype_short(leaf.dtype)}[{', '.join(dims)}]"
            if leaf.is_floating_point() or leaf.is_complex():
                text += " ~ N(0, 1)"
            elif _is_integer(leaf.dtype):
                high = max(int(leaf.max()) + 1 if leaf.numel() else 1, 1)
                text += f" uniform in [0, {high})"
            else:
                text += " as in the example"
            parts.append(text)
    return ", ".join(parts) or "none"
