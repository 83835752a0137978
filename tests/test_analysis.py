"""The exchangeability analysis and site detection on hand-built models."""

import dataclasses

import pytest
import torch
from torch import nn

import exprune_fx
from exprune_fx import Config, InputError, analyze, check_symmetry
from exprune_fx.passes.exchangeability import META_AXES, META_ROLE
from exprune_fx.passes.sites import META_SITE
from exprune_fx.zoo import gcn, mlp, residual_cnn, sinusoidal_encoder


def classes_of(analysis, param):
    """Class ids of each axis of a parameter (by state-dict name)."""
    for node in analysis.graph_module.graph.nodes:
        if node.meta.get("exprune.target") == param:
            return node.meta[META_AXES]
    raise KeyError(param)


def by_id(analysis):
    return {c.id: c for c in analysis.classes}


def freed(analysis, class_ids):
    """The analysis with the given (pinned) classes wrongly called free."""
    classes = [dataclasses.replace(c, free=True) if c.id in class_ids else c for c in analysis.classes]
    return dataclasses.replace(analysis, classes=classes)


def test_mlp_hidden_widths_are_free():
    model, x = mlp(widths=(10, 16, 12, 8, 3))
    a = analyze(model, x, strict=True)
    cls = by_id(a)
    for i, width in ((0, 16), (2, 12), (4, 8)):
        (out_axis,) = classes_of(a, f"{i}.weight")[:1]
        assert [cls[c].size for c in out_axis] == [width] and cls[out_axis[0]].free
    assert not cls[classes_of(a, "0.weight")[1][0]].free  # input features
    assert not cls[classes_of(a, "6.weight")[0][0]].free  # output features
    assert check_symmetry(model, x, a) == []


def test_residual_cnn_stage_classes():
    model, x = residual_cnn()
    a = analyze(model, x, strict=True)
    cls = by_id(a)
    stage1 = {classes_of(a, n)[0][0] for n in ("stem.0.weight", "stage1.0.conv2.weight",
                                              "stage1.1.conv2.weight", "stage1.0.bn2.running_mean")}
    stage2 = {classes_of(a, n)[0][0] for n in ("transition.0.weight", "stage2.0.conv2.weight",
                                              "stage2.1.conv2.weight", "head.2.weight")[:3]}
    stage2.add(classes_of(a, "head.2.weight")[1][0])
    assert len(stage1) == 1 and cls[stage1.pop()].free
    assert len(stage2) == 1 and cls[stage2.pop()].free
    stem_in = classes_of(a, "stem.0.weight")[1]
    assert stem_in == ()  # one input channel: nothing to permute
    inner = classes_of(a, "stage1.0.conv1.weight")[0][0]
    assert cls[inner].free and inner != classes_of(a, "stage1.0.conv2.weight")[0][0]
    assert check_symmetry(model, x, a) == []


def test_rgb_stem_input_channels_are_pinned():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    a = analyze(model, torch.randn(1, 3, 9, 9), strict=True)
    (rgb,) = classes_of(a, "0.weight")[1]
    assert not by_id(a)[rgb].free
    assert any("graph input" in p.reason for p in by_id(a)[rgb].pins)
    kernel = classes_of(a, "0.weight")[2][0]
    assert not by_id(a)[kernel].free


def test_sinusoidal_encoding_pins_the_width():
    model, x = sinusoidal_encoder()
    a = analyze(model, x, strict=True)
    width = classes_of(a, "layer.linear2.weight")[0][0]
    assert not by_id(a)[width].free
    assert any("not uniform" in p.reason for p in by_id(a)[width].pins)
    ffn = classes_of(a, "layer.linear1.weight")[0][0]
    assert by_id(a)[ffn].free and by_id(a)[ffn].size == 32
    assert check_symmetry(model, x, a) == []


@pytest.mark.parametrize("case", ["mlp_input", "sinusoidal_width", "kernel_taps"])
def test_check_fails_when_a_pinned_class_is_called_free(case):
    """The symmetry check is not vacuous: classes pinned for a reason fail it."""
    if case == "mlp_input":
        model, x = mlp(widths=(6, 8, 3))
        a = analyze(model, x)
        victim = classes_of(a, "0.weight")[1][0]
    elif case == "sinusoidal_width":
        model, x = sinusoidal_encoder()
        a = analyze(model, x)
        victim = classes_of(a, "layer.linear2.weight")[0][0]
    else:
        model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3)).eval()
        x = torch.randn(1, 2, 9, 9)
        a = analyze(model, x)
        victim = classes_of(a, "2.weight")[2][0]
    failures = check_symmetry(model, x, freed(a, {victim}))
    assert [f.class_id for f in failures] == [victim]
    assert failures[0].error > 1e-2


