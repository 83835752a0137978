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
import torch

from exprune_fx import analyze, dump
from exprune_fx.cli import main, random_batch
from exprune_fx.datasets import FASHION_MNIST_ROOT
from exprune_fx.zoo import residual_cnn

CNN = "exprune_fx.zoo:residual_cnn"
MLP = "exprune_fx.zoo:mlp"
EARLY_EXIT_LINEAR_1 = "EARLY-EXIT site=linear_1 k=32 test=stats decision=relu"
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

    class TimesInput(torch.nn.Module):
        def forward(self, x, w):
            return torch.relu(x @ w)

    def times_input():  # w's axis 0 is not a batch axis
        return TimesInput().eval(), (torch.randn(2, 4), torch.randn(4, 3))

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


# -- dump --stage rewritten -----------------------------------------------------------------

def test_rewritten_text_dump_marks_early_exit_ops(capsys):
    status, out, err = run_cli(capsys, "dump", MLP, "--stage", "rewritten")
    assert status == 0 and err == ""
    lines = out.splitlines()
    early = [line for line in lines if "EARLY-EXIT" in line]
    assert len(early) == 1 and early[0].endswith(EARLY_EXIT_LINEAR_1)
    assert early[0].startswith("%relu_linear_default = exprune.relu_linear.default(%relu, ")
    dense = next(line for line in lines if line.startswith("%linear = aten.linear.default("))
    assert "DENSE site=linear: no free factor" in dense
    # the op reads the layer's own weight (no copy): its first k=32 columns are the head
    assert early[0].startswith("%relu_linear_default = exprune.relu_linear.default(%relu, %_2_weight, ")
    assert "exprune_1_linear_1_head" not in out and "exprune_1_linear_1_weight" not in out
    assert not any(line.startswith("%linear_1 = ") for line in lines)  # replaced by the op
    # the footer is CompiledModel.report()
    assert any(line.startswith("sites (3, 1 rewritten to early exit") for line in lines)
    assert re.search(r"^linear_1 +linear +relu +256 +32 +\S+ +rewritten$", out, re.M)
    assert re.search(r"^whole model: no calls counted yet", out, re.M)


def test_rewritten_json_dump_lists_sites(capsys):
    status, out, _ = run_cli(capsys, "dump", MLP, "--stage", "rewritten", "--format", "json")
    assert status == 0
    data = json.loads(out)
    assert data["stage"] == "rewritten" and data["config"]["k"] == 32
    sites = {s["name"]: s for s in data["sites"]}
    assert list(sites) == ["linear", "linear_1", "linear_2"]
    assert sites["linear_1"]["rewritten"] and sites["linear_1"]["counters"] == "exprune_1_linear_1_counters"
    assert not sites["linear"]["rewritten"] and sites["linear"]["reason"]
    early = [n for n in data["nodes"] if n["early_exit"]]
    assert [(n["target"], n["site"]) for n in early] == [("exprune.relu_linear.default", sites["linear_1"])]
    assert early[0]["args"][-2:] == ["%exprune_1_linear_1_counters", "1"]  # counters, stages
    assert [n["site"]["name"] for n in data["nodes"] if n["site"] and not n["early_exit"]] == ["linear", "linear_2"]


def test_rewritten_dot_fills_early_exit_ops_with_config_flags(capsys, models_py):
    status, out, _ = run_cli(capsys, "dump", f"{models_py}:make", "--stage", "rewritten", "--format", "dot",
                             "--k", "4", "--test", "threshold")
    assert status == 0 and out.startswith("digraph")
    assert re.search(r'"relu_linear_default" \[label="[^"]*early exit: linear_1 k=4 threshold", '
                     r'style="filled", fillcolor="lightblue"\]', out)
    assert re.search(r'"linear_2" \[label="[^"]*dense site linear_2", style="filled", fillcolor="orange"\]', out)
    assert '"exprune_1_linear_1_counters" -> "relu_linear_default";' in out


