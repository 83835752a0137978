"""Fit the fast kernels' cost model to this machine: ``exprune-fx tune``, or :func:`tune`.

The cost model (:func:`.fast.choose`) weighs the row-wise early-exit kernel against the dense
layer (``"fastest"``) or the BLAS kernel (``"auto"``) with a few constants. Their defaults
were fitted on the project's development machine (docs/benchmarks.md, "The cost model's
data"); on another CPU, thread count or torch build the break-even points move. This module
measures them here:

1. :func:`grid` times one linear ReLU site (threshold test, one stage, random weights) with
   each kernel forced, over layer shapes, rows per call and survivor shares (the critical
   value keeps that share of the (row, output) pairs), side by side with interleaved
   repetitions, the weight rotating over copies that fill 16 MB (a whole model's other layers
   evict a site's weight from the core's cache between its calls); each cell keeps the median
   over ``runs`` sweeps;
2. :func:`fit` picks, per setting, the candidate constants that lose the least time against
   always taking the faster of the two kernels, mean over the cells;
3. :func:`tune` applies them to :mod:`.fast` and saves them under this machine's tag
   (CPU model and flags, torch version, thread count) in ``$EXPRUNE_CACHE_DIR`` (default
   ``~/.cache/exprune-fx``)/``cost_model.json``; the first fast-kernel call of a later process
   on the same machine loads them (:func:`apply_saved`). ``EXPRUNE_COST_MODEL=builtin``
   keeps the built-in constants.

Example:
    >>> from exprune_fx.runtime import tuning
    >>> cells = [{"rows": r, "k": 16, "unit": 1, "k_terms": 1024, "survivors": 1.0,
    ...           "row-wise_ms": 1.0, "dense_ms": 2.0 if r <= 4 else 0.5, "blas_ms": 1.0} for r in (1, 4, 32)]
    >>> best, lost = tuning.fit(cells, "fastest")
    >>> lost, [tuning.row_chosen(c, "fastest", best) for c in cells]
    (0.0, [True, True, False])
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import platform
import random
import statistics
import warnings
from pathlib import Path

import torch

from ..timing import interleaved_times
from . import fast
from .counters import INDEX, new_counters

THRESHOLD = 1
# (outputs N, terms K, unit, k): the MLP's and the VGG's sites, the byte-level LM's FFN fc1, a
# wide and a narrow layer, two with short rows
SHAPES = ((1024, 1024, 1, 16), (256, 3136, 49, 8), (512, 128, 1, 32), (1024, 784, 1, 16), (128, 512, 1, 32),
          (2048, 128, 1, 16), (512, 256, 1, 16))
ROWS = (1, 2, 3, 4, 8, 16, 32)
SURVIVORS = (1.0, 0.7, 0.5, 0.3, 0.1)
QUICK = {"shapes": ((1024, 1024, 1, 16), (256, 3136, 49, 8), (512, 128, 1, 32)), "rows": (1, 4, 16),
         "survivors": (1.0, 0.5, 0.1), "repeats": 10, "runs": 1}
KERNELS = (fast.ROW, fast.BLAS, fast.DENSE)
# the constants of each setting's choice, the kernel it weighs the row-wise kernel against, and
# the candidates fit() searches
CHOICES = {
    "fastest": {"other": fast.DENSE, "constants": ("DENSE_BUDGET", "OUTPUT_COST", "MIN_TERMS"),
                "candidates": list(itertools.product((1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0, 12.0, 16.0),
                                                     (0, 128, 256, 384, 512, 768, 1024, 1536),
                                                     (0, 192, 256, 384, 512)))},
    "auto": {"other": fast.BLAS, "constants": ("ROW_BUDGET",),
             "candidates": [(b,) for b in (2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 16.0, 24.0, 32.0)]},
}
CONSTANTS = tuple(name for choice in CHOICES.values() for name in choice["constants"])
# tune() keeps a setting's constants in force unless the fit loses at least this much less time
# (a share of the faster kernel's time, mean over the cells): one sweep's noise is about that
KEEP_WITHIN = 0.005


def _cell(n: int, big_k: int, unit: int, k: int, rows: int, share: float, copies: int, g: torch.Generator) -> dict:
    weights = [torch.randn(n, big_k, generator=g) for _ in range(copies)]
    x = torch.relu(torch.randn(rows, big_k, generator=g))
    offset = torch.randn(n, generator=g)
    kh = k * unit
    means = (x[:, :kh] @ weights[0][:, :kh].T) / k + offset / (big_k // unit)
    critical = torch.tensor(-1e30 if share >= 1 else float(torch.quantile(means.flatten(), 1 - share)))
    return {"n": n, "k_terms": big_k, "unit": unit, "k": k, "rows": rows, "survivors": share,
            "args": (x, weights, torch.ones(n), offset.expand(rows, n), critical)}


def _runner(cell: dict, kernel: str):
    x, weights, scale, offset, critical = cell["args"]
    stats, turn = new_counters(), [0]

    def run():
        turn[0] += 1
        return fast.relu_linear(x, weights[turn[0] % len(weights)], scale, offset, cell["unit"], cell["k"], THRESHOLD,
                                critical, stats, kernel=kernel)
    return run


def side_by_side(fns: dict, repeats: int, rnd: random.Random) -> dict:
    """Median ms per kernel, and the median per-repetition ratio of the row-wise kernel to each other."""
    names = list(fns)
    times = interleaved_times(fns, repeats, rnd, warmup=1)
    return {**{f"{name}_ms": 1e3 * statistics.median(times[name]) for name in names},
            **{f"{name}_ratio": statistics.median(a / b for a, b in zip(times[fast.ROW], times[name]))
               for name in names if name != fast.ROW}}


def grid(shapes=SHAPES, rows=ROWS, survivors=SURVIVORS, repeats: int = 30, runs: int = 3,
         weight_bytes: int = 16 << 20, seed: int = 0, progress=None) -> list[dict]:
    """Every cell's row-wise, BLAS and dense times; the weight rotates over enough copies to
    fill ``weight_bytes`` (2 to 32 copies). ``progress``: called after each cell of each sweep."""
    if fast.module() is None:
        raise RuntimeError("the fast kernels could not be built here (see the warning): nothing to time")
    g, rnd = torch.Generator().manual_seed(seed), random.Random(seed)
    cells = []
    for (n, big_k, unit, k), m, share in itertools.product(shapes, rows, survivors):
        copies = min(32, max(2, weight_bytes // (4 * n * big_k)))
        cells.append(_cell(n, big_k, unit, k, m, share, copies, g))
    sweeps = [[] for _ in cells]
    with torch.no_grad():
        for _ in range(runs):
            for cell, kept in zip(cells, sweeps):
                kept.append(side_by_side({kernel: _runner(cell, kernel) for kernel in KERNELS}, repeats, rnd))
                if progress is not None:
                    progress()
    for cell, kept in zip(cells, sweeps):
        del cell["args"]
        for key in kept[0]:
            cell[key] = statistics.median(t[key] for t in kept)
    return cells


def row_chosen(cell: dict, setting: str, constants: tuple | None = None) -> bool:
    """Whether ``setting``'s cost model picks the row-wise kernel for this cell (with the
    constants in force, or those given), at the cell's survivor share."""
    stats = new_counters()
    stats[INDEX["outputs"]], stats[INDEX["pruned"]] = 1000.0, 1000.0 * (1 - cell["survivors"])  # the share kept
    values = dict(zip(CHOICES[setting]["constants"], constants)) if constants is not None else None
    with fast.use(setting):
        return fast.choose(cell["rows"], cell["k"] * cell["unit"] / cell["k_terms"], stats, cell["k_terms"],
                           values) == fast.ROW


