"""The ``exprune-fx`` command line (also ``python -m exprune_fx``).

``exprune-fx dump MODEL``
    Lift or analyse a model and print its graph as text, JSON or graphviz DOT. ``MODEL`` is
    ``package.module:callable`` or ``path/to/file.py:callable``; the callable takes no
    arguments and returns a model or ``(model, example_inputs)``. ``--input-shape`` (one per
    positional input) replaces the example inputs with seeded random float32 tensors.
``exprune-fx demo [--out DIR]``
    Analyse the shipped residual CNN, check the symmetries it found by permuting the weights,
    and write its dumps to ``DIR`` (default ``demo-out``).

Errors are one line on stderr starting with ``exprune-fx: error:``; the exit status is 2 for
a bad command line (arguments, model spec, shapes) and 1 when the model cannot be lifted or
analysed.

Example:
    >>> from exprune_fx.cli import parse_shape
    >>> parse_shape("1,3,32,32")
    (1, 3, 32, 32)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, NoReturn, Sequence

import torch

from . import __version__
from .analysis import analyze
from .dump import FORMATS, graphviz_available, render, write_dump
from .errors import ExPruneError, TrainingModeError
from .lifting import lift
from .symmetry import check_symmetry

PROG = "exprune-fx"
STAGES = ("lifted", "analyzed")
DEMO_NAME = "residual_cnn"
_SUFFIX_FORMATS = {".txt": "text", ".json": "json", ".dot": "dot", ".svg": "dot", ".png": "dot"}
_SPEC_FORMS = "'package.module:callable' or 'path/to/file.py:callable'"


class CliError(Exception):
    """A problem to report as one line; ``status`` is the exit status."""

    def __init__(self, message: str, status: int = 2):
        super().__init__(message)
        self.status = status


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _describe_exception(exc: BaseException) -> str:
    text = _one_line(str(exc))
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# -- argument parsing --------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (a :class:`CliError`), not usage + exit."""

    def error(self, message: str) -> NoReturn:
        raise CliError(f"{message} (see '{self.prog} --help')", status=2)


def build_parser() -> argparse.ArgumentParser:
    """The ``exprune-fx`` argument parser with its ``dump`` and ``demo`` commands."""
    parser = _Parser(prog=PROG, description="ExPrune as a torch.fx compiler pass: inspect what "
                     "the exchangeability analysis finds in a model.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an unexpected error")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    dump = commands.add_parser("dump", help="print a model's lifted or analysed graph",
                               description="Lift or analyse MODEL and print its graph.")
    dump.add_argument("model", metavar="MODEL",
                      help=f"{_SPEC_FORMS}; the callable takes no arguments and returns a model "
                           f"or (model, example_inputs)")
    dump.add_argument("--input-shape", action="append", default=[], metavar="SHAPE",
                      help="shape of one positional input, e.g. 1,3,32,32 (repeat for each "
                           "input); seeded random float32 inputs replace the returned ones")
    dump.add_argument("--stage", choices=STAGES, default="analyzed",
                      help="lifted: the ATen graph only; analyzed (default): with symmetry "
                           "classes and reduction sites")
    dump.add_argument("--format", choices=FORMATS, default=None,
                      help="output format (default: from the -o suffix, else text)")
    dump.add_argument("-o", "--output", metavar="FILE", default=None,
                      help="write to FILE instead of stdout (a .svg/.png file is rendered "
                           "with graphviz when it is installed)")
    dump.add_argument("--outputs", nargs="+", metavar="NAME", default=None,
                      help="model outputs that define its function, NAME or NAME=argmax "
                           "(default: all, as values)")
    dump.add_argument("--eval", action="store_true",
                      help="put the model in eval mode before lifting it")
    dump.set_defaults(handler=run_dump)

    demo = commands.add_parser("demo", help="analyse and symmetry-check the demo residual CNN",
                               description="Analyse the shipped residual CNN, check its "
                                           "symmetries and write its dumps to DIR.")
    demo.add_argument("--out", metavar="DIR", default="demo-out",
                      help="directory for the dumps (default: demo-out)")
    demo.set_defaults(handler=run_demo)
    return parser


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,32,32"`` -> ``(1, 3, 32, 32)``; a :class:`CliError` for anything else."""
    parts = [p.strip() for p in text.split(",")]
    if not text.strip() or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise CliError(f"invalid --input-shape {text!r}: expected positive integers separated "
                       f"by commas, e.g. 1,3,32,32")
    return tuple(int(p) for p in parts)


