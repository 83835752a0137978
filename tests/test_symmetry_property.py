"""Property test: on generated architectures every class the analysis calls free is a
symmetry, and graph inputs and outputs are never free. (That the check can fail is shown
in test_analysis.py, by freeing classes that are pinned for a reason.)"""

from archgen import architectures
from hypothesis import given, settings

from exprune_fx import analyze, check_symmetry
from exprune_fx.passes.exchangeability import META_AXES, META_ROLE


def _boundary_classes(analysis):
    ids = set()
    for node in analysis.graph_module.graph.nodes:
        if node.op == "placeholder" and node.meta.get(META_ROLE) == "input":
            ids |= {c for axis in node.meta.get(META_AXES, ()) for c in axis}
        if node.op == "output":
            for value in node.args[0]:
                ids |= {c for axis in value.meta.get(META_AXES, ()) for c in axis}
    return ids


@settings(max_examples=200)
@given(architectures())
def test_free_classes_are_symmetries(arch):
    model, x = arch
    analysis = analyze(model, x, strict=True)
    failures = check_symmetry(model, x, analysis)
    assert failures == [], f"{model.extra_repr()}: {[str(f) for f in failures]}"
    by_id = {c.id: c for c in analysis.classes}
    assert not any(by_id[c].free for c in _boundary_classes(analysis))
