"""Legal but suspicious settings are one warning line each in the plan, before any work."""
from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from bench.pipeline import plan_warnings, validate
from tests.clitools import ROOT


def settings_of(overrides: list[str], tmp_path):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=smoke", "logger=none", *overrides])
    with open_dict(cfg):
        cfg.paths.cache = str(tmp_path / "cache")
    return cfg, validate(cfg)


def test_the_smoke_preset_plans_without_warnings(tmp_path):
    assert plan_warnings(*settings_of([], tmp_path)) == []


@pytest.mark.parametrize("overrides, warning", [
    # A preset shrunk in its steps but not its warm-up (experiment=ffhq_tab3 train.steps=60 kept 5000).
    (["train.steps=60", "train.warmup_steps=5000"],
     "train.warmup_steps=5000 is not shorter than train.steps=60: the learning rate never reaches train.lr="),
    (["eval.completion_samples=1000"],
     "eval.completion_samples=1000 exceeds the 23 val images: completion FID uses 23"),
    (["eval.num_samples=100"], "eval.num_samples=100 exceeds the reference's 64 train images: FID and KID compare"),
])
def test_a_suspicious_setting_is_one_warning(tmp_path, overrides, warning):
    [line] = plan_warnings(*settings_of(overrides, tmp_path))
    assert line.startswith(warning) and "\n" not in line
    assert not (tmp_path / "cache").exists()  # validation computes nothing