def loss(cells: list[dict], setting: str, constants: tuple | None = None) -> float:
    """Mean over the cells of (time of the kernel picked) / (time of the faster of the two) - 1."""
    other = CHOICES[setting]["other"]
    lost = [(c["row-wise_ms"] if row_chosen(c, setting, constants) else c[f"{other}_ms"])
            / min(c["row-wise_ms"], c[f"{other}_ms"]) - 1 for c in cells]
    return sum(lost) / len(lost)


def fit(cells: list[dict], setting: str) -> tuple[tuple, float]:
    """``setting``'s constants of least :func:`loss`, by grid search over its candidates."""
    best = min(CHOICES[setting]["candidates"], key=lambda c: (loss(cells, setting, c), c))
    return best, loss(cells, setting, best)


def tune(quick: bool = False, runs: int | None = None, repeats: int | None = None, save: bool = True,
         progress=None) -> dict:
    """Measure the grid here, fit both settings' constants, apply them to :mod:`.fast` and
    (``save``) keep them for later processes on this machine. A setting keeps the constants in
    force unless the fit loses at least :data:`KEEP_WITHIN` less time. ``quick``: three shapes, three
    row counts and three survivor shares, one sweep (seconds; the full grid takes about half a
    minute). Returns ``{"constants": {name: value}, "before": {...}, "loss": {setting:
    [loss with the constants before, loss fitted]}, "tag": ..., "path": ... or None}``."""
    sizes = dict(QUICK) if quick else {"shapes": SHAPES, "rows": ROWS, "survivors": SURVIVORS, "repeats": 30,
                                       "runs": 3}
    sizes.update({key: value for key, value in (("runs", runs), ("repeats", repeats)) if value is not None})
    if sizes["runs"] < 1 or sizes["repeats"] < 1:
        raise ValueError("runs and repeats must be at least 1")
    before = {name: getattr(fast, name) for name in CONSTANTS}
    cells = grid(progress=progress, **sizes)
    fitted, losses = {}, {}
    for setting, choice in CHOICES.items():
        best, lost = fit(cells, setting)
        in_force = loss(cells, setting)
        if in_force <= lost + KEEP_WITHIN:  # not worth a change: the grid's noise is larger
            best, lost = tuple(before[name] for name in choice["constants"]), in_force
        losses[setting] = [in_force, lost]
        fitted.update(zip(choice["constants"], best))
    apply(fitted)
    path = save_constants(fitted) if save else None
    return {"constants": fitted, "before": before, "loss": losses, "tag": machine_tag(), "path": path}


