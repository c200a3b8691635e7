"""A/A test of the evaluation protocol on the smoke shapes, through the real pipeline stages and metrics.

AR and ImageBART T=2 trained at one seed are one model (the same weights: T=2 is a single decoder-only AR
model). Sampled with different random streams, their comparison must come out "not different" at about the
nominal 5% rate per metric; an untrained prior must come out significantly worse every time.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from scipy import stats as sps

from bench import metrics as M
from bench import pipeline as P
from bench import stats as S
from bench.evaluate import load_reference, sample_metrics
from bench.results import empty_results
from bench.tokens import decode_tokens, load_tokenizer

CONF = str(Path(__file__).resolve().parent.parent / "conf")
SEEDS = 40
TESTED = ("fid", "kid_mean", "prdc_precision", "recall", "density", "coverage")


def job_for(prior: str, cache: Path, out: Path) -> P.Job:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=["experiment=smoke", f"prior={prior}", "T=2", "logger=none",
                                           f"paths.cache={cache}"])
    settings = P.validate(cfg)
    extractor = M.load_feature_extractor(None)
    return P.Job(cfg, out, settings, empty_results(), extractor)


@pytest.fixture(scope="module")
def models(smoke_token_cache, tmp_path_factory):
    import shutil

    from tests.conftest import SHARED_STAGES

    cache = tmp_path_factory.mktemp("aa") / "cache"
    for stage in SHARED_STAGES:
        shutil.copytree(smoke_token_cache / stage, cache / stage)
    out = {}
    for name in ("ar", "imagebart"):
        job = job_for(name, cache, cache.parent / name)
        data = P.data_stage(job)
        tokens = P.tokens_stage(job, data)
        ref = P.reference_stage(job, data)
        out[name], _ = P.train_stage(job, tokens)
    torch.manual_seed(123)
    untrained = P.build_prior_checked(job.cfg, tokens.vocab_size, tokens.grid)
    tok_model = load_tokenizer(job.cache / "tokenizer" / tokens.tokenizer_key, job.cfg.tokenizer)
    feats, stats = load_reference(ref.directory)
    return out["ar"], out["imagebart"], untrained, tokens, tok_model, ref.extractor, feats, stats, job.cfg.eval


def evaluate(prior, seed, tokens, tok_model, extractor, feats, stats, cfg) -> dict:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        x = prior.sample(int(cfg.num_samples), generator=g)
    images = decode_tokens(tok_model, x, tokens.inverse, tokens.grid, batch_size=64)
    fake = M.images_to_features(images, extractor)
    values, _ = sample_metrics(feats["pool"], stats, fake, cfg, seed)
    return values


def test_one_model_sampled_twice_is_not_different_and_an_untrained_model_is_worse(models):
    ar, ib2, untrained, tokens, tok_model, extractor, feats, stats, cfg = models
    # The A/A premise: ImageBART T=2 and AR trained at one seed are the same weights.
    assert all(torch.equal(a, b) for a, b in zip(ar.state_dict().values(), ib2.state_dict().values()))
    same = {k: 0 for k in TESTED}
    for s in range(SEEDS):
        a = evaluate(ar, 1000 + s, tokens, tok_model, extractor, feats, stats, cfg)
        b = evaluate(ib2, 2000 + s, tokens, tok_model, extractor, feats, stats, cfg)
        for k in TESTED:
            same[k] += S.independent_test(a[k], a[f"{k}_se"], b[k], b[f"{k}_se"]) < 0.05
        if s < 8:  # power: an untrained prior (noise tokens) is significantly worse every time
            c = evaluate(untrained, 3000 + s, tokens, tok_model, extractor, feats, stats, cfg)
            for k in ("fid", "kid_mean"):
                assert c[k] > a[k] and S.independent_test(a[k], a[f"{k}_se"], c[k], c[f"{k}_se"]) < 0.05, (s, k)
    # 40 A/A comparisons at a 5% level: 0-6 false positives cover 99% of a correct test (P(X >= 7) = 0.003);
    # a test whose intervals are half as wide as they should be would give ~40% instead.
    hi = int(sps.binom.isf(0.003, SEEDS, 0.05))
    assert all(v <= hi for v in same.values()), same
    # ... and the intervals are not so wide that nothing can ever differ: the untrained model is detected above.
    assert np.mean(list(same.values())) / SEEDS < 0.15
