"""``calibrate``: choose per-site settings that save the most FLOPs within an accuracy budget.

The search answers "how much work can I skip for at most ``max_drop`` metric loss?" with far
fewer evaluations than a black-box search (the reference ran 2000 Optuna trials per model):

1. **Profile** (cheap): for each k in ``ks``, compile once with every site rewritten and
   nothing pruned (which also measures the oracle bound: what a perfect sign predictor at
   that k would save); then for every site and every alpha in ``alphas``, retune that one site
   in place (no recompile) and evaluate on a seeded subset of the calibration data
   (``profile_fraction``), recording the metric drop and the site's FLOPs saving. A site's
   settings run from the least to the most aggressive and stop at the first over budget.
2. **Allocate** (knapsack greedy, verified): per site, keep the upper convex hull of its
   (drop, saving) points; merge the hull segments of all sites by decreasing saving per unit
   of drop (:func:`upgrade_path`). Bisect that path for the longest prefix whose total drop on
   all the calibration data, plus ``margin`` standard errors of it, stays within ``max_drop``;
   then try the upgrades after it one at a time.

Sites with a provably non-negative input are also offered lossless exact mode, and their
statistical settings are profiled and chosen in hybrid mode (``hybrid=True``: the same test,
then exact early exit for the outputs it keeps).

Evaluations are counted in full-data equivalents (a profile run on a quarter of the data
counts 0.25). Whole-model settings of the compiled model (``zero_skip``) carry over to every
trial. Calibrate on a validation split; report on a held-out split.

Example:
    >>> import torch, exprune_fx
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128),
    ...                             torch.nn.ReLU(), torch.nn.Linear(128, 4)).eval()
    >>> x = torch.randn(256, 8)
    >>> data = [(x[i:i + 64], model(x[i:i + 64]).argmax(1)) for i in range(0, 256, 64)]
    >>> fast = exprune_fx.compile(model, x[:4])
    >>> result = exprune_fx.calibrate(fast, data, max_drop=0.02, ks=(16,), alphas=(0.05,), progress=False)
    >>> result.report["metric_drop"] <= 0.02
    True
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from tqdm.auto import tqdm

from .compiler import CompiledModel, ExPruneWarning, Prepared, batch_rows
from .config import Config, SiteConfig
from .errors import InputError
from .fitting import fit_margin, fit_thresholds
from .lifting import normalize_inputs
from .runtime import observe

Metric = Callable[[Any, torch.Tensor], float]


def accuracy(outputs: Any, labels: torch.Tensor) -> float:
    """Fraction of argmax predictions over the last axis equal to ``labels`` (logits of a
    ``ModelOutput`` or the first element of a tuple are used)."""
    logits = getattr(outputs, "logits", outputs)
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return (logits.argmax(-1) == labels).float().mean().item()


@dataclass
class Calibration:
    """The chosen ``config``, the model compiled with it, and what the search did."""

    config: Config
    compiled: CompiledModel
    report: dict[str, Any] = field(default_factory=dict)


def _call(model, inputs):
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


def _rows(inputs) -> int:
    return batch_rows(*normalize_inputs(inputs))


class _Evaluator:
    """Weighted metric over batches; counts evaluations in full-data equivalents."""

    def __init__(self, batches: list, metric: Metric):
        self.batches, self.metric = batches, metric
        self.total_rows = sum(_rows(x) for x, _ in batches)
        self.evaluations = 0.0

    def __call__(self, model, subset: Sequence[int] | None = None) -> float:
        return self.per_batch(model, subset)[0]

    def per_batch(self, model, subset: Sequence[int] | None = None) -> tuple[float, list[tuple[int, float]]]:
        """The weighted metric and each batch's (rows, metric)."""
        chosen = [self.batches[i] for i in subset] if subset is not None else self.batches
        scores = []
        with torch.no_grad():
            for inputs, labels in chosen:
                scores.append((_rows(inputs), self.metric(_call(model, inputs), labels)))
        rows = sum(n for n, _ in scores)
        self.evaluations += rows / self.total_rows
        return sum(n * v for n, v in scores) / max(rows, 1), scores