def apply(constants: dict) -> None:
    """Set the cost model's constants (names from :data:`CONSTANTS`) in :mod:`.fast`; all or,
    on a bad name or value, none."""
    unknown = sorted(set(constants) - set(CONSTANTS))
    if unknown:
        raise KeyError(f"not cost-model constants: {unknown} (they are {CONSTANTS})")
    values = {name: type(getattr(fast, name))(value) for name, value in constants.items()}
    for name, value in values.items():
        setattr(fast, name, value)


def machine_tag() -> str:
    """What the constants depend on: CPU model and flags, torch version, threads."""
    cpu = ""
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))
    key = "|".join((cpu or platform.processor(), platform.machine(), torch.__version__, str(torch.get_num_threads())))
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def cache_path() -> Path:
    return Path(os.environ.get("EXPRUNE_CACHE_DIR", Path.home() / ".cache" / "exprune-fx")) / "cost_model.json"


def save_constants(constants: dict) -> Path:
    """Keep ``constants`` under this machine's tag (other machines' entries stay)."""
    path = cache_path()
    saved = _read(path) or {}
    saved[machine_tag()] = {"constants": constants, "torch": torch.__version__, "threads": torch.get_num_threads()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(saved, indent=1, sort_keys=True))
    return path


def apply_saved() -> dict | None:
    """Apply the constants :func:`tune` saved for this machine, if any (and unless
    ``EXPRUNE_COST_MODEL=builtin``); returns them. A file that cannot be read is ignored, with
    a warning."""
    if os.environ.get("EXPRUNE_COST_MODEL", "") == "builtin":
        return None
    entry = (_read(cache_path()) or {}).get(machine_tag())
    if not isinstance(entry, dict) or not isinstance(entry.get("constants"), dict):
        return None
    try:
        apply(entry["constants"])
    except (KeyError, TypeError, ValueError) as exc:
        warnings.warn(f"exprune-fx: ignoring the saved cost model in {cache_path()} ({exc}); run 'exprune-fx tune' "
                      "again", RuntimeWarning, stacklevel=2)
        return None
    return entry["constants"]


def _read(path: Path) -> dict | None:
    try:
        if not path.exists():
            return None
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        warnings.warn(f"exprune-fx: ignoring {path}: {exc}", RuntimeWarning, stacklevel=3)
        return None
    return saved if isinstance(saved, dict) else None