def test_rewritten_dump_notes_when_nothing_is_rewritten(capsys, models_py):
    status, out, err = run_cli(capsys, "dump", f"{models_py}:make", "--stage", "rewritten")
    assert status == 0 and "EARLY-EXIT" not in out and "n=8 <= k=32" in out
    assert err.count("\n") == 1 and err.startswith("exprune-fx: note: no site was rewritten")


# -- stats -----------------------------------------------------------------------------------

def test_stats_text_prints_prune_rates_and_flops(capsys):
    status, out, err = run_cli(capsys, "stats", MLP)
    assert status == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == ("inputs: 4 batches of seeded random inputs (seed 0) shaped like the example "
                        "inputs: arg0 f32[2, 784] ~ N(0, 1)")
    assert re.fullmatch(r"site +kind +decision +n +k +prune rate +status", lines[1])
    assert re.search(r"^linear_1 +linear +relu +256 +32 +\d+\.\d% +rewritten$", out, re.M)
    assert re.search(r"^linear +linear +relu +- +- +- +dense: ", out, re.M)
    assert re.fullmatch(r"whole model over 4 call\(s\), 8 row\(s\): [\d.e+]+ dense FLOPs, [\d.e+]+ executed, "
                        r"reduction -?\d+\.\d\d% \(.*\)",
                        lines[-1])
    assert "4.301e+06 dense FLOPs" in lines[-1]  # 4 batches x 2 rows x 2 x 268,800 MACs


def test_stats_exact_mode_flag(capsys):
    status, out, err = run_cli(capsys, "stats", MLP, "--mode", "exact", "--k", "8")
    assert status == 0 and err == ""
    assert re.search(r"^linear_1 +linear +relu +256 +8 +\d+\.\d% +rewritten$", out, re.M)
    assert re.search(r"^linear +linear +relu +- +- +- +dense: exact mode needs a non-negative input", out, re.M)
    status, out, err = run_cli(capsys, "stats", MLP, "--mode", "lossless")
    assert status == 2 and "--mode" in err


def test_stats_hybrid_mode_and_interval_flags(capsys):
    status, out, err = run_cli(capsys, "stats", MLP, "--mode", "hybrid", "--k", "8", "--interval", "16")
    assert status == 0 and err == ""
    assert re.search(r"^linear_1 +linear +relu +256 +8 +\d+\.\d% +rewritten$", out, re.M)
    assert re.search(r"^linear +linear +relu +- +- +- +dense: hybrid mode: exact mode needs a non-negative", out, re.M)
    status, out, err = run_cli(capsys, "stats", MLP, "--mode", "hybrid", "--interval", "0")
    assert status == 2 and "--interval must be an integer >= 1" in err


def test_stats_zero_skip_flag(capsys):
    status, out, err = run_cli(capsys, "stats", MLP, "--zero-skip", "--batches", "1")
    assert status == 0 and err == ""
    assert re.search(r"^zero-skip: (input density linear_\d+ |.* stays dense: )", out, re.M)
    status, out, _ = run_cli(capsys, "stats", MLP, "--batches", "1")
    assert status == 0 and "zero-skip" not in out
    status, _, err = run_cli(capsys, "dump", MLP, "--zero-skip")
    assert status == 2 and "--zero-skip only applies to --stage rewritten" in err


def test_stats_json_parses(capsys):
    status, out, _ = run_cli(capsys, "stats", MLP, "--format", "json", "--batches", "2")
    assert status == 0
    data = json.loads(out)
    assert set(data["sites"]) == {"linear_1"} and isinstance(data["reduction"], float)
    site = data["sites"]["linear_1"]
    assert site["calls"] == 2 and site["outputs"] == 2 * 2 * 256 and 0.0 <= site["prune_rate"] <= 1.0
    assert data["calls"] == 2 and data["rows"] == 4 and data["dense_flops"] > 0
    assert data["inputs"] == {"batches": 2, "batch_size": None, "seed": 0,
                              "description": "arg0 f32[2, 784] ~ N(0, 1)"}


def test_stats_batch_size_sets_the_rows(capsys):
    status, out, _ = run_cli(capsys, "stats", MLP, "--format", "json", "--batches", "2", "--batch-size", "3")
    data = json.loads(out)
    assert status == 0 and data["rows"] == 6 and data["sites"]["linear_1"]["outputs"] == 6 * 256
    assert data["inputs"]["description"] == "arg0 f32[3, 784] ~ N(0, 1)"


