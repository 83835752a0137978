"""lift(): roles, input forms, output names, and clear errors for bad input."""

import copy

import pytest
import torch
from torch import nn

from exprune_fx import ExportError, InputError, TrainingModeError, lift
from exprune_fx.zoo import gcn, residual_cnn


def roles(lifted):
    return {n.name: n.meta["exprune.role"] for n in lifted.graph_module.graph.nodes if n.op == "placeholder"}


def test_roles_and_targets():
    model, x = residual_cnn()
    lifted = lift(model, x)
    r = roles(lifted)
    assert r["x"] == "input"
    assert r["p_stem_0_weight"] == "parameter"
    assert r["b_stem_1_running_mean"] == "buffer"
    targets = {n.meta.get("exprune.target") for n in lifted.graph_module.graph.nodes}
    assert "stem.1.running_var" in targets


def test_model_is_not_modified():
    model, x = residual_cnn()
    before = copy.deepcopy(model.state_dict())
    hooks = (dict(model._forward_hooks), dict(model._forward_pre_hooks))
    lift(model, x)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert (dict(model._forward_hooks), dict(model._forward_pre_hooks)) == hooks
    assert not model.training


@pytest.mark.parametrize("form", ["tensor", "tuple", "list", "args_kwargs"])
def test_input_forms(form):
    model, x = residual_cnn()
    inputs = {"tensor": x, "tuple": (x,), "list": [x], "args_kwargs": ((), {"x": x})}[form]
    assert lift(model, inputs).output_names == ("output",)


def test_keyword_and_tuple_outputs():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 4)

        def forward(self, x, scale=None):
            return {"logits": self.a(x) * scale, "aux": (x, x.sum())}

    lifted = lift(Two().eval(), {"x": torch.randn(2, 3), "scale": torch.tensor(2.0)})
    assert lifted.output_names == ("logits", "aux.0", "aux.1")


def test_sparse_adjacency_gcn():
    model, inputs = gcn(sparse=True)
    lifted = lift(model, inputs)
    assert any("matmul" in str(n.target) or "sparse" in str(n.target) for n in lifted.graph_module.graph.nodes)


def test_training_mode_is_refused():
    model, x = residual_cnn()
    model.train()
    with pytest.raises(TrainingModeError, match=r"model\.eval\(\)"):
        lift(model, x)
    assert model.training  # untouched


def test_wrong_shapes_name_the_module():
    model, _ = residual_cnn()
    with pytest.raises(InputError) as err:
        lift(model, torch.randn(2, 3, 28, 28))
    msg = str(err.value)
    assert "'stem.0' (Conv2d)" in msg and "tensor[2, 3, 28, 28]" in msg
    assert "\n" not in msg


def test_unexportable_model_names_the_module():
    class DataDependent(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # Python control flow on a tensor value
                return x * 2
            return x

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = DataDependent()

        def forward(self, x):
            return self.inner(x)

    with pytest.raises(ExportError, match=r"'inner' \(DataDependent\)"):
        lift(Outer().eval(), torch.ones(3))


def test_bad_arguments():
    with pytest.raises(InputError, match="nn.Module"):
        lift(lambda x: x, torch.ones(1))
    model, _ = residual_cnn()
    with pytest.raises(InputError, match="example_inputs"):
        lift(model, 3)
    with pytest.raises(InputError, match="argument names"):
        lift(model, {"y": torch.randn(1, 1, 28, 28)})
