"""Smoke runs of the benchmark scripts on tiny slices (the full runs are `make bench`)."""

import json
import sys
from pathlib import Path

import pytest

from exprune_fx.datasets import FASHION_MNIST_ROOT

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
pytestmark = pytest.mark.skipif(not FASHION_MNIST_ROOT.is_dir(), reason="dataset-fashion-mnist is not installed")


def test_static_pruning_benchmark_smoke(tmp_path):
    import static_pruning

    rows = static_pruning.main(["--out", str(tmp_path), "--sparsities", "0.9", "--pruners", "magnitude",
                                "--train", "256", "--finetune-epochs", "1", "--val", "100", "--test", "200",
                                "--exact-test", "20", "--ks", "8", "--alphas", "0.2"])
    assert [r["budget"] for r in rows] == ["negligible (0.1%)", "1%"]
    for r in rows:
        assert abs(r["achieved_sparsity"] - 0.9) < 1e-5
        assert -1 < r["reduction"] < 1 and 0 < r["exact_reduction_dense_model"] < 1
    assert json.loads((tmp_path / "static_pruning.json").read_text()) == rows
    assert "| vgg | magnitude | 90% |" in (tmp_path / "static_pruning.md").read_text()


def test_calibration_benchmark_smoke(tmp_path):
    import calibration

    rows = calibration.main(["--out", str(tmp_path), "--models", "gcn", "--val", "100", "--test", "100",
                             "--tests", "stats", "--ks", "8", "--zero-skip", "--quiet"])
    assert {(r["model"], r["test"]) for r in rows} == {("gcn", "stats")} and len(rows) == 2
    assert all(0 <= r["oracle_reduction"] < 1 and r["evaluations"] <= 100 for r in rows)
    assert all(r["reduction_with_zero_skip"] >= r["reduction"] - 1e-9 and r["zero_skip_alone"] >= 0 for r in rows)
    assert "| with zero-skip | zero-skip alone |" in (tmp_path / "calibration.md").read_text()
    assert (tmp_path / "pareto_gcn.png").stat().st_size > 0


def test_calibration_table_has_zero_skip_columns_only_when_measured():
    import calibration

    row = {"model": "m", "metric_name": "accuracy", "test": "stats", "budget": "1%", "dense_accuracy": 0.9,
           "accuracy": 0.89, "reduction": 0.2, "oracle_reduction": 0.4, "fraction_of_oracle": 0.5,
           "evaluations": 10, "seconds": 3.0}
    plain = calibration.to_markdown([row])
    assert "zero-skip" not in plain and plain.splitlines()[1].count("---") == 11
    skipped = {**row, "reduction_with_zero_skip": 0.5, "zero_skip_alone": 0.3}
    lines = calibration.to_markdown([skipped, row]).splitlines()
    assert lines[1].count("---") == 13 and all(line.count("|") == 14 for line in lines)
    assert "| 50.00% | 30.00% |" in lines[2] and "| - | - |" in lines[3]
    head = {**row, "argmax_oracle_reduction": 0.1, "fraction_of_both_oracles": 0.4}
    line = calibration.to_markdown([head]).splitlines()[2]
    assert "| 40.00% + 10.00% argmax | 50% / 40% |" in line and line.count("|") == 12


def test_wallclock_pieces_on_a_small_mlp():
    """The wall-clock benchmark's timing and per-site pieces, without data or training."""
    import torch

    import exprune_fx
    import wallclock
    from exprune_fx.zoo import mlp

    model, _ = mlp(widths=(32, 128, 128, 4))
    x = torch.randn(3, 32)
    compiled = exprune_fx.compile(model, x, exprune_fx.Config(alpha=0.3, k=8))
    timing = wallclock.side_by_side(wallclock.variants(model, compiled, x), x, repeats=3)
    assert set(timing) == set(wallclock.VARIANTS) and timing["dense eager"]["ratio"] == 1.0
    reduction = wallclock.flops_reduction(compiled, x)
    sites = wallclock.site_rows("mlp", compiled, x, repeats=3)
    assert [s["site_shape"] for s in sites] == [[128, 128]] and sites[0]["rows"] == 3
    assert 0 < sites[0]["prune_rate"] < 1 and sites[0]["flops_reduction"] > 0
    assert timing["fastest + inductor"]["ratio_to_dense_inductor"] > 0
    row = wallclock.row("mlp", 3, timing, reduction, {"dense_accuracy": 0.5, "accuracy": 0.5, "linear_sites": sites,
                                                      "fastest_reduction": reduction})
    table = wallclock.markdown([row], "test machine")
    assert "| mlp | 3 |" in table and "| mlp | 128 x 128 | 3 |" in table
    fastest_line = next(line for line in table.splitlines() if line.startswith("| mlp | 3 |") and "%" in line
                        and line.count("|") == 9)
    assert f"(x{timing['fastest + inductor']['ratio_to_dense_inductor']:.2f})" in fastest_line