def paired_drop(dense: list[tuple[int, float]], trial: list[tuple[int, float]]) -> tuple[float, float]:
    """Mean metric drop over batches (weighted by rows) and its standard error, from the
    batch-to-batch spread of the paired differences (0 when every batch agrees)."""
    w = torch.tensor([n for n, _ in dense], dtype=torch.float64)
    d = torch.tensor([a - b for (_, a), (_, b) in zip(dense, trial)], dtype=torch.float64)
    mean = float((w * d).sum() / w.sum())
    if len(d) < 2:
        return mean, 0.0
    var = float((w * (d - mean) ** 2).sum() / w.sum())
    n_eff = float(w.sum() ** 2 / (w * w).sum())
    return mean, math.sqrt(var / max(n_eff - 1, 1))


def _site_saving(compiled: CompiledModel, site: str) -> float:
    s = compiled.exprune_stats()["sites"].get(site)
    if not s or not s["calls"]:
        return 0.0
    return 2 * (s["dense_macs"] - s["executed_macs"]) / max(compiled.exprune_stats()["rows"], 1)


def calibrate(compiled: CompiledModel, data: Iterable | Callable[[], Iterable], metric: Metric | None = None,
              max_drop: float = 0.01, ks: Sequence[int] = (8, 16, 32), alphas: Sequence[float] = (0.01, 0.05, 0.2),
              test: str = "stats", thresholds: Sequence[float] = (-0.02, -0.01, 0.0),
              prices: Sequence[float] = (0.05, 0.1, 0.2, 0.4),
              head_errors: Sequence[float] = (0.001, 0.003, 0.01, 0.03),
              profile_fraction: float = 0.25, margin: float = 1.0, seed: int = 0, stages: int = 1,
              exact: bool = True, exact_k: int = 16, hybrid: bool = True, order: str = "natural",
              progress: bool = True) -> Calibration:
    """Calibrate ``compiled`` (from :func:`exprune_fx.compile`) on ``data``, an iterable of
    ``(inputs, labels)`` batches (or a callable returning one). ``metric(outputs, labels)``
    is higher-is-better (default: :func:`accuracy`); ``max_drop`` is the largest allowed drop
    of the metric below the dense model's on ``data``. ``test="stats"`` searches ``alphas``;
    ``test="threshold"`` searches ``thresholds`` (in units of the folded per-term mean, so
    their scale is model-specific). ``test="fitted"`` gives every
    ReLU site with a compile-time weight one threshold per output, fitted on the profile subset
    at each price in ``prices`` (:mod:`exprune_fx.fitting`: a larger price prunes more), and
    searches the prices. Under both, an argmax site (a prediction head read through argmax)
    searches ``head_errors``: for each, the margin fitted on the profile subset so that at most
    that fraction of its rows would stop on a leader that is not their final argmax
    (:func:`exprune_fx.fitting.fit_margin`). The recordings ride on the profile's
    nothing-pruned pass, so they cost no evaluation. Other sites (products of two run-time
    values under the fitted test) get no statistical setting: they stay disabled, or take exact
    mode where they admit it.
    A step is kept when its drop plus ``margin`` standard
    errors (estimated from the batch-to-batch spread of the paired drops) stays within
    ``max_drop``: small calibration sets otherwise accept drops that were zero by chance.
    ``stages > 1`` calibrates the sequential test (ReLU sites test at k, then the outputs
    left undecided at 2k, 4k, ...). ``exact`` also offers every site that exact mode can
    rewrite (a ReLU site with a provably non-negative input) its lossless setting,
    ``mode="exact"`` with check interval ``exact_k``: no metric drop, so the
    allocation takes it wherever no statistical setting saves more within the budget.
    ``hybrid`` (single-stage tests only) runs the statistical settings of those same sites in
    hybrid mode: the test at k, then exact early exit for the outputs it keeps (the same
    accuracy, more saving; see :mod:`exprune_fx.config`). ``order="magnitude"`` (threshold
    test, one stage) has every site's test read its largest-weight terms first
    (``Config.order``), in hybrid mode too. See the module docstring."""
    if not isinstance(compiled, CompiledModel) or getattr(compiled, "source_model", None) is None:
        raise InputError("calibrate() takes what exprune_fx.compile returned (it recompiles the source model)")
    if not (isinstance(max_drop, (int, float)) and 0 <= max_drop and math.isfinite(max_drop)):
        raise InputError(f"max_drop must be a finite number >= 0 (got {max_drop!r})")
    if not (isinstance(margin, (int, float)) and 0 <= margin and math.isfinite(margin)):
        raise InputError(f"margin must be a finite number >= 0 (got {margin!r})")
    if not 0 < profile_fraction <= 1:
        raise InputError(f"profile_fraction must be in (0, 1] (got {profile_fraction!r})")
    if test not in ("stats", "threshold", "fitted"):
        raise InputError(f"test must be 'stats', 'threshold' or 'fitted' (got {test!r})")
    if test == "fitted" and stages != 1:
        raise InputError(f"test='fitted' fits one test per output (stages=1, got {stages})")
    kernel_test = "threshold" if test == "fitted" else test
    Config(stages=stages, order=order, test=kernel_test)  # validates (order="magnitude" needs the threshold test)
    if test == "fitted":
        grid = _Grid("price", tuple(prices), fitted={})
        if not grid.values or any(not (isinstance(p, (int, float)) and 0 < p < math.inf) for p in grid.values):
            raise InputError(f"prices must be finite numbers > 0 (got {tuple(prices)!r})")
    else:
        grid = _Grid("alpha", tuple(alphas)) if test == "stats" else _Grid("threshold", tuple(thresholds))
        for value in grid.values:
            Config(**{grid.setting: value})  # validates
    if test != "stats" and (not head_errors or any(not (isinstance(e, (int, float)) and 0 <= e < 1)
                                                   for e in head_errors)):
        raise InputError(f"head_errors must be numbers in [0, 1), at least one (got {tuple(head_errors)!r})")
    batches = list(data() if callable(data) else data)
    if not batches or any(not (isinstance(b, (tuple, list)) and len(b) == 2) for b in batches):
        raise InputError("data must yield (inputs, labels) pairs, and at least one")
    start = time.perf_counter()
    evaluate = _Evaluator(batches, metric or accuracy)
    shuffled = torch.randperm(len(batches), generator=torch.Generator().manual_seed(seed)).tolist()
    subset = sorted(shuffled[: max(1, round(profile_fraction * len(batches)))])
    source, example, outputs = compiled.source_model, compiled.example_inputs, compiled.outputs

    prepared = Prepared(source, example, outputs)  # lift and analyse once; each trial rewrites a copy

    def build(cfg: Config) -> CompiledModel:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExPruneWarning)  # trials with every site disabled are normal
            return prepared.compile(cfg)

    dense_full, dense_batches = evaluate.per_batch(source)
    dense_subset = evaluate(source, subset)
    # every site starts at the setting that prunes nothing (an argmax site's differs from a ReLU
    # site's); whole-model settings of the compiled model (zero-skip) carry over to every trial
    decisions = {s.name: s.decision for s in prepared.analysis.sites}
    if test != "stats" and "argmax" in decisions.values():
        grid = dataclasses.replace(grid, head_errors=tuple(head_errors))
    base = Config(k=min(ks), test=kernel_test, stages=stages, zero_skip=compiled.config.zero_skip, order=order,
                  **grid.off(),
                  sites={s: SiteConfig(**grid.off(d)) for s, d in decisions.items()
                         if d == "argmax"})
    Config(k=exact_k)  # validates
    exact_variant = build(dataclasses.replace(base, k=exact_k, mode="exact")) if exact or hybrid else None
    exact_sites = [r.name for r in exact_variant.rewritten_sites] if exact_variant is not None else []
    profiled = base
    if hybrid and stages == 1 and exact_sites:  # the sites exact mode can rewrite test in hybrid mode, where it can
        probe = build(dataclasses.replace(base, sites={**base.sites,
                                                       **{s: SiteConfig(mode="hybrid") for s in exact_sites}}))
        profiled = dataclasses.replace(base, sites={**base.sites,
                                                    **{r.name: SiteConfig(mode="hybrid") for r in probe.rewritten_sites
                                                       if r.name in exact_sites}})
    candidates, oracle = _profile(build, evaluate, subset, dense_subset, ks, profiled, grid, max_drop, progress)
    if exact and exact_sites:
        candidates += _profile_exact(exact_variant, evaluate, subset, dense_subset)
    deciding = [s.name for s in prepared.analysis.sites if s.eligible]  # the sites a config can enable
    config, steps = _allocate(build, evaluate, base, deciding, candidates, dense_batches, max_drop, margin,
                              grid, progress)

    final = build(config)
    final.reset_stats()
    metric_value = evaluate(final)
    stats = final.exprune_stats()
    report = {
        "dense_metric": dense_full, "metric": metric_value, "metric_drop": dense_full - metric_value,
        "max_drop": max_drop, "dense_flops": stats["dense_flops"], "executed_flops": stats["executed_flops"],
        "reduction": stats["reduction"], "oracle_reduction": max(oracle.values(), default=0.0),
        "oracle_reduction_by_k": oracle, "evaluations": round(evaluate.evaluations, 2),
        "seconds": time.perf_counter() - start, "steps": steps,
        "sites": {n: _site_settings(config.sites.get(n)) for n in config.sites},
    }
    return Calibration(config, final, report)


