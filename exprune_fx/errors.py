"""Errors exprune-fx raises for bad input: each message says what went wrong and what to do.

Every error derives from :class:`ExPruneError`; those about arguments also derive from
ValueError so that ``except ValueError`` keeps working.
"""


class ExPruneError(Exception):
    """Base class of every error exprune-fx raises on purpose."""


class InputError(ExPruneError, ValueError):
    """The model or the example inputs do not fit together, or an argument is invalid."""


class TrainingModeError(ExPruneError, ValueError):
    """The model is in training mode; ExPrune works on inference graphs (call model.eval())."""


class ExportError(ExPruneError, RuntimeError):
    """torch.export could not capture the model; the message names the module that failed."""