def test_conv_tile_shares_match_the_reference_decisions():
    """The conv tile measurement: its 1 x 1 share is the prune rate the reference counts, and
    a tile that contains another is pruned whole no more often; a hand-made mask's shares."""
    import torch

    import exprune_fx
    import wallclock
    from exprune_fx.runtime import fast
    from exprune_fx.zoo import residual_cnn

    p = torch.zeros(2, 3, 2, 3, dtype=torch.bool)
    p[0, 0] = True  # one whole map of six
    p[1, :, 0, :2] = True  # the first two positions of every channel of image 1
    assert wallclock.pruned_tile_share(p, 1, 1) == pytest.approx(12 / 36)
    assert wallclock.pruned_tile_share(p, 1, 2) == pytest.approx(6 / 18)  # image 0 channel 0: 3; image 1: 1 a channel
    assert wallclock.pruned_tile_share(p, 2, 2) == pytest.approx(2 / 12)  # blocks (0, 1), (2, pad): image 1's first
    assert wallclock.pruned_tile_share(p, 1, 4) == pytest.approx(2 / 12)  # positions padded to 8: image 0 channel 0
    assert wallclock.pruned_tile_share(p, 1, None) == pytest.approx(1 / 6)

    model, x = residual_cnn(batch=4)
    compiled = exprune_fx.compile(model, x, exprune_fx.Config(alpha=0.3, k=4))
    rows = wallclock.conv_tile_rows("resnet", compiled, x)
    with torch.no_grad(), fast.use("reference"):
        compiled.reset_stats()
        compiled(x)
    sites = compiled.exprune_stats()["sites"]
    convs = [s for s in compiled.rewritten_sites if s.kind == "conv2d"]
    assert len(rows) == len(convs) > 0
    for row, site in zip(rows, convs):  # (the recorder sees the sites in graph order)
        tiles = row["tiles"]
        assert tiles["1 x 1"] == pytest.approx(sites[site.name]["prune_rate"], abs=1e-6)
        assert tiles["1 x 1"] >= tiles["1 x 4"] >= tiles["1 x 16"] and tiles["1 x 4"] >= tiles["16 x 4"] >= tiles["32 x 4"]
    assert any(row["tiles"]["1 x 1"] > 0 for row in rows)
    table = wallclock.markdown([dict(wallclock.row("resnet", 4, {v: {"median_ms": 1.0, "ratio": 1.0, "ratio_to_dense_inductor": 1.0}
                                                                 for v in wallclock.VARIANTS}, 0.1,
                                                  {"dense_accuracy": 0.5, "accuracy": 0.5}), conv_tiles=rows)],
                               "test machine")
    assert f"| resnet | {' x '.join(map(str, rows[0]['site_shape']))} |" in table


def test_site_kernel_grid_and_fit_on_a_tiny_grid():
    """The cost model's grid: every cell timed for every kernel at its survivor share, and a
    fit that picks, from the candidates, constants that lose no more than those in force."""
    import site_kernels

    from exprune_fx.runtime import fast

    if fast.module() is None:
        pytest.skip("the fast kernels cannot be built here")
    cells = site_kernels.grid(shapes=((64, 512, 1, 8),), rows=(1, 4), survivors=(1.0, 0.2), repeats=2, runs=1)
    assert len(cells) == 4 and all(c["row-wise_ms"] > 0 and c["dense_ms"] > 0 and c["blas_ms"] > 0 for c in cells)
    for setting in site_kernels.CHOICES:
        best, lost = site_kernels.fit(cells, setting)
        assert 0 <= lost <= site_kernels.loss(cells, setting) + 1e-12
        assert len(best) == len(site_kernels.CHOICES[setting]["constants"])
    # the in-force choice is the runtime's own: one row, few survivors, K above MIN_TERMS -> row-wise
    cell = {"rows": 1, "k": 8, "unit": 1, "k_terms": 512, "survivors": 0.2}
    assert site_kernels.row_chosen(cell, "fastest") and site_kernels.row_chosen(cell, "auto")
    assert not site_kernels.row_chosen({**cell, "k_terms": 128}, "fastest")
    text = site_kernels.markdown(cells)
    assert text.count("| 64 x 512 (1, 8) |") == 4 and "least-loss fit" in text
