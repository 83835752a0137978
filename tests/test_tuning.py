"""Fitting the fast kernels' cost model to a machine (exprune_fx/runtime/tuning.py): the fit
on given timings, what tune() applies and keeps, and the constants a later process loads."""

import json

import pytest

from exprune_fx.cli import main
from exprune_fx.runtime import fast, tuning

pytestmark = pytest.mark.skipif(fast.module() is None, reason="the fast kernels could not be built here")


TRUTH = {"fastest": (4.0, 256, 256), "auto": (6.0,)}  # candidates of tuning.CHOICES


def _cells(truth: dict = TRUTH) -> list[dict]:
    """Timings over 128- and 1024-term rows, 1-32 rows and three survivor shares where the
    row-wise kernel is twice as fast as the other kernel wherever the cost model with the
    ``truth`` constants picks it, and half as fast elsewhere."""
    cells = []
    for terms in (128, 1024):
        for rows in (1, 2, 4, 8, 16, 32):
            for survivors in (1.0, 0.5, 0.1):
                cell = {"rows": rows, "k": 16, "unit": 1, "k_terms": terms, "survivors": survivors, "row-wise_ms": 1.0}
                for setting, constants in truth.items():
                    wins = tuning.row_chosen(cell, setting, constants)
                    cell[f"{tuning.CHOICES[setting]['other']}_ms"] = 2.0 if wins else 0.5
                cells.append(cell)
    return cells


@pytest.fixture()
def constants(monkeypatch, tmp_path):
    """The built-in constants back after the test, and a private cache directory."""
    for name in tuning.CONSTANTS:
        monkeypatch.setattr(fast, name, getattr(fast, name))
    monkeypatch.setenv("EXPRUNE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("EXPRUNE_COST_MODEL", raising=False)
    return {name: getattr(fast, name) for name in tuning.CONSTANTS}


def test_fit_finds_constants_that_pick_the_faster_kernel_everywhere():
    cells = _cells()
    for setting in tuning.CHOICES:
        best, lost = tuning.fit(cells, setting)
        assert lost == 0.0 and lost < tuning.loss(cells, setting, tuning.CHOICES[setting]["candidates"][0])
        other = tuning.CHOICES[setting]["other"]
        for cell in cells:
            assert tuning.row_chosen(cell, setting, best) == (cell["row-wise_ms"] < cell[f"{other}_ms"]), cell


def test_tune_applies_and_saves_the_fit_and_a_later_process_loads_it(constants, monkeypatch):
    cells = _cells()
    monkeypatch.setattr(tuning, "grid", lambda **sizes: cells)
    result = tuning.tune(quick=True)
    fitted = result["constants"]
    assert fitted == {name: getattr(fast, name) for name in tuning.CONSTANTS} != constants
    assert (fitted["ROW_BUDGET"],) == TRUTH["auto"]
    assert all(after == 0.0 < before for before, after in result["loss"].values())
    saved = json.loads(result["path"].read_text())
    assert saved[tuning.machine_tag()]["constants"] == fitted

    tuning.apply(constants)  # a new process: built-in constants, then what the machine saved
    assert tuning.apply_saved() == fitted and fast.ROW_BUDGET == fitted["ROW_BUDGET"]
    tuning.apply(constants)
    monkeypatch.setenv("EXPRUNE_COST_MODEL", "builtin")
    assert tuning.apply_saved() is None and fast.ROW_BUDGET == constants["ROW_BUDGET"]


def test_tune_keeps_the_constants_in_force_where_the_fit_gains_little(constants, monkeypatch):
    """Timings the constants in force already get right: nothing changes (the fit's tie, or
    a gain within KEEP_WITHIN, is noise)."""
    in_force = {setting: tuple(constants[name] for name in choice["constants"])
                for setting, choice in tuning.CHOICES.items()}
    cells = _cells(in_force)
    monkeypatch.setattr(tuning, "grid", lambda **sizes: cells)
    assert tuning.tune(save=False)["constants"] == constants
    assert not list(tuning.cache_path().parent.glob("*.json"))


def test_saved_constants_of_another_machine_or_a_broken_file_are_ignored(constants):
    path = tuning.cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"another-machine": {"constants": {"ROW_BUDGET": 99.0}}}))
    assert tuning.apply_saved() is None and fast.ROW_BUDGET == constants["ROW_BUDGET"]
    path.write_text(json.dumps({tuning.machine_tag(): {"constants": {"NOT_A_CONSTANT": 1}}}))
    with pytest.warns(RuntimeWarning, match="ignoring the saved cost model"):
        assert tuning.apply_saved() is None
    path.write_text("{not json")
    with pytest.warns(RuntimeWarning, match="ignoring"):
        assert tuning.apply_saved() is None
    assert {name: getattr(fast, name) for name in tuning.CONSTANTS} == constants


def test_tune_measures_a_small_grid_for_real(constants):
    """The timing itself (no timed assertion): every cell has each kernel's time."""
    cells = tuning.grid(shapes=((64, 512, 1, 8),), rows=(1, 8), survivors=(1.0, 0.2), repeats=2, runs=1)
    assert len(cells) == 4 and all(c[f"{k}_ms"] > 0 for c in cells for k in tuning.KERNELS)
    with pytest.raises(ValueError, match="at least 1"):
        tuning.tune(runs=0)


def test_cli_tune_reports_the_fit_and_where_it_is_saved(constants, monkeypatch, capsys):
    monkeypatch.setattr(tuning, "grid", lambda **sizes: _cells())
    assert main(["tune", "--quick"]) == 0
    out = capsys.readouterr().out
    assert '"fastest": in force DENSE_BUDGET=' in out and "loses 0.0%" in out
    assert f"saved to {tuning.cache_path()}" in out
    assert main(["tune", "--quick", "--no-save"]) == 0
    assert "not saved" in capsys.readouterr().out
