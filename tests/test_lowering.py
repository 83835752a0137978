"""Site ops in torch ops for inductor (exprune_fx/runtime/lowering.py): a site's dense form is
used exactly where the op would run dense whatever its counters say, and gives the op's
outputs and counters; under inductor the compiled graph has no opaque op left for such sites."""

import inspect
import math

import pytest
import torch
from archgen import architectures
from hypothesis import given, settings
from hypothesis import strategies as st

import exprune_fx
from exprune_fx import Config
from exprune_fx.fastcall import LeanCall
from exprune_fx.runtime import fast, kernels, lowering
from exprune_fx.runtime.counters import INDEX, new_counters, read
from test_exact import compile_quietly

pytestmark = pytest.mark.skipif(fast.module() is None, reason="the fast kernels could not be built here")


def test_each_dense_form_takes_its_ops_arguments():
    """A graph node may pass any argument by name: the functions' parameters are the schemas'."""
    for op, fn in lowering.TRACEABLE.items():
        assert list(inspect.signature(fn).parameters) == [a.name for a in op._schema.arguments], op


def _primed_counters(survivors: float) -> torch.Tensor:
    """Counters of a site that has tested 1000 outputs and kept this share of them (what the
    cost model reads); ``survivors`` 0 is the state most in favour of the row-wise kernel."""
    stats = new_counters()
    stats[INDEX["outputs"]], stats[INDEX["pruned"]] = 1000.0, 1000.0 * (1 - survivors)
    return stats


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([1, 3, 8, 16, 40]), st.sampled_from([64, 256, 383, 384, 512, 1024]), st.integers(1, 24),
       st.sampled_from([1, 2, 8]), st.sampled_from(["none", "vector", "full"]), st.sampled_from([0.0, 0.3, 1.0]),
       st.booleans(), st.data())
def test_linear_dense_form_is_used_only_where_the_op_runs_dense(rows, terms, outputs, k, offset_kind, survivors,
                                                               leading, data):
    """Under "fastest": wherever the dense form is taken, the op (its Python kernel, which asks
    the cost model) also ran dense, with the same outputs and the same counters, from any state
    of the site's counters; the op is still called where the cost model may pick the row-wise
    kernel (long rows, few rows)."""
    torch.manual_seed(data.draw(st.integers(0, 10_000)))
    lead = (rows // 2, 2) if leading and rows % 2 == 0 else (rows,)
    x = torch.randint(-3, 4, lead + (terms,)).float()
    w = torch.randint(-3, 4, (outputs, terms)).float()
    scale = 2.0 ** torch.randint(-2, 3, (outputs,)).float()
    offset = {"none": None, "vector": torch.randint(-6, 7, (outputs,)).float(),
              "full": torch.randint(-6, 7, lead + (outputs,)).float()}[offset_kind]
    critical = torch.tensor(0.0)
    with fast.use("fastest"):
        dense = lowering._linear_runs_dense(x, w, 1, k, new_counters())
        for form in (lowering.relu_linear, lowering.relu_matmul):
            ours, theirs = _primed_counters(survivors), _primed_counters(survivors)
            got = form(x, w, scale, offset, 1, k, kernels.THRESHOLD, critical, ours)
            expected = kernels.relu_matmul(x, w, scale, offset, 1, k, kernels.THRESHOLD, critical, theirs)
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
            assert read(ours) == read(theirs)
            ran_dense = read(theirs)["untested"] == rows * outputs
            assert ran_dense or not dense
    short_or_many = terms < fast.MIN_TERMS or rows * (k / terms + fast.OUTPUT_COST / terms) > fast.DENSE_BUDGET
    assert dense == short_or_many
    with fast.use("auto"):
        assert not lowering._linear_runs_dense(x, w, 1, k, new_counters())  # only "fastest" runs dense


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 3), st.sampled_from([1, 2]), st.integers(1, 6), st.integers(1, 3), st.booleans(),
       st.sampled_from(["none", "channel", "full"]), st.sampled_from(["reference", "fastest"]), st.data())
