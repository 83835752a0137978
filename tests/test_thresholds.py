"""Per-output thresholds: SiteConfig(thresholds=...), the kernels that take them, the
recording they are fitted from, the fit itself, and calibrate(test="fitted")."""

import dataclasses
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import exprune_fx
from exprune_fx import Config, ExPruneWarning, InputError, SiteConfig
from exprune_fx.fitting import fit_margin, fit_thresholds
from exprune_fx.runtime import fast, observe
from exprune_fx.zoo import residual_cnn
from test_calibrate import accuracy, setup  # noqa: F401  (the module-scoped fixture)
from test_exact import compile_quietly

NEVER = -math.inf


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 96), nn.ReLU(), nn.Linear(96, 80), nn.ReLU(), nn.Linear(80, 64), nn.ReLU(),
                         nn.Linear(64, 5)).eval()


def _cnn():
    return residual_cnn(seed=0)[0]


MODELS = {"mlp": (_mlp, lambda: torch.randn(40, 12)), "cnn": (_cnn, lambda: torch.randn(6, 1, 28, 28))}


def _drawn_thresholds(statistic: torch.Tensor, generator) -> list[float]:
    """Per output: -inf for about a third, else a quantile of its own statistic (so that some
    of its samples fall below and some above)."""
    q = torch.rand(statistic.shape[0], generator=generator, dtype=torch.float64) * 0.8 + 0.1
    values = torch.quantile(statistic.double(), q, dim=1).diagonal()
    values[torch.rand(statistic.shape[0], generator=generator) < 0.33] = NEVER
    return values.tolist()


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("order", ["natural", "magnitude"])
def test_each_output_prunes_where_its_own_statistic_is_below_its_threshold(name, order):
    """One site at a time (a site's pruning changes the inputs of the sites after it): the
    count of pruned outputs is what the recorded statistics and drawn per-output thresholds
    say, output by output (a threshold applied along the wrong axis would give other
    counts), in statistical mode under the reference and the fast kernels; hybrid mode prunes
    the same outputs (the same model outputs)."""
    build, inputs = MODELS[name]
    model, x = build(), inputs()
    base = Config(k=8, test="threshold", threshold=NEVER, order=order)
    statistical = compile_quietly(model, x, base)
    hybrid = compile_quietly(model, x, dataclasses.replace(base, mode="hybrid"))
    with observe.recording(per_call=1 << 30) as record:
        statistical(x)
    generator = torch.Generator().manual_seed(1)
    assert statistical.rewritten_sites
    for report in statistical.rewritten_sites:
        statistic, _ = record.samples(getattr(statistical.graph_module, report.counters))
        assert report.per_output == statistic.shape[0]
        thresholds = _drawn_thresholds(statistic, generator)
        expected = int((statistic < torch.tensor(thresholds, dtype=torch.float32)[:, None]).sum())
        statistical.retune(report.name, thresholds=thresholds)
        results = {}
        for setting in ("reference", "fast"):
            with fast.use(setting):
                statistical.reset_stats()
                results[setting] = statistical(x)
                counted = statistical.exprune_stats()["sites"][report.name]["pruned"]
                if order == "natural":
                    assert counted == expected, (report.name, setting)
                else:  # magnitude order's cost rule may leave a few outputs untested
                    assert 0 < counted <= expected, (report.name, setting)
        torch.testing.assert_close(results["fast"], results["reference"], rtol=1e-4, atol=1e-4)
        assert "per-output thresholds" in statistical.report()
        if report.name in {r.name for r in hybrid.rewritten_sites}:
            hybrid.retune(report.name, thresholds=thresholds)
            torch.testing.assert_close(hybrid(x), results["reference"], rtol=1e-4, atol=1e-4)
            hybrid.retune(report.name, threshold=NEVER)
        statistical.retune(report.name, threshold=NEVER)


def test_thresholds_are_validated():
    model, x = _mlp(), torch.randn(4, 12)
    with pytest.raises(InputError, match="thresholds has 3 values; the site has 80 outputs"):
        compile_quietly(model, x, Config(test="threshold", k=8, sites={"linear_1": {"thresholds": [0.0] * 3}}))
    with pytest.raises(InputError, match="need test='threshold'"):
        Config(sites={"linear_1": {"thresholds": [0.0] * 80}})
    with pytest.raises(InputError, match="stages=1"):
        Config(test="threshold", stages=2, sites={"linear_1": {"thresholds": [0.0] * 80}})
    with pytest.raises(InputError, match=r"thresholds\[1\] must be a float"):
        SiteConfig(thresholds=[0.0, float("nan")])
    with pytest.raises(InputError, match="non-empty sequence"):
        SiteConfig(thresholds="0.1")
    compiled = compile_quietly(model, x, Config(test="threshold", k=8))
    with pytest.raises(InputError, match="has 80 outputs; got 2 thresholds"):
        compiled.retune("linear_1", thresholds=[0.0, 0.0])


