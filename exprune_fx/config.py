"""``Config``: how each site tests its partial reduction.

* ``k`` (default 32): terms computed before the test; a site with ``n <= k`` stays dense.
* ``test``: ``"stats"`` (one-sided z-test with the finite-population correction, pruning an
  output when ``mean < Phi^-1(alpha) * SE``) or ``"threshold"`` (pruning when
  ``mean < threshold``).
* ``alpha`` in [0, 0.5] for the stats test (0 prunes nothing); ``threshold`` any float,
  plus or minus infinity allowed (+inf prunes every decided output, -inf nothing).
* ``stages`` (default 1): the sequential test. ReLU sites test at k terms, then test the
  outputs left undecided again at 2k, 4k, ... (``stages`` tests in all, each below n),
  each at the same critical value (an output's false-prune probability is at most
  ``stages`` times one test's). Argmax sites test once.
* ``mode``: ``"statistical"`` (default: the tests above) or ``"exact"``, the lossless mode:
  at ReLU sites whose input is provably non-negative, each output sums its positive (folded)
  terms first, then its negative terms, most negative first, ``k`` at a time, and stops once
  the running sum is negative (it can only fall further, and the ReLU makes it 0). No test,
  no accuracy change, no exchangeability needed; ``test``, ``alpha``, ``threshold`` and
  ``stages`` do not apply, ``k`` is the check interval. Or ``"hybrid"``, both at once, at
  the same ReLU sites (exchangeable and with a provably non-negative input): the statistical
  test at ``k`` terms (``stages`` does not apply), then, for every output it did not prune,
  the remaining terms sign-ordered as in exact mode, checked every ``interval`` terms. It
  prunes exactly what the statistical test prunes (the same accuracy) and saves at least as
  much: a kept output that turns out negative stops early instead of running to the end.
* ``order`` (default ``"natural"``): which terms come first. ``"natural"`` is the
  contraction's own order, an exchangeable one: the first k terms are a sample of the n, as the
  stats test assumes. ``"magnitude"`` (statistical or hybrid mode, threshold test, one stage) reads
  each output's k terms of largest weight magnitude first (a conv term's magnitude is its
  window's L1 norm), fixed at compile time per output. Those terms are not a random sample,
  so the stats test's alpha would not mean what it says and is refused; the threshold
  test's value is calibrated on data instead (:func:`exprune_fx.calibrate`). On the
  Fashion-MNIST ResNet this predicts the sign from 8 of 32-64 channels far better than the
  natural order (docs/benchmarks.md). It applies to ReLU sites whose terms are single
  elements (linear, or groups-1 convolutions over whole channels) with a compile-time
  weight; other sites keep the natural order, and each site's report says which it uses.
* ``thresholds`` (per site only, default None): one threshold per output feature (linear) or
  output channel (convolution) of a ReLU site with a compile-time weight, in place of the
  site's single ``threshold`` (threshold test; statistical or hybrid mode). Outputs differ in
  scale and in how well k terms predict them, so one value per site is a compromise;
  :func:`exprune_fx.calibrate` fits these from data (``test="fitted"``). ``-inf`` never
  prunes that output.
* ``interval`` (default 32): the check interval of hybrid mode's exact remainder (every
  check is counted, so a short interval pays more checks than it saves).
* ``sites``: per-site overrides keyed by site name, each a :class:`SiteConfig` or a dict
  with any of ``enabled``, ``k``, ``test``, ``alpha``, ``threshold``, ``thresholds``,
  ``stages``, ``mode``, ``interval``, ``order``.
* ``zero_skip`` (default False): zero-skip propagation (``passes/zero_skip.py``). After the
  ExPrune rewrite, every linear layer with a static weight whose input is a ReLU output
  (an ExPrune site's, or a plain ReLU's) sums only the weight rows of its nonzero inputs
  when that pays. Exact up to float summation order; with every site disabled it is plain
  ReLU-sparsity skipping, without ExPrune. A whole-model setting, not a per-site one.

For an argmax (dominance) site, ``alpha`` is the family-wise error of the row's decision,
split over the other classes by Bonferroni; ``threshold`` is a margin on the mean per-term
difference between the leader and each other class.

Example:
    >>> from exprune_fx import Config
    >>> cfg = Config(k=16, alpha=0.01, sites={"linear_2": {"enabled": False}})
    >>> cfg.for_site("linear_2").enabled, cfg.for_site("linear_1").k
    (False, 16)
    >>> Config(k=1)
    Traceback (most recent call last):
    ...
    exprune_fx.errors.InputError: Config.k must be an integer >= 2 (got 1)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from statistics import NormalDist
from typing import Any, Mapping, Sequence

import torch

from .errors import InputError

TESTS = ("stats", "threshold")
MODES = ("statistical", "exact", "hybrid")
ORDERS = ("natural", "magnitude")


def _check_mode(mode: Any, where: str) -> None:
    if mode not in MODES:
        raise InputError(f"{where}.mode must be one of {MODES} (got {mode!r})")


def _check_k(k: Any, where: str) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise InputError(f"{where}.k must be an integer >= 2 (got {k!r})")


def _check_alpha(alpha: Any, where: str) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 0.5:
        raise InputError(f"{where}.alpha must be a float in [0, 0.5] (got {alpha!r})")


def _check_threshold(threshold: Any, where: str) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold):
        raise InputError(f"{where}.threshold must be a float, +/-inf allowed (got {threshold!r})")


def _check_stages(stages: Any, where: str) -> None:
    if isinstance(stages, bool) or not isinstance(stages, int) or not 1 <= stages <= 8:
        raise InputError(f"{where}.stages must be an integer in [1, 8] (got {stages!r})")


def _check_interval(interval: Any, where: str) -> None:
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise InputError(f"{where}.interval must be an integer >= 1 (got {interval!r})")


def _check_order(order: Any, where: str) -> None:
    if order not in ORDERS:
        raise InputError(f"{where}.order must be one of {ORDERS} (got {order!r})")


def _check_thresholds(thresholds: Any, where: str) -> tuple[float, ...]:
    """One float per output, +/-inf allowed; returned as a tuple of floats."""
    if isinstance(thresholds, torch.Tensor):
        thresholds = thresholds.detach().cpu().reshape(-1).tolist()
    if isinstance(thresholds, (str, bytes)) or not isinstance(thresholds, Sequence) or not thresholds:
        raise InputError(f"{where}.thresholds must be a non-empty sequence of floats, one per output "
                         f"(got {type(thresholds).__name__})")
    for i, t in enumerate(thresholds):
        if isinstance(t, bool) or not isinstance(t, (int, float)) or math.isnan(t):
            raise InputError(f"{where}.thresholds[{i}] must be a float, +/-inf allowed (got {t!r})")
    return tuple(float(t) for t in thresholds)


def _check_combination(resolved: "ResolvedSiteConfig", where: str) -> None:
    """Settings that are valid alone but not together."""
    if resolved.thresholds is not None and resolved.mode != "exact" and resolved.test != "threshold":
        raise InputError(f"{where}: thresholds (per output) need test='threshold' (got test={resolved.test!r})")
    if resolved.thresholds is not None and resolved.stages != 1 and resolved.mode == "statistical":
        raise InputError(f"{where}: thresholds (per output) are fitted for one test (stages=1, got {resolved.stages})")
    if resolved.order != "magnitude" or resolved.mode == "exact":
        return
    if resolved.test != "threshold":
        raise InputError(f"{where}: order='magnitude' needs test='threshold': the largest terms are not a random "
                         f"sample, so the stats test's alpha would not bound the false-prune rate")
    if resolved.stages != 1 and resolved.mode == "statistical":
        raise InputError(f"{where}: order='magnitude' tests once (stages=1, got {resolved.stages})")


def _check_test(test: Any, where: str) -> None:
    if test not in TESTS:
        raise InputError(f"{where}.test must be one of {TESTS} (got {test!r})")


@dataclass(frozen=True)
class SiteConfig:
    """The settings of one site; None means "as in the Config"."""

    enabled: bool | None = None
    k: int | None = None
    test: str | None = None
    alpha: float | None = None
    threshold: float | None = None
    stages: int | None = None
    mode: str | None = None
    interval: int | None = None
    order: str | None = None
    thresholds: tuple[float, ...] | None = None

    def __post_init__(self):
        where = "SiteConfig"
        if self.thresholds is not None:
            object.__setattr__(self, "thresholds", _check_thresholds(self.thresholds, where))
        if self.order is not None:
            _check_order(self.order, where)
        if self.interval is not None:
            _check_interval(self.interval, where)
        if self.mode is not None:
            _check_mode(self.mode, where)
        if self.enabled is not None and not isinstance(self.enabled, bool):
            raise InputError(f"{where}.enabled must be True or False (got {self.enabled!r})")
        if self.k is not None:
            _check_k(self.k, where)
        if self.test is not None:
            _check_test(self.test, where)
        if self.alpha is not None:
            _check_alpha(self.alpha, where)
        if self.threshold is not None:
            _check_threshold(self.threshold, where)
        if self.stages is not None:
            _check_stages(self.stages, where)


@dataclass(frozen=True)
class ResolvedSiteConfig:
    enabled: bool
    k: int
    test: str
    alpha: float
    threshold: float
    stages: int = 1
    mode: str = "statistical"
    interval: int = 32
    order: str = "natural"
    thresholds: tuple[float, ...] | None = None

    @property
    def critical(self) -> float:
        """The value the op compares against: Phi^-1(alpha) (stats) or the threshold (the
        per-output ``thresholds``, where given, replace it at a ReLU site)."""
        if self.test == "threshold":
            return float(self.threshold)
        return -math.inf if self.alpha <= 0 else NormalDist().inv_cdf(self.alpha)

    def dominance_critical(self, classes: int) -> float:
        """z such that leader-minus-other means above z * SE are significant (Bonferroni)."""
        if self.test == "threshold":
            return float(self.threshold)
        if self.alpha <= 0:
            return math.inf
        return NormalDist().inv_cdf(1.0 - self.alpha / max(classes - 1, 1))


@dataclass(frozen=True)
class Config:
    """Global settings plus per-site overrides. See the module docstring."""

    k: int = 32
    test: str = "stats"
    alpha: float = 0.05
    threshold: float = 0.0
    sites: Mapping[str, SiteConfig] = field(default_factory=dict)
    stages: int = 1
    mode: str = "statistical"
    zero_skip: bool = False
    interval: int = 32
    order: str = "natural"

    def __post_init__(self):
        _check_k(self.k, "Config")
        _check_order(self.order, "Config")
        if not isinstance(self.zero_skip, bool):
            raise InputError(f"Config.zero_skip must be True or False (got {self.zero_skip!r})")
        _check_mode(self.mode, "Config")
        _check_interval(self.interval, "Config")
        _check_stages(self.stages, "Config")
        _check_test(self.test, "Config")
        _check_alpha(self.alpha, "Config")
        _check_threshold(self.threshold, "Config")
        if not isinstance(self.sites, Mapping):
            raise InputError("Config.sites must map site names to SiteConfig or dicts")
        sites = {}
        for name, sc in self.sites.items():
            if isinstance(sc, Mapping):
                unknown = set(sc) - {f.name for f in fields(SiteConfig)}
                if unknown:
                    raise InputError(f"Config.sites[{name!r}] has unknown settings {sorted(unknown)}")
                sc = SiteConfig(**sc)
            if not isinstance(sc, SiteConfig):
                raise InputError(f"Config.sites[{name!r}] must be a SiteConfig or a dict")
            sites[name] = sc
        object.__setattr__(self, "sites", sites)
        _check_combination(self.for_site(""), "Config")  # "" names no site (fx names are non-empty): the globals
        for name in sites:
            _check_combination(self.for_site(name), f"Config.sites[{name!r}]")

    def for_site(self, name: str) -> ResolvedSiteConfig:
        sc = self.sites.get(name, SiteConfig())
        pick = lambda v, d: d if v is None else v  # noqa: E731
        return ResolvedSiteConfig(pick(sc.enabled, True), pick(sc.k, self.k), pick(sc.test, self.test),
                                  pick(sc.alpha, self.alpha), pick(sc.threshold, self.threshold),
                                  pick(sc.stages, self.stages), pick(sc.mode, self.mode),
                                  pick(sc.interval, self.interval), pick(sc.order, self.order), sc.thresholds)

    def with_site(self, name: str, **settings: Any) -> "Config":
        """A copy with ``settings`` overriding site ``name`` (a new ``threshold`` drops the
        site's per-output ``thresholds``, unless they are given too)."""
        if "threshold" in settings:
            settings.setdefault("thresholds", None)
        sites = dict(self.sites)
        sites[name] = replace(sites.get(name, SiteConfig()), **settings)
        return replace(self, sites=sites)

    def unknown_sites(self, names) -> list[str]:
        return sorted(set(self.sites) - set(names))