def test_conv_and_argmax_dense_forms_equal_the_ops(batch, groups, per_group, kernel, padded, offset_kind, setting,
                                                   data):
    """Convolution and argmax sites: the dense form under "fastest", the op under any other
    setting; either way the op's outputs and counters."""
    torch.manual_seed(data.draw(st.integers(0, 10_000)))
    cin, cout = 2 * groups * per_group, groups * 3
    x = torch.randint(-2, 3, (batch, cin, 5, 5)).float()
    w = torch.randint(-2, 3, (cout, cin // groups, kernel, kernel)).float()
    scale = 2.0 ** torch.randint(-1, 2, (cout,)).float()
    pad = [kernel // 2] * 2 if padded else [0, 0]
    out_hw = 5 + 2 * pad[0] - kernel + 1
    offset = {"none": None, "channel": torch.randint(-3, 4, (cout, 1, 1)).float(),
              "full": torch.randint(-3, 4, (batch, cout, out_hw, out_hw)).float()}[offset_kind]
    conv_args = (x, w, scale, offset, [1, 1], pad, [1, 1], groups, per_group, 1, kernels.THRESHOLD,
                 torch.tensor(0.0))
    head = torch.randint(-3, 4, (7, 2 * per_group)).float()
    argmax_args = (x.flatten(1)[:, :2 * per_group], head, torch.ones(7), None, 1, 1, kernels.THRESHOLD,
                   torch.tensor(math.inf))
    with fast.use(setting):
        for form, kernel_fn, args in ((lowering.relu_conv2d, kernels.relu_conv2d, conv_args),
                                      (lowering.argmax_matmul, kernels.argmax_matmul, argmax_args)):
            ours, theirs = new_counters(), new_counters()
            torch.testing.assert_close(form(*args, ours), kernel_fn(*args, theirs), rtol=0, atol=1e-4)
            assert read(ours) == read(theirs)
            assert (read(ours)["untested"] == read(ours)["outputs"]) == (setting == "fastest")


def _captured_targets(compiled, x) -> set:
    """The call targets of the graph dynamo hands to the compiler for the inductor path's flat
    function (recorded by a pass-through backend instead of inductor)."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    gm = compiled.graph_module
    with torch.no_grad():
        torch.compile(LeanCall._flat_forward(gm, raw=False), backend=record)(gm, x)
    torch._dynamo.reset()
    return {str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"}


def _cnn():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 8, 3),
                               torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 64), torch.nn.ReLU(),
                               torch.nn.Linear(64, 10)).eval()


def test_inductor_sees_torch_ops_for_sites_run_dense():
    """The graph inductor gets: under "fastest", no ``exprune`` op for the convolution, the
    argmax head and the short linear site; under "reference", the ops themselves (the opaque
    early-exit kernels)."""
    x = torch.randn(2, 3, 8, 8)
    compiled = exprune_fx.compile(_cnn(), x, Config(alpha=0.3, k=4), outputs={"output": "argmax"})
    assert {s.kind for s in compiled.rewritten_sites} == {"conv2d", "linear"}
    with fast.use("fastest"):
        fastest = _captured_targets(compiled, x)
    with fast.use("reference"):
        reference = _captured_targets(compiled, x)
    assert not any(t.startswith("exprune.") for t in fastest)
    assert {"exprune.relu_conv2d.default", "exprune.argmax_matmul.default"} <= reference
    assert any("conv2d" in t for t in fastest)


def test_inductor_fastest_keeps_the_eager_outputs_and_counters_and_follows_the_setting(fresh_dynamo):
    """End to end under inductor: the same outputs and counters as the eager graph under
    "fastest" (dense forms) and, after the setting changes (a recompile), under "reference"
    (the ops, which prune)."""
    model = _cnn()
    x = torch.randn(2, 3, 8, 8)
    config = Config(alpha=0.3, k=4)
    eager = exprune_fx.compile(model, x, config, outputs={"output": "argmax"})
    compiled = exprune_fx.compile(model, x, config, outputs={"output": "argmax"})
    compiled.set_inner("inductor")
    with torch.no_grad():
        for setting in ("fastest", "reference", "fastest"):
            with fast.use(setting):
                for _ in range(2):  # guarded, then compiled
                    eager(x), compiled(x)
                eager.reset_stats(), compiled.reset_stats()
                torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)
                for site in compiled.rewritten_sites:
                    torch.testing.assert_close(compiled._counters(site), eager._counters(site), rtol=0, atol=0)
                pruned = sum(s["pruned"] for s in compiled.exprune_stats()["sites"].values())
                assert (pruned > 0) == (setting == "reference")


@settings(max_examples=4, deadline=None)
@given(architectures())
def test_inductor_fastest_preserves_semantics_when_nothing_is_pruned(arch):
    """Generated architectures, every site rewritten but never pruning, under "fastest" and
    inductor (dense forms and ops mixed): the original model's outputs."""
    torch._dynamo.reset()
    model, x = arch
    compiled = compile_quietly(model, x, Config(alpha=0.0, k=2))
    compiled.set_inner("inductor")
    with torch.no_grad(), fast.use("fastest"):
        for _ in range(2):
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
    assert all(s["pruned"] == 0 for s in compiled.exprune_stats()["sites"].values())
