"""Side-by-side timing (the benchmarks, the cost-model tuner): interleaved repetitions in a random order.

Each repetition runs every variant once, in a new random order: a fixed order favours or
penalises a variant by what ran before it (warm caches, the other variant's threads).

Example:
    >>> import random
    >>> times = interleaved_times({"a": lambda: None, "b": lambda: None}, 5, random.Random(0))
    >>> sorted(times), len(times["a"])
    (['a', 'b'], 5)
"""

from __future__ import annotations

import random
import time

import torch


def interleaved_times(fns: dict, repeats: int, order: random.Random, warmup: int = 3) -> dict[str, list[float]]:
    """Seconds per call of each no-argument callable, ``repeats`` each, after ``warmup`` calls
    each (compiles, loads, fills caches); gradients off."""
    names = list(fns)
    times = {name: [] for name in names}
    with torch.no_grad():
        for name in names:
            for _ in range(warmup):
                fns[name]()
        for _ in range(repeats):
            for name in order.sample(names, len(names)):
                t0 = time.perf_counter()
                fns[name]()
                times[name].append(time.perf_counter() - t0)
    return times
