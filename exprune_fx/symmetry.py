"""``check_symmetry``: test the analysis instead of trusting it.

For each free class, draw one random permutation, apply it to every parameter and buffer
slice in the class (one factor of one axis each), run the model with the permuted tensors
(``torch.func.functional_call``: the caller's model is not touched) and compare the counted
outputs with the original ones. A sound analysis returns no failures.

The comparison is ``max|permuted - original| / max(max|original|, tiny) <= rtol`` per
output (default rtol 1e-4 for float32): a wrong symmetry moves outputs by O(1), float
reassociation by about 1e-6.

Example:
    >>> import torch
    >>> from exprune_fx import check_symmetry
    >>> cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
    ...                           torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3)).eval()
    >>> check_symmetry(cnn, torch.randn(1, 3, 8, 8))
    []
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from .analysis import Analysis, OutputSpec, analyze
from .lifting import normalize_inputs
from .passes.exchangeability import Member, SymmetryClass


@dataclass(frozen=True)
class SymmetryFailure:
    """A free class whose permutation changed an output."""

    class_id: int
    size: int
    output: str
    error: float  # max abs difference / max abs of the original output

    def __str__(self) -> str:
        return f"class c{self.class_id} (size {self.size}) changed output {self.output!r}: relative error {self.error:.3g}"


def permute_factor(t: torch.Tensor, member: Member, perm: torch.Tensor) -> torch.Tensor:
    """Permute one factor of one axis of ``t`` (the axis is viewed as its factor sizes)."""
    axis, sizes = member.axis, member.factors
    shape = tuple(t.shape)
    split = shape[:axis] + sizes + shape[axis + 1:]
    view = t.reshape(split)
    return view.index_select(axis + member.factor, perm.to(t.device)).reshape(shape)


def permuted_state(state: dict[str, torch.Tensor], cls: SymmetryClass,
                   perm: torch.Tensor) -> dict[str, torch.Tensor]:
    """The tensors of ``state`` that ``cls`` touches, with ``perm`` applied to each slice."""
    out: dict[str, torch.Tensor] = {}
    seen = set()
    for m in cls.parameters:
        key = (m.name, m.axis, m.factor)
        if key in seen or m.name not in state:
            continue
        seen.add(key)
        out[m.name] = permute_factor(out.get(m.name, state[m.name]), m, perm)
    return out


def _relative_error(a: Any, b: Any) -> float:
    if not isinstance(a, torch.Tensor):
        return 0.0 if a == b else float("inf")
    if not a.is_floating_point():
        return 0.0 if torch.equal(a, b) else float("inf")
    scale = b.abs().max().item() if b.numel() else 0.0
    diff = (a - b).abs().max().item() if b.numel() else 0.0
    return diff / max(scale, 1e-12)


def check_symmetry(model: torch.nn.Module, example_inputs: Any, analysis: Analysis | None = None,
                   outputs: OutputSpec = None, rtol: float = 1e-4,
                   seed: int = 0) -> list[SymmetryFailure]:
    """Permute each free class of ``analysis`` (computed if None) and list the failures."""
    if analysis is None:
        analysis = analyze(model, example_inputs, outputs=outputs)
    args, kwargs = normalize_inputs(example_inputs)
    state = dict(model.named_parameters(remove_duplicate=False))
    state.update(dict(model.named_buffers(remove_duplicate=False)))
    counted = [i for i, name in enumerate(analysis.lifted.output_names) if name in analysis.outputs]
    gen = torch.Generator().manual_seed(seed)

    with torch.no_grad():
        reference = tree_flatten(model(*args, **kwargs))[0]
        failures = []
        for cls in analysis.free_classes:
            if not cls.parameters:
                continue
            perm = torch.randperm(cls.size, generator=gen)
            while cls.size > 1 and torch.equal(perm, torch.arange(cls.size)):
                perm = torch.randperm(cls.size, generator=gen)
            patched = permuted_state(state, cls, perm)
            result = tree_flatten(torch.func.functional_call(model, patched, args, kwargs))[0]
            for i in counted:
                err = _relative_error(result[i], reference[i])
                if err > rtol:
                    failures.append(SymmetryFailure(cls.id, cls.size, analysis.lifted.output_names[i], err))
                    break
    return failures
