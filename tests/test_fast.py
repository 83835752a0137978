"""The fast CPU kernels against the reference kernels: same outputs, same decisions, same
counters (except ``computed``, the work actually spent), on generated shapes and masks."""

import math
import warnings

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import exprune_fx
from exprune_fx import Config, InputError
from exprune_fx.runtime import fast, kernels
from exprune_fx.runtime.counters import FIELDS, INDEX, new_counters, read
from exprune_fx.zoo import mlp

NEVER, ALWAYS = -math.inf, math.inf
pytestmark = pytest.mark.skipif(fast.module() is None, reason="the fast kernels could not be built here")


def _both(x, w, scale, offset, unit, k, test, critical, stages):
    """(output, counters) of the reference and of the fast kernel."""
    results = []
    for setting in ("reference", "fast"):
        c = new_counters()
        with fast.use(setting):
            z = kernels.relu_linear(x, w, scale, offset, unit, k, test, torch.tensor(critical, dtype=torch.float64),
                                    c, stages)
        results.append((z, read(c)))
    return results


def _weight(outputs: int, columns: int, strided: bool) -> torch.Tensor:
    """An integer-valued weight [outputs, columns]; ``strided``: a column range of a wider
    tensor (rows contiguous, row stride larger than the row), as a reordered layout may be."""
    w = torch.randint(-3, 4, (outputs, columns + (5 if strided else 0))).float()
    return w[:, 2:2 + columns] if strided else w


def _boundary_margin(x, w, scale, offset, unit, k, n, test, critical) -> float:
    """The smallest distance, in float64, of any output's test statistic from its critical value."""
    x, w, a = x.double(), w.double(), scale.double()
    s1, s2 = kernels._term_sums(x[:, :k * unit], w[:, :k * unit], k, unit, test)
    c = kernels._flatten_offset(offset, (x.shape[0], w.shape[0]), x.shape[0], w.shape[0], x)
    mean = kernels._term_mean(s1, a, c, k, n)
    if test == kernels.THRESHOLD:
        return float((mean - critical).abs().min()) if mean.numel() else math.inf
    se = (a * a * (s2 - s1 * s1 / k).clamp_min(0) / (k - 1) / k * ((n - k) / (n - 1))).sqrt()
    return float((mean - critical * se).abs().min()) if mean.numel() else math.inf


def _offsets(outputs: int, lead: tuple):
    return {"none": None, "scalar": torch.tensor(3.0), "vector": torch.randint(-6, 7, (outputs,)).float(),
            "full": torch.randint(-6, 7, lead + (outputs,)).float()}


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 11), st.integers(1, 40), st.integers(1, 3), st.integers(3, 70), st.integers(1, 3),
       st.sampled_from([kernels.STATS, kernels.THRESHOLD]), st.sampled_from(["none", "scalar", "vector", "full"]),
       st.sampled_from(["drawn", "empty", "full"]), st.data())
def test_fast_relu_linear_equals_reference(rows, outputs, unit, n, stages, test, offset_kind, mask, data):
    """Integer-valued data (exact sums) and power-of-two scales: the two kernels must agree on
    every decision and every kept value, with nothing pruned (empty mask), everything pruned
    (full mask) and a drawn critical value; also with leading batch axes and zero rows."""
    k = data.draw(st.integers(2, n - 1))
    torch.manual_seed(data.draw(st.integers(0, 10_000)))
    lead = (rows,) if data.draw(st.booleans()) or rows == 0 else (1, rows)
    x = torch.randint(-3, 4, lead + (n * unit,)).float()
    w = _weight(outputs, n * unit, data.draw(st.booleans()))
    scale = 2.0 ** torch.randint(-2, 3, (outputs,)).float()
    offset = _offsets(outputs, lead)[offset_kind]
    critical = {"empty": NEVER, "full": ALWAYS, "drawn": data.draw(st.integers(-3, 1)) + 0.37}[mask]
    (zr, cr), (zf, cf) = _both(x, w, scale, offset, unit, k, test, critical, stages)
    assert zf.shape == zr.shape == lead + (outputs,)
    assert torch.equal(zf == 0, zr == 0)
    torch.testing.assert_close(zf, zr, rtol=0, atol=1e-4)
    assert {f: v for f, v in cr.items() if f != "computed"} == {f: v for f, v in cf.items() if f != "computed"}
    assert cf["computed"] <= cr["computed"] + 1e-9  # the fast kernel never spends more than the reference
    if mask == "full" and test == kernels.THRESHOLD:  # (stats: a zero standard error keeps the output)
        assert cf["pruned"] == cf["outputs"] and cf["remainder"] == 0
    if mask == "empty":
        assert cf["pruned"] == 0


