"""priors/options.py: one helper turns a prior's config into dataclasses, with one-line errors."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from priors import PRIORS, build_prior
from priors.options import LogitSampling, options_from

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Demo:
    size: int  # derived by the caller in these tests
    count: int = 1
    rate: float = 0.5
    flag: bool = True
    kind: str = "a"
    limit: int | None = None


def test_options_fill_the_dataclass_and_an_int_is_a_valid_float():
    demo = options_from(Demo, {"count": 3, "rate": 1, "flag": False, "limit": None}, "prior", owner="demo", size=7)
    assert demo == Demo(size=7, count=3, rate=1.0, flag=False)
    assert isinstance(demo.rate, float)
    assert options_from(Demo, None, "prior", owner="demo", size=7) == Demo(size=7)


@pytest.mark.parametrize("options, message", [
    ({"cuont": 3}, r"^prior\.cuont is not an option of prior=demo \(options: count, rate, flag, kind, limit, sample\)$"),
    ({"size": 3}, r"^prior\.size is not an option of prior=demo"),  # derived by the caller, never an option
    ({"count": 2.5}, r"^prior\.count=2\.5: expected an integer$"),
    ({"count": True}, r"^prior\.count=True: expected an integer$"),
    ({"limit": "many"}, r"^prior\.limit='many': expected an integer$"),
    ({"rate": "fast"}, r"^prior\.rate='fast': expected a number$"),
    ({"flag": "maybe"}, r"^prior\.flag='maybe': expected true or false$"),
    ({"kind": 3}, r"^prior\.kind=3: expected a string$"),
])
def test_unknown_keys_and_bad_types_are_one_line_errors(options, message):
    with pytest.raises(ValueError, match=message):
        options_from(Demo, options, "prior", owner="demo", others=("sample",), size=7)


def test_keys_the_caller_reads_itself_are_listed_and_skipped():
    assert options_from(Demo, {"sample": {"x": 1}}, "prior", owner="demo", others=("sample",), size=7) == Demo(7)
    with pytest.raises(ValueError, match=r"^prior\.sample=3: expected a mapping of options$"):
        options_from(LogitSampling, 3, "prior.sample", owner="demo")


def test_ranges_are_checked_by_the_dataclass_itself():
    with pytest.raises(ValueError, match=r"^prior\.sample\.top_k=0 must be >= 1 or null$"):
        options_from(LogitSampling, {"top_k": 0}, "prior.sample", owner="demo")
    with pytest.raises(ValueError, match=r"^prior\.sample\.temperature=0 must be > 0$"):
        LogitSampling(temperature=0)


@pytest.mark.parametrize("name", list(PRIORS))
def test_the_error_for_an_unknown_key_lists_exactly_the_options_of_the_yaml(name):
    yaml = OmegaConf.to_container(OmegaConf.load(ROOT / f"conf/prior/{name}.yaml"))
    assert yaml.pop("name") == name
    with pytest.raises(ValueError) as e, torch.device("meta"):
        build_prior(name, 64, (4, 4), T=3, budget=400_000, cfg={**yaml, "nope": 1})
    assert str(e.value).startswith(f"prior.nope is not an option of prior={name} (options: ")
    assert sorted(str(e.value).split("(options: ")[1].rstrip(")").split(", ")) == sorted(yaml)
    with pytest.raises(ValueError) as e, torch.device("meta"):
        build_prior(name, 64, (4, 4), T=3, budget=400_000, cfg={**yaml, "sample": {**yaml["sample"], "nope": 1}})
    assert str(e.value).startswith(f"prior.sample.nope is not an option of prior={name} (options: ")
    assert sorted(str(e.value).split("(options: ")[1].rstrip(")").split(", ")) == sorted(yaml["sample"])


@pytest.mark.parametrize("name", list(PRIORS))
@pytest.mark.parametrize("option", ["n_layer", "n_head", "dropout"])
def test_out_of_range_transformer_options_are_one_line_errors(name, option):
    bad = {"n_layer": 0, "n_head": 0, "dropout": 1.0}[option]
    with pytest.raises(ValueError, match=rf"^prior\.{option}={bad} must "):
        build_prior(name, 64, (4, 4), T=3, budget=400_000, cfg={option: bad})


@pytest.mark.parametrize("name", list(PRIORS))
def test_arch_config_survives_a_checkpoint_round_trip(name):
    with torch.device("meta"):
        prior = build_prior(name, 64, (4, 4), T=3, budget=400_000, cfg={"n_layer": 2})
    # Checkpoints store arch_config and compare it with == on load: it must come back equal from JSON.
    assert json.loads(json.dumps(prior.arch_config())) == prior.arch_config()
    assert prior.arch_config()["n_layer"] == 2 and prior.arch_config()["vocab_size"] == 64
    assert prior.arch_config()["grid"] == [4, 4]  # a list, as checkpoints store it (they compare with ==)
    assert "sample" not in prior.arch_config()


def test_train_config_takes_every_value_from_the_yaml():
    """TrainConfig has no defaults of its own: conf/train/default.yaml is the one place its values are set, and a
    config without one of them is refused by name."""
    import dataclasses
    from pathlib import Path

    from omegaconf import OmegaConf

    from bench.errors import ConfigError
    from bench.options import TrainConfig, train_config

    yaml = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "train" / "default.yaml")
    assert all(f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
               for f in dataclasses.fields(TrainConfig))
    built = train_config(yaml)
    assert dataclasses.asdict(built) == OmegaConf.to_container(yaml)
    del yaml["val_every"]
    with pytest.raises(ConfigError, match=r"^train\.val_every is required"):
        train_config(yaml)