def _site_settings(sc: SiteConfig | None) -> dict:
    return {} if sc is None else {k: v for k, v in sc.__dict__.items() if v is not None}


@dataclass(frozen=True)
class _Grid:
    """What the profile searches per site. ReLU sites: ``values`` of ``setting`` ("alpha",
    "threshold", or "price" for per-output thresholds fitted into ``fitted``). Argmax sites
    under the threshold and fitted tests: ``head_errors``, each fitted into a margin in
    ``margins`` (:func:`exprune_fx.fitting.fit_margin`)."""

    setting: str  # "alpha", "threshold" or "price"
    values: tuple[float, ...]
    fitted: dict | None = None  # test="fitted": (k, site, price) -> per-output thresholds
    head_errors: tuple[float, ...] = ()  # the threshold and fitted tests: the argmax sites' grid
    margins: dict = field(default_factory=dict)  # (k, site, error) -> the argmax site's margin

    @property
    def records(self) -> bool:
        """Whether the profile's nothing-pruned pass records what the tests see (to fit)."""
        return self.fitted is not None or bool(self.head_errors)

    def _by_margin(self, decision: str) -> bool:
        """Whether a site with this decision searches ``head_errors`` (fitted margins)."""
        return decision == "argmax" and bool(self.head_errors)

    def values_for(self, decision: str) -> list[float]:
        """A site's grid, from the least to the most aggressive (a larger alpha, threshold,
        price or error prunes more)."""
        return sorted(self.head_errors if self._by_margin(decision) else self.values)

    def key(self, decision: str) -> str:
        """What a site's grid value is called in the report."""
        return "head_error" if self._by_margin(decision) else self.setting

    def off(self, decision: str = "relu") -> dict:
        """The settings that prune nothing. The threshold test reads an argmax site's margin
        the other way round (a row stops when the leader's mean advantage exceeds it), so there
        it is ``+inf``, where a ReLU site's is ``-inf``."""
        if self.setting == "alpha":
            return {"alpha": 0.0}
        return {"threshold": math.inf if decision == "argmax" else -math.inf}

    def settings(self, k: int, site: str, value: float, decision: str = "relu") -> dict:
        """The settings of ``site`` (whose decision is ``decision``) that ``value`` of its grid
        stands for."""
        if self.setting == "alpha":
            return {"alpha": value}
        if self._by_margin(decision):
            return {"threshold": self.margins[(k, site, value)]}
        if self.fitted is None:
            return {"threshold": value}
        return {"thresholds": self.fitted[(k, site, value)]}

    def fit(self, k: int, variant: CompiledModel, record) -> list[str]:
        """Fit every recorded site of ``variant`` at every value of its grid; the sites the
        grid applies to (every rewritten site, except ReLU sites without per-output thresholds
        under the fitted test, and argmax sites that recorded nothing)."""
        tunable = []
        for report in variant.rewritten_sites:
            samples = record.samples(getattr(variant.graph_module, report.counters))
            if self._by_margin(report.decision):
                if samples is None:
                    continue
                for error in self.head_errors:
                    self.margins[(k, report.name, error)] = fit_margin(*samples, error)
            elif self.fitted is not None:
                if report.per_output is None or samples is None:
                    continue
                for price in self.values:
                    self.fitted[(k, report.name, price)] = tuple(fit_thresholds(*samples, price).tolist())
            tunable.append(report.name)
        return tunable


