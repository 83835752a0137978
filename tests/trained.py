"""A small model trained in a few seconds on learnable synthetic data, for the tests."""

import torch
from torch import nn


def trained_mlp(count: int = 4000):
    """A ReLU MLP trained for a few seconds on learnable synthetic data (Gaussian clusters)."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(10, 20, generator=g) * 1.5

    def data(count):
        y = torch.randint(0, 10, (count,), generator=g)
        return centers[y] + torch.randn(count, 20, generator=g), y

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(150):
        x, y = data(256)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), data(count)
