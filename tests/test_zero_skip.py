"""Zero-skip propagation: the kernel, the pass, Config(zero_skip=True), stats, save/load, backend."""

import math
import warnings
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import exprune_fx
from exprune_fx import Config, ExPruneWarning, InputError
from exprune_fx.lifting import lift
from exprune_fx.passes.zero_skip import META_ZERO_SKIP, add_zero_skip
from exprune_fx.runtime import zero_skip
from exprune_fx.zoo import mlp

PATHS = ("auto", "sparse", "dense")
# A cost model under which skipping always pays: the pass then rewrites the small layers of
# these tests, which the measured model (rightly) leaves dense.
ALWAYS = zero_skip.CostModel(dense_rows=1e9, sparse_macs=0.0, scan=0.0, overhead=0.0)


def every_layer():
    return mock.patch.object(zero_skip, "COST", ALWAYS)


def sparse_input(shape, density: float, pattern: str, generator, dtype=torch.float64) -> torch.Tensor:
    x = torch.randn(shape, generator=generator, dtype=dtype)
    if pattern == "zeros":
        return torch.zeros_like(x)
    if pattern == "no zeros":
        return x.abs() + 0.5
    return torch.relu(x) * (torch.rand(shape, generator=generator) < density)


@settings(max_examples=150)
@given(lead=st.lists(st.integers(0, 4), max_size=2), k=st.integers(1, 48), n=st.integers(1, 24),
       density=st.floats(0.0, 1.0), pattern=st.sampled_from(["random", "zeros", "no zeros"]),
       bias=st.booleans(), path=st.sampled_from(PATHS), seed=st.integers(0, 2**16))
