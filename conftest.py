"""Doctests in exprune_fx/ and passes/ draw random tensors: seed torch before each one, so that a
docstring example shows the same numbers on every machine and every run."""

import pytest
import torch
from _pytest.doctest import DoctestItem


@pytest.fixture(autouse=True)
def _seed_doctests(request):
    if isinstance(request.node, DoctestItem):
        torch.manual_seed(0)
    yield
