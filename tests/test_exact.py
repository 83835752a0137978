"""Exact mode: lossless early termination on non-negative inputs, and the non-negativity
analysis it rests on."""

import warnings

import pytest
import torch
from archgen import architectures
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import exprune_fx
from exprune_fx import Config, ExPruneWarning, InputError
from exprune_fx.passes.nonnegative import META_NONNEGATIVE
from exprune_fx.runtime.counters import new_counters, read
from exprune_fx.runtime.exact import exact_relu_conv2d, exact_relu_matmul, sign_order
from exprune_fx.zoo import residual_cnn


def run(model, x):
    with torch.no_grad():
        return model(x)


def compile_quietly(model, x, config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExPruneWarning)
        return exprune_fx.compile(model, x, config)


@settings(max_examples=60, deadline=None)
@given(architectures(), st.integers(2, 6))
def test_exact_mode_equals_the_dense_model(arch, k):
    """After every decision the outputs equal the dense model's, on generated architectures
    (batch norm with negative scales, residual adds, grouped convs, pooling, attention)."""
    model, x = arch
    compiled = compile_quietly(model, x, Config(mode="exact", k=k))
    for batch in (x, torch.cat([x, -x, 3 * x])):
        torch.testing.assert_close(run(compiled, batch), run(model, batch), rtol=1e-4, atol=1e-4)
    for s in compiled.exprune_stats()["sites"].values():
        assert s["test"] == "exact"
        assert s["partial_macs"] + s["remainder_macs"] <= s["dense_macs"]


@settings(max_examples=60, deadline=None)
@given(architectures())
def test_nonnegative_analysis_is_sound(arch):
    """Every value the analysis calls non-negative is >= 0 on random inputs."""
    model, x = arch
    analysis = exprune_fx.analyze(model, x)
    marked = {n.name for n in analysis.graph_module.graph.nodes
              if n.meta[META_NONNEGATIVE] and n.op == "call_function"}
    module = analysis.lifted.exported.module()
    assert marked <= {n.name for n in module.graph.nodes}  # every claim is checked below
    failures = []

    class Checker(torch.fx.Interpreter):
        def run_node(self, node):
            result = super().run_node(node)
            if node.name in marked:
                for v in result if isinstance(result, (tuple, list)) else [result]:
                    if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool((v >= 0).all()):
                        failures.append(node.format_node())
            return result

    with torch.no_grad():
        for batch in (x, -2 * x, torch.randn_like(x)):
            Checker(module).run(batch)
    assert not failures


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 6), st.integers(1, 40), st.integers(1, 9), st.integers(1, 8), st.integers(0, 2**16),
       st.floats(0.0, 0.9))
