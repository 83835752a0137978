"""The ``exprune-fx`` command line (also ``python -m exprune_fx``).

``MODEL`` is ``package.module:callable`` or ``path/to/file.py:callable``; the callable takes
no arguments and returns a model or ``(model, example_inputs)``, where the example inputs are
a tensor, a tuple of positional inputs, a dict of keyword inputs or ``(args, kwargs)``.
``--input-shape`` (one per positional input) replaces them with seeded random float32
tensors; ``--eval`` puts the model in eval mode first.

``exprune-fx dump MODEL [--stage lifted|analyzed|rewritten] [--format text|json|dot] [-o FILE]``
    Print a model's graph. ``lifted``: the ATen graph with shapes; ``analyzed`` (default):
    with each axis' symmetry classes and the reduction sites; ``rewritten``: the graph that
    ``exprune_fx.compile`` produces, each early-exit op marked
    ``EARLY-EXIT site=linear_1 k=32 test=stats decision=relu`` and the compile report
    (``CompiledModel.report()``) as the footer. ``--outputs NAME[=argmax] ...`` declares the
    outputs that define the model's function (analyzed and rewritten stages).
``exprune-fx stats MODEL [--batches N] [--batch-size B] [--seed S] [--format text|json] [-o FILE]``
    Compile the model on its example inputs, run ``N`` (default 4) batches of seeded random
    inputs shaped like them through the compiled model under ``torch.no_grad()``, and print
    the per-site prune rates and the whole-model FLOPs (``CompiledModel.report()``), or
    ``CompiledModel.exprune_stats()`` as JSON with an added ``inputs`` entry. Float tensors
    are drawn from N(0, 1), integer tensors (token ids) uniformly from ``[0, max + 1)`` of
    the example; other values are the example's. ``--batch-size B`` sets the size of axis 0
    of every input tensor (rows of bool tensors are repeated from the example).
``--k K --test stats|threshold --alpha A --threshold T`` (``dump --stage rewritten``, ``stats``)
    The :class:`exprune_fx.Config` to compile with (defaults: 32, stats, 0.05, 0.0).
``exprune-fx demo [--out DIR] [--val N] [--test N] [--max-drop D]``
    The main job (:mod:`exprune_fx.demo`): calibrate the shipped ResNet-style CNN on
    Fashion-MNIST to at most ``D`` accuracy drop (default 0.01), print the per-site table,
    test accuracy and FLOPs reduction, and write the graph dump, plots and ``results.json``
    to ``DIR`` (default ``demo-out``).
``exprune-fx tune [--quick] [--runs N] [--repeats N] [--no-save]``
    Fit the fast kernels' cost model to this machine (:mod:`exprune_fx.runtime.tuning`): time
    one linear site's kernels over a grid of shapes, rows and survivor shares (about half a
    minute; ``--quick``: seconds, less reliable), print the constants in force and the fitted
    ones with the time each loses against always taking the faster kernel, and save the fitted
    ones for later processes on this machine (unless ``--no-save``).

Errors are one line on stderr starting with ``exprune-fx: error:``; the exit status is 2 for
a bad command line (arguments, model spec, shapes, config values) and 1 when the model cannot
be loaded, lifted, analysed, compiled or run. When compiling rewrites no site, a one-line
``exprune-fx: note:`` on stderr says so (the report's status column says why per site).

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
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator, NoReturn, Sequence

import torch

from . import __version__
from .analysis import analyze
from .compiler import CompiledModel, ExPruneWarning
from .compiler import compile as compile_model
from .config import MODES, TESTS, Config
from .dump import FORMATS, render, render_compiled, write_dump
from .errors import ExPruneError, InputError, TrainingModeError
from .lifting import lift
from .random_inputs import describe_inputs, random_batch, random_inputs

PROG = "exprune-fx"
STAGES = ("lifted", "analyzed", "rewritten")
STATS_FORMATS = ("text", "json")
CONFIG_FLAGS = ("k", "test", "alpha", "threshold", "mode", "interval", "zero_skip")
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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _add_model_arguments(command: argparse.ArgumentParser) -> None:
    """MODEL, --input-shape, --outputs and --eval, shared by ``dump`` and ``stats``."""
    command.add_argument("model", metavar="MODEL",
                         help=f"{_SPEC_FORMS}; the callable takes no arguments and returns a "
                              f"model or (model, example_inputs)")
    command.add_argument("--input-shape", action="append", default=[], metavar="SHAPE",
                         help="shape of one positional input, e.g. 1,3,32,32 (repeat for each "
                              "input); seeded random float32 inputs replace the returned ones")
    command.add_argument("--outputs", nargs="+", metavar="NAME", default=None,
                         help="model outputs that define its function, NAME or NAME=argmax "
                              "(default: all, as values)")
    command.add_argument("--eval", action="store_true",
                         help="put the model in eval mode before lifting it")


def _add_config_arguments(command: argparse.ArgumentParser) -> None:
    """--k, --test, --alpha, --threshold, --mode, --interval, --zero-skip: the exprune_fx.Config
    to compile with."""
    group = command.add_argument_group("compile settings (exprune_fx.Config)")
    group.add_argument("--k", type=int, default=None, metavar="K",
                       help="terms computed before the early-exit test (default 32); sites "
                            "with n <= k stay dense")
    group.add_argument("--test", choices=TESTS, default=None,
                       help="stats (default): one-sided z-test at level --alpha; threshold: "
                            "prune when the partial mean is below --threshold")
    group.add_argument("--alpha", type=float, default=None, metavar="A",
                       help="level of the stats test, in [0, 0.5] (default 0.05; 0 prunes nothing)")
    group.add_argument("--threshold", type=float, default=None, metavar="T",
                       help="threshold of the threshold test (default 0.0; inf and -inf allowed)")
    group.add_argument("--mode", choices=MODES, default=None,
                       help="statistical (default): the tests above; exact: lossless early exit on "
                            "non-negative inputs (sign-ordered terms, --k is the check interval); hybrid: "
                            "the test, then exact early exit for the outputs it keeps")
    group.add_argument("--interval", type=int, default=None, metavar="I",
                       help="check interval of hybrid mode's exact remainder (default 32)")
    group.add_argument("--zero-skip", action="store_true", default=None,
                       help="zero-skip propagation: linears fed by a ReLU sum only the weight rows of "
                            "their nonzero inputs where that pays (Config(zero_skip=True))")


def build_parser() -> argparse.ArgumentParser:
    """The ``exprune-fx`` argument parser with its ``dump``, ``stats``, ``demo`` and ``tune`` commands."""
    parser = _Parser(prog=PROG, description="ExPrune as a torch.fx compiler pass: inspect what "
                     "the exchangeability analysis finds in a model.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an unexpected error")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    dump = commands.add_parser("dump", help="print a model's lifted, analysed or rewritten graph",
                               description="Lift, analyse or compile MODEL and print its graph.")
    _add_model_arguments(dump)
    dump.add_argument("--stage", choices=STAGES, default="analyzed",
                      help="lifted: the ATen graph only; analyzed (default): with symmetry "
                           "classes and reduction sites; rewritten: the compiled graph with "
                           "its early-exit ops and the compile report")
    dump.add_argument("--format", choices=FORMATS, default=None,
                      help="output format (default: from the -o suffix, else text)")
    dump.add_argument("-o", "--output", metavar="FILE", default=None,
                      help="write to FILE instead of stdout (a .svg/.png file is rendered "
                           "with graphviz when it is installed)")
    _add_config_arguments(dump)
    dump.set_defaults(handler=run_dump)

    stats = commands.add_parser(
        "stats", help="compile a model, run random batches and print its prune rates and FLOPs",
        description="Compile MODEL with ExPrune, run seeded random batches shaped like its example "
                    "inputs through it, and print each site's prune rate and the whole-model FLOPs.")
    _add_model_arguments(stats)
    stats.add_argument("--batches", type=_positive_int, default=4, metavar="N",
                       help="random batches to run (default 4)")
    stats.add_argument("--batch-size", type=_positive_int, default=None, metavar="B",
                       help="size of axis 0 of every input tensor (default: as in the example inputs)")
    stats.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    stats.add_argument("--format", choices=STATS_FORMATS, default=None,
                       help="text: the report table; json: exprune_stats() (default: from the -o "
                            "suffix, else text)")
    stats.add_argument("-o", "--output", metavar="FILE", default=None,
                       help="write to FILE instead of stdout")
    _add_config_arguments(stats)
    stats.set_defaults(handler=run_stats)

    demo = commands.add_parser(
        "demo", help="the main job: calibrate the shipped ResNet-style CNN on Fashion-MNIST",
        description="Compile the shipped ResNet-style CNN, calibrate it to at most --max-drop accuracy "
                    "drop on Fashion-MNIST validation images, report the per-site prune rates, test "
                    "accuracy and FLOPs reduction, and write the graph dump and plots to DIR. Needs "
                    "'apt-get install dataset-fashion-mnist' (or EXPRUNE_FASHION_MNIST).")
    demo.add_argument("--out", metavar="DIR", default="demo-out",
                      help="directory for the dumps, plots and results.json (default: demo-out)")
    demo.add_argument("--val", type=_positive_int, default=1000, metavar="N",
                      help="validation images to calibrate on, 50 to 5000 (default 1000)")
    demo.add_argument("--test", type=_positive_int, default=10000, metavar="N",
                      help="test images to report on, up to 10000 (default 10000)")
    demo.add_argument("--max-drop", type=float, default=0.01, metavar="D",
                      help="largest allowed accuracy drop, as a fraction (default 0.01)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the calibration (default 0)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(handler=run_demo)

    tune = commands.add_parser(
        "tune", help="fit the fast kernels' cost model to this machine and save it",
        description="Time one linear ReLU site's kernels (row-wise early exit, BLAS, dense layer) over a grid "
                    "of layer shapes, rows per call and survivor shares, fit the cost model's constants "
                    "(exprune_fx.runtime.fast) that lose the least time against always taking the faster "
                    "kernel, apply them and save them for later processes on this machine (CPU, torch "
                    "version and thread count). EXPRUNE_COST_MODEL=builtin ignores the saved ones.")
    tune.add_argument("--quick", action="store_true",
                      help="a small grid and one sweep: seconds instead of about half a minute, less reliable")
    tune.add_argument("--runs", type=_positive_int, default=None, metavar="N",
                      help="sweeps over the grid, each cell's median kept (default 3; 1 with --quick)")
    tune.add_argument("--repeats", type=_positive_int, default=None, metavar="N",
                      help="repetitions per kernel and cell in one sweep (default 30; 10 with --quick)")
    tune.add_argument("--no-save", action="store_true", help="print the fit only; keep nothing")
    tune.set_defaults(handler=run_tune)
    return parser


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,32,32"`` -> ``(1, 3, 32, 32)``; a :class:`CliError` for anything else."""
    parts = [p.strip() for p in text.split(",")]
    if not text.strip() or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise CliError(f"invalid --input-shape {text!r}: expected positive integers separated "
                       f"by commas, e.g. 1,3,32,32")
    return tuple(int(p) for p in parts)


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


