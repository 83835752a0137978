"""``static``: unstructured static pruners that zero weights before ExPrune's dynamic pruning.

Every pruner takes a model and a target ``sparsity`` in [0, 1), returns a :class:`Pruned`
holding a **new** model (a deep copy; the input model is never modified) whose prunable weights
are masked, and prunes exactly ``round(sparsity * total)`` of the ``total`` prunable weights.
The prunable weights are the ``weight`` of every ``nn.Linear`` and ``nn.Conv2d``
(:func:`prunable_parameters`); biases, norms and every other parameter are left alone.

- :func:`magnitude`: global magnitude pruning (smallest ``|w|`` over all layers at once).
- :func:`finetune_iteratively`: magnitude pruning in rounds along a geometric schedule, each
  round followed by fine-tuning with the masks re-applied after every optimizer step.
- :func:`finetune`: fine-tune any pruner's result with its masks fixed.
- :func:`synflow`: SynFlow (Tanaka et al., NeurIPS 2020), data-free, iterative, avoids layer
  collapse.
- :func:`sensitivity_sampling`: sampling by empirical sensitivity on a batch, in the manner of
  SiPP (Baykal, Liebenwein et al.).

Models in training mode are accepted: the pruners only read weights (the passes that run the
model switch a copy to eval mode) and the returned model keeps the input's mode. Kept weights
keep their values (no reweighting), so ``Pruned.masks`` and the zeros of the weights agree.
docs/static.md states each definition exactly.

Example:
    >>> import torch
    >>> from exprune_fx import static
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    >>> pruned = static.magnitude(model, 0.9)
    >>> pruned.report()["pruned"], pruned.report()["total"]   # round(0.9 * 384) = 346
    (346, 384)
    >>> flow = static.synflow(model, 0.9, torch.randn(16, 8), iterations=10)
    >>> sipp = static.sensitivity_sampling(model, 0.9, torch.randn(64, 8), seed=0)
    >>> [p.report()["pruned"] for p in (flow, sipp)]
    [346, 346]
    >>> sorted(sipp.per_layer())
    ['0.weight', '2.weight']
"""

from __future__ import annotations

import copy
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError

PRUNABLE = (nn.Linear, nn.Conv2d)


@dataclass
class Pruned:
    """A pruned copy of a model: ``masks`` maps each prunable parameter's name (as in
    ``model.named_parameters()``) to a bool tensor of its shape, True where the weight is kept.
    ``sparsity`` is the requested target; exactly ``round(sparsity * total)`` weights are pruned."""

    model: nn.Module
    masks: dict[str, torch.Tensor]
    method: str
    sparsity: float

    def per_layer(self) -> dict[str, float]:
        """Fraction of each prunable parameter's weights that is kept."""
        return {name: mask.float().mean().item() for name, mask in self.masks.items()}

    def report(self) -> dict[str, Any]:
        """Method, requested and achieved sparsity, pruned and total counts, and :meth:`per_layer`."""
        total = sum(m.numel() for m in self.masks.values())
        kept = sum(int(m.sum()) for m in self.masks.values())
        return {"method": self.method, "sparsity": self.sparsity, "achieved": (total - kept) / total,
                "pruned": total - kept, "total": total, "per_layer": self.per_layer()}


