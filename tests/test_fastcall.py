"""The lean call path of compiled models (exprune_fx/fastcall.py): same outputs, same counters,
same errors as the guarded path of the exported module."""

import pytest
import torch
from archgen import architectures
from hypothesis import given, settings
from hypothesis import strategies as st

import exprune_fx
from exprune_fx import Config, InputError
from exprune_fx.fastcall import LeanCall
from exprune_fx.runtime import fast
from exprune_fx.runtime.ops import PYTHON_KERNELS
from exprune_fx.zoo import mlp
from test_exact import compile_quietly


@pytest.fixture()
def compiled_mlp():
    torch.manual_seed(0)
    model, x = mlp(widths=(16, 128, 128, 4))
    return model, exprune_fx.compile(model, x, Config(alpha=0.0, k=8))


def test_lean_path_takes_over_after_one_guarded_call_and_matches_the_model(compiled_mlp):
    model, compiled = compiled_mlp
    x = torch.randn(5, 16)
    with torch.no_grad():
        lean = compiled.__dict__["_lean"]  # made by compile()'s own run on the example
        known = len(lean.known)
        assert lean(x) is None  # a new signature: not yet
        first = compiled(x)  # guarded: records the signature
        assert len(lean.known) == known + 1
        assert lean(x) is not None  # now the lean path answers
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(first, model(x), rtol=1e-5, atol=1e-5)
        y = torch.randn(3, 16)  # another batch size: guarded once, then lean
        torch.testing.assert_close(compiled(y), model(y), rtol=1e-5, atol=1e-5)
        assert len(lean.known) == known + 2


def test_lean_path_counts_calls_rows_and_site_work(compiled_mlp):
    _, compiled = compiled_mlp
    x = torch.randn(5, 16)
    with torch.no_grad():
        compiled(x)
        compiled.reset_stats()
        for _ in range(3):
            compiled(x)
    stats = compiled.exprune_stats()
    assert stats["calls"] == 3 and stats["rows"] == 15
    assert all(site["calls"] == 3 and site["outputs"] == 15 * 128 for site in stats["sites"].values())


def test_wrong_inputs_after_lean_calls_still_get_the_clear_error(compiled_mlp):
    _, compiled = compiled_mlp
    with torch.no_grad():
        compiled(torch.randn(2, 16))
        compiled(torch.randn(2, 16))
        with pytest.raises(InputError, match="do not fit the compiled graph"):
            compiled(torch.randn(2, 17))
        with pytest.raises(InputError, match="input 0 has dtype torch.float64; the model was compiled for "
                                             "torch.float32"):
            compiled(torch.randn(2, 16, dtype=torch.float64))


def test_calls_laid_out_unlike_the_example_get_a_clear_error(compiled_mlp):
    _, compiled = compiled_mlp
    x = torch.randn(2, 16)
    with torch.no_grad():
        compiled(x)
        for args, kwargs in (((x, x), {}), ((), {"input": x}), ((x,), {"scale": x})):
            with pytest.raises(InputError, match="compiled for 1 positional input"):
                compiled(*args, **kwargs)


def test_lean_path_reads_attributes_at_call_time(compiled_mlp):
    """A replaced buffer (not only one changed in place) is what the next lean call uses."""
    _, compiled = compiled_mlp
    site = compiled.rewritten_sites[0]
    x = torch.randn(4, 16)
    with torch.no_grad():
        compiled(x)
        compiled(x)
        compiled.graph_module.register_buffer(site.critical, torch.tensor(float("inf"), dtype=torch.float64))
        compiled.reset_stats()
        compiled(x)
    assert compiled.exprune_stats()["sites"][site.name]["prune_rate"] > 0.5


class _Scaled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 64), torch.nn.Linear(64, 64)

    def forward(self, x, *, scale, shift=None):
        h = torch.relu(self.b(torch.relu(self.a(x)))) * scale
        return h if shift is None else h + shift


