"""Static pruners (exprune_fx.static): each pruner's defining property on small models."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from exprune_fx import InputError, static

SPARSITIES = [0.0, 0.5, 0.9, 0.98]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: extra intra-op threads only add overhead, and thrash on a busy shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mlp(seed=0, widths=(12, 32, 24, 5), bias=True):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers += [nn.Linear(a, b, bias=bias)] + ([nn.ReLU()] if i < len(widths) - 2 else [])
    return nn.Sequential(*layers).eval()


def cnn(seed=0):
    """Conv (padded), BatchNorm, grouped strided conv, then a linear head: 3x8x8 inputs."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 5)).eval()


MODELS = {"mlp": (mlp, (12,)), "cnn": (cnn, (3, 8, 8))}


def batch(shape, n=16, seed=1):
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


def regression_data(model, shape, batches=2, n=16):
    model = copy.deepcopy(model).eval()  # running the input in train mode would update its BatchNorm
    out = []
    for i in range(batches):
        x = batch(shape, n, seed=10 + i)
        with torch.no_grad():
            out.append((x, model(x) + 0.1))
    return out


def run(method, model, sparsity, shape):
    x = batch(shape)
    if method == "magnitude":
        return static.magnitude(model, sparsity)
    if method == "synflow":
        return static.synflow(model, sparsity, x, iterations=10)
    if method == "sensitivity_sampling":
        return static.sensitivity_sampling(model, sparsity, x, seed=0)
    return static.finetune_iteratively(model, sparsity, regression_data(model, shape), F.mse_loss,
                                       rounds=2, epochs=1)


METHODS = ["magnitude", "synflow", "sensitivity_sampling", "finetune_iteratively"]


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [m.training for m in model.modules()],
            [(p.requires_grad, p.grad) for p in model.parameters()])


def prunable_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