def _profile(build, evaluate, subset, dense_subset, ks, base: Config, grid: _Grid, max_drop, progress):
    """One compile per k; per site and setting, one retuned evaluation on the subset. A
    site's settings run from the least to the most aggressive and stop after the first whose
    drop exceeds ``max_drop`` (a more aggressive one would not be admissible either).
    Also the oracle bound per k (a perfect sign predictor on every site, on the subset)."""
    candidates, oracle = [], {}
    variants = [(k, build(dataclasses.replace(base, k=k))) for k in ks]
    tunable = {}  # per k: the sites the grid applies to
    for k, variant in variants:  # nothing pruned: every negative output is counted (and, to fit, recorded)
        variant.reset_stats()
        with observe.recording() if grid.records else contextlib.nullcontext() as record:
            evaluate(variant, subset)
        oracle[k] = variant.exprune_stats()["oracle_reduction"]
        tunable[k] = grid.fit(k, variant, record) if grid.records else [r.name for r in variant.rewritten_sites]
    decisions = {r.name: r.decision for _, v in variants for r in v.rewritten_sites}
    bar = tqdm(total=sum(len(grid.values_for(decisions[s])) for t in tunable.values() for s in t),
               desc="profiling sites", disable=not progress)
    for k, variant in variants:
        for site in tunable[k]:
            values = grid.values_for(decisions[site])
            for i, value in enumerate(values):
                settings = grid.settings(k, site, value, decisions[site])
                variant.retune(site, **settings)
                variant.reset_stats()
                drop = dense_subset - evaluate(variant, subset)
                candidates.append({"site": site, "k": k, "mode": variant.config.for_site(site).mode,
                                   grid.key(decisions[site]): value, "settings": settings, "drop": drop,
                                   "saving": _site_saving(variant, site)})
                bar.update(1)
                if drop > max_drop:
                    bar.update(len(values) - i - 1)
                    break
            variant.retune(site, **grid.off(decisions[site]))
    bar.close()
    return candidates, oracle


