"""exprune_fx.compile end to end: equivalence, prune-everything, structure, errors."""

import copy
import dataclasses
import math
import warnings

import pytest
import torch
from archgen import architectures
from trained import trained_mlp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import exprune_fx
from exprune_fx import Config, ExPruneWarning, InputError
from exprune_fx.zoo import gcn, mlp, residual_cnn

NEVER = Config(alpha=0.0, k=2)
NEVER_STAGED = Config(alpha=0.0, k=2, stages=3)
NEVER_MAGNITUDE = Config(test="threshold", threshold=-math.inf, k=2, order="magnitude")
EVERYTHING = Config(test="threshold", threshold=math.inf, k=2)


def run(model, inputs):
    with torch.no_grad():
        if isinstance(inputs, dict):
            return model(**inputs)
        return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


def op_outputs(compiled, x):
    """Run the compiled graph on one tensor input, returning each exprune op's result."""
    seen = []

    class Recorder(torch.fx.Interpreter):
        def run_node(self, node):
            result = super().run_node(node)
            if str(node.target).startswith("exprune."):
                seen.append((node, result))
            return result

    with torch.no_grad():
        Recorder(compiled.graph_module).run(x)
    return seen


@settings(max_examples=60)
@given(architectures(), st.sampled_from([NEVER, NEVER_STAGED, NEVER_MAGNITUDE]))
def test_never_prune_is_equivalent(arch, config):
    model, x = arch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExPruneWarning)
        compiled = exprune_fx.compile(model, x, config)
    for batch in (x, torch.cat([x, -x, 2 * x])):
        torch.testing.assert_close(run(compiled, batch), run(model, batch), rtol=1e-5, atol=1e-5)
    stats = compiled.exprune_stats()
    assert all(s["pruned"] == 0 for s in stats["sites"].values())


@settings(max_examples=60)
@given(architectures())
def test_prune_everything(arch):
    """threshold=+inf: every decided output is exactly 0 after its ReLU, and the counted
    work of every rewritten site is its partial reduction and tests only."""
    model, x = arch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExPruneWarning)
        compiled = exprune_fx.compile(model, x, EVERYTHING)
    for node, out in op_outputs(compiled, x):
        if "relu" in str(node.target):
            assert torch.all(out == 0)
    for name, s in compiled.exprune_stats()["sites"].items():
        if s["decision"] == "relu":
            assert s["pruned"] == s["outputs"] > 0
            assert s["remainder_macs"] == 0
            assert s["executed_macs"] == s["partial_macs"] + s["test_macs"]