# ----------------------------------------------------------------------------- every pruner


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_exact_sparsity_and_masks_match_weights(method, kind, sparsity):
    make, shape = MODELS[kind]
    model = make()
    pruned = run(method, model, sparsity, shape)
    weights = {f"{n}.weight": m.weight for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    total = sum(w.numel() for w in weights.values())
    assert list(pruned.masks) == list(weights)
    assert pruned.method == method and pruned.sparsity == sparsity
    kept = sum(int(m.sum()) for m in pruned.masks.values())
    assert total - kept == round(sparsity * total)
    report = pruned.report()
    assert (report["pruned"], report["total"]) == (round(sparsity * total), total)
    assert report["achieved"] == pytest.approx(round(sparsity * total) / total)
    new = dict(pruned.model.named_parameters())
    for name, mask in pruned.masks.items():
        assert mask.dtype == torch.bool and mask.shape == weights[name].shape
        assert torch.equal(new[name] != 0, mask)  # zeros exactly where pruned (random init has no zeros)
        assert pruned.per_layer()[name] == pytest.approx(mask.float().mean().item())
        if method != "finetune_iteratively":
            assert torch.equal(new[name][mask], weights[name][mask])  # kept weights keep their values
    if method != "finetune_iteratively":  # biases, norms, buffers untouched
        after = pruned.model.state_dict()
        for key, value in model.state_dict().items():
            if key not in pruned.masks:
                assert torch.equal(after[key], value), key


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("training", [False, True])
def test_input_model_is_never_mutated(method, training):
    model = cnn().train(training)
    before = snapshot(model)
    pruned = run(method, model, 0.9, (3, 8, 8))
    after = snapshot(model)
    assert after[1] == before[1] and after[2] == before[2]
    assert before[0].keys() == after[0].keys()
    for key in before[0]:
        assert torch.equal(before[0][key], after[0][key]), key
    assert [m.training for m in pruned.model.modules()] == before[1]  # returned in the input's mode
    assert pruned.model is not model
    originals = {p.data_ptr() for p in model.parameters()}
    assert not originals & {p.data_ptr() for p in pruned.model.parameters()}


def test_scores_are_taken_in_eval_mode():
    """synflow and sensitivities run an eval-mode copy: BatchNorm uses its running statistics
    and Dropout is off, so a model in training mode gets the masks of its eval-mode self."""
    model = cnn()
    model[2] = nn.Sequential(nn.ReLU(), nn.Dropout(0.5))
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    x = batch((3, 8, 8))
    for method in ("synflow", "sensitivity_sampling"):
        a = run(method, model.eval(), 0.8, (3, 8, 8)).masks
        b = run(method, model.train(), 0.8, (3, 8, 8)).masks
        assert all(torch.equal(a[n], b[n]) for n in a), method
    a, b = static.sensitivities(model.eval(), x), static.sensitivities(model.train(), x)
    assert all(torch.equal(a[n], b[n]) for n in a)


# ----------------------------------------------------------------------------- magnitude


@settings(max_examples=30, deadline=None)
@given(widths=st.lists(st.integers(1, 12), min_size=2, max_size=4), sparsity=st.floats(0, 1, exclude_max=True),
       seed=st.integers(0, 100))
def test_magnitude_prunes_exactly_the_smallest(widths, sparsity, seed):
    model = mlp(seed, tuple(widths))
    pruned = static.magnitude(model, sparsity)
    weights = dict(model.named_parameters())
    kept = torch.cat([weights[n].abs()[m] for n, m in pruned.masks.items()])
    gone = torch.cat([weights[n].abs()[~m] for n, m in pruned.masks.items()])
    total = kept.numel() + gone.numel()
    assert gone.numel() == round(sparsity * total)
    if kept.numel() and gone.numel():
        assert gone.max() <= kept.min()


def test_magnitude_ties_prune_later_weights_first():
    layer = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    mask = static.magnitude(layer, 0.5).masks["weight"]
    assert mask.tolist() == [[True, True, True], [False, False, False]]


# ----------------------------------------------------------------------------- synflow


def collapsing_mlp():
    """Bias-free MLP whose middle layer (76% of the weights) is scaled by 1e-3, so global
    magnitude pruning at sparsity >= 0.77 removes that layer entirely."""
    model = mlp(0, (16, 64, 64, 4), bias=False)
    with torch.no_grad():
        model[2].weight.mul_(1e-3)
    return model


def depends_on_input(model, shape):
    with torch.no_grad():
        outs = model(batch(shape, 32, seed=5))
    return (outs - outs[0]).abs().max().item() > 0


@pytest.mark.parametrize("sparsity", [0.9, 0.98])
def test_synflow_avoids_the_layer_collapse_of_magnitude(sparsity):
    model = collapsing_mlp()
    assert depends_on_input(model, (16,))
    mag = static.magnitude(model, sparsity)
    assert min(int(m.sum()) for m in mag.masks.values()) == 0  # a whole layer is gone
    assert not depends_on_input(mag.model, (16,))                 # the output is constant
    flow = static.synflow(model, sparsity, batch((16,)), iterations=100)
    assert flow.report()["pruned"] == mag.report()["pruned"]
    assert all(int(m.sum()) > 0 for m in flow.masks.values())
    assert depends_on_input(flow.model, (16,))


def test_synflow_one_iteration_is_the_synaptic_flow_score():
    """Bias-free two-layer net: R = 1^T |W2| |W1| 1, so score(W1_ij) = |W1_ij| sum_o |W2_oi|
    and score(W2_oi) = |W2_oi| sum_j |W1_ij|; one iteration keeps the best scores globally."""
    model = mlp(3, (6, 10, 4), bias=False)
    w1, w2 = model[0].weight.detach().abs(), model[2].weight.detach().abs()
    scores = torch.cat([(w1 * w2.sum(0)[:, None]).flatten(), (w2 * w1.sum(1)[None, :]).flatten()])
    for sparsity in (0.3, 0.7):
        keep = scores.numel() - round(sparsity * scores.numel())
        expected = torch.zeros(scores.numel(), dtype=torch.bool)
        expected[scores.argsort(descending=True)[:keep]] = True
        masks = static.synflow(model, sparsity, (1, 6), iterations=1).masks
        assert torch.equal(torch.cat([masks["0.weight"].flatten(), masks["2.weight"].flatten()]), expected)


def test_synflow_is_data_free():
    model = cnn()
    a = static.synflow(model, 0.9, batch((3, 8, 8), 4), iterations=5).masks
    b = static.synflow(model, 0.9, (7, 3, 8, 8), iterations=5).masks
    c = static.synflow(model, 0.9, torch.Size([1, 3, 8, 8]), iterations=5).masks
    assert all(torch.equal(a[n], b[n]) and torch.equal(a[n], c[n]) for n in a)


def test_synflow_several_inputs():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(6, 8)

        def forward(self, x, y):
            return self.a(x) * self.b(y)

    torch.manual_seed(0)
    pruned = static.synflow(Two(), 0.5, (torch.randn(3, 4), torch.randn(3, 6)), iterations=5)
    assert pruned.report()["pruned"] == round(0.5 * (32 + 48))


# ----------------------------------------------------------------------------- sensitivity sampling


def brute_sensitivity(weight, points):
    """max over rows a of |w_ij a_j| / sum_k |w_ik a_k| (rows with zero denominator skipped)."""
    best = torch.zeros_like(weight)
    for a in points:
        contrib = weight.abs() * a.abs()
        denom = contrib.sum(1, keepdim=True)
        best = torch.maximum(best, torch.where(denom > 0, contrib / denom, torch.zeros_like(contrib)))
    return best


def test_sensitivities_of_a_linear_layer_on_sequences():
    torch.manual_seed(0)
    layer = nn.Linear(5, 3)
    x = torch.randn(2, 4, 5)
    x[0, 0] = 0  # a point with zero denominator is skipped
    got = static.sensitivities(layer, x)["weight"]
    torch.testing.assert_close(got, brute_sensitivity(layer.weight.detach(), x.reshape(-1, 5)))


@pytest.mark.parametrize("kwargs", [
    dict(stride=2, padding=1, groups=2),
    dict(padding="same", dilation=2),
    dict(padding=1, padding_mode="reflect"),
])
def test_sensitivities_of_a_conv_layer(kwargs):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, **kwargs)
    x = torch.randn(2, 4, 6, 6)
    got = static.sensitivities(conv, x)["weight"]
    pad = conv._reversed_padding_repeated_twice
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    xp = F.pad(x, pad, mode=mode)
    (sh, sw), (dh, dw), (kh, kw) = conv.stride, conv.dilation, conv.kernel_size
    oh, ow = conv(x).shape[-2:]
    g, cg, og = conv.groups, 4 // conv.groups, 6 // conv.groups
    w = conv.weight.detach()
    expected = torch.zeros_like(w)
    for grp in range(g):
        patches = [xp[n, grp * cg:(grp + 1) * cg, i * sh:i * sh + dh * (kh - 1) + 1:dh,
                      j * sw:j * sw + dw * (kw - 1) + 1:dw].flatten()
                   for n in range(2) for i in range(oh) for j in range(ow)]
        rows = slice(grp * og, (grp + 1) * og)
        expected[rows] = brute_sensitivity(w[rows].flatten(1), torch.stack(patches)).view_as(w[rows])
    torch.testing.assert_close(got, expected)