def test_sites_linear_decisions_and_n():
    model, x = mlp(widths=(10, 16, 12, 3))
    sites = {s.name: s for s in analyze(model, x).sites}
    assert (sites["linear"].n, sites["linear"].eligible) == (None, False)
    assert (sites["linear_1"].n, sites["linear_1"].decision, sites["linear_1"].eligible) == (16, "relu", True)
    assert sites["linear_2"].decision is None and "model output" in sites["linear_2"].reason


def test_conv_unit_term_is_a_channel_and_groups_divide_n():
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3, groups=4),
                          nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, groups=16), nn.ReLU(),
                          nn.Flatten(), nn.Linear(16 * 5 * 5, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    a = analyze(model, torch.randn(1, 3, 11, 11), strict=True)
    sites = {s.name: s for s in a.sites}
    assert sites["conv2d_1"].n == 4 and sites["conv2d_1"].eligible  # 16 in-channels / 4 groups
    assert sites["conv2d_1"].chain == ("conv2d_1", "batch_norm", "relu_1")
    assert sites["conv2d_2"].n is None  # depthwise: one channel per group
    # flatten of [16 = 4 groups x 4, 5, 5]: two free factors of 4 and pinned pixels; n is the
    # largest free factor, the unit term everything else (4 channels' 5x5 blocks)
    flat = sites["linear"]
    assert flat.n == 4 and flat.eligible
    assert [(size, free) for _, size, free in flat.contraction] == [(4, True), (4, True), (5, False), (5, False)]
    assert check_symmetry(model, torch.randn(1, 3, 11, 11), a) == []


def test_value_with_another_user_blocks_the_site():
    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x):
            h = torch.relu(self.a(x))
            pre = self.b(h)
            return self.c(torch.relu(pre)) + pre.sum(-1, keepdim=True)

    site = analyze(Branch().eval(), torch.randn(2, 4)).site("linear_1")
    assert site.decision == "relu" and not site.eligible
    assert "also used by 'sum" in site.reason


def test_residual_add_and_scale_are_epilogue():
    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
            self.scale = nn.Parameter(torch.rand(8))

        def forward(self, x):
            h = torch.relu(self.a(x))
            return torch.relu((self.b(h) + x) * self.scale * 0.5)

    site = analyze(Res().eval(), torch.randn(2, 8)).site("linear_1")
    assert site.decision == "relu" and site.eligible and len(site.chain) == 5


def test_input_dependent_gate_is_not_affine():
    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.g = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return torch.relu(self.b(h) * self.g(h))

    site = analyze(Gated().eval(), torch.randn(2, 8)).site("linear_1")
    assert site.decision is None and not site.eligible


def test_argmax_in_graph_and_declared_argmax_output():
    class Head(nn.Module):
        def __init__(self, argmax):
            super().__init__()
            self.a, self.b, self.argmax = nn.Linear(4, 8), nn.Linear(8, 5), argmax

        def forward(self, x):
            logits = self.b(torch.relu(self.a(x)))
            return logits.argmax(-1) if self.argmax else {"logits": logits}

    x = torch.randn(3, 4)
    assert analyze(Head(True).eval(), x).site("linear_1").decision == "argmax"
    assert analyze(Head(True).eval(), x).site("linear_1").eligible
    assert analyze(Head(False).eval(), x).site("linear_1").decision is None
    declared = analyze(Head(False).eval(), x, outputs={"logits": "argmax"}).site("linear_1")
    assert declared.decision == "argmax" and declared.eligible