def _compile_head(model, x, config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExPruneWarning)
        names = exprune_fx.analyze(model, x).outputs
        return exprune_fx.compile(model, x, config, outputs={name: "argmax" for name in names})


def test_argmax_sites_take_no_per_output_thresholds():
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    x = torch.randn(4, 8)
    compiled = _compile_head(head, x, Config(k=8, test="threshold"))
    argmax = [r for r in compiled.rewritten_sites if r.decision == "argmax"]
    assert argmax and argmax[0].per_output is None
    with pytest.raises(InputError, match="apply to ReLU sites"):
        compiled.retune(argmax[0].name, thresholds=[0.0] * 10)
    with pytest.raises(InputError, match="apply to ReLU sites"):
        _compile_head(head, x, Config(k=8, test="threshold", sites={argmax[0].name: {"thresholds": [0.0] * 10}}))


def test_retune_switches_between_one_threshold_and_one_per_output():
    model, x = _mlp(), torch.randn(64, 12)
    compiled = compile_quietly(model, x, Config(k=8, test="threshold", threshold=0.0))
    one = compiled(x)
    compiled.retune("linear_1", thresholds=[0.0] * 80)
    assert torch.equal(compiled(x), one)
    compiled.retune("linear_1", thresholds=[NEVER] * 80)
    compiled.retune("linear_2", thresholds=[NEVER] * 64)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
    assert compiled.config.for_site("linear_1").thresholds == (NEVER,) * 80
    compiled.retune("linear_1", threshold=0.0)  # one value again: the per-output ones are dropped
    assert compiled.config.for_site("linear_1").thresholds is None
    again = exprune_fx.compile(model, x, compiled.config)
    assert torch.equal(again(x), compiled(x))


def test_thresholds_are_saved_and_loaded(tmp_path):
    model, x = _mlp(), torch.randn(16, 12)
    thresholds = [NEVER if i % 3 == 0 else -0.05 * (i % 5) for i in range(80)]
    compiled = compile_quietly(model, x, Config(k=8, test="threshold", sites={"linear_1": {"thresholds": thresholds}}))
    path = tmp_path / "m.pt2"
    exprune_fx.save(compiled, path)
    loaded = exprune_fx.load(path, model=model)
    assert loaded.config.for_site("linear_1").thresholds == tuple(thresholds)
    assert torch.equal(loaded(x), compiled(x))


def _objective(statistic, lost, threshold, scale):
    return float((1 - lost / scale)[statistic < threshold].sum())


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 30), st.floats(0.05, 3.0), st.integers(0, 10_000))
def test_each_fitted_threshold_is_the_best_cut_of_its_own_samples(outputs, samples, price, seed):
    """Against brute force over every cut point: no threshold gains more for its output, and
    an output where no cut gains is never pruned. A larger price never prunes less."""
    g = torch.Generator().manual_seed(seed)
    statistic = torch.randn(outputs, samples, generator=g).double()
    z = (statistic + 0.7 * torch.randn(outputs, samples, generator=g)).double()
    fitted = fit_thresholds(statistic, z, price).double()
    lost = z.clamp_min(0)
    scale = price * max(float(lost.mean()), 1e-30)
    for j in range(outputs):
        cuts = torch.cat([statistic[j].sort().values + 1e-9, torch.tensor([-math.inf])])
        best = max(_objective(statistic[j], lost[j], t, scale) for t in cuts)
        assert _objective(statistic[j], lost[j], fitted[j], scale) == pytest.approx(best, abs=1e-9)
        if best <= 0:
            assert fitted[j] == NEVER
    more = fit_thresholds(statistic, z, price * 2).double()
    assert bool((more >= fitted).all())


def test_fit_rejects_bad_inputs():
    with pytest.raises(ValueError, match="price"):
        fit_thresholds(torch.zeros(2, 3), torch.zeros(2, 3), 0.0)
    with pytest.raises(ValueError, match=r"\[outputs, samples\]"):
        fit_thresholds(torch.zeros(2, 3), torch.zeros(3, 2), 0.1)


