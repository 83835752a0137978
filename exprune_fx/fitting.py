"""Per-output thresholds fitted from data: what ``calibrate(test="fitted")`` searches over.

A site's threshold test prunes output j when its statistic (the mean of its first k folded
terms) is below a threshold. One threshold per site treats every output alike, but outputs
differ in scale and in how well k terms predict them. :func:`fit_thresholds` chooses one per
output from recorded (statistic, z) samples (:mod:`exprune_fx.runtime.observe`), trading the
work saved against the value lost at one ``price`` for the whole site: pruning a sample saves
its remainder (the same amount for every output of a site) and loses ``max(z, 0)``, the value
the ReLU would have passed on. Per output, the threshold keeps the samples below it with the
largest total of ``1 - max(z, 0) / (price * mean_z)``, ``mean_z`` being the site's mean of
``max(z, 0)`` over all its samples: a larger price prunes more. An output for which no
threshold gains gets ``-inf`` (never pruned).

Example:
    >>> import torch
    >>> statistic = torch.tensor([[-3.0, -2.0, -1.0, 1.0, 2.0], [-1.0, 0.0, 1.0, 2.0, 3.0]])
    >>> z = torch.tensor([[-5.0, -1.0, 0.5, 2.0, 4.0], [3.0, 3.0, 3.0, 3.0, 3.0]])
    >>> fit_thresholds(statistic, z, price=0.2)  # output 1: every sample matters
    tensor([-1.5000,    -inf])
    >>> fit_thresholds(statistic, z, price=1.0)
    tensor([1.5000,   -inf])

An argmax site (dominance prediction) stops a whole row when the leader's smallest mean
advantage after k terms exceeds one margin. :func:`fit_margin` chooses that margin from
recorded rows so that at most a given fraction of all rows would stop on a leader that is not
their final argmax; the leader's estimate is then what the argmax reads, so this fraction is
the most the site can change the argmax decisions on the recorded data:

    >>> advantage = torch.tensor([0.9, 0.7, 0.5, 0.4, 0.2, 0.1])
    >>> final = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 1.0])  # row 2's leader is overtaken later
    >>> round(fit_margin(advantage, final, error=0.0), 4)  # stop rows 0 and 1 only
    0.6
    >>> round(fit_margin(advantage, final, error=1 / 6), 4)  # one wrong stop in six rows: rows 0 to 3
    0.3
    >>> fit_margin(advantage, 1 - final, error=0.0)  # row 0's leader is wrong: no row stops
    inf
"""

from __future__ import annotations

import math

import torch


def fit_thresholds(statistic: torch.Tensor, z: torch.Tensor, price: float) -> torch.Tensor:
    """Per-output thresholds [outputs] from samples ``statistic`` and ``z``, each
    [outputs, samples]; ``price`` > 0 (see the module docstring). The threshold is halfway
    between the last pruned sample's statistic and the next one (the test is ``<``)."""
    if not (isinstance(price, (int, float)) and price > 0 and math.isfinite(price)):
        raise ValueError(f"price must be a finite number > 0 (got {price!r})")
    if statistic.shape != z.shape or statistic.dim() != 2 or statistic.shape[1] == 0:
        raise ValueError(f"statistic and z must both be [outputs, samples] (got {tuple(statistic.shape)} and "
                         f"{tuple(z.shape)})")
    statistic, z = statistic.double(), z.double()
    lost = z.clamp_min(0)
    scale = price * max(float(lost.mean()), 1e-30)
    ordered, order = statistic.sort(1)
    gain = (1 - lost.gather(1, order) / scale).cumsum(1)
    best, last = gain.max(1)
    below = ordered.gather(1, last[:, None]).squeeze(1)  # the last pruned sample's statistic
    upper = torch.cat([ordered[:, 1:], torch.full_like(ordered[:, :1], math.inf)], 1).gather(1, last[:, None])
    # halfway to the next sample, and in float32 above the last pruned one (past the largest, just above it)
    threshold = torch.maximum(((below + upper.squeeze(1)) / 2).float(),
                              torch.nextafter(below.float(), torch.tensor(math.inf)))
    return torch.where(best > 0, threshold, torch.full_like(threshold, -math.inf))


def fit_margin(statistic: torch.Tensor, final: torch.Tensor, error: float) -> float:
    """The margin of an argmax site from recorded rows (see the module docstring):
    ``statistic`` [rows] the leader's smallest mean advantage after k terms, ``final`` [rows]
    1 where that leader is the final argmax, else 0; ``error`` in [0, 1) the largest fraction
    of all rows that may stop on a wrong leader. The rows that stop are those with the largest
    statistics, as many as the error allows; the margin is halfway between the last of them and
    the next (the test is ``>``); ``inf`` (never stop) when no row can."""
    if not (isinstance(error, (int, float)) and 0 <= error < 1):
        raise ValueError(f"error must be a number in [0, 1) (got {error!r})")
    statistic, final = statistic.reshape(-1).double(), final.reshape(-1).double()
    if statistic.shape != final.shape or statistic.numel() == 0:
        raise ValueError(f"statistic and final must be the same non-empty size (got {tuple(statistic.shape)} and "
                         f"{tuple(final.shape)})")
    ordered, order = statistic.sort(descending=True)
    wrong = (1 - final[order]).cumsum(0)
    # a prefix may end only where the statistic changes (tied rows stop together)
    ends = torch.cat([ordered[1:] < ordered[:-1], torch.tensor([True])])
    ok = ((wrong <= error * statistic.numel() + 1e-9) & ends & torch.isfinite(ordered)).nonzero()
    if ok.numel() == 0:
        return math.inf
    last = int(ok.max())
    below = float(ordered[last + 1]) if last + 1 < ordered.numel() else -math.inf
    # halfway to the next row, and in float32 below the last row that stops (with none after it, just below it)
    under = torch.nextafter(ordered[last].float(), torch.tensor(-math.inf))
    if math.isinf(below):
        return float(under)
    return float(torch.minimum(torch.tensor((float(ordered[last]) + below) / 2).float(), under))
