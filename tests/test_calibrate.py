"""calibrate(): the budget holds on held-out data, the search is cheap and deterministic."""

import math

import pytest
import torch

import exprune_fx
from exprune_fx import InputError
from exprune_fx.calibrate import _allocate, _Grid, upgrade_path
from trained import trained_mlp


def batches(x, y, size=500):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


@pytest.fixture(scope="module")
def setup():
    model, (x, y) = trained_mlp(count=8000)
    val, test = batches(x[:4000], y[:4000]), batches(x[4000:], y[4000:])
    return model, val, test


def accuracy(model, data):
    with torch.no_grad():
        return sum((model(x).argmax(1) == y).sum().item() for x, y in data) / sum(len(y) for _, y in data)


def test_budget_is_respected_on_held_out_data(setup):
    model, val, test = setup
    compiled = exprune_fx.compile(model, val[0][0][:4])
    result = exprune_fx.calibrate(compiled, val, max_drop=0.005, ks=(16, 32), alphas=(0.01, 0.1, 0.3),
                                  hybrid=False, progress=False)
    report = result.report
    assert report["metric_drop"] <= 0.005  # on the calibration split, by construction
    assert accuracy(model, test) - accuracy(result.compiled, test) <= 0.005 + 0.005  # held out: budget + noise
    assert report["reduction"] > 0.0 and report["evaluations"] <= 100
    assert report["steps"] and all({"site", "k", "metric", "reduction", "phase"} <= set(s) for s in report["steps"])
    assert all("alpha" in s for s in report["steps"] if s["mode"] != "exact")
    assert report["oracle_reduction"] > 0
    chosen = result.config.for_site("linear_1")
    assert chosen.enabled and chosen.k in (16, 32)


def test_zero_budget_and_determinism(setup):
    model, val, _ = setup
    compiled = exprune_fx.compile(model, val[0][0][:4])
    first = exprune_fx.calibrate(compiled, val[:4], max_drop=0.0, ks=(16,), alphas=(0.05, 0.2), progress=False)
    again = exprune_fx.calibrate(compiled, lambda: val[:4], max_drop=0.0, ks=(16,), alphas=(0.05, 0.2), progress=False)
    assert first.config.for_site("linear_1").mode in ("exact", "hybrid")
    assert first.config == again.config
    assert first.report["metric_drop"] <= 0.0


def test_threshold_search(setup):
    model, val, _ = setup
    compiled = exprune_fx.compile(model, val[0][0][:4])
    result = exprune_fx.calibrate(compiled, val[:4], max_drop=0.01, ks=(32,), test="threshold",
                                  thresholds=(-0.05, 0.0), progress=False)
    assert result.report["metric_drop"] <= 0.01
    assert all(step["k"] == 32 and "threshold" in step for step in result.report["steps"] if step["mode"] != "exact")
    assert result.config.test == "threshold"


def test_magnitude_order_calibration(setup):
    """order="magnitude": every site the search chose reads its largest terms first (in
    hybrid mode where the site admits it), and the budget holds on the split and held out."""
    model, val, test = setup
    compiled = exprune_fx.compile(model, val[0][0][:4])
    result = exprune_fx.calibrate(compiled, val[:4], max_drop=0.01, ks=(16,), test="threshold",
                                  thresholds=(-0.1, -0.05, 0.0), order="magnitude", exact=False, progress=False)
    assert result.report["metric_drop"] <= 0.01
    assert accuracy(model, test) - accuracy(result.compiled, test) <= 0.01 + 0.005
    chosen = result.compiled.rewritten_sites
    assert chosen and all(s.order == "magnitude" and s.test in ("threshold", "threshold+exact") for s in chosen)
    assert result.report["reduction"] > 0


def test_sequential_test_calibration(setup):
    """stages=3: the chosen config carries the stages, the budget holds on the split."""
    model, val, _ = setup
    compiled = exprune_fx.compile(model, val[0][0][:4])
    result = exprune_fx.calibrate(compiled, val[:4], max_drop=0.01, ks=(8,), alphas=(0.05, 0.2), stages=3,
                                  progress=False)
    assert result.config.stages == 3 and result.report["metric_drop"] <= 0.01
    sites = result.compiled.exprune_stats()["sites"]
    assert sites and all(s["stages"] == 3 for s in sites.values())


