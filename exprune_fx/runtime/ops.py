"""``torch.ops.exprune.*``: the early-exit kernels as operators of the ``exprune`` library.

``critical`` is a buffer of the rewritten graph, so that a site can be retuned without
recompiling: 0-d, or for a ReLU site's threshold test one value per output feature or channel
(``SiteConfig.thresholds``). Each op mutates only its ``stats`` counter tensor (``Tensor(a!)`` in its
schema) and returns a new tensor; its fake implementation gives the output's shape and dtype,
so a rewritten graph can be printed, exported with torch.export and compiled by inductor
(which treats the op as opaque).

The ops are defined with ``torch.library.Library`` and explicit schemas rather than
``torch.library.custom_op``: the dispatch then costs a few microseconds per call instead of
tens, which decides whether a batch-1 call can be faster than the dense layer.

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

import inspect

import torch
import torch.nn.functional as F

from . import exact, hybrid, kernels, sparse

_LIB = torch.library.Library("exprune", "DEF")

# Each op's Python kernel, by overload: the lean call path (exprune_fx/fastcall.py) calls these
# directly, skipping the dispatcher's boxing of a dozen arguments (6-12 us per call).
PYTHON_KERNELS: dict = {}


def _op(schema: str, impl, fake) -> None:
    """Define ``exprune::<schema>``, run ``impl`` on CPU and CUDA, ``fake`` for shapes."""
    name = schema.split("(", 1)[0]
    _LIB.define(schema)
    overload = getattr(torch.ops.exprune, name).default
    schema_names = [a.name for a in overload._schema.arguments]
    if list(inspect.signature(impl).parameters) != schema_names:  # a graph node may pass any of them by name
        raise AssertionError(f"exprune::{name}: the kernel's parameters differ from the schema's {schema_names}")
    PYTHON_KERNELS[overload] = impl
    # the kernel runs eagerly even when called from a frame dynamo is evaluating (the
    # torch.compile backend runs rewritten graphs from compiled code)
    impl = torch.compiler.disable(impl)
    for key in ("CPU", "CUDA"):
        _LIB.impl(name, impl, key)
    torch.library.register_fake(f"exprune::{name}", fake, lib=_LIB)


def _rows_by(x, n_out):
    return x.new_empty(x.shape[:-1] + (n_out,))


_op("relu_matmul(Tensor x, Tensor weight, Tensor scale, Tensor? offset, int unit, int k, int test, Tensor critical, "
    "Tensor(a!) stats, int stages=1) -> Tensor",
    kernels.relu_matmul,
    lambda x, weight, *rest, **kw: torch.matmul(x, weight.transpose(-1, -2)) if weight.dim() > 2
    else _rows_by(x, weight.shape[0]))

_op("relu_linear(Tensor x, Tensor weight, Tensor scale, Tensor? offset, int unit, int k, int test, "
    "Tensor critical, Tensor(a!) stats, int stages=1) -> Tensor",
    kernels.relu_linear, lambda x, weight, *rest, **kw: _rows_by(x, weight.shape[0]))

_op("argmax_matmul(Tensor x, Tensor weight, Tensor scale, Tensor? offset, int unit, int k, int test, "
    "Tensor critical, Tensor(a!) stats) -> Tensor",
    kernels.argmax_matmul, lambda x, weight, *rest, **kw: _rows_by(x, weight.shape[0]))

_op("relu_conv2d(Tensor x, Tensor weight, Tensor scale, Tensor? offset, int[] stride, int[] padding, int[] dilation, "
    "int groups, int unit, int k, int test, Tensor critical, Tensor(a!) stats, int stages=1) -> Tensor",
    kernels.relu_conv2d,
    lambda x, weight, scale, offset, stride, padding, dilation, groups, *rest, **kw:
    F.conv2d(x, weight, None, stride, padding, dilation, groups))

_op("exact_relu_matmul(Tensor x, Tensor positive, Tensor order, Tensor negative, Tensor count, Tensor? offset, "
    "int k, Tensor(a!) stats) -> Tensor",
    exact.exact_relu_matmul, lambda x, positive, *rest, **kw: _rows_by(x, positive.shape[0]))

_op("exact_relu_conv2d(Tensor x, Tensor positive, Tensor order, Tensor negative, Tensor count, Tensor? offset, "
    "int[] stride, int[] padding, int[] dilation, int k, Tensor(a!) stats) -> Tensor",
    exact.exact_relu_conv2d,
    lambda x, positive, order, negative, count, offset, stride, padding, dilation, *rest, **kw:
    F.conv2d(x, positive, None, stride, padding, dilation))

_op("hybrid_relu_linear(Tensor x, Tensor head, Tensor scale, Tensor? offset, Tensor positive, Tensor order, "
    "Tensor negative, Tensor count, int unit, int k, int test, Tensor critical, int interval, Tensor(a!) stats) -> Tensor",
    hybrid.hybrid_relu_linear, lambda x, head, *rest, **kw: _rows_by(x, head.shape[0]))

_op("hybrid_relu_conv2d(Tensor x, Tensor head, Tensor scale, Tensor? offset, Tensor positive, Tensor order, "
    "Tensor negative, Tensor count, int[] stride, int[] padding, int[] dilation, int unit, int k, int test, "
    "Tensor critical, int interval, Tensor(a!) stats) -> Tensor",
    hybrid.hybrid_relu_conv2d,
    lambda x, head, scale, offset, positive, order, negative, count, stride, padding, dilation, *rest, **kw:
    F.conv2d(x, head if head.shape[1] == x.shape[1] else torch.cat([head, positive], 1), None, stride, padding,
             dilation))

_op("sparse_relu_matmul(Tensor x, Tensor first, Tensor first_w, Tensor rest, Tensor rest_w, Tensor nonzero, "
    "Tensor tested, Tensor scale, Tensor? offset, int k, int test, Tensor critical, Tensor(a!) stats) -> Tensor",
    sparse.sparse_relu_matmul, lambda x, first, *rest, **kw: _rows_by(x, first.shape[0]))

_op("sparse_relu_conv2d(Tensor x, Tensor first, Tensor first_w, Tensor rest_w, Tensor nonzero, Tensor tested, "
    "Tensor taps_first, Tensor taps_all, Tensor scale, Tensor? offset, int[] stride, int[] padding, int[] dilation, "
    "int k, int test, Tensor critical, Tensor(a!) stats) -> Tensor",
    sparse.sparse_relu_conv2d,
    lambda x, first, first_w, rest_w, nonzero, tested, taps_first, taps_all, scale, offset, stride, padding, dilation,
    *rest, **kw: F.conv2d(x, rest_w, None, stride, padding, dilation))

# Zero-skip propagation (runtime/zero_skip.py): a linear layer fed by a ReLU reads only the
# weight rows of its nonzero inputs; weight_t is the weight transposed at compile time, [K, N].
from . import zero_skip as _zero_skip  # noqa: E402

_op("zero_skip_linear(Tensor x, Tensor weight_t, Tensor? bias, Tensor(a!) stats) -> Tensor",
    _zero_skip.zero_skip_linear, lambda x, weight_t, *rest, **kw: _rows_by(x, weight_t.shape[1]))
