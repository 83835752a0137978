"""Config validation: every bad value names the setting and the allowed range."""

import math

import pytest

from exprune_fx import Config, InputError, SiteConfig


@pytest.mark.parametrize("kwargs, match", [
    ({"k": 1}, r"Config\.k must be an integer >= 2"),
    ({"k": 2.5}, r"Config\.k must be an integer"),
    ({"k": True}, r"Config\.k"),
    ({"alpha": -0.1}, r"Config\.alpha must be a float in \[0, 0\.5\]"),
    ({"alpha": 0.7}, r"Config\.alpha"),
    ({"threshold": float("nan")}, r"Config\.threshold must be a float"),
    ({"threshold": "0"}, r"Config\.threshold"),
    ({"test": "ttest"}, r"Config\.test must be one of"),
    ({"sites": {"linear": {"k": 0}}}, r"SiteConfig\.k"),
    ({"sites": {"linear": {"alpha": 1}}}, r"SiteConfig\.alpha"),
    ({"sites": {"linear": {"enable": False}}}, r"unknown settings \['enable'\]"),
    ({"sites": {"linear": 3}}, r"SiteConfig or a dict"),
    ({"stages": 0}, r"Config\.stages must be an integer in \[1, 8\]"),
    ({"stages": 2.0}, r"Config\.stages"),
    ({"sites": {"linear": {"stages": 9}}}, r"SiteConfig\.stages"),
    ({"order": "largest"}, r"Config\.order must be one of \('natural', 'magnitude'\)"),
    ({"sites": {"linear": {"order": 1}}}, r"SiteConfig\.order"),
    ({"order": "magnitude"}, r"Config: order='magnitude' needs test='threshold'"),
    ({"order": "magnitude", "test": "threshold", "stages": 2}, r"tests once"),
    ({"order": "magnitude", "test": "stats", "mode": "hybrid"}, r"needs test='threshold'"),
    ({"test": "threshold", "sites": {"linear": {"order": "magnitude", "test": "stats"}}},
     r"Config\.sites\['linear'\]: order='magnitude' needs test='threshold'"),
])
def test_bad_values_are_refused(kwargs, match):
    with pytest.raises(InputError, match=match):
        Config(**kwargs)


def test_infinite_thresholds_and_zero_alpha_are_allowed():
    assert Config(test="threshold", threshold=math.inf).for_site("x").critical == math.inf
    assert Config(test="threshold", threshold=-math.inf).for_site("x").critical == -math.inf
    assert Config(alpha=0.0).for_site("x").critical == -math.inf
    assert Config(alpha=0.5).for_site("x").critical == 0.0


def test_site_overrides():
    cfg = Config(k=16, alpha=0.01, sites={"a": SiteConfig(k=8), "b": {"enabled": False, "test": "threshold"}})
    assert cfg.for_site("a").k == 8 and cfg.for_site("a").alpha == 0.01
    assert not cfg.for_site("b").enabled and cfg.for_site("b").test == "threshold"
    assert cfg.with_site("a", alpha=0.2).for_site("a").alpha == 0.2
    assert cfg.for_site("a").critical < 0


def test_dominance_critical_is_bonferroni():
    cfg = Config(alpha=0.05).for_site("head")
    assert cfg.dominance_critical(2) == pytest.approx(1.6449, abs=1e-3)
    assert cfg.dominance_critical(11) == pytest.approx(2.5758, abs=1e-3)  # 1 - 0.05/10
    assert Config(alpha=0.0).for_site("h").dominance_critical(10) == math.inf


def test_magnitude_order_resolves_per_site():
    cfg = Config(test="threshold", order="magnitude", sites={"a": {"order": "natural", "test": "stats"},
                                                             "b": {"mode": "exact"}})
    assert cfg.for_site("x").order == "magnitude"
    assert cfg.for_site("a").order == "natural" and cfg.for_site("a").test == "stats"
    assert cfg.for_site("b").mode == "exact"  # exact mode orders its own terms: the setting does not apply
