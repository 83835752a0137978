"""exprune-fx: dynamic pruning from exchangeability (ExPrune) as a torch.fx compiler pass.

    >>> import torch, exprune_fx
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(),
    ...                           torch.nn.Linear(16, 16), torch.nn.ReLU()).eval()
    >>> analysis = exprune_fx.analyze(mlp, torch.randn(2, 4))
    >>> exprune_fx.check_symmetry(mlp, torch.randn(2, 4), analysis)
    []
"""

from .analysis import Analysis, analyze
from .backend import ExPruneBackend, backend, reset_stats, stats
from .calibrate import Calibration, calibrate
from .compiler import CompiledModel, ExPruneWarning, compile
from .config import Config, SiteConfig
from .errors import ExportError, ExPruneError, InputError, TrainingModeError
from .lifting import Lifted, lift
from .persist import load, save
from .passes.exchangeability import Member, Pin, SymmetryClass
from .passes.sites import Site
from .symmetry import SymmetryFailure, check_symmetry

__all__ = [
    "Analysis", "Calibration", "calibrate", "CompiledModel", "ExPruneBackend", "backend", "reset_stats", "stats", "Config", "ExPruneWarning", "SiteConfig", "compile", "load", "save", "ExPruneError", "ExportError", "InputError", "Lifted", "Member", "Pin", "Site",
    "SymmetryClass", "SymmetryFailure", "TrainingModeError", "analyze", "check_symmetry", "lift",
]
__version__ = "0.1.0"