def test_bad_arguments(setup):
    model, val, _ = setup
    compiled = exprune_fx.compile(model, val[0][0][:4])
    with pytest.raises(InputError, match="max_drop"):
        exprune_fx.calibrate(compiled, val, max_drop=-1)
    with pytest.raises(InputError, match="alpha"):
        exprune_fx.calibrate(compiled, val, alphas=(0.9,))
    with pytest.raises(InputError, match=r"\(inputs, labels\)"):
        exprune_fx.calibrate(compiled, [torch.zeros(3)])
    with pytest.raises(InputError, match="margin"):
        exprune_fx.calibrate(compiled, val, margin=-1)
    with pytest.raises(InputError, match="stages"):
        exprune_fx.calibrate(compiled, val, stages=0)
    with pytest.raises(InputError, match="test must be"):
        exprune_fx.calibrate(compiled, val, test="oracle")
    with pytest.raises(InputError, match="order='magnitude' needs test='threshold'"):
        exprune_fx.calibrate(compiled, val, order="magnitude")
    with pytest.raises(InputError, match="what exprune_fx.compile returned"):
        exprune_fx.calibrate(model, val)
    for bad in ((), (1.0,), (-0.1,), ("x",)):
        with pytest.raises(InputError, match="head_errors"):
            exprune_fx.calibrate(compiled, val, test="threshold", head_errors=bad)


def test_paired_drop_standard_error():
    from exprune_fx.calibrate import paired_drop

    dense = [(100, 0.9)] * 4
    assert paired_drop(dense, [(100, 0.9)] * 4) == (0.0, 0.0)
    mean, se = paired_drop(dense, [(100, 0.92), (100, 0.88), (100, 0.92), (100, 0.88)])
    assert mean == pytest.approx(0.0) and se > 0.01  # cancelling flips are not a free pass


def test_upgrade_path_follows_each_sites_convex_hull():
    """Dominated points, points under a chord and drops over budget are left out; a negative
    drop counts as zero; segments of all sites merge by saving per unit of drop."""
    c = [{"site": "a", "drop": 0.0, "saving": 1.0}, {"site": "a", "drop": 0.01, "saving": 1.1},
         {"site": "a", "drop": 0.02, "saving": 3.0}, {"site": "a", "drop": 0.03, "saving": 2.0},
         {"site": "a", "drop": 0.5, "saving": 9.0}, {"site": "b", "drop": -0.01, "saving": 0.5},
         {"site": "b", "drop": 0.05, "saving": 2.0}]
    path = upgrade_path(c, max_drop=0.1)
    assert [(u["site"], u["saving"]) for u in path] == [("a", 1.0), ("b", 0.5), ("a", 3.0), ("b", 2.0)]
    assert [u["saving"] for u in upgrade_path(c, max_drop=0.1, start={"a": 3.0})] == [0.5, 2.0]


class _Additive:
    """A stand-in model for _allocate: its metric drop is the sum of each enabled site's true
    drop (which the profile misjudged), measured on four equal batches."""

    def __init__(self, config, true_drop):
        self.drop = sum(true_drop[(name, sc.alpha)] for name, sc in config.sites.items() if sc.enabled)

    def reset_stats(self):
        pass

    def exprune_stats(self):
        return {"reduction": 0.0}


def test_allocation_falls_back_when_a_profiled_setting_fails_verification():
    true_drop = {("a", 0.05): 0.002, ("a", 0.2): 0.03, ("b", 0.05): 0.004, ("b", 0.2): 0.006}
    profiled = [{"site": s, "k": 16, "mode": "statistical", "alpha": a, "settings": {"alpha": a}, "drop": d,
                 "saving": saving}
                for (s, a, d, saving) in [("a", 0.05, 0.001, 1.0), ("a", 0.2, 0.002, 3.0),  # a at 0.2 looked safe
                                          ("b", 0.05, 0.003, 1.0), ("b", 0.2, 0.004, 1.5)]]

    class Evaluate:
        def per_batch(self, model):
            return 0.9 - model.drop, [(100, 0.9 - model.drop)] * 4

    config, steps = _allocate(lambda cfg: _Additive(cfg, true_drop), Evaluate(), exprune_fx.Config(k=16),
                              ["a", "b"], profiled, [(100, 0.9)] * 4, 0.01, 1.0, _Grid("alpha", (0.05, 0.2)),
                              False)
    chosen = {name: sc.alpha for name, sc in config.sites.items() if sc.enabled}
    assert chosen == {"a": 0.05, "b": 0.2}  # a's larger setting failed; its smaller one fits beside b's
    assert sum(true_drop[item] for item in chosen.items()) <= 0.01
    assert any(not step["accepted"] and step["site"] == "a" and step["alpha"] == 0.2 for step in steps)