def test_magnitude_order_reads_each_outputs_largest_terms_and_is_reported():
    """order="magnitude": a ReLU site's test reads each output's k largest-weight terms (here
    the k largest weights are strongly negative, the others small and positive: the natural
    order's first k terms see the positive ones and keep the output, the magnitude order's
    prune it); the report says which order each site's test reads."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    with torch.no_grad():
        model[0].bias.fill_(5.0)  # every hidden unit positive
        model[2].bias.zero_()
        model[2].weight.fill_(0.01)
        model[2].weight[:, 28:] = -1.0
    x = torch.randn(64, 8) * 0.1
    config = Config(test="threshold", threshold=0.0, k=4)
    natural = exprune_fx.compile(model, x, config)
    by_magnitude = exprune_fx.compile(model, x, dataclasses.replace(config, order="magnitude"))
    for compiled in (natural, by_magnitude):
        compiled(x)
    orders = {s.name: s.order for s in by_magnitude.sites if s.rewritten}
    assert orders == {"linear_1": "magnitude"}  # the first linear reads the graph input (pinned)
    assert "rewritten, magnitude order" in by_magnitude.report()
    assert by_magnitude.exprune_stats()["sites"]["linear_1"]["order"] == "magnitude"
    h = model[1](model[0](x))
    # every output of linear_1 is negative: pruning it all is right
    assert torch.all(h > 0) and torch.all(model[2](h) <= 0)
    assert natural.exprune_stats()["sites"]["linear_1"]["pruned"] == 0
    assert by_magnitude.exprune_stats()["sites"]["linear_1"]["prune_rate"] == 1.0
    with torch.no_grad():
        torch.testing.assert_close(by_magnitude(x), model(x), rtol=1e-5, atol=1e-5)


def test_pruned_outputs_are_zero_and_the_rest_exact():
    model, x = mlp(widths=(32, 256, 256, 10), batch=64)
    compiled = exprune_fx.compile(model, x, Config(alpha=0.3, k=16))
    ((node, out),) = op_outputs(compiled, x)
    dense = model[2](model[1](model[0](x)))  # linear_1's pre-activation
    pruned = out == 0
    assert 0 < pruned.float().mean() < 1
    torch.testing.assert_close(out[~pruned], dense[~pruned], rtol=1e-5, atol=1e-5)


def test_other_batch_sizes_and_structures():
    class Structured(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(6, 64), nn.Linear(64, 64), nn.Linear(64, 3)

        def forward(self, x, scale=None):
            h = torch.relu(self.b(torch.relu(self.a(x))))
            return {"logits": self.c(h) * scale, "hidden": (h, h.sum(-1))}

    model = Structured().eval()
    inputs = {"x": torch.randn(1, 6), "scale": torch.tensor(2.0)}
    compiled = exprune_fx.compile(model, inputs, NEVER)
    for batch in (1, 5, 33):
        call = {"x": torch.randn(batch, 6), "scale": torch.tensor(2.0)}
        out, ref = run(compiled, call), run(model, call)
        assert isinstance(out, dict) and isinstance(out["hidden"], tuple)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_gcn_with_sparse_adjacency():
    model, inputs = gcn(sparse=True)
    compiled = exprune_fx.compile(model, inputs, NEVER)
    torch.testing.assert_close(run(compiled, inputs), run(model, inputs), rtol=1e-5, atol=1e-5)
    assert [s.name for s in compiled.rewritten_sites] == ["linear_1"]
    # whole-model FLOPs count the sparse aggregation by its stored entries, not as dense
    compiled.reset_stats()
    run(compiled, inputs)
    x, adjacency = inputs
    widths = [(lin.in_features, lin.out_features) for lin in model.lins]
    expected = sum(2 * adjacency._nnz() * fi + 2 * len(x) * fi * fo for fi, fo in widths)
    assert compiled.exprune_stats()["dense_flops"] == pytest.approx(expected, rel=1e-6)


def test_the_original_model_is_not_modified():
    model, x = residual_cnn()
    state = copy.deepcopy(model.state_dict())
    compiled = exprune_fx.compile(model, x, Config(alpha=0.2, k=8))
    run(compiled, x)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not any(k.startswith("exprune") for k in model.state_dict())
    assert not model.training


def test_no_eligible_site_warns_and_behaves_like_the_model():
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).eval()
    x = torch.randn(3, 4)
    with pytest.warns(ExPruneWarning, match="no site was rewritten.*linear_1: no decision"):
        compiled = exprune_fx.compile(model, x)
    torch.testing.assert_close(run(compiled, x), run(model, x))


def test_sites_left_dense_are_reported():
    model, x = mlp(widths=(8, 16, 64, 64, 3))
    with pytest.warns(ExPruneWarning, match="no site was rewritten"):
        compiled = exprune_fx.compile(model, x, Config(k=32, sites={"linear_2": {"enabled": False}}))
    by_name = {s.name: s for s in compiled.sites}
    assert "n=16 <= k=32" in by_name["linear_1"].reason
    assert by_name["linear_2"].reason == "disabled in the config"
    assert "no free factor" in by_name["linear"].reason
    assert "dense:" in compiled.report()
    with pytest.raises(InputError, match="unknown sites"):
        exprune_fx.compile(model, x, Config(sites={"linear_9": {"k": 4}}))
    with pytest.raises(InputError, match="Config"):
        exprune_fx.compile(model, x, {"k": 4})


def test_stats_and_reset():
    model, x = mlp(widths=(32, 256, 256, 10), batch=8)
    compiled = exprune_fx.compile(model, x, Config(alpha=0.2, k=16))
    run(compiled, x)
    run(compiled, torch.randn(24, 32))
    stats = compiled.exprune_stats()
    site = stats["sites"]["linear_1"]
    assert stats["calls"] == 2 and stats["rows"] == 32 and site["calls"] == 2
    assert site["dense_macs"] == 32 * 256 * 256
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(32, 32))
    assert stats["dense_flops"] == pytest.approx(counter.get_total_flops())
    assert stats["executed_flops"] == pytest.approx(
        stats["dense_flops"] - 2 * site["dense_macs"] + 2 * site["executed_macs"])
    compiled.reset_stats()
    assert compiled.exprune_stats()["calls"] == 0 and compiled.exprune_stats()["sites"]["linear_1"]["calls"] == 0


def test_trained_model_saves_flops_within_one_point():
    model, (x, y) = trained_mlp()
    dense_acc = (run(model, x).argmax(1) == y).float().mean().item()
    compiled = exprune_fx.compile(model, x[:8], Config(alpha=0.05, k=32))
    acc = (run(compiled, x).argmax(1) == y).float().mean().item()
    stats = compiled.exprune_stats()
    assert dense_acc > 0.8
    assert stats["reduction"] > 0.0
    assert stats["sites"]["linear_1"]["prune_rate"] > 0.05
    assert acc >= dense_acc - 0.01
    never = exprune_fx.compile(model, x[:8], Config(alpha=0.0, k=32))
    run(never, x)
    oracle = never.exprune_stats()["oracle_reduction"]
    assert stats["reduction"] < oracle < 1  # a perfect sign predictor at k=32 saves more
    assert stats["argmax_oracle_reduction"] == 0.0  # no argmax site


def test_the_argmax_oracle_stops_every_row_of_the_head_after_k_terms():
    model, (x, _) = trained_mlp()
    never = exprune_fx.compile(model, x[:8], Config(alpha=0.0, k=32), outputs={"output": "argmax"})
    run(never, x)
    stats = never.exprune_stats()
    head = [s for s in stats["sites"].values() if s["decision"] == "argmax"]
    assert len(head) == 1 and head[0]["pruned"] == 0  # alpha 0 stops no row
    expected = 2 * head[0]["dense_macs"] * (1 - 32 / head[0]["n"]) / stats["dense_flops"]
    assert stats["argmax_oracle_reduction"] == pytest.approx(expected) and expected > 0
    assert stats["oracle_reduction"] > 0  # the ReLU sites' sign oracle is counted apart


def test_rewritten_graph_exports_and_prints():
    model, x = mlp(widths=(8, 64, 64, 3))
    compiled = exprune_fx.compile(model, x, Config(alpha=0.1, k=16))
    assert "exprune.relu_linear" in compiled.graph_module.code
    exported = torch.export.export(compiled.graph_module, (x,), strict=False)
    assert any("exprune.relu_linear" in str(n.target) for n in exported.graph.nodes)


def test_inductor_compiles_around_the_runtime_ops():
    model, x = mlp(widths=(8, 64, 64, 3))
    compiled = exprune_fx.compile(model, x, Config(alpha=0.0, k=16))
    fast = torch.compile(compiled.graph_module, backend="inductor")
    torch.testing.assert_close(run(fast, x), run(model, x), rtol=1e-5, atol=1e-5)
    assert compiled.exprune_stats()["sites"]["linear_1"]["calls"] >= 1  # the op ran and counted


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_runs_on_cuda():
    model, x = residual_cnn()
    model, x = model.cuda(), x.cuda()
    compiled = exprune_fx.compile(model, x, Config(alpha=0.0, k=8))
    torch.testing.assert_close(run(compiled, x), run(model, x), rtol=1e-4, atol=1e-4)
    pruning = exprune_fx.compile(model, x, Config(alpha=0.2, k=8))
    run(pruning, x)
    assert pruning.exprune_stats()["reduction"] != 0


def check_early_exit(model, x, alpha, k=8):
    """Compile twice (nothing pruned / alpha): the first equals the model, and the outputs
    the second keeps equal the first's. Returns both and the kept mask."""
    never = exprune_fx.compile(model, x, Config(alpha=0.0, k=k))
    torch.testing.assert_close(run(never, x), run(model, x), rtol=1e-5, atol=1e-5)
    some = exprune_fx.compile(model, x, Config(alpha=alpha, k=k))
    ((_, out),) = op_outputs(some, x)
    ((_, dense),) = op_outputs(never, x)
    kept = out != 0
    torch.testing.assert_close(out[kept], dense[kept], rtol=1e-5, atol=1e-5)
    return never, some, kept


