"""A process-wide runtime setting that can also be used as a context manager.

Example:
    >>> state = {"setting": "auto"}
    >>> with set_scoped(state, "dense", ("auto", "dense"), "mode"):
    ...     state["setting"]
    'dense'
    >>> state["setting"]
    'auto'
"""

from __future__ import annotations

import contextlib

from ..errors import InputError


def set_scoped(state: dict, setting: str, allowed: tuple, what: str):
    """Set ``state["setting"]`` for the whole process (after validating it against ``allowed``;
    ``what`` names it in the error); as a context manager, restore the old value on exit."""
    if setting not in allowed:
        raise InputError(f"{what} must be one of {allowed} (got {setting!r})")
    old, state["setting"] = state["setting"], setting

    @contextlib.contextmanager
    def restore():
        try:
            yield
        finally:
            state["setting"] = old

    return restore()
