"""``python -m exprune_fx``: the ``exprune-fx`` command line (see :mod:`exprune_fx.cli`)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