def test_fast_relu_linear_on_float_data_nothing_or_everything_pruned():
    """Real-valued data: with the decisions fixed (never / always prune) the outputs agree to
    float rounding, including on a layer wide enough to be split over threads."""
    torch.manual_seed(0)
    x, w = torch.randn(3, 784), torch.randn(1024, 784)
    scale, offset = torch.rand(1024) + 0.5, torch.randn(1024)
    (zr, _), (zf, cf) = _both(x, w, scale, offset, 1, 16, kernels.STATS, NEVER, 1)
    torch.testing.assert_close(zf, zr, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(zf, scale * (x @ w.T) + offset, rtol=1e-5, atol=1e-4)
    assert cf["computed"] == cf["partial"] + cf["test"] + cf["remainder"]
    (_, _), (zf, cf) = _both(x, w, scale, offset, 1, 16, kernels.THRESHOLD, ALWAYS, 1)
    assert torch.all(zf == 0) and cf["computed"] == 3 * 1024 * (16 + 2)


def test_compiled_model_is_the_same_under_every_kernel_setting():
    model, x = mlp(widths=(16, 256, 256, 256, 4))
    x = torch.randint(-2, 3, (5, 16)).float()
    compiled = exprune_fx.compile(model, x, Config(alpha=0.2, k=8))
    outs, stats = {}, {}
    for setting in ("reference", "fast", "auto"):
        with fast.use(setting):
            compiled.reset_stats()
            outs[setting] = compiled(x)
            stats[setting] = sum(s["pruned"] for s in compiled.exprune_stats()["sites"].values())
    torch.testing.assert_close(outs["fast"], outs["reference"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outs["auto"], outs["reference"], rtol=1e-4, atol=1e-4)
    assert stats["fast"] == stats["reference"] == stats["auto"] > 0


def test_cost_model_uses_the_measured_survivor_share():
    stats = new_counters()
    with fast.use("auto"):
        assert fast.choose(1, 0.02, stats) == fast.choose(8, 0.02, stats) == fast.ROW  # before any call: survivors 1
        assert fast.choose(32, 0.02, stats) == fast.BLAS
        stats[1], stats[2] = 100.0, 90.0  # 10% of outputs kept so far
        assert fast.choose(32, 0.02, stats) == fast.ROW and fast.choose(200, 0.02, stats) == fast.BLAS
    with fast.use("fastest"):
        assert fast.choose(1, 0.02, stats, 1024) == fast.ROW and fast.choose(200, 0.02, stats, 1024) == fast.DENSE
        # nothing pruned yet: each row reads the whole weight plus the fixed cost of its outputs
        rows = int(fast.DENSE_BUDGET / (1 + fast.OUTPUT_COST / 1024))
        assert fast.choose(rows, 0.02, new_counters(), 1024) == fast.ROW
        assert fast.choose(rows + 1, 0.02, new_counters(), 1024) == fast.DENSE
        assert fast.choose(1, 0.02, stats, fast.MIN_TERMS - 1) == fast.DENSE  # a short row: never row-wise
        assert fast.choose(1, 0.02, stats, fast.MIN_TERMS) == fast.ROW
    with fast.use("fast"):
        assert fast.choose(10_000, 1.0, new_counters()) == fast.ROW


def test_cost_model_ignores_outputs_of_calls_run_dense():
    """Calls run dense prune nothing because they test nothing: their outputs are no evidence
    about the survivor share, so a site that ran dense on big calls still sees its measured
    share (counted over the outputs it tested) and can go back to the row-wise kernel."""
    stats = new_counters()
    stats[INDEX["outputs"]], stats[INDEX["untested"]], stats[INDEX["pruned"]] = 1000.0, 900.0, 90.0  # 10% kept of 100
    with fast.use("auto"):
        assert fast.choose(32, 0.02, stats) == fast.ROW  # 32 x (0.02 + 0.98 x 0.1) = 3.8 reads <= 8
    stats[INDEX["untested"]] = 0.0  # the same counts as if all 1000 had been tested: 91% kept
    with fast.use("auto"):
        assert fast.choose(32, 0.02, stats) == fast.BLAS
    stats[INDEX["untested"]], stats[INDEX["pruned"]] = 1000.0, 0.0  # nothing tested yet: survivors 1, as before any call
    with fast.use("auto"):
        assert fast.choose(8, 0.02, stats) == fast.ROW and fast.choose(9, 0.02, stats) == fast.BLAS


def test_kernel_setting_is_validated_and_restored():
    before = fast.current()
    with pytest.raises(InputError, match="kernels must be one of"):
        fast.use("turbo")
    with fast.use("reference"):
        assert fast.current() == "reference"
    assert fast.current() == before


def test_unsupported_calls_fall_back_to_the_reference():
    torch.manual_seed(1)
    x, w = torch.randn(2, 40, dtype=torch.float64), torch.randn(6, 40, dtype=torch.float64)

    def covered(x, w):
        return fast.relu_linear(x, w, torch.ones(len(w)), None, 1, 8, kernels.STATS, NEVER, new_counters()) is not None

    assert not covered(x, w)  # float64
    assert not covered(x.float(), w.float().T.contiguous().T)  # columns not contiguous
    assert covered(x.float()[:, 1:], w.float()[:, 1:])  # rows contiguous, any row stride
    with fast.use("reference"):
        assert not covered(x.float(), w.float())
    with fast.use("fast"):
        z = kernels.relu_linear(x, w, torch.ones(6, dtype=torch.float64), None, 1, 8, kernels.STATS,
                                torch.tensor(NEVER), new_counters())
    torch.testing.assert_close(z, x @ w.T)


def test_build_failure_warns_once_and_falls_back(monkeypatch):
    monkeypatch.setitem(fast._state, "module", None)
    monkeypatch.setitem(fast._state, "failed", None)

    def broken():
        raise RuntimeError("Error building extension: no compiler\nc++: not found")

    monkeypatch.setattr(fast, "_build", broken)
    with pytest.warns(RuntimeWarning, match="could not be built .*c\\+\\+: not found.*reference kernels"):
        assert fast.module() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fast.module() is None  # no second warning
        x, w = torch.randn(1, 40), torch.randn(6, 40)
        with fast.use("fast"):
            z = kernels.relu_linear(x, w, torch.ones(6), None, 1, 8, kernels.STATS, torch.tensor(NEVER),
                                    new_counters())
    torch.testing.assert_close(z, x @ w.T, rtol=1e-5, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 40), st.integers(1, 40), st.integers(1, 3), st.integers(3, 70),
       st.sampled_from([kernels.STATS, kernels.THRESHOLD]), st.sampled_from(["none", "scalar", "vector", "full"]),
       st.sampled_from(["drawn", "empty", "full"]), st.data())
def test_blas_kernel_for_many_rows_equals_reference(rows, outputs, unit, n, test, offset_kind, mask, data):
    """The kernel the cost model picks for many rows (matrix products, one fused test pass)."""
    k = data.draw(st.integers(2, n - 1))
    torch.manual_seed(data.draw(st.integers(0, 10_000)))
    x = torch.randint(-3, 4, (rows, n * unit)).float()
    w = _weight(outputs, n * unit, data.draw(st.booleans()))
    scale = 2.0 ** torch.randint(-2, 3, (outputs,)).float()
    offset = _offsets(outputs, (rows,))[offset_kind]
    critical = {"empty": NEVER, "full": ALWAYS, "drawn": data.draw(st.integers(-3, 1)) + 0.37}[mask]
    cr, cf = new_counters(), new_counters()
    with fast.use("reference"):
        zr = kernels.relu_linear(x, w, scale, offset, unit, k, test, torch.tensor(critical), cr)
    c = None if offset is None else offset.expand(rows, outputs)
    zf = fast.relu_linear(x, w, scale, c, unit, k, test, critical, cf, kernel=fast.BLAS)
    # a drawn offset or critical value can put an output within float rounding of the decision
    # boundary, where the two kernels may legitimately round to different sides
    assume(mask != "drawn" or _boundary_margin(x, w, scale, offset, unit, k, n, test, critical) > 1e-4)
    assert torch.equal(zf == 0, zr == 0)
    torch.testing.assert_close(zf, zr, rtol=0, atol=1e-4)
    cr, cf = read(cr), read(cf)
    assert {f: v for f, v in cr.items() if f != "computed"} == {f: v for f, v in cf.items() if f != "computed"}


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 40), st.integers(1, 40), st.integers(3, 70), st.sampled_from(["none", "scalar", "vector", "full"]),
       st.data())
