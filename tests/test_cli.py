"""The ``exprune-fx`` command line and the graph renderers behind ``dump``."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from exprune_fx import analyze, dump
from exprune_fx.cli import main
from exprune_fx.zoo import residual_cnn

CNN = "exprune_fx.zoo:residual_cnn"
FREE_LABEL = re.compile(r"\bf\d+:\d+\b")
PINNED_LABEL = re.compile(r"\bp\d+:\d+\b")

MODELS_PY = textwrap.dedent("""
    import torch

    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
                                    torch.nn.Linear(8, 8), torch.nn.ReLU(),
                                    torch.nn.Linear(8, 3)).eval()
        return model, torch.randn(2, 4)

    def bare():
        return make()[0]

    def training():
        return torch.nn.Linear(4, 2)

    def not_a_model():
        return 3

    def broken():
        raise RuntimeError("weights not found")

    NOT_CALLABLE = 3
""")


@pytest.fixture
def models_py(tmp_path: Path) -> str:
    """A model file with several factories; returns its path."""
    path = tmp_path / "tiny_models.py"
    path.write_text(MODELS_PY)
    return str(path)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# -- dump ------------------------------------------------------------------------------------

def test_text_dump_of_the_cnn_marks_sites_and_labels(capsys):
    status, out, err = run_cli(capsys, "dump", CNN)
    assert status == 0 and err == ""
    lines = out.splitlines()
    conv = next(line for line in lines if line.startswith("%conv2d_1 = aten.conv2d.default("))
    assert conv.endswith("SITE conv2d n=32 decision=relu eligible")
    head = next(line for line in lines if line.startswith("%linear = aten.linear.default("))
    assert "SITE linear n=64 decision=- ineligible: no decision" in head
    assert FREE_LABEL.search(conv) and PINNED_LABEL.search(conv)
    stem_weight = next(line for line in lines if line.startswith("%p_stem_0_weight = "))
    assert "placeholder[parameter stem.0.weight]" in stem_weight
    assert re.search(r"\[f\d+:32, 1, p\d+:3, p\d+:3\]", stem_weight)  # size-1 in-channel axis
    site_lines = [line for line in lines if line.startswith("%") and "  SITE " in line]
    eligible = [line for line in site_lines if line.endswith(" eligible")]
    assert f"sites ({len(site_lines)}, {len(eligible)} eligible):" in lines
    assert len(eligible) >= 9  # every conv after the stem
    assert any(re.fullmatch(r"classes \(\d+, [1-9]\d* free\):", line) for line in lines)
    assert any(re.search(r"^  p\d+ +size 3 .* pinned by \S+: \S", line) for line in lines)


def test_json_dump_parses_and_matches_analyze(capsys):
    status, out, _ = run_cli(capsys, "dump", CNN, "--format", "json")
    assert status == 0
    data = json.loads(out)
    analysis = analyze(*residual_cnn())
    assert data["stage"] == "analyzed"
    assert data["sites"] == [dump.site_json(s) for s in analysis.sites]
    assert [(c["id"], c["size"], c["free"]) for c in data["classes"]] == \
        [(c.id, c.size, c.free) for c in analysis.classes]
    nodes = {n["name"]: n for n in data["nodes"]}
    assert [n["site"]["name"] for n in data["nodes"] if n["site"]] == [s.name for s in analysis.sites]
    assert nodes["x"]["role"] == "input" and nodes["x"]["shape"] == [2, 1, 28, 28]
    conv_out = nodes["conv2d_1"]["axes"][1]
    assert len(conv_out) == 1 and conv_out[0]["size"] == 32 and conv_out[0]["free"] is True
    assert nodes["p_stem_0_weight"]["axes"][1] == []  # size-1 axis


def test_lifted_stage_has_no_class_labels(capsys, models_py):
    status, out, _ = run_cli(capsys, "dump", f"{models_py}:make", "--stage", "lifted")
    assert status == 0
    assert not FREE_LABEL.search(out) and not PINNED_LABEL.search(out)
    assert "SITE" not in out and "classes (" not in out
    assert "%input = placeholder[input]  f32[2, 4]" in out
    assert "%p_0_weight = placeholder[parameter 0.weight]  f32[8, 4]" in out


def test_lifted_json_has_no_axes(capsys, models_py):
    status, out, _ = run_cli(capsys, "dump", f"{models_py}:make", "--stage", "lifted", "--format", "json")
    data = json.loads(out)
    assert status == 0 and data["stage"] == "lifted" and data["classes"] == data["sites"] == []
    assert all(n["axes"] is None and n["site"] is None for n in data["nodes"])


def test_outputs_argmax_makes_the_head_a_site(capsys, models_py):
    status, out, _ = run_cli(capsys, "dump", f"{models_py}:make", "--outputs", "output=argmax",
                             "--format", "json")
    sites = {s["name"]: s for s in json.loads(out)["sites"]}
    assert status == 0 and sites["linear_2"]["decision"] == "argmax"


def test_output_file_format_follows_suffix(capsys, models_py, tmp_path):
    target = tmp_path / "graph.json"
    status, out, _ = run_cli(capsys, "dump", f"{models_py}:make", "-o", str(target))
    assert status == 0 and str(target) in out
    assert json.loads(target.read_text())["stage"] == "analyzed"


def test_dot_without_graphviz_writes_dot_file(capsys, models_py, tmp_path, monkeypatch):
    monkeypatch.setattr(dump.shutil, "which", lambda name: None)
    target = tmp_path / "graph.svg"
    status, out, err = run_cli(capsys, "dump", f"{models_py}:make", "--format", "dot", "-o", str(target))
    written = tmp_path / "graph.dot"
    assert status == 0 and not target.exists() and written.exists()
    assert err.count("\n") == 1 and "graphviz" in err and str(written) in err
    text = written.read_text()
    assert text.startswith("digraph")
    assert re.search(r'"linear_1" \[label="[^"]*eligible", style="filled", fillcolor="palegreen"\]', text)
    assert re.search(r'"linear" \[label="[^"]*ineligible", style="filled", fillcolor="orange"\]', text)
    assert '"relu" -> "linear_1";' in text


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz 'dot' is not installed")
def test_dot_to_svg_with_graphviz(capsys, models_py, tmp_path):
    target = tmp_path / "graph.svg"
    status, _, err = run_cli(capsys, "dump", f"{models_py}:make", "-o", str(target))
    assert status == 0 and err == ""
    assert "<svg" in target.read_text()


def test_file_spec_with_input_shape(capsys, models_py):
    status, out, _ = run_cli(capsys, "dump", f"{models_py}:bare", "--input-shape", "3,4")
    assert status == 0
    assert "%input = placeholder[input]  [p" in out and "SITE linear n=8 decision=relu eligible" in out


def test_input_shape_overrides_returned_inputs(capsys, models_py):
    status, out, _ = run_cli(capsys, "dump", f"{models_py}:make", "--stage", "lifted",
                             "--input-shape", "5,4")
    assert status == 0 and "%input = placeholder[input]  f32[5, 4]" in out


def test_training_mode_model_with_eval_flag(capsys, models_py):
    status, _, err = run_cli(capsys, "dump", f"{models_py}:training", "--input-shape", "2,4", "--eval")
    assert status == 0 and err == ""


# -- errors ------------------------------------------------------------------------------------

BAD_INPUTS = [
    # (argv with {models} for the model file, exit status, part of the message)
    (["dump", "residual_cnn"], 2, "must be 'package.module:callable'"),
    (["dump", "no_such_package_xyz.models:make"], 2, "cannot import module 'no_such_package_xyz.models'"),
    (["dump", "{dir}/missing.py:make"], 2, "does not exist"),
    (["dump", "{models}:no_such_factory"], 2, "has no attribute 'no_such_factory'"),
    (["dump", "exprune_fx.zoo:no_such_factory"], 2, "has no attribute 'no_such_factory'"),
    (["dump", "{models}:NOT_CALLABLE"], 2, "not a callable"),
    (["dump", "{models}:not_a_model"], 2, "returned a value of type 'int'; expected a torch.nn.Module"),
    (["dump", "{models}:broken"], 1, "RuntimeError: weights not found"),
    (["dump", "{models}:bare"], 2, "pass one --input-shape"),
    (["dump", "{models}:make", "--input-shape", "1,x"], 2, "invalid --input-shape '1,x'"),
    (["dump", "{models}:make", "--input-shape", ""], 2, "invalid --input-shape"),
    (["dump", "{models}:make", "--input-shape", "2,5"], 1, "the model failed on the example inputs"),
    (["dump", "{models}:training", "--input-shape", "2,4"], 1, "training mode"),
    (["dump", "{models}:make", "--outputs", "nope"], 1, "unknown output(s)"),
    (["dump", "{models}:make", "--format", "xml"], 2, "invalid choice: 'xml'"),
    (["dump", "{models}:make", "--stage", "lifted", "--outputs", "output"], 2, "--outputs only applies"),
    (["dump"], 2, "required: MODEL"),
    (["explode"], 2, "invalid choice: 'explode'"),
    ([], 2, "required: COMMAND"),
]


@pytest.mark.parametrize("argv, status, message", BAD_INPUTS,
                         ids=[" ".join(case[0]) or "no-args" for case in BAD_INPUTS])
def test_bad_input_is_one_line_error(capsys, models_py, argv, status, message):
    argv = [a.format(models=models_py, dir=str(Path(models_py).parent)) for a in argv]
    code, out, err = run_cli(capsys, *argv)
    assert code == status
    assert out == ""
    assert err.startswith("exprune-fx: error: ") and err.endswith("\n") and err.count("\n") == 1
    assert message in err
    assert "Traceback" not in err


def test_syntax_error_in_model_file_is_one_line(capsys, tmp_path):
    bad = tmp_path / "bad_syntax.py"
    bad.write_text("def make(:\n")
    code, _, err = run_cli(capsys, "dump", f"{bad}:make")
    assert code == 1 and err.count("\n") == 1 and "SyntaxError" in err and "Traceback" not in err


# -- demo and entry points -------------------------------------------------------------------

def test_demo_writes_its_files(capsys, tmp_path):
    out_dir = tmp_path / "demo"
    status, out, err = run_cli(capsys, "demo", "--out", str(out_dir))
    assert status == 0 and err == ""
    assert out.startswith("ExPrune analysis: ")
    assert re.search(r"^symmetry check: permuted [1-9]\d* free classes, 0 failures", out, re.M)
    for suffix in (".txt", ".json", ".dot"):
        path = out_dir / f"residual_cnn{suffix}"
        assert path.stat().st_size > 0 and str(path) in out
    assert json.loads((out_dir / "residual_cnn.json").read_text())["stage"] == "analyzed"
    assert (out_dir / "residual_cnn.svg").exists() == (shutil.which("dot") is not None)


def test_help_in_process(capsys):
    status, out, _ = run_cli(capsys, "dump", "--help")
    assert status == 0 and "--input-shape" in out and "--stage" in out


def test_python_m_help():
    result = subprocess.run([sys.executable, "-m", "exprune_fx", "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: exprune-fx")
    assert "dump" in result.stdout and "demo" in result.stdout