def _config_flags(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in CONFIG_FLAGS if getattr(args, name) is not None}


def config_from_args(args: argparse.Namespace) -> Config:
    """The :class:`Config` that ``--k/--test/--alpha/--threshold`` describe (a CliError if invalid)."""
    try:
        return Config(**_config_flags(args))
    except InputError as exc:
        message = _one_line(str(exc))
        for name in CONFIG_FLAGS:
            message = message.replace(f"Config.{name} ", f"--{name.replace('_', '-')} ")
        raise CliError(f"invalid compile setting: {message}") from exc


@contextlib.contextmanager
def _model_errors() -> Iterator[None]:
    """Report the errors of lifting, analysing or compiling as one line, exit status 1."""
    try:
        yield
    except TrainingModeError as exc:
        raise CliError(f"{_one_line(str(exc))} From the command line, pass --eval.", 1) from exc
    except ExPruneError as exc:
        raise CliError(_one_line(str(exc)), 1) from exc


def compile_quietly(model: torch.nn.Module, inputs: Any, config: Config,
                    outputs: dict[str, str] | None) -> CompiledModel:
    """``exprune_fx.compile`` whose ExPruneWarning becomes a one-line note on stderr."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with _model_errors():
            compiled = compile_model(model, inputs, config, outputs=outputs)
    for warning in caught:
        if issubclass(warning.category, ExPruneWarning):
            print(f"{PROG}: note: no site was rewritten, the compiled model runs dense (the report "
                  f"gives each site's reason)", file=sys.stderr)
        else:  # through the usual filters again
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return compiled


def _emit(content: str, fmt: str, output: str | None) -> None:
    if output is None:
        sys.stdout.write(content)
    else:
        written = write_dump(content, fmt, output)
        print(f"wrote {written}")


def run_dump(args: argparse.Namespace) -> int:
    """``exprune-fx dump``: render the lifted, analysed or rewritten graph of a model."""
    fmt = _choose_format(args.format, args.output)
    outputs = parse_outputs(args.outputs)
    if outputs is not None and args.stage == "lifted":
        raise CliError("--outputs only applies to --stage analyzed or rewritten")
    if args.stage != "rewritten" and _config_flags(args):
        flags = [f"--{name.replace('_', '-')}" for name in _config_flags(args)]
        verb = "applies" if len(flags) == 1 else "apply"
        raise CliError(f"{', '.join(flags)} only {verb} to --stage rewritten (and to the stats command)")
    config = config_from_args(args) if args.stage == "rewritten" else None
    model, inputs = _model_inputs(args)
    if args.stage == "rewritten":
        content = render_compiled(compile_quietly(model, inputs, config, outputs), fmt)
    else:
        with _model_errors():
            if args.stage == "lifted":
                gm, classes = lift(model, inputs).graph_module, None
            else:
                analysis = analyze(model, inputs, outputs=outputs)
                gm, classes = analysis.graph_module, analysis.classes
        content = render(gm, classes, fmt)
    _emit(content, fmt, args.output)
    return 0


def run_stats(args: argparse.Namespace) -> int:
    """``exprune-fx stats``: compile a model, run random batches, print prune rates and FLOPs."""
    suffix = Path(args.output).suffix.lower() if args.output else ""
    fmt = args.format or ("json" if suffix == ".json" else "text")
    outputs = parse_outputs(args.outputs)
    config = config_from_args(args)
    model, inputs = _model_inputs(args)
    compiled = compile_quietly(model, inputs, config, outputs)
    gen = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        for index in range(args.batches):
            batch_args, batch_kwargs = random_batch(inputs, gen, args.batch_size)
            where = f"running random batch {index + 1} of {args.batches} through the compiled model"
            try:
                compiled(*batch_args, **batch_kwargs)
            except ExPruneError as exc:
                raise CliError(f"{where}: {_one_line(str(exc))}", 1) from exc
            except Exception as exc:
                raise CliError(f"{where} failed: {_describe_exception(exc)}", 1) from exc
    described = describe_inputs(inputs, args.batch_size)
    stats = compiled.exprune_stats()
    if fmt == "json":
        stats["inputs"] = {"batches": args.batches, "batch_size": args.batch_size, "seed": args.seed,
                           "description": described}
        content = json.dumps(stats, indent=1) + "\n"
    else:
        content = (f"inputs: {args.batches} batches of seeded random inputs (seed {args.seed}) shaped "
                   f"like the example inputs: {described}\n{compiled.report()}\n")
    _emit(content, fmt, args.output)
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """``exprune-fx demo``: the main job (:mod:`exprune_fx.demo`)."""
    from .demo import check_sizes, run

    try:
        check_sizes(args.val, args.test, args.max_drop)
    except InputError as exc:
        raise CliError(str(exc)) from exc
    with _model_errors():  # e.g. Fashion-MNIST not installed
        summary = run(args.out, val=args.val, test=args.test, max_drop=args.max_drop, seed=args.seed,
                      progress=not args.quiet)
    return 1 if summary["symmetry_failures"] else 0


def run_tune(args: argparse.Namespace) -> int:
    """``exprune-fx tune``: :func:`exprune_fx.runtime.tuning.tune`, reported."""
    from .runtime import fast, tuning

    if fast.module() is None:
        raise CliError("the fast kernels could not be built here (see the warning above): there is nothing to tune")
    result = tuning.tune(quick=args.quick, runs=args.runs, repeats=args.repeats, save=not args.no_save)
    print(f"cost model for this machine ({result['tag']}, {torch.get_num_threads()} threads):")
    for setting, choice in tuning.CHOICES.items():
        old = ", ".join(f"{name}={result['before'][name]:g}" for name in choice["constants"])
        new = ", ".join(f"{name}={result['constants'][name]:g}" for name in choice["constants"])
        before, after = result["loss"][setting]
        print(f'  "{setting}": in force {old} (loses {100 * before:.1f}%); fitted {new} (loses {100 * after:.1f}%)')
    print("time lost: mean over the grid's cells against always taking the faster kernel")
    print(f"saved to {result['path']}" if result["path"] else "not saved (--no-save)")
    return 0


def _attach_negative_values(argv: list[str]) -> list[str]:
    """``--threshold -inf`` -> ``--threshold=-inf``: argparse takes ``-inf`` for an option."""
    joined, i = [], 0
    while i < len(argv):
        if argv[i] in ("--threshold", "--alpha") and i + 1 < len(argv) and argv[i + 1].startswith("-"):
            joined.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            joined.append(argv[i])
            i += 1
    return joined


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (errors are one line on stderr)."""
    argv = _attach_negative_values(list(sys.argv[1:] if argv is None else argv))
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