def test_zero_budget_takes_the_lossless_exact_mode(setup):
    """With no drop allowed, the statistical settings that cost accuracy are refused and the
    exact mode (which the trained MLP's second ReLU site admits) is chosen: held-out
    predictions are unchanged and work is still saved."""
    model, val, test = setup
    compiled = exprune_fx.compile(model, val[0][0][:4])
    result = exprune_fx.calibrate(compiled, val, max_drop=0.0, ks=(16,), alphas=(0.2,), exact_k=8, hybrid=False,
                                  progress=False)
    assert result.config.for_site("linear_1").mode == "exact"
    assert result.report["reduction"] > 0
    with torch.no_grad():
        for x, _ in test:
            assert torch.equal(result.compiled(x).argmax(1), model(x).argmax(1))
    without = exprune_fx.calibrate(compiled, val, max_drop=0.0, ks=(16,), alphas=(0.2,), exact=False, hybrid=False,
                                   progress=False)
    assert without.config.for_site("linear_1").mode == "statistical"


def test_sites_that_admit_exact_mode_test_in_hybrid_mode(setup):
    """Where exact mode applies, the statistical settings are profiled and chosen in hybrid
    mode (the test, then exact early exit): the same predictions as the statistical setting
    it stands for, and at least its saving. hybrid=False profiles them statistically."""
    model, val, test = setup
    compiled = exprune_fx.compile(model, val[0][0][:4])
    kwargs = dict(max_drop=0.01, ks=(16,), alphas=(0.05,), exact=False, progress=False)
    result = exprune_fx.calibrate(compiled, val[:4], **kwargs)
    plain = exprune_fx.calibrate(compiled, val[:4], hybrid=False, **kwargs)
    chosen = result.config.for_site("linear_1")
    assert chosen.enabled and chosen.mode == "hybrid"
    assert all(step["mode"] == "hybrid" for step in result.report["steps"] if step["site"] == "linear_1")
    assert result.report["metric_drop"] <= 0.01
    assert plain.config.for_site("linear_1").mode == "statistical"
    as_statistical = exprune_fx.compile(model, val[0][0][:4], result.config.with_site("linear_1", mode="statistical"))
    with torch.no_grad():
        for x, _ in test:
            assert torch.equal(result.compiled(x).argmax(1), as_statistical(x).argmax(1))
    hybrid_sites, statistical_sites = result.compiled.exprune_stats()["sites"], as_statistical.exprune_stats()["sites"]
    assert hybrid_sites["linear_1"]["pruned"] > statistical_sites["linear_1"]["pruned"]


def test_calibration_keeps_zero_skip(setup):
    model, val, _ = setup
    compiled = exprune_fx.compile(model, val[0][0][:4], exprune_fx.Config(zero_skip=True))
    considered = [r.name for r in compiled.zero_skip]
    assert considered  # the trained MLP has linears fed by a ReLU
    result = exprune_fx.calibrate(compiled, val[:2], max_drop=0.01, ks=(16,), alphas=(0.05,), exact=False,
                                  progress=False)
    assert result.config.zero_skip
    assert [r.name for r in result.compiled.zero_skip] == considered


@pytest.mark.parametrize("kind", ["threshold", "fitted"])
def test_an_argmax_head_prunes_nothing_until_its_setting_is_chosen(setup, kind):
    """Under the threshold and fitted tests, a threshold of -inf prunes nothing at a ReLU site
    but stops every row of an argmax head (its margin reads the other way): the head must start
    at +inf, or the profile sees every ReLU setting fail (threshold) and the result misses its
    budget (fitted). The head's own grid is ``head_errors``, each a margin fitted on the
    profile subset; it is profiled and chosen like any other site's."""
    model, val, test = setup
    compiled = exprune_fx.compile(model, val[0][0][:4], outputs={"output": "argmax"})
    assert [r.decision for r in compiled.rewritten_sites] == ["relu", "argmax"]
    grid = {"thresholds": (-0.05, 0.0)} if kind == "threshold" else {"prices": (0.1, 0.4)}
    result = exprune_fx.calibrate(compiled, val[:4], max_drop=0.01, ks=(16,), test=kind, exact=False, hybrid=False,
                                  head_errors=(0.001, 0.01, 0.05), progress=False, **grid)
    assert result.report["metric_drop"] <= 0.01
    assert accuracy(model, test) - accuracy(result.compiled, test) <= 0.01 + 0.01
    assert result.config.for_site("linear_1").enabled and result.report["reduction"] > 0.05
    head = result.config.for_site("linear_2")
    head_steps = [s for s in result.report["steps"] if s["site"] == "linear_2"]
    assert all("head_error" in s for s in head_steps)
    if head.enabled:
        assert head_steps and 0 <= head.threshold < math.inf  # a fitted margin: the leader's advantage is >= 0