def test_uncounted_outputs_are_not_pinned():
    class WithCache(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

        def forward(self, x):
            h = self.a(x)
            return {"logits": self.b(torch.relu(h)), "cache": h}

    x = torch.randn(2, 4)
    pinned = analyze(WithCache().eval(), x)
    counted = analyze(WithCache().eval(), x, outputs=["logits"])
    assert pinned.free_classes == [] and len(counted.free_classes) == 1
    assert check_symmetry(WithCache().eval(), x, counted) == []
    with pytest.raises(InputError, match="unknown output"):
        analyze(WithCache().eval(), x, outputs=["past"])
    with pytest.raises(InputError, match="modes"):
        analyze(WithCache().eval(), x, outputs={"logits": "softmax"})


def test_gcn_hidden_layer_is_eligible():
    for sparse in (False, True):
        model, inputs = gcn(sparse=sparse)
        a = analyze(model, inputs, strict=True)
        assert [s.name for s in a.eligible_sites] == ["linear_1"]
        assert check_symmetry(model, inputs, a) == []


def test_meta_keys_and_report():
    model, x = residual_cnn()
    a = analyze(model, x)
    gm = a.graph_module
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert all(META_ROLE in n.meta for n in placeholders)
    assert all(META_AXES in n.meta for n in gm.graph.nodes if n.op == "call_function"
               and isinstance(n.meta.get("val"), torch.Tensor))
    assert [n.meta[META_SITE] for n in gm.graph.nodes if META_SITE in n.meta] == a.sites
    text = str(a)
    assert "conv2d_1" in text and "eligible" in text and "free classes" in text


def test_einsum_and_bmm_contractions():
    class Mix(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = nn.Parameter(torch.randn(6, 8))
            self.w2 = nn.Parameter(torch.randn(8, 3))

        def forward(self, x):
            h = torch.relu(torch.einsum("bi,ij->bj", x, self.w1))
            return torch.bmm(h[None], self.w2[None])[0]

    x = torch.randn(4, 6)
    a = analyze(Mix().eval(), x, strict=True)
    assert {s.kind for s in a.sites} == {"einsum", "bmm"}
    assert a.site("bmm").n == 8
    assert check_symmetry(Mix().eval(), x, a) == []


def test_square_is_not_an_affine_step_and_doubling_is():
    class Twice(nn.Module):
        def __init__(self, square):
            super().__init__()
            self.a, self.b, self.square = nn.Linear(4, 8), nn.Linear(8, 8), square

        def forward(self, x):
            y = self.b(torch.relu(self.a(x)))
            return torch.relu(y * y if self.square else y + y)

    x = torch.randn(2, 4)
    assert analyze(Twice(True).eval(), x).site("linear_1").decision is None
    assert analyze(Twice(False).eval(), x).site("linear_1").eligible


@pytest.mark.parametrize("empty", ["buffer", "new_zeros"])
def test_cat_skips_an_empty_1d_operand(empty):
    """torch.cat ignores a 1-d tensor of size 0 whatever the other operands' rank (a Hugging
    Face DynamicCache starts as one): the analysis sees the cat as the identity on the rest."""
    class Cached(nn.Module):
        def __init__(self, empty):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)
            self.empty = empty
            self.register_buffer("cache", torch.zeros(0))

        def forward(self, x):
            h = torch.relu(self.a(x))
            if self.empty == "buffer":
                h = torch.cat([self.cache, h], dim=-1)
            elif self.empty == "new_zeros":
                h = torch.cat([h, x.new_zeros(0)], dim=-1)
            return self.c(torch.relu(self.b(h)))

    def summary(a):
        return ([(c.size, c.free, c.pins) for c in a.classes],
                [(s.name, s.n, s.decision, s.eligible, s.reason) for s in a.sites])

    x = torch.randn(4, 4)
    model, plain = Cached(empty).eval(), Cached(None).eval()
    plain.load_state_dict(model.state_dict())
    a = analyze(model, x, strict=True)
    assert summary(a) == summary(analyze(plain, x, strict=True))
    assert a.site("linear_1").eligible and a.site("linear_1").n == 8
    assert check_symmetry(model, x, a) == []
    never = Config(alpha=0.0, k=2)
    compiled = exprune_fx.compile(model, x, never)  # lifted with a dynamic batch
    assert summary(compiled.analysis) == summary(exprune_fx.compile(plain, x, never).analysis)
    assert [s.name for s in compiled.rewritten_sites] == ["linear_1"]
    for batch in (x, torch.randn(7, 4)):
        with torch.no_grad():
            torch.testing.assert_close(compiled(batch), model(batch), rtol=1e-5, atol=1e-5)