def random_inputs(shapes: Sequence[tuple[int, ...]], seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Seeded standard-normal float32 tensors, one per shape."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=gen, dtype=torch.float32) for shape in shapes)


def parse_outputs(names: Sequence[str] | None) -> dict[str, str] | None:
    """``["logits=argmax", "aux"]`` -> ``{"logits": "argmax", "aux": "value"}``."""
    if names is None:
        return None
    modes = {}
    for item in names:
        name, _, mode = item.partition("=")
        if not name:
            raise CliError(f"invalid --outputs entry {item!r}: expected NAME or NAME=MODE")
        modes[name] = mode or "value"
    return modes


# -- loading the model -------------------------------------------------------------------------

@contextlib.contextmanager
def _on_sys_path(directory: str) -> Iterator[None]:
    """Make ``directory`` importable while the user's model module is imported."""
    added = directory not in sys.path
    if added:
        sys.path.insert(0, directory)
    try:
        yield
    finally:
        if added and directory in sys.path:
            sys.path.remove(directory)


def _is_file_spec(location: str) -> bool:
    return location.endswith(".py") or "/" in location or os.sep in location


def _import_file(location: str) -> Any:
    path = Path(location)
    if not path.is_file():
        raise CliError(f"model file {location!r} does not exist")
    name = f"_exprune_fx_model_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise CliError(f"cannot load {location!r} as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    with _on_sys_path(str(path.resolve().parent)):
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(name, None)
            raise CliError(f"importing {location!r} failed: {_describe_exception(exc)}", 1) from exc
    return module


def _import_module(location: str) -> Any:
    with _on_sys_path(os.getcwd()):
        try:
            return importlib.import_module(location)
        except ModuleNotFoundError as exc:
            if exc.name and (location == exc.name or location.startswith(exc.name + ".")):
                raise CliError(f"cannot import module {location!r}: {_one_line(str(exc))}") from exc
            raise CliError(f"importing module {location!r} failed: {_describe_exception(exc)}", 1) from exc
        except Exception as exc:
            raise CliError(f"importing module {location!r} failed: {_describe_exception(exc)}", 1) from exc


def _resolve(spec: str) -> Any:
    """The object ``spec`` names: a module or file, a colon, a (dotted) attribute path."""
    location, colon, attr = spec.rpartition(":")
    if not colon or not location or not attr:
        raise CliError(f"model spec {spec!r} must be {_SPEC_FORMS}")
    module = _import_file(location) if _is_file_spec(location) else _import_module(location)
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CliError(f"{location!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def load_model(spec: str) -> tuple[torch.nn.Module, Any]:
    """Call the factory ``spec`` names; return ``(model, example_inputs or None)``."""
    obj = _resolve(spec)
    if isinstance(obj, torch.nn.Module):
        return obj, None
    if not callable(obj):
        raise CliError(f"{spec!r} is a value of type {type(obj).__name__!r}, not a callable that "
                       f"returns a model")
    try:
        result = obj()
    except Exception as exc:
        raise CliError(f"calling {spec!r} failed: {_describe_exception(exc)}", 1) from exc
    if isinstance(result, torch.nn.Module):
        return result, None
    if isinstance(result, (tuple, list)) and len(result) == 2 and isinstance(result[0], torch.nn.Module):
        return result[0], result[1]
    raise CliError(f"{spec!r} returned a value of type {type(result).__name__!r}; expected a "
                   f"torch.nn.Module or a (model, example_inputs) pair")


# -- commands ----------------------------------------------------------------------------------

def _choose_format(fmt: str | None, output: str | None) -> str:
    if fmt is not None:
        return fmt
    suffix = Path(output).suffix.lower() if output else ""
    return _SUFFIX_FORMATS.get(suffix, "text")


def _model_inputs(args: argparse.Namespace) -> tuple[torch.nn.Module, Any]:
    shapes = [parse_shape(s) for s in args.input_shape]
    model, inputs = load_model(args.model)
    if shapes:
        inputs = random_inputs(shapes)
    if inputs is None:
        raise CliError(f"{args.model!r} returned a model without example inputs; pass one "
                       f"--input-shape per positional input, e.g. --input-shape 1,3,32,32")
    if args.eval:
        model.eval()
    return model, inputs


def run_dump(args: argparse.Namespace) -> int:
    """``exprune-fx dump``: render the lifted or analysed graph of a model."""
    fmt = _choose_format(args.format, args.output)
    outputs = parse_outputs(args.outputs)
    if outputs is not None and args.stage == "lifted":
        raise CliError("--outputs only applies to --stage analyzed")
    model, inputs = _model_inputs(args)
    try:
        if args.stage == "lifted":
            gm, classes = lift(model, inputs).graph_module, None
        else:
            analysis = analyze(model, inputs, outputs=outputs)
            gm, classes = analysis.graph_module, analysis.classes
    except TrainingModeError as exc:
        raise CliError(f"{_one_line(str(exc))} From the command line, pass --eval.", 1) from exc
    except ExPruneError as exc:
        raise CliError(_one_line(str(exc)), 1) from exc
    content = render(gm, classes, fmt)
    if args.output is None:
        sys.stdout.write(content)
    else:
        written = write_dump(content, fmt, args.output)
        print(f"wrote {written}")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """``exprune-fx demo``: analyse and symmetry-check the residual CNN, write its dumps."""
    from .zoo import residual_cnn

    start = time.perf_counter()
    model, x = residual_cnn()
    analysis = analyze(model, x)
    failures = check_symmetry(model, x, analysis)
    checked = sum(1 for c in analysis.free_classes if c.parameters)
    print(analysis)
    print()
    verdict = "sound" if not failures else "UNSOUND"
    print(f"symmetry check: permuted {checked} free classes, {len(failures)} failures ({verdict})")
    for failure in failures:
        print(f"  {failure}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gm, classes = analysis.graph_module, analysis.classes
    written = [write_dump(render(gm, classes, fmt), fmt, out / f"{DEMO_NAME}{ext}")
               for fmt, ext in (("text", ".txt"), ("json", ".json"), ("dot", ".dot"))]
    if graphviz_available():
        svg = write_dump(render(gm, classes, "dot"), "dot", out / f"{DEMO_NAME}.svg")
        if svg.suffix == ".svg":
            written.append(svg)
    print(f"wrote {', '.join(str(p) for p in written)} in {time.perf_counter() - start:.1f} s")
    if not graphviz_available():
        print(f"(install graphviz to also get {out / DEMO_NAME}.svg)")
    return 1 if failures else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (errors are one line on stderr)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        return args.handler(args)
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else 0
    except CliError as exc:
        print(f"{PROG}: error: {_one_line(str(exc))}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        print(f"{PROG}: error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `exprune-fx dump ... | head`
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")
        return 1
    except Exception as exc:
        if debug:
            raise
        print(f"{PROG}: error: unexpected {_describe_exception(exc)} (rerun with --debug for "
              f"the traceback)", file=sys.stderr)
        return 1