def _profile_exact(variant: CompiledModel, evaluate, subset, dense_subset) -> list[dict]:
    """``variant`` has every site it could rewrite in exact mode; each one's saving on the
    subset. The drop is measured for the whole variant (zero up to float reassociation)."""
    variant.reset_stats()
    drop = max(dense_subset - evaluate(variant, subset), 0.0)
    k = variant.config.k
    return [{"site": r.name, "k": k, "mode": "exact", "drop": drop, "saving": _site_saving(variant, r.name)}
            for r in variant.rewritten_sites]


def upgrade_path(candidates: list[dict], max_drop: float, start: dict[str, float] | None = None) -> list[dict]:
    """The order in which to switch sites to more saving settings: per site, the upper convex
    hull of its candidates' (drop, saving) points (drops below zero counted as zero; drops over
    ``max_drop`` left out), starting from (0, ``start[site]``): the saving of the setting the
    site starts from (0: disabled); the hull segments of all sites merged by decreasing slope
    (saving per unit of drop). This is the greedy order of the multiple-choice knapsack
    relaxation: a prefix of the path is the best allocation its summed drop buys, if drops add
    up.

    >>> c = [{"site": "a", "drop": 0.0, "saving": 0.1}, {"site": "a", "drop": 0.02, "saving": 0.3},
    ...      {"site": "b", "drop": 0.01, "saving": 0.4}, {"site": "b", "drop": 0.05, "saving": 0.41}]
    >>> [(u["site"], u["saving"]) for u in upgrade_path(c, max_drop=0.03)]
    [('a', 0.1), ('b', 0.4), ('a', 0.3)]
    >>> [(u["site"], u["saving"]) for u in upgrade_path(c, max_drop=0.03, start={"b": 0.4})]
    [('a', 0.1), ('a', 0.3)]
    """
    start = start or {}
    by_site: dict[str, list[tuple[float, float, dict]]] = {}
    for c in _admissible(candidates, max_drop, start):
        by_site.setdefault(c["site"], []).append((max(c["drop"], 0.0), c["saving"], c))
    segments = []
    for order, (site, points) in enumerate(by_site.items()):
        hull: list[tuple[float, float, dict | None]] = [(0.0, start.get(site, 0.0), None)]
        for point in sorted(points, key=lambda p: (p[0], -p[1])):
            if point[1] <= hull[-1][1]:
                continue  # dominated: no more saving for at least as much drop
            while len(hull) >= 2 and _slope(hull[-2], hull[-1]) <= _slope(hull[-1], point):
                hull.pop()  # under the chord: never the best use of its drop
            hull.append(point)
        segments += [(-_slope(a, b), order, i, b[2]) for i, (a, b) in enumerate(zip(hull, hull[1:]))]
    return [c for *_, c in sorted(segments, key=lambda s: s[:3])]