def test_dense_call_equals_the_layer_and_counts_nothing_pruned(rows, outputs, columns, offset_kind, data):
    """The "fastest" setting's dense call: the layer's epilogue exactly (integer data), nothing
    pruned, every term counted as computed, negatives counted as the reference counts them."""
    torch.manual_seed(data.draw(st.integers(0, 10_000)))
    x = torch.randint(-3, 4, (rows, columns)).float()
    w = _weight(outputs, columns, data.draw(st.booleans()))
    scale = 2.0 ** torch.randint(-2, 3, (outputs,)).float()
    offset = _offsets(outputs, (rows,))[offset_kind]
    c = None if offset is None else offset.expand(rows, outputs)
    cf, cr = new_counters(), new_counters()
    zf = fast.relu_linear(x, w, scale, c, 1, 2, kernels.STATS, 0.0, cf, kernel=fast.DENSE)
    expected = scale * (x @ w.T) + (0.0 if offset is None else offset)
    torch.testing.assert_close(zf, expected, rtol=0, atol=1e-4)
    with fast.use("reference"):
        kernels.relu_linear(x, w, scale, offset, 1, 2, kernels.STATS, torch.tensor(NEVER), cr)
    cf, cr = read(cf), read(cr)
    assert cf["pruned"] == 0 and cf["negative"] == cr["negative"] == float((expected < 0).sum())
    assert cf["calls"] == 1 and cf["outputs"] == rows * outputs and cf["dense"] == rows * outputs * columns
    assert cf["partial"] + cf["test"] + cf["remainder"] == cf["dense"] == cf["computed"]
    assert cf["untested"] == cf["outputs"] and cr["untested"] == 0  # the dense call tested nothing