def test_epilogue_folding_matches_dense():
    """Bias, batch norm with negative scales, residual, doubling and constant scales folded."""
    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 64)
            self.b = nn.Linear(64, 64)
            self.bn = nn.BatchNorm1d(64)
            self.bn.weight.data.uniform_(-1.5, 1.5)
            self.bn.running_mean.normal_()
            self.bn.running_var.uniform_(0.5, 2)
            self.gain = nn.Parameter(torch.rand(64) + 0.5)  # a buffer would pin the width
            self.head = nn.Linear(64, 3)

        def forward(self, x):
            h = torch.relu(self.a(x))
            y = self.bn(self.b(h))
            return self.head(torch.relu((y + y + h) * self.gain / 3.0 - 0.1))

    never, some, kept = check_early_exit(Chain().eval(), torch.randn(64, 6), alpha=0.3)
    assert [s.name for s in never.rewritten_sites] == ["linear_1"]
    assert 0 < kept.float().mean() < 1


def test_product_of_two_run_time_values():
    """A bmm/matmul of two activations whose contraction is free is rewritten too."""
    class Gram(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Linear(4, 48), nn.Linear(4, 48), nn.Linear(5, 2)

        def forward(self, x):  # contraction over the free hidden width of a and b
            scores = torch.bmm(torch.relu(self.a(x)), torch.relu(self.b(x)).transpose(1, 2))
            return self.head(torch.relu(scores - 0.5))

    never, some, _ = check_early_exit(Gram().eval(), torch.randn(3, 5, 4), alpha=0.4)
    assert [s.kind for s in never.rewritten_sites] == ["bmm"]
    assert some.exprune_stats()["sites"]["bmm"]["outputs"] == 3 * 5 * 5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_on_cpu(dtype):
    model, x = mlp(widths=(16, 128, 128, 4))
    model, x = model.to(dtype), x.to(dtype)
    never = exprune_fx.compile(model, x, Config(alpha=0.0, k=8))
    tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float64: 1e-9}[dtype]
    torch.testing.assert_close(run(never, x), run(model, x), rtol=tol, atol=tol)
    some = exprune_fx.compile(model, x, Config(alpha=0.3, k=8))
    assert run(some, x).dtype == dtype
    assert some.exprune_stats()["sites"]["linear_1"]["pruned"] > 0