def _admissible(candidates: list[dict], max_drop: float, start: dict[str, float]) -> list[dict]:
    """The candidates worth trying: more saving than the site's start, a drop within ``max_drop``."""
    return [c for c in candidates if c["saving"] > start.get(c["site"], 0.0) and c["drop"] <= max_drop]


def _slope(a: tuple, b: tuple) -> float:
    return (b[1] - a[1]) / (b[0] - a[0]) if b[0] > a[0] else math.inf


def _allocate(build, evaluate, base: Config, all_sites: list[str], candidates: list[dict], dense_batches: list,
              max_drop: float, margin: float, grid: _Grid, progress) -> tuple[Config, list[dict]]:
    """Verified on all the data: start from every site (of ``all_sites``) disabled, or in its lossless exact
    setting where it has one (if that verifies); bisect the :func:`upgrade_path` for its
    longest prefix within the budget; then try the upgrades after it one at a time, at most
    one try per site. A site whose upgrade fails gets no larger setting, but it does get a try
    of its most saving admissible setting below the failed one (the profile's drops are noisy)."""
    sites = {c["site"] for c in candidates}
    steps: list[dict] = []
    bar = tqdm(total=2 * len(sites) + 1, desc="allocating", disable=not progress)

    def apply(config: Config, c: dict) -> Config:
        settings = {"mode": c["mode"]} if c["mode"] == "exact" else {"mode": c["mode"], **c["settings"]}
        return config.with_site(c["site"], enabled=True, k=c["k"], **settings)

    def verify(config: Config, last: dict, phase: str) -> bool:
        compiled = build(config)
        compiled.reset_stats()
        value, trial_batches = evaluate.per_batch(compiled)
        drop, se = paired_drop(dense_batches, trial_batches)
        accepted = drop + margin * se <= max_drop
        settings = {k: last[k] for k in ("mode", grid.setting, "head_error") if k in last}
        steps.append({"site": last["site"], "k": last["k"], **settings, "phase": phase, "metric": value,
                      "drop": drop, "drop_se": se, "reduction": compiled.exprune_stats()["reduction"],
                      "accepted": accepted})
        bar.update(1)
        return accepted

    # a site without candidates (none the grid can tune) stays disabled
    start = dataclasses.replace(base, sites={s: SiteConfig(enabled=False) for s in all_sites})
    lossless = {c["site"]: c for c in candidates if c["mode"] == "exact" and c["saving"] > 0}  # one per site
    if lossless:
        trial = start
        for c in lossless.values():
            trial = apply(trial, c)
        if verify(trial, next(iter(lossless.values())), "start: every exact-capable site in exact mode"):
            start = trial
        else:
            lossless = {}
    saving = {s: c["saving"] for s, c in lossless.items()}  # each site's current setting
    path = upgrade_path(candidates, max_drop, saving)
    admissible = _admissible(candidates, max_drop, {})

    def prefix(n: int) -> Config:
        config = start
        for c in path[:n]:
            config = apply(config, c)
        return config

    good, bad = 0, len(path) + 1  # the longest verified prefix; the shortest failed one
    while bad - good > 1:
        mid = (good + bad) // 2
        if verify(prefix(mid), path[mid - 1], f"bisect: first {mid} of {len(path)} upgrades"):
            good = mid
        else:
            bad = mid
    config = prefix(good)
    saving.update({c["site"]: c["saving"] for c in path[:good]})
    ceiling: dict[str, float] = {}  # a site's failed saving: only settings below it are tried
    queue, tries = collections.deque(path[good:]), 0
    while queue and tries < len(sites):
        c = queue.popleft()
        site = c["site"]
        if c["saving"] >= ceiling.get(site, math.inf):
            continue
        known_failed = good < len(path) and c is path[good]  # the bisection's first failure
        if not known_failed:
            tries += 1
            trial = apply(config, c)
            if verify(trial, c, "one at a time"):
                config, saving[site] = trial, c["saving"]
                continue
        ceiling[site] = c["saving"]
        below = [o for o in admissible if o["site"] == site and saving.get(site, 0.0) < o["saving"] < c["saving"]]
        if below:
            queue.appendleft(max(below, key=lambda o: o["saving"]))
    bar.close()
    return config, steps