def test_stats_is_deterministic_and_seeded(capsys, models_py):
    argv = ["stats", f"{models_py}:make", "--k", "4", "--format", "json", "--batches", "2"]
    first, second = (json.loads(run_cli(capsys, *argv)[1]) for _ in range(2))
    assert first == second and first["inputs"]["seed"] == 0
    assert json.loads(run_cli(capsys, *argv, "--seed", "7")[1])["inputs"]["seed"] == 7


@pytest.mark.parametrize("threshold, rate", [("inf", 1.0), ("-inf", 0.0)])
def test_stats_threshold_flag_reaches_the_config(capsys, models_py, threshold, rate):
    # "--threshold -inf" as two words: argparse alone would take -inf for an option
    status, out, _ = run_cli(capsys, "stats", f"{models_py}:make", "--k", "4", "--test", "threshold",
                             "--threshold", threshold, "--format", "json", "--batches", "1")
    data = json.loads(out)
    assert status == 0 and data["sites"]["linear_1"]["test"] == "threshold"
    assert data["sites"]["linear_1"]["prune_rate"] == rate


def test_stats_argmax_output_and_output_file(capsys, models_py, tmp_path):
    target = tmp_path / "stats.json"
    status, out, _ = run_cli(capsys, "stats", f"{models_py}:make", "--k", "4", "--outputs", "output=argmax",
                             "--batches", "1", "-o", str(target))
    assert status == 0 and out == f"wrote {target}\n"
    data = json.loads(target.read_text())
    assert data["sites"]["linear_2"]["decision"] == "argmax"


def test_stats_on_hf_opt_with_keyword_token_inputs(capsys):
    pytest.importorskip("transformers")
    status, out, err = run_cli(capsys, "stats", "exprune_fx.zoo:hf_opt", "--k", "16", "--batches", "2",
                               "--batch-size", "3")
    assert status == 0 and err == ""
    assert re.match(r"inputs: 2 batches .*: input_ids i64\[3, 8\] uniform in \[0, \d+\), use_cache=False$",
                    out.splitlines()[0])
    assert re.search(r"^linear_4 +linear +relu +32 +16 +\d+\.\d% +rewritten$", out, re.M)  # fc1 of layer 0
    assert "whole model over 2 call(s)" in out


def test_random_batch_follows_the_example():
    example = ((torch.randn(2, 3), torch.tensor([[5, 0], [2, 9]])),
               {"mask": torch.tensor([[True], [False]]), "flag": False, "half": torch.zeros(2, dtype=torch.float16)})
    (x, ids), kwargs = random_batch(example, torch.Generator().manual_seed(0))
    assert x.shape == (2, 3) and x.dtype == torch.float32 and not torch.equal(x, example[0][0])
    assert ids.dtype == torch.int64 and ids.shape == (2, 2) and 0 <= int(ids.min()) and int(ids.max()) <= 9
    assert torch.equal(kwargs["mask"], example[1]["mask"]) and kwargs["flag"] is False
    assert kwargs["half"].dtype == torch.float16
    (x5, ids5), kwargs5 = random_batch(example, torch.Generator().manual_seed(0), batch_size=5)
    assert x5.shape == (5, 3) and ids5.shape == (5, 2) and kwargs5["half"].shape == (5,)
    assert kwargs5["mask"].flatten().tolist() == [True, False, True, False, True]
    again = random_batch(example, torch.Generator().manual_seed(0), batch_size=5)
    assert torch.equal(again[0][0], x5) and torch.equal(again[0][1], ids5)


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
    (["dump", "{models}:make", "--k", "8"], 2, "--k only applies to --stage rewritten"),
    (["dump", "{models}:make", "--stage", "rewritten", "--k", "1"], 2, "--k must be an integer >= 2"),
    (["dump", "{models}:training", "--input-shape", "2,4", "--stage", "rewritten"], 1, "pass --eval"),
    (["stats", "{models}:make", "--alpha", "0.9"], 2, "invalid compile setting: --alpha must be a float in [0, 0.5]"),
    (["stats", "{models}:make", "--test", "zscore"], 2, "invalid choice: 'zscore'"),
    (["stats", "{models}:make", "--threshold", "nan"], 2, "--threshold must be a float"),
    (["stats", "{models}:make", "--batches", "0"], 2, "--batches: expected a positive integer"),
    (["stats", "{models}:make", "--batch-size", "x"], 2, "--batch-size: expected a positive integer"),
    (["stats", "{models}:make", "--format", "dot"], 2, "invalid choice: 'dot'"),
    (["stats", "{models}:bare"], 2, "pass one --input-shape"),
    (["stats", "{models}:broken"], 1, "RuntimeError: weights not found"),
    (["stats", "{models}:make", "--outputs", "nope"], 1, "unknown output(s)"),
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