def prunable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The ``weight`` of every ``nn.Linear`` and ``nn.Conv2d`` in ``model``, by parameter name,
    in module order (a weight shared by several layers is listed once, under its first name)."""
    found, seen = {}, set()
    for module_name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, PRUNABLE) and isinstance(weight, nn.Parameter) and id(weight) not in seen:
            seen.add(id(weight))
            found[f"{module_name}.weight" if module_name else "weight"] = weight
    return found


# ----------------------------------------------------------------------------- pruners


def magnitude(model: nn.Module, sparsity: float) -> Pruned:
    """Global unstructured magnitude pruning: prune the ``round(sparsity * total)`` weights of
    smallest ``|w|`` over all prunable layers together. Ties are broken by a stable sort of the
    concatenated ``|w|`` (layers in :func:`prunable_parameters` order, each flattened in row-major
    order): among equal magnitudes the later weights are pruned first."""
    params = _check(model, sparsity, "magnitude")
    scores = {name: p.detach().abs() for name, p in params.items()}
    masks = _global_masks(scores, _pruned_count(params, sparsity))
    return _finish(model, masks, "magnitude", sparsity)


def finetune_iteratively(model: nn.Module, sparsity: float, data: Iterable | Callable[[], Iterable],
                         loss_fn: Callable | None = None, *, rounds: int = 3, epochs: int = 1,
                         optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None,
                         step: Callable[[nn.Module, torch.optim.Optimizer, Any], Any] | None = None) -> Pruned:
    """Iterative magnitude pruning with fine-tuning. In round r = 1..``rounds``, prune (global
    magnitude, never reviving a pruned weight) to sparsity ``1 - (1 - sparsity) ** (r / rounds)``
    (the last round prunes exactly ``round(sparsity * total)``), then train for ``epochs``
    passes over ``data``, re-applying the masks after every step so pruned weights stay zero.

    ``data`` is a list of ``(inputs, targets)`` batches (or a callable returning an iterable of
    them); ``inputs`` is a tensor, a tuple of positional inputs or a dict of keyword inputs.
    ``optimizer(params)`` builds the optimizer once, over the copy's parameters (default:
    SGD, lr 0.01). Each step runs ``step(model, optimizer, batch)`` if given, otherwise
    ``zero_grad``, ``loss_fn(model(inputs), targets).backward()``, ``optimizer.step()``. The
    copy trains in training mode and is returned in the input model's mode."""
    params = _check(model, sparsity, "finetune_iteratively")
    _check_count(rounds, "rounds")
    _check_count(epochs, "epochs")
    step, batches = _training(loss_fn, step, data, "finetune_iteratively")
    pruned = copy.deepcopy(model)
    weights = prunable_parameters(pruned)
    opt = (optimizer or (lambda ps: torch.optim.SGD(ps, lr=0.01)))(pruned.parameters())
    total = sum(p.numel() for p in params.values())
    masks = {name: torch.ones_like(w, dtype=torch.bool) for name, w in weights.items()}
    pruned.train()
    for r in range(1, rounds + 1):
        target = sparsity if r == rounds else 1 - (1 - sparsity) ** (r / rounds)
        scores = {name: torch.where(masks[name], w.detach().abs(), -1.0) for name, w in weights.items()}
        masks = _global_masks(scores, round(target * total))
        _apply_masks(weights, masks)
        for _ in range(epochs):
            for batch in batches:
                step(pruned, opt, batch)
                _apply_masks(weights, masks)
    pruned.train(model.training)
    return Pruned(pruned, masks, "finetune_iteratively", float(sparsity))


def finetune(pruned: Pruned, data: Iterable | Callable[[], Iterable], loss_fn: Callable | None = None, *,
             epochs: int = 1, optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None,
             step: Callable[[nn.Module, torch.optim.Optimizer, Any], Any] | None = None) -> Pruned:
    """Fine-tune a copy of ``pruned.model`` for ``epochs`` passes over ``data`` with its masks
    fixed (re-applied after every optimizer step, so pruned weights stay zero). ``data``,
    ``loss_fn``, ``optimizer`` and ``step`` are as in :func:`finetune_iteratively`. Returns a
    new :class:`Pruned` with the same masks, method and sparsity; ``pruned`` is not modified."""
    if not isinstance(pruned, Pruned):
        raise InputError(f"finetune takes what a pruner returned, a Pruned (got {type(pruned).__name__})")
    _check_count(epochs, "epochs")
    step, batches = _training(loss_fn, step, data, "finetune")
    model = copy.deepcopy(pruned.model)
    weights = prunable_parameters(model)
    opt = (optimizer or (lambda ps: torch.optim.SGD(ps, lr=0.01)))(model.parameters())
    model.train()
    for _ in range(epochs):
        for batch in batches:
            step(model, opt, batch)
            _apply_masks(weights, pruned.masks)
    model.train(pruned.model.training)
    return Pruned(model, dict(pruned.masks), pruned.method, pruned.sparsity)


def _training(loss_fn, step, data, who: str):
    """The step function and the list of batches of a fine-tuning run, checked."""
    if step is None and not callable(loss_fn):
        raise InputError(f"{who} needs loss_fn(outputs, targets), or a step(model, optimizer, batch)")
    if step is not None and not callable(step):
        raise InputError(f"step must be callable as step(model, optimizer, batch) (got {step!r})")
    batches = list(data() if callable(data) else data)
    if not batches:
        raise InputError(f"{who} got no data: pass a non-empty list of (inputs, targets) batches")
    return step or _default_step(loss_fn), batches


