"""The compiler passes of exprune-fx, shipped as ``exprune_fx.passes``.

* :mod:`.factors`: the union-find store of axis factors (unite, refine, pin);
* :mod:`.rules`: per-op constraint rules;
* :mod:`.exchangeability`: the analysis pass, labels ``node.meta["exprune.axes"]``;
* :mod:`.sites`: reduction sites and their decisions, ``node.meta["exprune.site"]``.
"""
