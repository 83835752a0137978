import os
import warnings

import pytest
from hypothesis import HealthCheck, settings

# CI runs a fixed, reproducible set of examples; local runs explore new ones each time.
settings.register_profile(
    "ci", derandomize=True, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev", deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))
# the cost model's built-in constants, whatever `exprune-fx tune` saved on this machine
os.environ["EXPRUNE_COST_MODEL"] = "builtin"
warnings.filterwarnings("ignore", message=".*torch.export.*")

if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    torch.set_num_threads(1)  # one thread per worker: 2 workers on 2 cores, no oversubscription


@pytest.fixture()
def fresh_dynamo():
    """Dynamo's caches and counters empty before and after the test."""
    import torch

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