def synflow(model: nn.Module, sparsity: float, example: torch.Tensor | tuple, iterations: int = 100) -> Pruned:
    """SynFlow (Tanaka et al., 2020), data-free. On a float64, eval-mode copy whose parameters
    and floating-point buffers are replaced by their absolute values, with input all ones of the
    example's shape at batch 1 and ``R`` the sum of the output, repeat for j = 1..``iterations``:
    score every kept weight by ``|dR/dw * w|`` (pruned weights masked to zero), then keep the
    ``round((1 - sparsity) ** (j / iterations) * total)`` best-scored kept weights globally
    (exactly ``total - round(sparsity * total)`` at the last round; masks only shrink).

    ``example`` is an example input tensor (its batch axis is replaced by 1), an input shape
    (a tuple of ints whose first entry, the batch, is replaced by 1), or a tuple of example
    tensors for a model with several positional inputs. Costs ``iterations`` forward and
    backward passes at batch 1."""
    params = _check(model, sparsity, "synflow")
    _check_count(iterations, "iterations")
    scorer = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for value in scorer.state_dict().values():
            if value.is_floating_point():
                value.abs_()
    weights = prunable_parameters(scorer)
    for w in weights.values():
        w.requires_grad_(True)
    inputs = _ones_like_example(example, next(iter(weights.values())).device)
    magnitudes = {name: w.detach().clone() for name, w in weights.items()}
    masks = {name: torch.ones_like(w, dtype=torch.bool) for name, w in weights.items()}
    total = sum(p.numel() for p in params.values())
    for j in range(1, iterations + 1):
        with torch.no_grad():
            for name, w in weights.items():
                w.copy_(magnitudes[name] * masks[name])
        grads = torch.autograd.grad(_output_sum(_run(scorer, inputs, "synflow")), list(weights.values()),
                                    allow_unused=True)
        scores = {}
        for (name, w), g in zip(weights.items(), grads):
            score = (g * w).abs() if g is not None else torch.zeros_like(w)
            scores[name] = torch.where(masks[name], score.detach(), -math.inf)
        keep = round((1 - sparsity) ** (j / iterations) * total) if j < iterations else total - _pruned_count(params, sparsity)
        masks = _global_masks(scores, total - keep)
    return _finish(model, masks, "synflow", sparsity)


def sensitivity_sampling(model: nn.Module, sparsity: float, batch: Any, seed: int = 0,
                         budgets: str = "sensitivity") -> Pruned:
    """Keep weights sampled by empirical sensitivity on ``batch`` (see :func:`sensitivities`).

    The budget of ``K = total - round(sparsity * total)`` kept weights is split across layers
    by ``budgets``: ``"sensitivity"`` (default) in proportion to each layer's summed
    sensitivity, capped at the layer's size with the excess passed on to the other layers
    (water-filling), as SiPP spends its samples where the sensitivity mass is;
    ``"proportional"`` in proportion to the layers' sizes. Either way the split uses largest
    remainders (ties to the earlier layer) and gives at least one weight to every layer
    whenever ``K`` covers every layer. Within a layer of budget ``k``, ``k`` weights are
    sampled without replacement with probability proportional to their sensitivity
    (successive sampling, drawn as the ``k`` largest keys ``log(u) / s`` with ``u`` uniform
    from a ``torch.Generator`` seeded by ``seed``); if fewer than ``k`` weights have positive
    sensitivity, all of those are kept and the rest of the budget goes to the largest ``|w|``.
    Kept weights are not reweighted (SiPP scales them by ``1 / (m p)``)."""
    params = _check(model, sparsity, "sensitivity_sampling")
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise InputError(f"seed must be an int (got {seed!r})")
    if budgets not in ("sensitivity", "proportional"):
        raise InputError(f"budgets must be 'sensitivity' or 'proportional' (got {budgets!r})")
    sens = sensitivities(model, batch)
    sizes = [p.numel() for p in params.values()]
    kept = sum(sizes) - _pruned_count(params, sparsity)
    mass = sizes if budgets == "proportional" else [float(sens[name].double().sum()) for name in params]
    generator = torch.Generator().manual_seed(int(seed))
    masks = {}
    for (name, w), k in zip(params.items(), _water_fill(kept, mass, sizes)):  # caps never bind on sizes
        masks[name] = _sample_layer(sens[name], w.detach().abs(), k, generator).to(w.device)
    return _finish(model, masks, "sensitivity_sampling", sparsity)