def test_keyword_calls_take_the_lean_path_in_any_keyword_order():
    """Keyword inputs are flattened as the exported module flattens them: after one guarded
    call, calls with the same keywords (in any order) are lean, with the module's results;
    other keywords or a non-tensor input keep the guarded path and its errors."""
    model = _Scaled().eval()
    x, two, one = torch.randn(3, 8), torch.tensor(2.0), torch.tensor(1.0)
    compiled = compile_quietly(model, ((x,), {"scale": two, "shift": one}), Config(alpha=0.0, k=8))
    lean = compiled.__dict__["_lean"]
    y = torch.randn(5, 8)
    with torch.no_grad():
        assert lean(y, scale=two, shift=one) is None  # a new signature
        compiled(y, shift=one, scale=two)  # guarded, keywords in another order
        for call in (lambda: lean(y, scale=two, shift=one), lambda: lean(y, shift=one, scale=two)):
            out = call()
            assert out is not None and torch.equal(out, compiled.graph_module(y, scale=two, shift=one))
        torch.testing.assert_close(compiled(y, shift=one, scale=two), model(y, scale=two, shift=one))
        assert lean(y, scale=two) is None and lean(y, scale=2.0, shift=one) is None
        compiled.reset_stats()
        compiled(y, scale=two, shift=one)
        assert compiled.exprune_stats()["rows"] == 5
        with pytest.raises(InputError, match="keyword inputs"):
            compiled(y, scale=two)


@settings(max_examples=40, deadline=None)
@given(architectures(), st.integers(2, 6), st.sampled_from(["statistical", "exact", "hybrid"]),
       st.sampled_from(["reference", "auto", "fastest"]), st.booleans())
def test_lean_path_calls_the_kernels_directly_with_the_dispatchers_results(arch, k, mode, setting, aggressive):
    """The lean path calls each ``exprune`` op's Python kernel directly; the guarded module goes
    through the dispatcher. Same outputs and same counters, for every kind of site, mode and
    kernel setting, with and without pruning."""
    model, x = arch
    tests = {"test": "threshold", "threshold": 0.3} if aggressive else {"alpha": 0.1}
    compiled = compile_quietly(model, x, Config(k=k, mode=mode, zero_skip=True, **tests))
    lean = compiled.__dict__["_lean"]
    gm = compiled.graph_module
    with torch.no_grad(), fast.use(setting):
        compiled(x)  # the signature is known: the next call is lean
        assert lean(x) is not None
        results = []
        for call in (lambda: compiled(x), lambda: gm(x)):  # lean, then the dispatcher
            compiled.reset_stats()
            out = call()
            results.append((out, [compiled._counters(s).clone() for s in compiled.rewritten_sites]))
    (lean_out, lean_counts), (guarded_out, guarded_counts) = results
    torch.testing.assert_close(lean_out, guarded_out, rtol=0, atol=0)
    for a, b in zip(lean_counts, guarded_counts):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@settings(max_examples=15, deadline=None)
@given(architectures(), st.sampled_from(["reference", "fastest"]), st.booleans())
def test_lean_keyword_calls_equal_the_guarded_module(arch, setting, aggressive):
    """Generated architectures compiled on a keyword input: once the guards have accepted a
    signature, keyword calls take the lean path, with the guarded module's outputs and
    counters bit for bit, also at another batch size; pruning nothing, the model's outputs."""
    model, x = arch
    tests = {"test": "threshold", "threshold": 0.3} if aggressive else {"alpha": 0.0}
    compiled = compile_quietly(model, {"x": x}, Config(k=2, **tests))
    lean, gm = compiled.__dict__["_lean"], compiled.graph_module
    other = torch.cat([x, x[:1]])  # one more row: a new signature (the batch axis is dynamic)
    with torch.no_grad(), fast.use(setting):
        for inputs in (x, other):
            compiled(x=inputs)  # guarded once per signature
            results = []
            for call in (lambda: compiled(x=inputs), lambda: gm(x=inputs)):  # lean, then guarded
                compiled.reset_stats()
                results.append((call(), [compiled._counters(s).clone() for s in compiled.rewritten_sites]))
            assert lean(x=inputs) is not None
            (lean_out, lean_counts), (guarded_out, guarded_counts) = results
            torch.testing.assert_close(lean_out, guarded_out, rtol=0, atol=0)
            for a, b in zip(lean_counts, guarded_counts):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
            if not aggressive:
                torch.testing.assert_close(lean_out, model(inputs), rtol=1e-4, atol=1e-4)