def test_unreached_layers_get_zero_sensitivity():
    class Partial(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.used(x)

    sens = static.sensitivities(Partial(), torch.randn(3, 4))
    assert (sens["used.weight"] > 0).all() and (sens["unused.weight"] == 0).all()


def random_masks_like(model, masks, seed):
    """A copy of ``model`` pruned at random with the same per-layer kept counts as ``masks``."""
    generator = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(model)
    params = dict(out.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            keep = torch.zeros(mask.numel(), dtype=torch.bool)
            keep[torch.randperm(mask.numel(), generator=generator)[:int(mask.sum())]] = True
            params[name].mul_(keep.view_as(mask))
    return out


@pytest.mark.parametrize("model_seed", [0, 1, 2])
def test_sensitivity_sampling_beats_random_pruning_on_its_batch(model_seed):
    model = mlp(model_seed, (20, 64, 64, 5))
    x = batch((20,), 128, seed=model_seed)
    with torch.no_grad():
        dense = model(x)

    def error(m):
        with torch.no_grad():
            return ((m(x) - dense).norm(dim=1) / dense.norm(dim=1)).mean().item()

    for sparsity in (0.3, 0.5):  # at higher sparsity every unreweighted pruning loses most of the output
        sipp = static.sensitivity_sampling(model, sparsity, x, seed=0)
        randoms = sorted(error(random_masks_like(model, sipp.masks, s)) for s in range(9))
        assert error(sipp.model) < randoms[4], (sparsity, error(sipp.model), randoms)
        if sparsity == 0.3:
            assert error(sipp.model) < randoms[0], (error(sipp.model), randoms)


def test_sensitivity_sampling_prefers_positive_sensitivity_then_magnitude():
    torch.manual_seed(0)
    layer = nn.Linear(8, 4, bias=False)
    x = torch.randn(32, 8)
    x[:, 4:] = 0  # weights reading columns 4..7 have zero sensitivity
    live = torch.zeros(4, 8, dtype=torch.bool)
    live[:, :4] = True
    for sparsity, seed in [(0.75, 0), (0.75, 1), (0.5, 0)]:  # budgets 8 and 16 <= 16 live weights
        mask = static.sensitivity_sampling(layer, sparsity, x, seed=seed).masks["weight"]
        assert not (mask & ~live).any() and int(mask.sum()) == 32 - round(sparsity * 32)
    mask = static.sensitivity_sampling(layer, 0.25, x).masks["weight"]  # 24 kept: all 16 live + 8 largest dead
    dead = layer.weight.detach().abs()[:, 4:].flatten()
    expected_dead = torch.zeros(16, dtype=torch.bool)
    expected_dead[dead.argsort(descending=True)[:8]] = True
    assert mask[:, :4].all() and torch.equal(mask[:, 4:].flatten(), expected_dead)


@settings(max_examples=25, deadline=None)
@given(widths=st.lists(st.integers(1, 10), min_size=2, max_size=5), sparsity=st.floats(0, 1, exclude_max=True))
def test_sensitivity_sampling_budget_split(widths, sparsity):
    model = mlp(0, tuple(widths))
    pruned = static.sensitivity_sampling(model, sparsity, torch.randn(4, widths[0]), budgets="proportional")
    sizes = [m.numel() for m in pruned.masks.values()]
    kept = [int(m.sum()) for m in pruned.masks.values()]
    total = sum(sizes)
    budget = total - round(sparsity * total)
    assert sum(kept) == budget
    if budget >= len(sizes):
        assert min(kept) >= 1
    if all(budget * n >= total for n in sizes):  # no layer needs the one-weight minimum
        assert all(abs(k - budget * n / total) < 1 for k, n in zip(kept, sizes))


@settings(max_examples=40, deadline=None)
@given(weights=st.lists(st.floats(0, 100), min_size=1, max_size=6), caps=st.lists(st.integers(0, 50), min_size=6,
       max_size=6), fraction=st.floats(0, 1))
def test_water_fill_budgets(weights, caps, fraction):
    caps = caps[:len(weights)]
    budget = round(fraction * sum(caps))
    shares = static._water_fill(budget, weights, caps)
    assert sum(shares) == budget
    assert all(0 <= s <= c for s, c in zip(shares, caps))
    if budget >= sum(c > 0 for c in caps):
        assert all(s >= 1 for s, c in zip(shares, caps) if c > 0)
    total = sum(weights)
    if total > 0 and all(budget * w < c * total and budget * w >= total for w, c in zip(weights, caps)):
        # no cap binds and no entry needs the one-unit minimum: a plain largest-remainder split
        assert all(abs(s - budget * w / total) < 1 for s, w in zip(shares, weights))


def test_sensitivity_budgets_keep_small_sensitive_layers():
    """The first layer of a wide-classifier model is small but carries much sensitivity mass:
    sensitivity budgets keep over a quarter of it where size-proportional budgets keep 10%."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 400), nn.ReLU(), nn.Linear(400, 2))
    x = torch.randn(64, 4)
    by_sensitivity = static.sensitivity_sampling(model, 0.9, x).per_layer()
    by_size = static.sensitivity_sampling(model, 0.9, x, budgets="proportional").per_layer()
    assert abs(by_size["0.weight"] - 0.1) < 0.02
    assert by_sensitivity["0.weight"] > 0.25
    with pytest.raises(InputError, match="budgets"):
        static.sensitivity_sampling(model, 0.9, x, budgets="uniform")


def test_sensitivity_sampling_is_deterministic_per_seed():
    model, x = cnn(), batch((3, 8, 8))
    a = static.sensitivity_sampling(model, 0.5, x, seed=7).masks
    b = static.sensitivity_sampling(model, 0.5, x, seed=7).masks
    c = static.sensitivity_sampling(model, 0.5, x, seed=8).masks
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)


def test_sensitivity_sampling_accepts_dict_batches():
    class Kw(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x, scale=1.0):
            return self.fc(x) * scale

    torch.manual_seed(0)
    model, x = Kw(), torch.randn(5, 4)
    a = static.sensitivity_sampling(model, 0.5, {"x": x}, seed=3).masks["fc.weight"]
    b = static.sensitivity_sampling(model, 0.5, x, seed=3).masks["fc.weight"]
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- finetune_iteratively


def fitted_mlp():
    """A small MLP fitted to a smooth regression target, and its data."""
    torch.manual_seed(0)
    model = mlp(0, (8, 32, 32, 1))
    x = torch.randn(128, 8)
    y = (x[:, :1] * x[:, 1:2]).sin() + x[:, 2:3]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    return model, [(x[i:i + 32], y[i:i + 32]) for i in range(0, 128, 32)]


def loss_on(model, data):
    with torch.no_grad():
        return sum(F.mse_loss(model(x), y).item() for x, y in data) / len(data)


def test_finetune_recovers_loss_of_one_shot_magnitude():
    model, data = fitted_mlp()
    one_shot = static.magnitude(model, 0.9)
    tuned = static.finetune_iteratively(model, 0.9, data, F.mse_loss, rounds=3, epochs=10,
                                        optimizer=lambda ps: torch.optim.Adam(ps, lr=5e-3))
    assert tuned.report()["pruned"] == one_shot.report()["pruned"]
    assert loss_on(tuned.model, data) < 0.5 * loss_on(one_shot.model, data)
    weights = dict(tuned.model.named_parameters())
    assert all(torch.equal(weights[n] != 0, m) for n, m in tuned.masks.items())


def test_finetune_schedule_masks_only_shrink_and_stay_zero_under_momentum():
    model, data = fitted_mlp()
    names = [f"{n}.weight" for n in prunable_names(model)]
    total = sum(dict(model.named_parameters())[n].numel() for n in names)
    seen = []

    def step(m, optimizer, batch):
        params = dict(m.named_parameters())
        assert m.training
        seen.append(torch.cat([(params[n] == 0).flatten() for n in names]))
        optimizer.zero_grad()
        F.mse_loss(m(batch[0]), batch[1]).backward()
        optimizer.step()

    sparsity, rounds = 0.9, 3
    pruned = static.finetune_iteratively(
        model.eval(), sparsity, lambda: iter(data[:2]), rounds=rounds, epochs=1, step=step,
        optimizer=lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3))
    assert len(seen) == rounds * 2
    expected = [round((1 - (1 - sparsity) ** (r / rounds)) * total) for r in range(1, rounds)]
    expected.append(round(sparsity * total))
    assert [int(z.sum()) for z in seen[::2]] == expected
    for earlier, later in zip(seen, seen[1:]):
        assert not (earlier & ~later).any()  # a pruned weight is never revived
    final = torch.cat([~pruned.masks[n].flatten() for n in names])
    assert torch.equal(final, seen[-1])
    weights = dict(pruned.model.named_parameters())
    assert torch.equal(torch.cat([(weights[n] == 0).flatten() for n in names]), final)
    assert not pruned.model.training


def test_finetune_keeps_train_mode():
    model, data = fitted_mlp()
    pruned = static.finetune_iteratively(model.train(), 0.5, data, F.mse_loss, rounds=1)
    assert all(m.training for m in pruned.model.modules())


@pytest.mark.parametrize("method", ["synflow", "sensitivity_sampling", "magnitude"])
def test_finetune_with_fixed_masks(method):
    model, data = fitted_mlp()
    x = data[0][0]
    pruned = {"synflow": lambda: static.synflow(model, 0.8, x, iterations=10),
              "sensitivity_sampling": lambda: static.sensitivity_sampling(model, 0.8, x),
              "magnitude": lambda: static.magnitude(model, 0.8)}[method]()
    before = {k: v.clone() for k, v in pruned.model.state_dict().items()}
    tuned = static.finetune(pruned, data, F.mse_loss, epochs=20, optimizer=lambda ps: torch.optim.Adam(ps, lr=5e-3))
    assert all(torch.equal(v, pruned.model.state_dict()[k]) for k, v in before.items())  # input untouched
    assert loss_on(tuned.model, data) < 0.5 * loss_on(pruned.model, data)
    weights = dict(tuned.model.named_parameters())
    assert all(torch.equal(weights[n] != 0, m) for n, m in tuned.masks.items())
    assert (tuned.method, tuned.sparsity, tuned.report()["pruned"]) == (method, 0.8, pruned.report()["pruned"])
    with pytest.raises(InputError, match="Pruned"):
        static.finetune(model, data, F.mse_loss)
    with pytest.raises(InputError, match="loss_fn"):
        static.finetune(pruned, data)


# ----------------------------------------------------------------------------- with exprune_fx.compile


def test_pruned_model_compiles_with_exprune():
    import exprune_fx

    model = mlp(0, (16, 64, 64, 10))
    x = batch((16,), 32)
    pruned = static.magnitude(model, 0.8)
    # alpha=0 never prunes dynamically: the compiled model computes the statically pruned one
    fast = exprune_fx.compile(pruned.model, x, exprune_fx.Config(k=16, alpha=0.0))
    assert [r.name for r in fast.rewritten_sites] == ["linear_1"]
    with torch.no_grad():
        torch.testing.assert_close(fast(x), pruned.model(x))
        assert (fast(x) - model(x)).abs().max() > 1e-3


# ----------------------------------------------------------------------------- bad inputs


def _no_prunable():
    return nn.Sequential(nn.Conv1d(2, 2, 3), nn.ReLU())


X = torch.randn(4, 12)
BAD = [
    (lambda: static.magnitude(mlp(), 1.0), r"sparsity must be a number in \[0, 1\)"),
    (lambda: static.magnitude(mlp(), -0.1), r"sparsity must be a number in \[0, 1\)"),
    (lambda: static.magnitude(mlp(), float("nan")), r"sparsity must be a number.*nan"),
    (lambda: static.synflow(mlp(), math.inf, X), r"synflow: sparsity"),
    (lambda: static.magnitude(mlp(), True), r"sparsity must be a number.*True"),
    (lambda: static.magnitude(mlp(), "0.5"), r"sparsity must be a number"),
    (lambda: static.magnitude(lambda x: x, 0.5), r"magnitude takes an nn.Module \(got function\)"),
    (lambda: static.sensitivity_sampling(None, 0.5, X), r"sensitivity_sampling takes an nn.Module"),
    (lambda: static.sensitivities("model", X), r"sensitivities takes an nn.Module"),
    (lambda: static.magnitude(_no_prunable(), 0.5), r"no nn.Linear or nn.Conv2d layers"),
    (lambda: static.synflow(nn.ReLU(), 0.5, X), r"no nn.Linear or nn.Conv2d layers"),
    (lambda: static.sensitivities(nn.ReLU(), X), r"no nn.Linear or nn.Conv2d layers"),
    (lambda: static.magnitude(nn.LazyLinear(3), 0.5), r"uninitialized lazy parameters"),
    (lambda: static.sensitivity_sampling(mlp(), 0.5, torch.empty(0, 12)), r"needs a non-empty batch"),
    (lambda: static.sensitivity_sampling(mlp(), 0.5, []), r"needs a non-empty batch"),
    (lambda: static.sensitivity_sampling(mlp(), 0.5, {}), r"needs a non-empty batch"),
    (lambda: static.sensitivity_sampling(mlp(), 0.5, torch.tensor(1.0)), r"needs a non-empty batch"),
    (lambda: static.sensitivity_sampling(mlp(), 0.5, torch.randn(4, 7)),
     r"model failed on inputs of shape \[\(4, 7\)\]"),
    (lambda: static.sensitivity_sampling(mlp(), 0.5, X, seed=1.5), r"seed must be an int"),
    (lambda: static.sensitivity_sampling(mlp(), 0.5, X, seed=True), r"seed must be an int"),
    (lambda: static.synflow(mlp(), 0.5, "x"), r"synflow: example must be an input tensor, an input shape"),
    (lambda: static.synflow(mlp(), 0.5, (0, 12)), r"synflow: example must be"),
    (lambda: static.synflow(mlp(), 0.5, ()), r"synflow: example must be"),
    (lambda: static.synflow(mlp(), 0.5, torch.tensor(1.0)), r"must have a batch axis"),
    (lambda: static.synflow(mlp(), 0.5, torch.randn(2, 7)), r"synflow: the model failed on inputs of shape"),
    (lambda: static.synflow(mlp(), 0.5, X, iterations=0), r"iterations must be an int >= 1"),
    (lambda: static.finetune_iteratively(mlp(), 0.5, [(X, X)]), r"needs loss_fn\(outputs, targets\)"),
    (lambda: static.finetune_iteratively(mlp(), 0.5, [(X, X)], step=3), r"step must be callable"),
    (lambda: static.finetune_iteratively(mlp(), 0.5, [], F.mse_loss), r"got no data"),
    (lambda: static.finetune_iteratively(mlp(), 0.5, [(X, X)], F.mse_loss, rounds=0), r"rounds must be an int"),
    (lambda: static.finetune_iteratively(mlp(), 0.5, [(X, X)], F.mse_loss, epochs=True), r"epochs must be"),
    (lambda: static.finetune_iteratively(mlp(), 0.5, [(torch.randn(4, 3), X)], F.mse_loss),
     r"finetune_iteratively: the model failed"),
]


@pytest.mark.parametrize("call, match", BAD, ids=range(len(BAD)))
def test_bad_inputs_raise_input_error(call, match):
    with pytest.raises(InputError, match=match):
        call()


def test_input_error_is_a_value_error():
    with pytest.raises(ValueError):
        static.magnitude(mlp(), 1.5)
