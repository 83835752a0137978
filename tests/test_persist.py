"""save/load round trips, format versions, and stale files."""

import json
import zipfile

import pytest
import torch

import exprune_fx
from exprune_fx import Config, InputError, persist
from exprune_fx.runtime import counters, fast
from exprune_fx.zoo import mlp, residual_cnn


def call(model, inputs):
    with torch.no_grad():
        return model(**inputs) if isinstance(inputs, dict) else model(inputs)


@pytest.mark.parametrize("name", ["residual_cnn", "residual_cnn_magnitude", "hf_opt"])
def test_round_trip_is_identical(tmp_path, name):
    if name == "hf_opt":
        pytest.importorskip("transformers")
        from exprune_fx.zoo import hf_opt
        model, inputs = hf_opt()
        cfg, outputs = Config(alpha=0.2, k=8, sites={"linear_4": {"alpha": 0.4}}), {"logits": "argmax"}
    elif name == "residual_cnn_magnitude":
        model, inputs = residual_cnn()
        cfg = Config(test="threshold", threshold=-0.01, k=8, order="magnitude", sites={"conv2d_3": {"mode": "hybrid"}})
        outputs = None
    else:
        model, inputs = residual_cnn()
        cfg, outputs = Config(alpha=0.2, k=8, sites={"conv2d_3": {"enabled": False}}), None
    compiled = exprune_fx.compile(model, inputs, cfg, outputs=outputs)
    path = tmp_path / "model.pt2"
    exprune_fx.save(compiled, path)
    loaded = exprune_fx.load(path, model=model)
    before, after = call(compiled, inputs), call(loaded, inputs)
    if hasattr(before, "logits"):
        assert type(after) is type(before)
        before, after = before.logits, after.logits
    assert torch.equal(before, after)
    assert loaded.config == compiled.config and loaded.sites == compiled.sites
    if name == "residual_cnn_magnitude":
        assert {s.order for s in loaded.rewritten_sites} == {"magnitude"}
    assert loaded.exprune_stats()["sites"].keys() == compiled.exprune_stats()["sites"].keys()
    assert loaded.exprune_stats()["calls"] == 1
    bigger = ({k: torch.cat([v, v]) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
              if isinstance(inputs, dict) else torch.cat([inputs, inputs]))
    call(loaded, bigger)  # the dynamic batch axis survives


def test_stale_and_foreign_files_are_refused(tmp_path):
    model, x = mlp(widths=(8, 64, 64, 3))
    compiled = exprune_fx.compile(model, x, Config(k=16))
    path = tmp_path / "m.pt2"
    exprune_fx.save(compiled, path)
    other, _ = mlp(widths=(8, 64, 32, 3))
    with pytest.raises(InputError, match="compiled from a model whose 2.weight"):
        exprune_fx.load(path, model=other)
    retrained, _ = mlp(widths=(8, 64, 64, 3), seed=1)
    with pytest.raises(InputError, match="other weights"):
        exprune_fx.load(path, model=retrained)
    with pytest.raises(InputError, match="does not exist"):
        exprune_fx.load(tmp_path / "none.pt2")
    (tmp_path / "junk.pt2").write_bytes(b"junk")
    with pytest.raises(InputError, match="not a model saved by exprune_fx.save"):
        exprune_fx.load(tmp_path / "junk.pt2")
    plain = tmp_path / "plain.pt2"
    torch.export.save(torch.export.export(model, (x,)), plain)
    with pytest.raises(InputError, match="no exprune-fx record"):
        exprune_fx.load(plain)
    with pytest.raises(InputError, match="save\\(\\) takes"):
        exprune_fx.save(model, tmp_path / "x.pt2")


def test_unknown_format_version_is_refused(tmp_path):
    model, x = mlp(widths=(8, 64, 64, 3))
    path = tmp_path / "m.pt2"
    exprune_fx.save(exprune_fx.compile(model, x, Config(k=16)), path)
    future = tmp_path / "future.pt2"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(future, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename.endswith("exprune.json"):
                meta = json.loads(data)
                meta["version"] = 99
                data = json.dumps(meta).encode()
            dst.writestr(item, data)
    with pytest.raises(InputError, match="version 99; this exprune-fx reads 'exprune-fx' versions 2, 3"):
        exprune_fx.load(future)


def test_version_2_files_load_with_the_counters_of_this_version(tmp_path, monkeypatch):
    """Version 2 wrote nine counters per site (no ``untested``): such a file loads, runs and counts."""
    model, x = mlp(widths=(8, 64, 64, 3))
    compiled = exprune_fx.compile(model, x, Config(alpha=0.3, k=16))
    path = tmp_path / "v2.pt2"
    with monkeypatch.context() as patch, fast.use("reference"):  # (this version's C++ kernels refuse 9 slots)
        patch.setattr(counters, "FIELDS", counters.FIELDS[:9])
        patch.setattr(persist, "VERSION", 2)
        old = exprune_fx.compile(model, x, Config(alpha=0.3, k=16))
        assert getattr(old.graph_module, old.rewritten_sites[0].counters).shape == (9,)
        exprune_fx.save(old, path)
    loaded = exprune_fx.load(path, model=model)
    for site in loaded.rewritten_sites:
        assert getattr(loaded.graph_module, site.counters).shape == (len(counters.FIELDS),)
    batch = torch.randn(16, 8)
    for setting in ("reference", "fastest"):
        with fast.use(setting):
            loaded.reset_stats(), compiled.reset_stats()
            assert torch.equal(call(loaded, batch), call(compiled, batch))
            assert loaded.exprune_stats()["sites"] == compiled.exprune_stats()["sites"]