def test_every_op_has_its_python_kernel():
    names = {op.name() for op in PYTHON_KERNELS}
    assert names == {f"exprune::{name}" for name in torch.ops.exprune}


class _Mixed(torch.nn.Module):
    """Ops of several shapes of call: keyword arguments, several outputs, eval-mode dropout."""

    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(8, 32), torch.nn.Linear(16, 4)
        self.norm, self.drop = torch.nn.LayerNorm(32), torch.nn.Dropout(0.5)

    def forward(self, x):
        a, b = torch.chunk(self.drop(self.norm(self.up(x))), 2, dim=-1)
        return self.down(torch.relu(a) * torch.softmax(b, dim=-1)).sum(dim=-1, keepdim=True)


def test_lean_path_calls_aten_ops_directly_and_skips_eval_dropout():
    """The lean forward binds every ATen op to its C++ callable (no ``OpOverload.__call__``
    frame) and drops eval-mode dropouts, which return their input: the outputs are the
    guarded module's, bit for bit."""
    model = _Mixed().eval()
    x = torch.randn(3, 8)
    compiled = compile_quietly(model, x, Config(k=4, alpha=0.1))
    gm = compiled.graph_module
    assert any(n.target is torch.ops.aten.dropout.default for n in gm.graph.nodes)
    with torch.no_grad():
        guarded = gm(x)
        compiled(x)
        lean = compiled.__dict__["_lean"]
        out = lean(x)
    assert out is not None and torch.equal(out, guarded) and torch.equal(out, model(x))
    forward = lean.fn.__wrapped__
    bound = list(forward.__globals__.values())
    assert not any(isinstance(v, torch._ops.OpOverload) for v in bound)
    assert torch.ops.aten.linear.default._op in bound and torch.ops.aten.dropout.default._op not in bound


def _unique_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def test_inductor_inner_compiles_the_flat_graph_and_keeps_the_eager_results(fresh_dynamo):
    """set_inner("inductor"): a known signature runs the flat function compiled by inductor (a
    new dynamo graph, not the eager lean forward), with the eager path's outputs and counters;
    a new batch size takes the guarded path once, then the compiled one; a replaced buffer is
    what the next call reads."""
    torch.manual_seed(0)
    model, _ = mlp(widths=(16, 128, 128, 4))
    eager = exprune_fx.compile(model, torch.randn(2, 16), Config(alpha=0.3, k=8))
    compiled = exprune_fx.compile(model, torch.randn(2, 16), Config(alpha=0.3, k=8))
    compiled.set_inner("inductor")
    with torch.no_grad(), fast.use("reference"):
        for x in (torch.randn(5, 16), torch.randn(3, 16)):
            graphs = _unique_graphs()
            for _ in range(2):  # guarded (records the signature), then lean under inductor
                eager(x), compiled(x)
            lean = compiled.__dict__["_lean"]
            assert lean.inner == "inductor" and lean(x) is not None and _unique_graphs() > graphs
            eager.reset_stats(), compiled.reset_stats()
            torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)
            for site in compiled.rewritten_sites:
                torch.testing.assert_close(compiled._counters(site), eager._counters(site), rtol=0, atol=0)
        assert compiled.exprune_stats()["calls"] == 1 and compiled.exprune_stats()["sites"]
        assert max(s["prune_rate"] for s in compiled.exprune_stats()["sites"].values()) > 0
        site = compiled.rewritten_sites[0]
        compiled.graph_module.register_buffer(site.critical, torch.tensor(float("inf"), dtype=torch.float64))
        compiled.reset_stats()
        compiled(x)
    assert compiled.exprune_stats()["sites"][site.name]["prune_rate"] > 0.5