def test_an_argmax_head_records_its_leaders_smallest_advantage_and_whether_it_is_final():
    """What the argmax kernel records is recomputed by hand from the head's input; a margin
    fitted at an error rate then stops exactly the rows whose statistic exceeds it, and at
    most that fraction of rows change their argmax (on the data it was fitted on)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    x = torch.randn(400, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExPruneWarning)
        compiled = exprune_fx.compile(model, x[:4], Config(k=8, test="threshold", sites={
            "linear": SiteConfig(enabled=False), "linear_1": SiteConfig(threshold=math.inf)}), {"output": "argmax"})
    head = compiled.rewritten_sites[0]
    assert head.decision == "argmax"
    with observe.recording(per_call=1 << 30) as record:
        compiled(x)
    statistic, final = record.samples(getattr(compiled.graph_module, head.counters))
    with torch.no_grad():
        h = model[1](model[0](x))
        w, b = model[2].weight, model[2].bias
        partial = h[:, :8] @ w[:, :8].T + b * (8 / 64)
        leader = partial.argmax(1, keepdim=True)
        advantage = ((partial.gather(1, leader) - partial) / 8).scatter(1, leader, math.inf).amin(1)
    torch.testing.assert_close(statistic[0], advantage, rtol=1e-5, atol=1e-6)
    assert torch.equal(final[0].bool(), leader.squeeze(1) == model(x).argmax(1))
    assert 0 < int(final.sum()) < len(x)  # both kinds of rows occur
    for error in (0.0, 0.02, 0.1):
        margin = fit_margin(statistic, final, error)
        compiled.retune("linear_1", threshold=margin)
        compiled.reset_stats()
        with fast.use("reference"):
            changed = int((compiled(x).argmax(1) != model(x).argmax(1)).sum())
        assert compiled.exprune_stats()["sites"]["linear_1"]["pruned"] == int((statistic > margin).sum()) > 0
        assert changed <= error * len(x) + 1e-9


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([0.0, 0.1, 0.2, 0.3, 0.5, 1.0]), min_size=1, max_size=25),
       st.integers(0, 10_000), st.floats(0.0, 0.5))
def test_a_fitted_margin_stops_the_most_rows_within_the_error(values, seed, error):
    """Against brute force over every cut (ties included: tied rows stop together): the
    margin stops the largest set of top rows whose wrong leaders are at most ``error`` of all
    rows, and nothing when even the top group has too many."""
    g = torch.Generator().manual_seed(seed)
    statistic = torch.tensor(values)
    final = (torch.rand(len(values), generator=g) < 0.7).float()
    margin = fit_margin(statistic, final, error)
    stopped = statistic > margin
    assert float((1 - final)[stopped].sum()) <= error * len(values) + 1e-9
    feasible = [int((statistic >= t).sum()) for t in statistic.unique()
                if float((1 - final)[statistic >= t].sum()) <= error * len(values) + 1e-9]
    assert int(stopped.sum()) == max(feasible, default=0)
    assert bool((fit_margin(statistic, final, min(error * 2, 0.99)) <= margin))


def test_fit_margin_rejects_bad_inputs():
    with pytest.raises(ValueError, match="error"):
        fit_margin(torch.zeros(3), torch.ones(3), 1.0)
    with pytest.raises(ValueError, match="same non-empty size"):
        fit_margin(torch.zeros(3), torch.ones(2), 0.1)


def test_recording_keeps_at_most_per_call_samples_and_does_not_nest():
    model, x = _mlp(), torch.randn(50, 12)
    compiled = compile_quietly(model, x, Config(k=8, test="threshold", threshold=NEVER))
    with observe.recording(per_call=16) as record:
        compiled(x)
        compiled(x)
        with pytest.raises(RuntimeError, match="nest"):
            with observe.recording():
                pass
    statistic, z = record.samples(getattr(compiled.graph_module, compiled.rewritten_sites[0].counters))
    assert statistic.shape == z.shape == (80, 32)
    assert not observe.active()


def test_fitted_calibration_respects_the_budget(setup):  # noqa: F811
    """test="fitted": the chosen sites carry one threshold per output, fitted on the data;
    the budget holds on the calibration split and, within noise, held out."""
    model, val, test = setup
    compiled = exprune_fx.compile(model, val[0][0][:4])
    result = exprune_fx.calibrate(compiled, val[:4], max_drop=0.01, ks=(16,), test="fitted", prices=(0.1, 0.4),
                                  exact=False, progress=False)
    assert result.report["metric_drop"] <= 0.01
    assert accuracy(model, test) - accuracy(result.compiled, test) <= 0.01 + 0.005
    chosen = [r for r in result.compiled.rewritten_sites]
    assert chosen and result.report["reduction"] > 0
    assert all(result.config.for_site(r.name).thresholds is not None for r in chosen if r.test != "exact")
    assert all("price" in s for s in result.report["steps"] if s["mode"] != "exact")
    with pytest.raises(InputError, match="prices"):
        exprune_fx.calibrate(compiled, val[:1], test="fitted", prices=(0.0,))
    with pytest.raises(InputError, match="stages=1"):
        exprune_fx.calibrate(compiled, val[:1], test="fitted", stages=2)