def sensitivities(model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
    """Empirical sensitivity of every prunable weight on ``batch``, by parameter name:
    ``s[i, j] = max over points x of |w[i, j] * a[j](x)| / sum_k |w[i, k] * a[k](x)|``, where ``a``
    is the layer's input. A point is a row of a linear layer's input (every leading position of
    a sequence counts) or, for a convolution, one output position's input patch
    (``F.unfold``; ``j`` runs over the input channels of the group times the kernel taps);
    points whose denominator is 0 are skipped. Layers the batch does not reach get zeros.

    ``batch`` is a tensor, a tuple of positional inputs, or a dict of keyword inputs. The
    forward pass runs without gradients on an eval-mode copy."""
    if not isinstance(model, nn.Module):
        raise InputError(f"sensitivities takes an nn.Module (got {type(model).__name__})")
    runner = copy.deepcopy(model).eval()
    weights = prunable_parameters(runner)
    if not weights:
        raise InputError("sensitivities: the model has no nn.Linear or nn.Conv2d layers")
    first = next(iter(_tensors(batch)), None)
    if first is None or first.dim() == 0 or first.shape[0] == 0:
        raise InputError("sensitivity_sampling needs a non-empty batch: a tensor, a tuple or a dict of tensors")
    maxima = {name: torch.zeros_like(w, dtype=torch.float32) for name, w in weights.items()}
    names = {id(w): name for name, w in weights.items()}

    def observe(module, args):
        name = names[id(module.weight)]
        maxima[name] = torch.maximum(maxima[name], _layer_sensitivity(module, args[0]))

    hooks = [m.register_forward_pre_hook(observe) for m in runner.modules()
             if isinstance(m, PRUNABLE) and id(getattr(m, "weight", None)) in names]
    try:
        with torch.no_grad():
            _run(runner, batch, "sensitivity_sampling")
    finally:
        for hook in hooks:
            hook.remove()
    return maxima


# ----------------------------------------------------------------------------- helpers


def _check(model, sparsity, who: str) -> dict[str, nn.Parameter]:
    if not isinstance(model, nn.Module):
        raise InputError(f"{who} takes an nn.Module (got {type(model).__name__})")
    if (not isinstance(sparsity, numbers.Real) or isinstance(sparsity, bool) or not math.isfinite(sparsity)
            or not 0 <= sparsity < 1):
        raise InputError(f"{who}: sparsity must be a number in [0, 1), the fraction of prunable weights "
                         f"to zero (got {sparsity!r})")
    params = prunable_parameters(model)
    if not params:
        raise InputError(f"{who}: the model has no nn.Linear or nn.Conv2d layers, so nothing to prune")
    lazy = [name for name, p in params.items() if isinstance(p, nn.parameter.UninitializedParameter)]
    if lazy:
        raise InputError(f"{who}: {lazy} are uninitialized lazy parameters; run one forward pass first")
    return params


def _check_count(value, what: str) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise InputError(f"{what} must be an int >= 1 (got {value!r})")


def _pruned_count(params: dict[str, nn.Parameter], sparsity: float) -> int:
    return round(sparsity * sum(p.numel() for p in params.values()))


def _global_masks(scores: dict[str, torch.Tensor], n_pruned: int) -> dict[str, torch.Tensor]:
    """Keep all but the ``n_pruned`` lowest scores over every layer (stable sort: among equal
    scores the earlier weight is kept); NaN scores rank lowest."""
    flat = torch.cat([s.detach().flatten().double().cpu() for s in scores.values()])
    flat = torch.nan_to_num(flat, nan=-math.inf)
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.argsort(flat, descending=True, stable=True)[:flat.numel() - n_pruned]] = True
    masks, start = {}, 0
    for name, s in scores.items():
        masks[name] = keep[start:start + s.numel()].reshape(s.shape).to(s.device)
        start += s.numel()
    return masks


def _apply_masks(weights: dict[str, nn.Parameter], masks: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, w in weights.items():
            w.mul_(masks[name].to(w.device))


def _finish(model: nn.Module, masks: dict[str, torch.Tensor], method: str, sparsity: float) -> Pruned:
    pruned = copy.deepcopy(model)
    _apply_masks(prunable_parameters(pruned), masks)
    return Pruned(pruned, masks, method, float(sparsity))


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def _run(model: nn.Module, inputs, who: str):
    try:
        if isinstance(inputs, dict):
            return model(**inputs)
        return model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)
    except Exception as error:  # noqa: BLE001 - re-raised with what the user must fix
        shapes = [tuple(t.shape) for t in _tensors(inputs)]
        raise InputError(f"{who}: the model failed on inputs of shape {shapes}: "
                         f"{type(error).__name__}: {error}") from error


def _default_step(loss_fn):
    def step(model, optimizer, batch):
        inputs, targets = batch
        optimizer.zero_grad()
        loss_fn(_run(model, inputs, "finetune_iteratively"), targets).backward()
        optimizer.step()
    return step


