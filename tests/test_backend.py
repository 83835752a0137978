"""The torch.compile backend: both inner compilers, graph breaks, recompilation, stats."""

import pytest
import torch
from torch import nn

import exprune_fx
from exprune_fx import Config, InputError
from exprune_fx.zoo import mlp, residual_cnn

pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # (tests/conftest.py)
NEVER = Config(alpha=0.0, k=8)
SOME = Config(alpha=0.3, k=8)


def call(model, inputs):
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return out.logits if hasattr(out, "logits") else out


def bigger(inputs):
    grow = lambda t: torch.cat([t, t, t]) if isinstance(t, torch.Tensor) else t  # noqa: E731
    return {k: grow(v) for k, v in inputs.items()} if isinstance(inputs, dict) else grow(inputs)


def factories():
    out = [("mlp", lambda: mlp(widths=(16, 64, 64, 4))), ("residual_cnn", residual_cnn)]
    try:
        from exprune_fx.zoo import hf_opt
        import transformers  # noqa: F401
        out.append(("hf_opt", hf_opt))
    except ImportError:
        pass
    return out


@pytest.mark.parametrize("inner", ["eager", "inductor"])
@pytest.mark.parametrize("name, factory", factories())
def test_never_prune_equivalence_and_pruning(inner, name, factory):
    model, inputs = factory()
    fast = torch.compile(model, backend=exprune_fx.backend(NEVER, inner=inner))
    for batch in (inputs, bigger(inputs)):  # a new batch size recompiles or reuses the dynamic graph
        torch.testing.assert_close(call(fast, batch), call(model, batch), rtol=1e-5, atol=1e-5)
    stats = exprune_fx.stats(fast)
    assert stats["calls"] == 2 and stats["sites"]
    assert all(s["pruned"] == 0 for s in stats["sites"].values())

    torch._dynamo.reset()
    pruning = torch.compile(model, backend=exprune_fx.backend(SOME, inner=inner))
    call(pruning, inputs)
    rates = [s["prune_rate"] for s in exprune_fx.stats(pruning)["sites"].values() if s["decision"] == "relu"]
    assert rates and max(rates) > 0


def test_registered_backend_name():
    assert "exprune" in torch._dynamo.list_backends()
    model, x = mlp(widths=(16, 64, 64, 4))
    fast = torch.compile(model, backend="exprune")  # default Config: alpha=0.05 may prune
    assert call(fast, x).shape == call(model, x).shape
    stats = exprune_fx.stats(fast)
    assert stats["graphs"] >= 1 and "graph0.linear_1" in stats["sites"]


def test_graph_break_regions_each_go_through_the_pipeline():
    class Chatty(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
            self.b = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))

        def forward(self, x):
            h = self.a(x)
            if h.sum().item() > -1e9:  # .item() in Python control flow breaks the graph
                print("", end="")
            return self.b(h)

    model, x = Chatty().eval(), torch.randn(4, 8)
    backend = exprune_fx.backend(NEVER, inner="eager")
    fast = torch.compile(model, backend=backend)
    torch.testing.assert_close(call(fast, x), call(model, x), rtol=1e-5, atol=1e-5)
    stats = exprune_fx.stats(backend)
    assert stats["graphs"] >= 2
    assert len(stats["sites"]) >= 2  # one rewritten site on each side of the break


def test_compiled_function_stats_through_the_backend_object():
    model, x = mlp(widths=(16, 64, 64, 4))
    backend = exprune_fx.backend(NEVER, inner="eager")

    @torch.compile(backend=backend)
    def run(inp):
        return model(inp) * 2

    torch.testing.assert_close(run(x), call(model, x) * 2, rtol=1e-5, atol=1e-5)
    assert exprune_fx.stats(backend)["calls"] == 1
    exprune_fx.reset_stats(backend)
    assert exprune_fx.stats(backend)["calls"] == 0
    with pytest.raises(InputError, match="backend object"):
        exprune_fx.stats(run)


def test_bad_settings():
    with pytest.raises(InputError, match="inner must be one of"):
        exprune_fx.backend(inner="aot")
    with pytest.raises(InputError, match="Config"):
        exprune_fx.backend(config={"k": 4})


def test_training_mode_is_refused():
    model = nn.Sequential(nn.Linear(4, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 2))
    fast = torch.compile(model.train(), backend=exprune_fx.backend(NEVER, inner="eager"))
    with pytest.raises(Exception, match=r"training mode.*model\.eval\(\)"):
        fast(torch.randn(3, 4))
