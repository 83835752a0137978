"""Tensors that kernels derive from a site's compile-time tensors (a folded weight rebuilt from
its layouts, a transposed or zero-padded copy of a weight), built on the first call that needs
them and kept while those tensors live unchanged.

Example:
    >>> import torch
    >>> w = torch.randn(4, 3)
    >>> t = built_once((w,), lambda: w.t().contiguous(), "transposed")
    >>> built_once((w,), lambda: w.t().contiguous(), "transposed") is t
    True
    >>> _ = w.mul_(2)                                   # changed in place: built again
    >>> built_once((w,), lambda: w.t().contiguous(), "transposed") is t
    False
"""

from __future__ import annotations

import weakref

import torch

_BUILT: dict[tuple, object] = {}  # (what, (id, version) of each source) -> what was built from them


def built_once(sources: tuple, build, what=()):
    """``build()`` (run without autograd), once per ``sources`` (the tensors it reads,
    unchanged since: their ids and version counters are the key) and ``what`` (which layout of
    them); the entry goes when the first source is freed. An inference tensor has no version
    counter: it is built on every call."""
    try:
        key = (what,) + tuple((id(t), t._version) for t in sources)
    except RuntimeError:  # inference tensors do not track versions
        with torch.no_grad():
            return build()
    value = _BUILT.get(key)
    if value is None:
        with torch.no_grad():
            value = _BUILT[key] = build()
        weakref.finalize(sources[0], _BUILT.pop, key, None)
    return value