def test_stats_batch_that_does_not_fit_is_one_line_error(capsys, models_py):
    code, out, err = run_cli(capsys, "stats", f"{models_py}:times_input", "--batch-size", "5")
    note, error = err.splitlines()  # nothing to rewrite in x @ w: a note, then the error
    assert code == 1 and out == "" and note.startswith("exprune-fx: note: no site was rewritten")
    assert error.startswith("exprune-fx: error: running random batch 1 of 4 through the compiled model: ")
    assert "Traceback" not in err


def test_syntax_error_in_model_file_is_one_line(capsys, tmp_path):
    bad = tmp_path / "bad_syntax.py"
    bad.write_text("def make(:\n")
    code, _, err = run_cli(capsys, "dump", f"{bad}:make")
    assert code == 1 and err.count("\n") == 1 and "SyntaxError" in err and "Traceback" not in err


# -- demo and entry points -------------------------------------------------------------------

@pytest.mark.skipif(not FASHION_MNIST_ROOT.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_demo_calibrates_and_writes_its_files(capsys, tmp_path):
    """The main job on a small slice (the full one runs as ``make demo``)."""
    out_dir = tmp_path / "demo"
    status, out, _ = run_cli(capsys, "demo", "--out", str(out_dir), "--val", "100", "--test", "200", "--quiet")
    assert status == 0
    assert re.search(r"symmetry check: permuted [1-9]\d* free classes, 0 failures", out)
    assert re.search(r"^conv2d_1 +conv2d +relu +(32|288) ", out, re.M)  # the per-site table (288: exact mode)
    assert re.search(r"^test accuracy: dense 0\.\d+, ExPrune 0\.\d+", out, re.M)
    assert re.search(r"whole-model reduction -?\d+\.\d+%", out)
    results = json.loads((out_dir / "results.json").read_text())
    assert results["test_images"] == 200 and results["validation_drop"] <= 0.01
    assert results["dense_mflops_per_image"] > results["executed_mflops_per_image"] * (1 - 1e-9) or \
        results["flops_reduction"] <= 0
    for name in ("resnet_rewritten.txt", "resnet_rewritten.json", "resnet_rewritten.dot", "prune_rates.png",
                 "calibration.png"):
        assert (out_dir / name).stat().st_size > 0 and name in out
    assert json.loads((out_dir / "resnet_rewritten.json").read_text())["stage"] == "rewritten"
    assert (out_dir / "resnet_rewritten.svg").exists() == (shutil.which("dot") is not None)


def test_demo_refuses_bad_sizes(capsys):
    status, _, err = run_cli(capsys, "demo", "--val", "10")
    assert status == 2 and "val must be between 50 and 5000" in err and err.count("\n") == 1


def test_help_in_process(capsys):
    status, out, _ = run_cli(capsys, "dump", "--help")
    assert status == 0 and "--input-shape" in out and "--stage" in out and "rewritten" in out
    status, out, _ = run_cli(capsys, "stats", "--help")
    assert status == 0 and all(flag in out for flag in ("--batches", "--batch-size", "--k", "--alpha"))


def test_python_m_help():
    result = subprocess.run([sys.executable, "-m", "exprune_fx", "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: exprune-fx")
    assert "dump" in result.stdout and "stats" in result.stdout and "demo" in result.stdout