def test_fastest_prunes_where_it_pays_and_runs_dense_elsewhere():
    """One row: the row-wise kernel (the reference's decisions); many rows: the dense layer
    (the original model's outputs, nothing pruned)."""
    model, _ = mlp(widths=(16, 1024, 1024, 4))  # a site with K = 1024: one row pays for the row-wise kernel
    x = torch.randint(-2, 3, (64, 16)).float()
    compiled = exprune_fx.compile(model, x[:2], Config(alpha=0.3, k=8))
    with fast.use("reference"):
        one_ref = compiled(x[:1])
    with fast.use("fastest"):
        compiled.reset_stats()
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
        many = compiled.exprune_stats()["sites"]
        assert sum(s["pruned"] for s in many.values()) == 0
        assert all(s["untested_outputs"] == s["outputs"] > 0 for s in many.values())
        torch.testing.assert_close(compiled(x[:1]), one_ref, rtol=1e-4, atol=1e-4)
        one = compiled.exprune_stats()["sites"]
        assert all(one[name]["untested_outputs"] == s["untested_outputs"] for name, s in many.items())
        assert sum(s["pruned"] for s in one.values()) > 0  # the one-row call was tested, and pruned


def test_fastest_runs_conv_and_argmax_sites_dense_and_counts_them():
    """Convolution and argmax sites have no kernel that beats the dense layer on CPU: under
    "fastest" they run dense (the original model's outputs) and their counters say so."""
    torch.manual_seed(0)
    cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(32, 32, 3),
                              torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(32 * 6 * 6, 10)).eval()
    x = torch.randn(4, 3, 8, 8)
    compiled = exprune_fx.compile(cnn, x, Config(alpha=0.3, k=8), outputs={"output": "argmax"})
    assert {(s.kind, s.decision) for s in compiled.rewritten_sites} == {("conv2d", "relu"), ("linear", "argmax")}
    with torch.no_grad():
        with fast.use("reference"):
            compiled.reset_stats()
            compiled(x)
            reference = compiled.exprune_stats()
        with fast.use("fastest"):
            compiled.reset_stats()
            torch.testing.assert_close(compiled(x), cnn(x), rtol=1e-4, atol=1e-4)
            fastest = compiled.exprune_stats()
    for name, site in fastest["sites"].items():
        assert site["pruned"] == 0 and site["executed_macs"] == site["dense_macs"] == reference["sites"][name]["dense_macs"]
        assert site["outputs"] == reference["sites"][name]["outputs"] and site["calls"] == 1
        assert site["untested_outputs"] == site["outputs"] and reference["sites"][name]["untested_outputs"] == 0
    conv = next(s.name for s in compiled.rewritten_sites if s.kind == "conv2d")
    assert fastest["sites"][conv]["oracle_saved_macs"] > 0  # negatives are counted: the oracle bound stays known
    assert fastest["reduction"] == pytest.approx(0.0, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(["linear", "linear3d", "conv"]), st.integers(0, 5), st.integers(1, 12), st.integers(1, 6),
       st.sampled_from(["none", "scalar", "channel", "full", "row"]), st.booleans(), st.booleans(), st.data())
