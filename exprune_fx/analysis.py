"""``analyze``: run lifting, the exchangeability analysis and site detection on a model.

Example:
    >>> import torch
    >>> from exprune_fx import analyze
    >>> mlp = torch.nn.Sequential(
    ...     torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.ReLU(),
    ...     torch.nn.Linear(16, 3)).eval()
    >>> a = analyze(mlp, torch.randn(2, 4))
    >>> [(s.name, s.n, s.decision, s.eligible) for s in a.sites]
    [('linear', None, 'relu', False), ('linear_1', 16, 'relu', True), ('linear_2', 16, None, False)]
    >>> sorted(c.size for c in a.free_classes)
    [16, 16]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from torch.export.graph_signature import OutputKind
from torch.fx import GraphModule

from .errors import InputError
from .lifting import Lifted, lift
from .passes.exchangeability import SymmetryClass, label_classes
from .passes.nonnegative import mark_nonnegative
from .passes.sites import Site, find_sites

OutputSpec = Iterable[str] | Mapping[str, str] | None
_MODES = ("value", "argmax")


@dataclass
class Analysis:
    """What the analysis found: symmetry classes, reduction sites, and the labelled graph.

    ``outputs`` maps each counted output name to how it is consumed: ``"value"`` (the whole
    tensor matters) or ``"argmax"`` (only the argmax over its last axis matters).
    """

    lifted: Lifted
    classes: list[SymmetryClass]
    sites: list[Site]
    outputs: dict[str, str] = field(default_factory=dict)

    @property
    def graph_module(self) -> GraphModule:
        return self.lifted.graph_module

    @property
    def free_classes(self) -> list[SymmetryClass]:
        return [c for c in self.classes if c.free]

    @property
    def eligible_sites(self) -> list[Site]:
        return [s for s in self.sites if s.eligible]

    def site(self, name: str) -> Site:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(f"no site named {name!r}; sites: {[s.name for s in self.sites]}")

    def summary(self) -> dict[str, int]:
        return {
            "classes": len(self.classes),
            "free_classes": len(self.free_classes),
            "sites": len(self.sites),
            "eligible_sites": len(self.eligible_sites),
        }

    def __str__(self) -> str:
        s = self.summary()
        lines = [
            f"ExPrune analysis: {s['classes']} symmetry classes ({s['free_classes']} free), "
            f"{s['sites']} reduction sites ({s['eligible_sites']} eligible)",
            "outputs: " + ", ".join(f"{k} ({v})" for k, v in self.outputs.items()),
            "",
            f"{'site':<28} {'kind':<10} {'n':>6} {'decision':<9} {'eligible':<8} reason",
        ]
        for site in self.sites:
            lines.append(
                f"{site.name:<28} {site.kind:<10} {site.n if site.n is not None else '-':>6} "
                f"{site.decision or '-':<9} {'yes' if site.eligible else 'no':<8} {site.reason or ''}".rstrip()
            )
        lines += ["", "free classes:"]
        for c in self.free_classes:
            params = sorted({m.name for m in c.parameters})
            shown = ", ".join(params[:4]) + (f", ... ({len(params)} in all)" if len(params) > 4 else "")
            lines.append(f"  c{c.id} size {c.size}: {shown or 'no parameters'}")
        return "\n".join(lines)


def _output_modes(names: tuple[str, ...], outputs: OutputSpec) -> dict[str, str]:
    if outputs is None:
        return {name: "value" for name in names}
    if isinstance(outputs, str):
        outputs = [outputs]
    modes = dict(outputs) if isinstance(outputs, Mapping) else {o: "value" for o in outputs}
    unknown = [o for o in modes if o not in names]
    if unknown:
        raise InputError(f"unknown output(s) {unknown}; the model's outputs are {list(names)}.")
    bad = {k: v for k, v in modes.items() if v not in _MODES}
    if bad:
        raise InputError(f"output modes must be one of {_MODES}; got {bad}.")
    if not modes:
        raise InputError("outputs must name at least one output of the model.")
    return modes


def analyze(model: Any, example_inputs: Any = None, outputs: OutputSpec = None,
            strict: bool = False) -> Analysis:
    """Lift ``model`` and label its symmetry classes and reduction sites.

    ``model`` is an ``nn.Module`` (lifted on ``example_inputs``) or an already
    :class:`~exprune_fx.lifting.Lifted` model. ``outputs`` names the outputs that define the
    model's function: a list of names (each consumed as a whole value) or a dict
    ``{name: "value" | "argmax"}``; outputs left out are ignored (for example a returned
    key/value cache). By default every output counts as a value and is pinned. ``strict``
    turns a failing op rule into an error instead of a conservative pin (used by the tests).
    """
    lifted = model if isinstance(model, Lifted) else lift(model, example_inputs)
    modes = _output_modes(lifted.output_names, outputs)
    user_positions = [i for i, spec in enumerate(lifted.exported.graph_signature.output_specs)
                      if spec.kind == OutputKind.USER_OUTPUT]
    position_modes = {pos: modes[name] for pos, name in zip(user_positions, lifted.output_names)
                      if name in modes}
    counted = {pos for pos, mode in position_modes.items()}
    gm = lifted.graph_module
    classes = label_classes(gm, lifted.constants, counted, strict=strict)
    mark_nonnegative(gm, lifted.constants)
    sites = find_sites(gm, classes, position_modes)
    return Analysis(lifted, classes, sites, modes)
