"""Runtime of rewritten graphs: the early-exit kernels and their torch.library custom ops.

* :mod:`.counters`: the layout of a site's work counters;
* :mod:`.kernels`: the reference early-exit kernels (plain torch, no Python loop over terms);
* :mod:`.ops`: ``torch.ops.exprune.*``, custom ops with fake implementations, so that a
  rewritten graph prints, exports and compiles.
"""
