"""A/A test of the evaluation protocol on the smoke shapes, through the real pipeline stages and metrics.

AR and ImageBART T=2 trained at one seed are one model (the same weights: T=2 is a single decoder-only AR
model). Sampled with different random streams, their comparison must come out "not different" at about the
nominal 5% rate per metric; an untrained prior must come out significantly worse every time. The synthetic
versions of both checks (known distributions, 200 trials) are in tests/test_stats.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from scipy import stats as sps

from bench import features as FE
from bench import pipeline as P
from bench import stats as S
from bench.evaluate import load_reference, sample_metrics
from bench.results import empty_results
from bench.tokens import decode_tokens, load_tokenizer

CONF = str(Path(__file__).resolve().parent.parent / "conf")
SEEDS = 40
TESTED = ("fid", "kid_mean", "prdc_precision", "recall", "density", "coverage")
# 40 A/A comparisons at a 5% level: 0-6 false positives cover 99.7% of a correct test (P(X >= 7) = 0.003); a
# test whose intervals were half as wide as they should be would flag about 40% instead.
MAX_FALSE = int(sps.binom.isf(0.003, SEEDS, 0.05))


@dataclass
class Models:
    ar: object
    ib2: object
    untrained: object
    tokens: object
    tokenizer: object
    extractor: object
    ref_feats: dict
    ref_stats: dict
    cfg: object

    def evaluate(self, prior, seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            x = prior.sample(int(self.cfg.num_samples), generator=g)
        images = decode_tokens(self.tokenizer, x, self.tokens.inverse, self.tokens.grid, batch_size=64)
        values, _ = sample_metrics(self.ref_feats["pool"], self.ref_stats, FE.images_to_features(images, self.extractor),
                                   self.cfg, seed)
        return values


def build_models(cache: Path, overrides: list[str]) -> Models:
    """AR and ImageBART T=2 trained by the real train stage (same seed), and an untrained prior."""
    trained = {}
    for name in ("ar", "imagebart"):
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            cfg = compose("config", overrides=[f"prior={name}", "T=2", "logger=none", f"paths.cache={cache}",
                                               *overrides])
        job = P.Job(cfg, cache.parent / name, P.validate(cfg), empty_results(), FE.load_feature_extractor(None))
        data = P.data_stage(job)
        tokens = P.tokens_stage(job, data)
        ref = P.reference_stage(job, data)
        trained[name], _ = P.train_stage(job, tokens, data)
    torch.manual_seed(123)
    untrained = P.build_prior_checked(job.cfg, tokens.vocab_size, tokens.grid)
    tokenizer = load_tokenizer(job.cache / "tokenizer" / tokens.tokenizer_key, tokens.tokenizer)
    feats, stats = load_reference(ref.directory)
    return Models(trained["ar"], trained["imagebart"], untrained, tokens, tokenizer, ref.extractor, feats, stats,
                  job.cfg.eval)


def false_positives(m: Models) -> dict[str, int]:
    # The A/A premise: ImageBART T=2 and AR trained at one seed are the same weights.
    assert all(torch.equal(a, b) for a, b in zip(m.ar.state_dict().values(), m.ib2.state_dict().values()))
    same = {k: 0 for k in TESTED}
    for s in range(SEEDS):
        a, b = m.evaluate(m.ar, 1000 + s), m.evaluate(m.ib2, 2000 + s)
        for k in TESTED:
            same[k] += S.independent_test(a[k], a[f"{k}_se"], b[k], b[f"{k}_se"]) < 0.05
    print(f"A/A false positives of {SEEDS}: {same}")  # shown with pytest -s
    return same


@pytest.fixture(scope="module")
def smoke_models(smoke_token_cache, tmp_path_factory):
    import shutil

    from tests.conftest import SHARED_STAGES

    cache = tmp_path_factory.mktemp("aa") / "cache"
    for stage in SHARED_STAGES:
        shutil.copytree(smoke_token_cache / stage, cache / stage)
    return build_models(cache, ["experiment=smoke"])


# Slow (2 min with its models): false positives and power of the same tests are checked by default on simulated
# and real-shaped features (tests/test_stats.py, tests/test_calibration.py); this runs them end to end.
@pytest.mark.slow
def test_one_model_sampled_twice_is_not_different_on_the_smoke_shapes(smoke_models):
    """At the smoke shapes every prior decodes to the smoke tokenizer's blobs (its reconstructions are as far
    from real images as any sample), so only the A/A half can be checked here; the slow test below checks
    power at the default shapes."""
    same = false_positives(smoke_models)
    assert all(v <= MAX_FALSE for v in same.values()), same


@pytest.mark.slow
def test_aa_and_power_at_the_default_shapes(tmp_path):
    """The embedded default's tokenizer and priors (100 samples per evaluation): one model sampled twice is not
    different at about the nominal rate, and an untrained prior is significantly worse every time."""
    m = build_models(tmp_path / "cache", ["eval.num_samples=100"])
    same = false_positives(m)
    assert all(v <= MAX_FALSE for v in same.values()), same
    for s in range(8):
        a, c = m.evaluate(m.ar, 1000 + s), m.evaluate(m.untrained, 3000 + s)
        for k in ("fid", "kid_mean"):
            assert c[k] > a[k] and S.independent_test(a[k], a[f"{k}_se"], c[k], c[f"{k}_se"]) < 0.05, (s, k)