def test_dense_epilogue_equals_the_folded_layer(shape, rows, features, spatial, offset_kind, count_negative, per_row,
                                               data):
    """The dense call's epilogue (one C++ pass where the extension is built): ``scale * z + offset``
    on linear ([M, N], [B, T, N]) and convolution ([B, C, H, W]) outputs, whatever the offset's
    broadcast, and the counters of a call that prunes nothing."""
    torch.manual_seed(data.draw(st.integers(0, 10_000)))
    dims = {"linear": (rows, features), "linear3d": (rows, 2, features), "conv": (rows, features, spatial, 2)}[shape]
    channel = 1 if shape == "conv" else -1
    z = torch.randint(-4, 5, dims).float()
    scale = 2.0 ** torch.randint(-2, 3, (features,)).float()
    along = [1] * len(dims)
    along[channel] = features
    row_shape = [dims[0]] + [1] * (len(dims) - 1)
    offset = {"none": None, "scalar": torch.tensor(0.5), "channel": torch.randn(along),
              "full": torch.randn(dims), "row": torch.randn(row_shape)}[offset_kind]
    per_row = per_row and shape != "conv"  # argmax sites are linear
    expected = z * scale.view(along) + (0.0 if offset is None else offset)
    for dtype in (torch.float32, torch.float64):  # the C++ pass (float32, when built) and the torch ops
        stats = new_counters()
        got = kernels._dense_call(z.to(dtype, copy=True), scale, offset, stats, 7, count_negative, per_row)
        torch.testing.assert_close(got, expected.to(dtype), rtol=0, atol=1e-5)
        c = read(stats)
        outputs = expected.numel()
        assert c["calls"] == 1 and c["pruned"] == 0
        assert c["outputs"] == (outputs // features if per_row else outputs)
        assert c["dense"] == c["computed"] == c["remainder"] == 7 * outputs
        assert c["negative"] == (float((expected < 0).sum()) if count_negative else 0.0)


def test_counters_of_the_wrong_size_are_refused_not_written_past():
    """The C++ kernels write every counter field: a shorter vector (a hand-made one, or an old
    layout) gets a clear error instead of a write past its end."""
    x, w = torch.rand(2, 64), torch.randn(8, 64)
    for kernel in (fast.ROW, fast.BLAS, fast.DENSE, None):
        with fast.use("auto"), pytest.raises(RuntimeError, match="counters must be a contiguous float64 CPU vector"):
            fast.relu_linear(x, w, torch.ones(8), None, 1, 8, kernels.THRESHOLD, 0.0,
                             torch.zeros(len(FIELDS) - 1, dtype=torch.float64), kernel=kernel)


def test_cost_model_constants_are_read_on_every_call(monkeypatch):
    """docs/usage.md: setting fast.DENSE_BUDGET (and the others) takes effect at once."""
    stats = new_counters()
    with fast.use("fastest"):
        assert fast.choose(1, 0.02, stats, 1024) == fast.ROW
        monkeypatch.setattr(fast, "DENSE_BUDGET", 1.0)  # below one row's reads plus its fixed cost
        assert fast.choose(1, 0.02, stats, 1024) == fast.DENSE
        monkeypatch.setattr(fast, "MIN_TERMS", 2048)
        monkeypatch.setattr(fast, "DENSE_BUDGET", 100.0)
        assert fast.choose(1, 0.02, stats, 1024) == fast.DENSE