def test_inductor_inner_runs_keyword_calls_through_the_compiled_flat_function(fresh_dynamo):
    """Under inductor, keyword calls run the compiled flat function; the first one per
    signature runs eagerly, through the guards (one dynamo graph in all: the exported module
    itself is never compiled)."""
    model = _Scaled().eval()
    x, two, one = torch.randn(3, 8), torch.tensor(2.0), torch.tensor(1.0)
    compiled = compile_quietly(model, ((x,), {"scale": two, "shift": one}), Config(k=4, alpha=0.0))
    compiled.set_inner("inductor")
    with torch.no_grad():
        graphs = _unique_graphs()
        for _ in range(3):
            torch.testing.assert_close(compiled(x, scale=two, shift=one), model(x, scale=two, shift=one),
                                       rtol=1e-5, atol=1e-5)
        lean = compiled.__dict__["_lean"]
        assert _unique_graphs() == graphs + 1 and lean.inner == "inductor"
        assert lean(x, shift=one, scale=two) is not None
    assert compiled.exprune_stats()["calls"] == 3
    compiled.set_inner("eager")  # back: no inductor build left behind
    assert "_lean" not in compiled.__dict__
    with pytest.raises(InputError, match="inner must be one of"):
        compiled.set_inner("tvm")


class _Repeat(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 64), torch.nn.Linear(64, 64)

    def forward(self, x, times: int):
        return torch.relu(self.b(torch.relu(self.a(x)))).repeat(1, times)


class _Flagged(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 64)

    def forward(self, double: bool, x):
        h = torch.relu(self.a(x))
        return h * 2 if double else h


def test_a_constant_input_before_the_tensors_counts_rows_from_the_first_tensor():
    model = _Flagged().eval()
    x = torch.randn(3, 8)
    compiled = compile_quietly(model, (True, x), Config(k=4, alpha=0.0))
    with torch.no_grad():
        compiled(True, x)
        compiled.reset_stats()
        out = compiled(True, x)  # lean
    torch.testing.assert_close(out, model(True, x))
    assert compiled.exprune_stats()["rows"] == 3


def test_constant_inputs_are_part_of_the_lean_signature():
    """An int input (torch.export specialises on its value) rides along on the lean path, and
    the signature holds its value: another value takes the guarded path, whose guard refuses
    it with the clear error."""
    model = _Repeat().eval()
    x = torch.randn(3, 8)
    compiled = compile_quietly(model, (x, 2), Config(k=4, alpha=0.0))
    lean = compiled.__dict__["_lean"]
    with torch.no_grad():
        compiled(x, 2)
        assert lean(x, 2) is not None and lean(x, 3) is None and lean(x, 2.0) is None
        torch.testing.assert_close(compiled(x, 2), model(x, 2))
        with pytest.raises(InputError, match="do not fit the compiled graph.*non-tensor inputs"):
            compiled(x, 3)


@settings(max_examples=6, deadline=None)
@given(architectures())
def test_inductor_inner_preserves_semantics_when_nothing_is_pruned(arch):
    """Generated architectures, every site rewritten but never pruning: the inductor-compiled
    graph equals the original model up to float reassociation."""
    torch._dynamo.reset()
    model, x = arch
    compiled = compile_quietly(model, x, Config(alpha=0.0, k=2))
    compiled.set_inner("inductor")
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
    assert all(s["pruned"] == 0 for s in compiled.exprune_stats()["sites"].values())