def test_unsupported_dtypes_devices_and_inputs_are_refused():
    model, x = mlp(widths=(16, 32, 32, 4))
    with pytest.raises(InputError, match="dtype torch.int8 are not supported"):
        exprune_fx.compile(_int_model(), x)
    with pytest.raises(InputError, match="'meta' are not supported"):
        exprune_fx.compile(model, x.to("meta"))
    with pytest.raises(InputError, match="int64"):
        exprune_fx.compile(model, x.long())
    with pytest.raises(InputError, match="argument names"):
        exprune_fx.compile(model, {"inputs": x})
    with pytest.raises(exprune_fx.TrainingModeError):
        exprune_fx.compile(model.train(), x)


def _int_model():
    class Ints(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(4, dtype=torch.int8), requires_grad=False)

        def forward(self, x):
            return x
    return Ints().eval()


def test_retune_changes_alpha_without_recompiling(tmp_path):
    model, x = mlp(widths=(32, 256, 256, 10), batch=64)
    compiled = exprune_fx.compile(model, x, Config(alpha=0.0, k=16))
    run(compiled, x)
    assert compiled.exprune_stats()["sites"]["linear_1"]["pruned"] == 0
    compiled.retune("linear_1", alpha=0.3)
    compiled.reset_stats()
    run(compiled, x)
    assert compiled.exprune_stats()["sites"]["linear_1"]["pruned"] > 0
    assert compiled.config.for_site("linear_1").alpha == 0.3
    path = tmp_path / "m.pt2"
    exprune_fx.save(compiled, path)
    loaded = exprune_fx.load(path)
    torch.testing.assert_close(run(loaded, x), run(compiled, x))
    assert loaded.config.for_site("linear_1").alpha == 0.3
    with pytest.raises(InputError, match="alpha must be"):
        compiled.retune("linear_1", alpha=0.9)
    with pytest.raises(InputError, match="recompile"):
        compiled.retune("linear_1", k=8)
    with pytest.raises(InputError, match="not a rewritten site"):
        compiled.retune("linear", alpha=0.1)


class _ChannelsLastHead(torch.nn.Module):
    """A linear over channels-last features: its exchangeable terms (the channels) are not the
    leading factor of the flattened input, so the rewrite reorders the weight into a buffer."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.fc = torch.nn.Linear(16 * 4 * 4, 32)
        self.out = torch.nn.Linear(32, 4)

    def forward(self, x):
        h = torch.relu(self.conv(x)).permute(0, 2, 3, 1).flatten(1)
        return self.out(torch.relu(self.fc(h)))


def test_rewritten_graph_holds_each_weight_once(tmp_path):
    torch.manual_seed(0)
    model, x = _ChannelsLastHead().eval(), torch.randn(2, 3, 4, 4)
    compiled = exprune_fx.compile(model, x, Config(k=4, alpha=0.0))
    assert [s.name for s in compiled.rewritten_sites] == ["linear"]
    params = dict(compiled.graph_module.named_parameters())
    buffers = dict(compiled.graph_module.named_buffers())
    assert "fc.weight" not in params and "fc.bias" not in params  # reordered into a buffer, bias folded
    assert buffers["exprune_1_linear_weight"].shape == model.fc.weight.shape
    assert "conv.weight" in params and "out.weight" in params  # still read by the graph
    assert model.fc.weight is dict(model.named_parameters())["fc.weight"]  # the user's model is untouched
    inputs = torch.randn(5, 3, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(compiled(inputs), model(inputs), rtol=1e-5, atol=1e-5)
        exprune_fx.save(compiled, tmp_path / "m.pt")
        torch.testing.assert_close(exprune_fx.load(tmp_path / "m.pt")(inputs), model(inputs), rtol=1e-5, atol=1e-5)