def test_exact_matmul_kernel(rows, terms, outputs, k, seed, sparsity):
    """relu(kernel) == relu(dense) for x >= 0, any signs and zeros in the weight, and every
    block size; stopped outputs are exactly those cut short, and they are negative."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(outputs, terms, generator=g)
    w = w * (torch.rand(outputs, terms, generator=g) >= sparsity)
    x = torch.rand(rows, terms, generator=g) * (torch.rand(rows, terms, generator=g) > 0.3)
    offset = torch.randn(rows, outputs, generator=g)
    stats = new_counters()
    z = exact_relu_matmul(x, *sign_order(w), offset, k, stats)
    dense = x @ w.T + offset
    torch.testing.assert_close(z.relu(), dense.relu(), rtol=1e-5, atol=1e-5)
    c = read(stats)
    assert bool((dense[z == 0] <= 1e-5).all())  # an output stops only when its exact value is negative
    assert c["pruned"] <= int((z == 0).sum())
    assert c["partial"] + c["remainder"] <= c["dense"]
    assert c["dense"] == rows * int((w != 0).sum())  # zero weights are not terms
    assert c["partial"] == rows * int((w > 0).sum())


def test_exact_matmul_kernel_empty_and_full():
    x = torch.rand(3, 16)
    for w in (torch.ones(4, 16), -torch.ones(4, 16), torch.zeros(4, 16)):
        stats = new_counters()
        z = exact_relu_matmul(x, *sign_order(w), None, 4, stats)
        torch.testing.assert_close(z.relu(), (x @ w.T).relu())
        c = read(stats)
        if bool((w < 0).all()):  # the sum starts at 0 (not < 0): one block of 4, then every output stops
            assert c["pruned"] == 12 and c["remainder"] == 12 * 4 and c["test"] == 12 * 2
        else:
            assert c["pruned"] == 0


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 5), st.integers(1, 6), st.sampled_from([1, 3]), st.integers(1, 9),
       st.integers(0, 2**16), st.sampled_from([0, 1]))
def test_exact_conv_kernel(batch, cin, cout, size, k, seed, pad):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(cout, cin, size, size, generator=g)
    x = torch.rand(batch, cin, 6, 6, generator=g)
    offset = torch.randn(1, cout, 1, 1, generator=g)
    stats = new_counters()
    pos, order, neg, count = sign_order(w.reshape(cout, -1))
    z = exact_relu_conv2d(x, pos.reshape(w.shape), order, neg, count, offset, [1, 1], [pad, pad], [1, 1], k, stats)
    dense = torch.nn.functional.conv2d(x, w, None, 1, pad) + offset
    torch.testing.assert_close(z.relu(), dense.relu(), rtol=1e-5, atol=1e-5)
    c = read(stats)
    assert c["partial"] + c["remainder"] <= c["dense"]
    assert bool((dense[z == 0] <= 1e-5).all())


def _bn_mlp(negative_scale: bool):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 48), nn.ReLU(), nn.Linear(48, 48), nn.BatchNorm1d(48), nn.ReLU(),
                          nn.Linear(48, 3)).eval()
    with torch.no_grad():
        bn = model[3]
        bn.weight.copy_(-bn.weight.abs() - 0.5 if negative_scale else torch.rand(48) + 0.5)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    return model


@pytest.mark.parametrize("negative_scale", [False, True])
def test_batch_norm_scales_fold_into_the_signs(negative_scale):
    model = _bn_mlp(negative_scale)
    x = torch.randn(200, 6)
    compiled = compile_quietly(model, x[:4], Config(mode="exact", k=4))
    torch.testing.assert_close(run(compiled, x), run(model, x), rtol=1e-5, atol=1e-5)
    rewritten = {r.name: r for r in compiled.sites if r.rewritten}
    assert list(rewritten) == ["linear_1"]
    assert compiled.exprune_stats()["sites"]["linear_1"]["pruned"] > 0


def test_exact_sites_and_reasons_on_the_residual_cnn():
    model, x = residual_cnn()
    compiled = compile_quietly(model, x, Config(mode="exact", k=8))
    torch.testing.assert_close(run(compiled, x), run(model, x), rtol=1e-4, atol=1e-4)
    by_name = {r.name: r for r in compiled.sites}
    first = next(r for r in compiled.sites if r.kind.startswith("conv"))
    assert not first.rewritten and "non-negative" in first.reason  # its input is the image
    assert sum(r.rewritten for r in compiled.sites) >= 3
    head = [r for r in by_name.values() if r.decision is None]
    assert head and not any(r.rewritten for r in head)
    assert compiled.exprune_stats()["reduction"] > 0


def test_exact_mode_needs_no_exchangeability():
    """A ReLU site whose contraction is pinned (a conv fed by a concatenation's output
    ... or a linear after a sliced axis) still runs exactly: no statistics are involved."""

    class Sliced(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(5, 12), nn.Linear(8, 7)

        def forward(self, x):
            return torch.relu(self.b(torch.relu(self.a(x))[:, :8]))

    torch.manual_seed(1)
    model, x = Sliced().eval(), torch.randn(64, 5)
    statistical = compile_quietly(model, x, Config(k=2))
    exact = compile_quietly(model, x, Config(mode="exact", k=2))
    assert not any(r.rewritten for r in statistical.sites)
    assert [r.name for r in exact.sites if r.rewritten] == ["linear_1"]
    torch.testing.assert_close(run(exact, x), run(model, x))


def test_argmax_sites_stay_dense_in_exact_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 5)).eval()
    names = exprune_fx.analyze(model, torch.randn(2, 4)).outputs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExPruneWarning)
        compiled = exprune_fx.compile(model, torch.randn(2, 4), Config(mode="exact"),
                                      outputs={name: "argmax" for name in names})
    head = compiled.sites[-1]
    assert head.decision == "argmax" and not head.rewritten and "ReLU decision" in head.reason


def test_mode_is_validated_saved_and_not_retunable(tmp_path):
    with pytest.raises(InputError, match="mode"):
        Config(mode="lossless")
    with pytest.raises(InputError, match="mode"):
        Config(sites={"linear": {"mode": 3}})
    model = _bn_mlp(True)
    x = torch.randn(8, 6)
    compiled = compile_quietly(model, x, Config(mode="exact", k=4))
    with pytest.raises(InputError, match="exact mode"):
        compiled.retune("linear_1", alpha=0.1)
    exprune_fx.save(compiled, tmp_path / "m")
    loaded = exprune_fx.load(tmp_path / "m", model)
    assert loaded.config.mode == "exact"
    torch.testing.assert_close(run(loaded, x), run(model, x))


def test_per_site_mode_mixes_exact_and_statistical():
    model = _bn_mlp(False)
    x = torch.randn(64, 6)
    config = Config(k=8, alpha=0.0, sites={"linear_1": {"mode": "exact", "k": 4}})
    compiled = compile_quietly(model, x[:2], config)
    assert [(r.name, r.test) for r in compiled.sites if r.rewritten] == [("linear_1", "exact")]
    torch.testing.assert_close(run(compiled, x), run(model, x), rtol=1e-5, atol=1e-5)