def test_kernel_equals_linear(lead, k, n, density, pattern, bias, path, seed):
    g = torch.Generator().manual_seed(seed)
    x = sparse_input(tuple(lead) + (k,), density, pattern, g)
    w = torch.randn(n, k, generator=g, dtype=torch.float64)
    b = torch.randn(n, generator=g, dtype=torch.float64) if bias else None
    stats = zero_skip.new_counters()
    with zero_skip.use(path):
        y = torch.ops.exprune.zero_skip_linear(x, w.T.contiguous(), b, stats)
    expected = F.linear(x, w, b)
    assert y.shape == expected.shape and y.dtype == expected.dtype
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    c = zero_skip.read(stats)
    rows, nonzero = math.prod(lead), int(torch.count_nonzero(x))
    sparse = bool(c["sparse_calls"])
    assert sparse == (rows > 0 and (path == "sparse" or path == "auto" and zero_skip.COST.sparse(rows, k, n, nonzero)))
    assert c == {"calls": 1, "rows": rows, "nonzero": nonzero, "dense": rows * k * n, "executed": nonzero * n,
                 "computed": nonzero * n if sparse else rows * k * n, "sparse_calls": int(sparse)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("path", ["sparse", "dense"])
def test_kernel_other_dtypes(dtype, path):
    g = torch.Generator().manual_seed(0)
    x = sparse_input((5, 3, 40), 0.3, "random", g, dtype)
    w, b = torch.randn(12, 40, generator=g).to(dtype), torch.randn(12, generator=g).to(dtype)
    with zero_skip.use(path):
        y = zero_skip.zero_skip_linear(x, w.T.contiguous(), b, zero_skip.new_counters())
    tol = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    torch.testing.assert_close(y.float(), F.linear(x.float(), w.float(), b.float()), rtol=tol, atol=tol)


def test_counters_by_hand():
    x = torch.tensor([[1.0, 0, 0, 2], [0, 0, 0, 0], [0, 3, 0, 0]])
    w = torch.tensor([[1.0, 2, 3, 4], [5, 6, 7, 8]])  # N = 2, K = 4
    stats = zero_skip.new_counters()
    with zero_skip.use("sparse"):
        y = zero_skip.zero_skip_linear(x, w.T.contiguous(), torch.tensor([10.0, 20]), stats)
    with zero_skip.use("dense"):
        zero_skip.zero_skip_linear(x[:1], w.T.contiguous(), None, stats)
    assert y.tolist() == [[1 + 8 + 10, 5 + 16 + 20], [10, 20], [6 + 10, 18 + 20]]
    # sparse call: 3 rows, 3 nonzeros, dense 3*4*2 = 24, executed 3*2 = 6; dense call: 1 row, 2 nonzeros, 8 MACs
    assert zero_skip.read(stats) == {"calls": 2, "rows": 4, "nonzero": 5, "dense": 32, "executed": 10,
                                     "computed": 6 + 8, "sparse_calls": 1}


def test_cost_model():
    cost = zero_skip.COST
    assert cost.sparse(1, 1024, 1024, 50) and not cost.sparse(64, 1024, 1024, 60000)  # sparse/dense big layer
    assert not cost.sparse(1, 512, 128, 10)  # the fixed overhead exceeds a small layer's product
    assert cost.can_pay(1024, 1024) and cost.can_pay(8192, 2048)
    assert not cost.can_pay(512, 128) and not cost.can_pay(1024, 10)
    assert not any(cost.sparse(rows, 512, 128, 0) for rows in (1, 8, 64, 4096))
    assert not zero_skip.choose(0, 1024, 1024, 0)  # an empty call runs dense
    with zero_skip.use("sparse"):
        assert zero_skip.choose(64, 512, 128, 60000)
    with pytest.raises(InputError, match="zero-skip setting"):
        zero_skip.use("fast")


class Mixed(torch.nn.Module):
    """Linears fed by a ReLU in every form the pass knows, and linears it must leave alone."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(6, 16)
        self.b = torch.nn.Linear(16, 16)  # relu -> dropout -> linear: rewritten
        self.c = torch.nn.Linear(16, 8)   # relu6 -> view -> linear: rewritten
        self.d = torch.nn.Parameter(torch.randn(8, 12))  # mm(relu, W), W stored [K, N]: rewritten
        self.e = torch.nn.Parameter(torch.randn(12, 12))  # addmm(bias, relu, W.t()): rewritten
        self.e_bias = torch.nn.Parameter(torch.randn(12))
        self.f = torch.nn.Linear(12, 12)  # fed by gelu: left
        self.g = torch.nn.Linear(12, 4)   # fed by the raw input of a sum: left
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x, y):
        h = self.b(self.drop(torch.relu(self.a(x))))
        h = self.c(F.relu6(h).view(h.shape))
        h = torch.mm(torch.relu(h), self.d)
        h = torch.addmm(self.e_bias, torch.relu(h), self.e.t())
        h = self.f(F.gelu(h))
        z = torch.relu(h) @ y  # a product of two run-time values: left
        return self.g(h + 1), z


def test_pass_rewrites_exactly_the_linears_fed_by_a_relu():
    torch.manual_seed(0)
    model = Mixed().eval()
    args = (torch.randn(3, 6), torch.randn(12, 5))
    gm = lift(model, args, dynamic_batch=True).exported.module()
    reports = add_zero_skip(gm, every_linear=True)
    assert all(r.rewritten for r in reports)
    assert [(r.kind, r.in_features, r.out_features) for r in reports] == \
        [("linear", 16, 16), ("linear", 16, 8), ("mm", 8, 12), ("addmm", 12, 12)]
    ops = [n for n in gm.graph.nodes if n.target is torch.ops.exprune.zero_skip_linear.default]
    assert [n.meta[META_ZERO_SKIP] for n in ops] == reports
    left = [n for n in gm.graph.nodes if n.op == "call_function" and
            n.target in (torch.ops.aten.linear.default, torch.ops.aten.matmul.default, torch.ops.aten.mm.default)]
    assert len(left) == 4  # a (graph input), f (gelu), g (add), relu @ y (run-time operand)
    x = torch.randn(7, 6), torch.randn(12, 5)
    for path in PATHS:
        with zero_skip.use(path):
            for got, want in zip(gm(*x), model(*x)):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the graph no longer holds the rewritten weights, only their transposed copies
    names = dict(gm.named_parameters())
    assert {"b.weight", "c.weight", "d", "e"}.isdisjoint(names) and {"a.weight", "f.weight", "b.bias"} <= set(names)
    weight_t = getattr(gm, reports[0].weight_t)
    assert weight_t.is_contiguous() and torch.equal(weight_t, model.b.weight.T)


def _all_disabled(model, x) -> Config:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExPruneWarning)
        sites = exprune_fx.compile(model, x).sites
    return Config(zero_skip=True, sites={s.name: {"enabled": False} for s in sites})


def _linear_names(layers: int) -> list[str]:
    return ["linear"] + [f"linear_{i}" for i in range(1, layers)]


def _relu_mlp(widths, seed=0, shift=-0.5):
    """A ReLU MLP whose hidden pre-activations are shifted down: sparse ReLU outputs."""
    model, x = mlp(seed=seed, widths=widths, batch=4)
    with torch.no_grad():
        for layer in list(model)[:-1:2]:
            layer.bias.add_(shift)
    return model, x


@settings(max_examples=10, deadline=None)
@given(widths=st.lists(st.integers(2, 48), min_size=3, max_size=5), plain=st.booleans(),
       path=st.sampled_from(PATHS), seed=st.integers(0, 100), rows=st.integers(0, 9))
def test_compiled_model_equals_original(widths, plain, path, seed, rows):
    model, x = _relu_mlp(tuple(widths), seed=seed)
    names = _linear_names(len(widths) - 1)
    config = Config(zero_skip=True, alpha=0.0, k=2, sites={n: {"enabled": not plain} for n in names})
    with warnings.catch_warnings(), every_layer():
        warnings.simplefilter("ignore", ExPruneWarning)
        compiled = exprune_fx.compile(model, x, config)
    # every linear after a ReLU, unless it is itself a rewritten ExPrune site
    assert {r.name for r in compiled.zero_skip} == set(names[1:]) - {s.name for s in compiled.rewritten_sites}
    inputs = torch.randn(rows, widths[0], generator=torch.Generator().manual_seed(seed))
    with torch.no_grad(), zero_skip.use(path):
        torch.testing.assert_close(compiled(inputs), model(inputs), rtol=1e-5, atol=1e-5)


def test_hf_opt_ffn_down_projection():
    pytest.importorskip("transformers")
    from exprune_fx.zoo import hf_opt

    model, inputs = hf_opt()
    for config in (_all_disabled(model, inputs), Config(zero_skip=True, alpha=0.0, k=8)):
        with every_layer():
            compiled = exprune_fx.compile(model, inputs, config, outputs={"logits": "argmax"})
        assert [(r.in_features, r.out_features) for r in compiled.zero_skip] == [(64, 32), (64, 32)]  # fc2 x 2
        with torch.no_grad(), zero_skip.use("sparse"):
            got = compiled(**inputs).logits
        torch.testing.assert_close(got, model(**inputs).logits, rtol=1e-4, atol=1e-4)


def test_stats_and_report():
    model, x = _relu_mlp((8, 32, 16, 3))
    with every_layer():
        compiled = exprune_fx.compile(model, x, _all_disabled(model, x))
    assert compiled.exprune_stats()["zero_skip"]["nodes"]["linear_1"]["calls"] == 0  # compile's own run reset
    inputs = torch.randn(5, 8)
    with torch.no_grad():
        compiled(inputs)
        hidden = torch.relu(model[0](inputs))
    stats = compiled.exprune_stats()
    node = stats["zero_skip"]["nodes"]["linear_1"]
    nonzero = int(torch.count_nonzero(hidden))
    assert (node["rows"], node["in_features"], node["out_features"]) == (5, 32, 16)
    assert node["dense_macs"] == 5 * 32 * 16 and node["executed_macs"] == nonzero * 16
    assert node["density"] == pytest.approx(nonzero / (5 * 32))
    assert stats["zero_skip"]["saved_flops"] == pytest.approx(2 * sum(
        v["dense_macs"] - v["executed_macs"] for v in stats["zero_skip"]["nodes"].values()))
    assert stats["zero_skip"]["executed_flops"] == pytest.approx(stats["executed_flops"] - stats["zero_skip"]["saved_flops"])
    assert stats["executed_flops"] == stats["dense_flops"] and stats["reduction"] == 0  # no ExPrune site: unchanged
    assert "zero-skip: input density linear_1" in compiled.report()
    compiled.reset_stats()
    assert compiled.exprune_stats()["zero_skip"]["nodes"]["linear_1"]["calls"] == 0


def test_off_by_default_and_validated():
    model, x = mlp(widths=(8, 32, 16, 3))
    compiled = exprune_fx.compile(model, x, Config(k=8))
    assert compiled.zero_skip == [] and compiled.exprune_stats()["zero_skip"]["nodes"] == {}
    assert not any(n.target is torch.ops.exprune.zero_skip_linear.default for n in compiled.graph_module.graph.nodes)
    for bad in (1, "yes", None):
        with pytest.raises(InputError, match="Config.zero_skip must be True or False"):
            Config(zero_skip=bad)


def test_no_warning_when_only_zero_skip_rewrites():
    model, x = mlp(widths=(8, 32, 16, 3))
    config = _all_disabled(model, x)
    with warnings.catch_warnings(), every_layer():
        warnings.simplefilter("error", ExPruneWarning)
        exprune_fx.compile(model, x, config)


def test_save_load_round_trip(tmp_path):
    model, x = _relu_mlp((8, 64, 64, 3))
    with every_layer():
        compiled = exprune_fx.compile(model, x, Config(zero_skip=True, alpha=0.2, k=8))
    path = tmp_path / "m.pt2"
    exprune_fx.save(compiled, path)
    loaded = exprune_fx.load(path, model=model)
    assert loaded.config.zero_skip and loaded.zero_skip == compiled.zero_skip
    inputs = torch.randn(6, 8)
    with torch.no_grad(), zero_skip.use("sparse"):
        assert torch.equal(loaded(inputs), compiled(inputs))
    assert loaded.exprune_stats()["zero_skip"]["nodes"]["linear_2"]["rows"] == 6
    assert "4.weight" not in dict(loaded.graph_module.named_parameters())  # the head: saved once, transposed


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_torch_compile_backend(inner):
    model, x = _relu_mlp((8, 32, 32, 3))
    b = exprune_fx.backend(Config(zero_skip=True, alpha=0.0, k=8), inner=inner)
    fast = torch.compile(model, backend=b)
    with torch.no_grad(), zero_skip.use("sparse"), every_layer():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)
    nodes = exprune_fx.stats(b)["zero_skip"]["nodes"]
    assert list(nodes) == ["graph0.linear_2"] and nodes["graph0.linear_2"]["rows"] == 4


def test_cost_model_leaves_layers_where_skipping_cannot_pay():
    model, x = mlp(widths=(16, 1024, 1024, 10))
    with torch.no_grad():
        model[2].bias.sub_(0.5)  # sparser ReLU outputs before the head
    compiled = exprune_fx.compile(model, x, _all_disabled(model, x))
    assert [(r.name, r.rewritten) for r in compiled.zero_skip] == [("linear_1", True), ("linear_2", False)]
    assert "cannot pay on a 1024 -> 10 product" in compiled.zero_skip[1].reason
    assert "2.weight" not in dict(compiled.graph_module.named_parameters())  # linear_1's, transposed
    assert "4.weight" in dict(compiled.graph_module.named_parameters())  # the head's, untouched
    inputs = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(compiled(inputs), model(inputs), rtol=1e-5, atol=1e-5)
    assert list(compiled.exprune_stats()["zero_skip"]["nodes"]) == ["linear_1"]
    assert "zero-skip: linear_2 stays dense: the sparse path cannot pay" in compiled.report()


def test_benchmark_pieces(tmp_path):
    """benchmarks/zero_skip.py: the per-layer rows on a small model, the grid and the fit."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import zero_skip as bench

    model, x = _relu_mlp((8, 64, 32, 3))
    compiled = bench._compile(model, x, _all_disabled(model, x))
    rows = bench.zero_skip_rows("mlp", compiled, torch.randn(9, 8), repeats=2, rows=(1, 8, 32), runs=2)
    assert [(r["node"], r["shape"], r["rows"]) for r in rows] == \
        [("linear_1", [64, 32], 1), ("linear_1", [64, 32], 8), ("linear_2", [32, 3], 1), ("linear_2", [32, 3], 8)]
    assert all(0 <= r["density"] <= 1 and not r["rewritten_by_default"] for r in rows)
    assert rows[0]["timing"]["dense linear"]["ratio"] == 1.0
    assert "| mlp | linear_1 (64 -> 32) | no | 8 |" in bench.markdown(rows)
    cells = bench.grid(shapes=((64, 32),), rows=(1, 4), densities=(0.1, 0.9), repeats=2, runs=1)
    assert len(cells) == 4 and all(c["dense_ms"] > 0 and c["sparse_ms"] > 0 for c in cells)
    model_fit, lost = bench.fit(cells)
    assert isinstance(model_fit, zero_skip.CostModel) and 0 <= lost <= bench.loss(cells, zero_skip.COST)
    assert "| 64 x 32 | 4 |" in bench.grid_markdown(cells)


def test_after_pruning_sites_equals_the_same_model_without_zero_skip():
    """Sites that prune (alpha > 0) feed their consumer more zeros; skipping them changes nothing."""
    model, x = _relu_mlp((16, 128, 128, 64, 5), shift=0.0)
    without = exprune_fx.compile(model, x, Config(alpha=0.3, k=8))
    with every_layer():
        with_skip = exprune_fx.compile(model, x, Config(zero_skip=True, alpha=0.3, k=8))
    assert [r.name for r in with_skip.zero_skipped] == ["linear_3"] and len(with_skip.rewritten_sites) == 2
    inputs = torch.randn(7, 16)
    with torch.no_grad(), zero_skip.use("sparse"):
        torch.testing.assert_close(with_skip(inputs), without(inputs), rtol=1e-5, atol=1e-5)
    sites, skips = with_skip.exprune_stats()["sites"], with_skip.exprune_stats()["zero_skip"]["nodes"]
    assert sites["linear_2"]["pruned"] > 0 and skips["linear_3"]["density"] < 0.5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("path", ["sparse", "dense"])
def test_kernel_on_cuda(path):
    g = torch.Generator().manual_seed(0)
    x = sparse_input((4, 3, 64), 0.2, "random", g, torch.float32).cuda()
    w, b = torch.randn(16, 64, generator=g).cuda(), torch.randn(16, generator=g).cuda()
    stats = zero_skip.new_counters("cuda")
    with zero_skip.use(path):
        y = torch.ops.exprune.zero_skip_linear(x, w.T.contiguous(), b, stats)
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    c = zero_skip.read(stats)
    assert c["rows"] == 12 and c["executed"] == int(torch.count_nonzero(x)) * 16 and c["sparse_calls"] == (path == "sparse")
