"""Union-find over axis factors: the constraint store of the exchangeability analysis.

Every axis of every value is a product of *factors* (a flatten of ``[C, H, W]`` has the
factors C, H and W). Each factor is a variable. Op rules add two kinds of constraints:

* ``unite(a, b)``: factors a and b must be permuted together (same permutation);
* ``pin(a, reason)``: factor a cannot be permuted at all.

Reshapes can split a factor after it has been united with others (a head split of ``d``
into ``[h, d/h]``); :meth:`FactorStore.refine` splits the whole class at once, so every
member sees the same split. When two splits of one class disagree and have no common
refinement, the class is pinned: pinning is always sound, uniting too little is not.

Example:
    >>> s = FactorStore()
    >>> d, w = s.new(12), s.new(12)
    >>> s.unite(d, w)
    >>> heads, head_dim = s.refine([d], [3, 4])
    >>> [s.size(v) for v in s.leaves(w)]
    [3, 4]
    >>> s.pin(head_dim, "rotary embedding")
    >>> s.pins(s.leaves(w)[1]), s.pins(s.leaves(w)[0])
    (('rotary embedding',), ())
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence


def common_refinement(a: Sequence[int], b: Sequence[int]) -> list[int] | None:
    """The coarsest factor sequence that refines both ``a`` and ``b`` (major to minor).

    Both sequences describe one extent of size ``prod(a) == prod(b)`` in row-major order.
    Returns None when no sequence of factors refines both (for example ``[2, 3]`` and
    ``[3, 2]``).

    >>> common_refinement([4, 6], [2, 12])
    [2, 2, 6]
    >>> common_refinement([2, 3], [3, 2]) is None
    True
    """
    if math.prod(a) != math.prod(b):
        return None

    def strides(seq: Sequence[int]) -> set[int]:
        out, acc = {1}, 1
        for size in reversed(seq):
            acc *= size
            out.add(acc)
        return out

    bounds = sorted(strides(a) | strides(b))
    if any(hi % lo for lo, hi in zip(bounds, bounds[1:])):
        return None
    return [hi // lo for lo, hi in reversed(list(zip(bounds, bounds[1:])))]


class FactorStore:
    """Factor variables with union, refinement and pins. See the module docstring."""

    def __init__(self) -> None:
        self._parent: list[int] = []
        self._size: list[int] = []
        self._children: dict[int, list[int]] = {}  # root -> refinement, major to minor
        self._pins: dict[int, list[object]] = {}  # root (leaf class) -> reasons

    # -- variables -------------------------------------------------------------------
    def new(self, size: int) -> int:
        """A fresh factor variable of the given size (> 1)."""
        self._parent.append(len(self._parent))
        self._size.append(int(size))
        return len(self._parent) - 1

    def find(self, v: int) -> int:
        root = v
        while self._parent[root] != root:
            root = self._parent[root]
        while self._parent[v] != root:  # path compression
            self._parent[v], v = root, self._parent[v]
        return root

    def size(self, v: int) -> int:
        return self._size[self.find(v)]

    def leaves(self, v: int) -> list[int]:
        """The finest factors of ``v``, as class representatives, major to minor."""
        root = self.find(v)
        kids = self._children.get(root)
        if not kids:
            return [root]
        return [leaf for kid in kids for leaf in self.leaves(kid)]

    def pins(self, v: int) -> tuple[object, ...]:
        """Reasons pinning the leaf class of ``v`` (empty when it is free)."""
        return tuple(self._pins.get(self.find(v), ()))

    # -- constraints -----------------------------------------------------------------
    def pin(self, v: int, reason: object) -> None:
        """Forbid permuting ``v`` (every leaf of it)."""
        for leaf in self.leaves(v):
            reasons = self._pins.setdefault(leaf, [])
            if reason not in reasons and len(reasons) < 8:
                reasons.append(reason)

    def unite(self, a: int, b: int, reason: object = "incompatible splits") -> None:
        """Require ``a`` and ``b`` to be permuted together.

        When both are already split differently, the splits are merged into their common
        refinement, or everything is pinned with ``reason`` when there is none.
        """
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self._size[ra] != self._size[rb]:
            raise ValueError(f"cannot unite factors of sizes {self._size[ra]} and {self._size[rb]}")
        ka, kb = self._children.pop(ra, None), self._children.pop(rb, None)
        pins = self._pins.pop(ra, []) + self._pins.pop(rb, [])  # only unsplit roots hold pins
        self._parent[rb] = ra
        if ka is not None or kb is not None:
            self._children[ra] = ka if ka is not None else kb
        for p in pins:
            self.pin(ra, p)
        if ka is not None and kb is not None:
            self._unite_sequences(self._leaves_of(ka), self._leaves_of(kb), reason)

    def _leaves_of(self, kids: list[int]) -> list[int]:
        return [leaf for kid in kids for leaf in self.leaves(kid)]

    def _unite_sequences(self, la: list[int], lb: list[int], reason: object) -> None:
        sizes_a = [self.size(v) for v in la]
        sizes_b = [self.size(v) for v in lb]
        common = common_refinement(sizes_a, sizes_b)
        if common is None:
            for v in la + lb:
                self.pin(v, reason)
            return
        fa = self._refine_leaves(la, common)
        fb = self._refine_leaves(lb, common)
        for x, y in zip(fa, fb):
            self.unite(x, y, reason)

    def _refine_leaves(self, leaves: list[int], common: list[int]) -> list[int]:
        """Split each leaf into its run of ``common``; return the new leaves."""
        out, i = [], 0
        for leaf in leaves:
            want, run = self.size(leaf), []
            while math.prod(run) < want:
                run.append(common[i])
                i += 1
            out.extend(self._split_leaf(leaf, run))
        return out

    def _split_leaf(self, leaf: int, sizes: list[int]) -> list[int]:
        root = self.find(leaf)
        if len(sizes) == 1:
            return [root]
        kids = [self.new(s) for s in sizes]
        self._children[root] = kids
        for reason in self._pins.pop(root, []):
            for kid in kids:
                self.pin(kid, reason)
        return kids

    def refine(self, vars_: Sequence[int], sizes: Sequence[int]) -> list[int] | None:
        """Express the concatenated factors ``vars_`` as the factor sequence ``sizes``.

        Returns one variable per entry of ``sizes`` (a merge of several existing leaves
        becomes a new variable refined into them), or None after pinning everything when
        the existing splits and ``sizes`` have no common refinement.
        """
        leaves = [leaf for v in vars_ for leaf in self.leaves(v)]
        common = common_refinement([self.size(v) for v in leaves], list(sizes))
        if common is None:
            return None
        fine = self._refine_leaves(leaves, common)
        out, i = [], 0
        for want in sizes:
            run = []
            while math.prod(self.size(v) for v in run) < want:
                run.append(fine[i])
                i += 1
            if len(run) == 1:
                out.append(run[0])
            else:
                merged = self.new(want)
                self._children[merged] = run
                out.append(merged)
        return out

    def unite_shapes(self, a: Sequence[int], b: Sequence[int], reason: object) -> None:
        """Unite two factor sequences of equal total size, refining as needed."""
        la = [leaf for v in a for leaf in self.leaves(v)]
        lb = [leaf for v in b for leaf in self.leaves(v)]
        self._unite_sequences(la, lb, reason)

    def classes(self, vars_: Iterable[int]) -> dict[int, list[int]]:
        """Group the leaf classes reachable from ``vars_``: representative -> leaves."""
        out: dict[int, list[int]] = {}
        for v in vars_:
            for leaf in self.leaves(v):
                out.setdefault(self.find(leaf), []).append(leaf)
        return out
