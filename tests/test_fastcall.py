"""The lean call path of compiled models (exprune_fx/fastcall.py): same outputs, same counters,
same errors as the guarded path of the exported module."""

import pytest
import torch

import exprune_fx
from exprune_fx import Config, InputError
from exprune_fx.fastcall import LeanCall
from exprune_fx.zoo import mlp


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


def test_keyword_and_non_tensor_calls_use_the_guarded_path():
    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 64), torch.nn.Linear(64, 64)

        def forward(self, x, *, scale=None):
            h = torch.relu(self.b(torch.relu(self.a(x))))
            return h if scale is None else h * scale

    model = Scaled().eval()
    x = torch.randn(3, 8)
    compiled = exprune_fx.compile(model, ((x,), {"scale": torch.tensor(2.0)}), Config(alpha=0.0, k=8))
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(compiled(x, scale=torch.tensor(2.0)), model(x, scale=torch.tensor(2.0)))
    assert LeanCall(compiled.graph_module).arity == -1  # keyword inputs: never lean