def _ones_like_example(example, device) -> torch.Tensor | tuple:
    if isinstance(example, torch.Tensor):
        if example.dim() == 0:
            raise InputError("synflow: the example must have a batch axis (got a 0-d tensor)")
        return torch.ones((1, *example.shape[1:]), dtype=torch.float64, device=device)
    if isinstance(example, (tuple, list, torch.Size)) and example and all(
            isinstance(d, numbers.Integral) and not isinstance(d, bool) and d >= 1 for d in example):
        return torch.ones((1, *example[1:]), dtype=torch.float64, device=device)
    if isinstance(example, (tuple, list)) and example and all(isinstance(t, torch.Tensor) for t in example):
        return tuple(_ones_like_example(t, device) for t in example)
    raise InputError("synflow: example must be an input tensor, an input shape (a tuple of positive ints, "
                     f"batch first) or a tuple of input tensors (got {example!r})")


def _output_sum(output) -> torch.Tensor:
    tensors = [t for t in _tensors(output if not hasattr(output, "to_tuple") else output.to_tuple())
               if t.is_floating_point()]
    if not tensors:
        raise InputError("synflow: the model returned no floating-point tensor to sum")
    return sum(t.sum() for t in tensors)


def _layer_sensitivity(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Max over the points in ``x`` of ``|w_ij a_j| / sum_k |w_ik a_k|`` (see
    :func:`sensitivities`), shaped like the module's weight (float32)."""
    w = module.weight.detach().float().abs()
    groups = getattr(module, "groups", 1)
    points = _points(module, x.detach().float()).abs()  # (P, groups * fan_in)
    fan_in = w[0].numel()
    a = points.reshape(points.shape[0], groups, fan_in)
    wg = w.reshape(groups, w.shape[0] // groups, fan_in)
    ratio_max = torch.zeros_like(wg)
    chunk = max(1, 2 ** 22 // w.numel())
    for start in range(0, a.shape[0], chunk):
        part = a[start:start + chunk]
        denom = torch.einsum("pgk,gok->pgo", part, wg)
        inv = torch.where(denom > 0, 1 / denom, torch.zeros_like(denom))
        ratio_max = torch.maximum(ratio_max, (part[:, :, None, :] * inv[..., None]).amax(0))
    return (wg * ratio_max).reshape(module.weight.shape).to(module.weight.device)


def _points(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows, one per point: (P, fan_in) for a linear layer,
    (P, in_channels * kh * kw) of unfolded patches for a convolution."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if x.dim() == 3:
        x = x.unsqueeze(0)
    padding = module.padding
    if isinstance(padding, str) or module.padding_mode != "zeros":
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
        padding = 0
    patches = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def _water_fill(budget: int, weights: list[float], caps: list[int]) -> list[int]:
    """Split ``budget`` in proportion to ``weights``, no entry above its cap: entries whose
    share would exceed their cap get the cap and the rest is split again among the others
    (largest remainders at the end, ties to the earlier entry); at least one unit per entry
    whenever the budget covers every entry with a nonzero cap. Zero total weight falls back
    to the caps."""
    shares = [0] * len(caps)
    free = [i for i in range(len(caps)) if caps[i] > 0]
    remaining = budget
    while free:
        mass = sum(weights[i] for i in free)
        w = {i: (weights[i] if mass > 0 else caps[i]) for i in free}
        total = sum(w.values())
        full = [i for i in free if remaining * w[i] >= caps[i] * total]
        if not full:
            exact = {i: remaining * w[i] / total for i in free}
            for i in free:
                shares[i] = int(exact[i])
            left = remaining - sum(shares[i] for i in free)
            for i in sorted(free, key=lambda i: -(exact[i] - int(exact[i])))[:left]:
                shares[i] += 1
            break
        for i in full:
            shares[i], remaining = caps[i], remaining - caps[i]
        free = [i for i in free if i not in full]
    if budget >= sum(c > 0 for c in caps):
        for i in range(len(caps)):
            if shares[i] == 0 and caps[i] > 0:
                shares[max(range(len(caps)), key=lambda j: shares[j])] -= 1
                shares[i] = 1
    return shares


def _sample_layer(sens: torch.Tensor, magnitude: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Bool mask keeping ``k`` weights sampled without replacement with probability
    proportional to ``sens`` (zero-sensitivity weights last, by decreasing magnitude)."""
    s = sens.detach().flatten().double().cpu()
    by_magnitude = torch.argsort(magnitude.flatten().cpu(), descending=True, stable=True)
    u = torch.rand(s.numel(), generator=generator, dtype=torch.float64).clamp_min(1e-300)
    keys = torch.where(s > 0, u.log() / s, -math.inf)[by_magnitude]
    keep = torch.zeros(s.numel(), dtype=torch.bool)
    keep[by_magnitude[torch.argsort(keys, descending=True, stable=True)[:k]]] = True
    return keep.reshape(sens.shape)
