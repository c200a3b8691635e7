"""A second tokenizer defined in the test suite (tests/toy_tokenizer.py, tests/conf/tokenizer/toy.yaml): the
registry's contract and a smoke sweep with the toy prior, with nothing under bench/ or image_tokenizers/ naming
either."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from bench.errors import ConfigError
from bench.tokens import job_tokenizer
from tests.clitools import ROOT, job_results, run_cli
from tests.toy_tokenizer import ToyOptions, ToyTokenizer
from image_tokenizers import TOKENIZERS, build_tokenizer

CONF = Path(__file__).resolve().parent / "conf"
TOY = {"name": "toy", "class": "tests.toy_tokenizer:ToyTokenizer", "patch": 4, "levels": 3,
       "encode_batch_size": 64, "hflip_train": False}


def brute_force_codes(images: np.ndarray, patch: int, levels: int) -> np.ndarray:
    """The toy's codes by loops over blocks and channels: (N, h, w)."""
    n, _, size, _ = images.shape
    g = size // patch
    out = np.zeros((n, g, g), dtype=np.int64)
    for b in range(n):
        for i in range(g):
            for j in range(g):
                code = 0
                for c in range(3):
                    mean = images[b, c, i * patch:(i + 1) * patch, j * patch:(j + 1) * patch].astype(np.float64).mean()
                    code = code * levels + int(np.round(mean / 255 * (levels - 1)))
                out[b, i, j] = code
    return out


def test_the_registry_builds_a_tokenizer_named_by_class():
    tokenizer, tokens = build_tokenizer(TOY, resolution=16)
    assert isinstance(tokenizer, ToyTokenizer) and tokenizer.options == ToyOptions(patch=4, levels=3)
    assert tokenizer.codebook_size == 27 and tokenizer.grid == (4, 4)
    assert tokens.encode_batch_size == 64 and tokens.hflip_train is False
    assert "toy" not in TOKENIZERS  # found through `class`, not registered


@pytest.mark.parametrize("change, message", [
    ({"name": "nope", "class": None}, r"^tokenizer\.name=nope is not one of: vqgan, taming, release$"),
    ({"class": "tests.toy_prior:ToyPrior"}, r"^tokenizer\.class=tests\.toy_prior:ToyPrior is not a "
                                            r"image_tokenizers\.base\.Tokenizer subclass$"),
    ({"patchh": 4}, r"^tokenizer\.patchh is not an option of tokenizer=toy \(options: patch, levels, "
                    r"encode_batch_size, hflip_train\)$"),
    ({"levels": "3"}, r"^tokenizer\.levels='3': expected an integer$"),
    ({"encode_batch_size": 0}, r"^tokenizer\.encode_batch_size=0 must be at least 1$"),
])
def test_bad_tokenizer_options_are_one_line_errors(change, message):
    with pytest.raises(ValueError, match=message):
        build_tokenizer({**TOY, **change}, resolution=16)


def test_a_missing_tokens_option_is_named():
    cfg = {k: v for k, v in TOY.items() if k != "hflip_train"}
    with pytest.raises(ConfigError, match=r"^tokenizer\.hflip_train is required"):
        job_tokenizer(OmegaConf.create({"tokenizer": cfg, "data": {"resolution": 16}}))


def test_toy_codes_match_brute_force_and_decode_paints_the_blocks():
    tokenizer, _ = build_tokenizer(TOY, resolution=16)
    tokenizer.load(Path("."), "cpu")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 3, 16, 16), dtype=np.uint8)
    codes = tokenizer.encode(images)
    assert codes.dtype == torch.int64 and codes.shape == (5, 4, 4)
    assert np.array_equal(codes.numpy(), brute_force_codes(images, 4, 3))
    # Images whose blocks are already palette colours are fixed points of decode(encode(.)).
    painted = tokenizer.decode(codes)
    assert painted.dtype == torch.uint8 and painted.shape == (5, 3, 16, 16)
    assert torch.equal(tokenizer.encode(painted), codes) and torch.equal(tokenizer.decode(codes), painted)
    assert set(np.unique(painted.numpy())) <= {0, 128, 255}


def test_a_second_tokenizer_runs_a_smoke_sweep_without_touching_bench(tmp_path):
    """The toy tokenizer and the toy prior (both in tests/) run a smoke sweep through the real CLI."""
    p = run_cli(["-m", "prior=toy", "tokenizer=toy", "T=2,3", "experiment=smoke", "logger=none", "name=toytok",
                 f"hydra.searchpath=[file://{CONF}]", f"paths.cache={tmp_path / 'cache'}"], cwd=tmp_path, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    log = p.stdout + p.stderr
    assert "training a VQGAN" not in log and "tokenizer (toy)" in log
    jobs = job_results(tmp_path / "multirun" / "toytok")
    assert len(jobs) == 2 and all(j["status"] == "ok" for j in jobs), [j.get("error") for j in jobs]
    tok = jobs[0]["tokenizer"]
    assert tok["n_embed"] == 27 and tok["grid"] == [8, 8] and 0 < tok["vocab_size"] <= 27
    assert jobs[0]["nll_kind"] == "exact" and jobs[0]["fid"] > 0
    # The cached tokens are the brute-force codes of the job's images, remapped to the effective codebook.
    [data_dir] = [d for d in (tmp_path / "cache" / "data").iterdir() if d.is_dir()]
    blob = torch.load(tmp_path / "cache" / "tokens" / jobs[0]["tokens_key"] / "tokens.pt", weights_only=True)
    train = np.load(data_dir / "train.npy")
    codes = brute_force_codes(train, 4, 3).reshape(len(train), -1)
    assert np.array_equal(blob["inverse"][blob["train"]].numpy(), codes)
    for package in ("bench", "image_tokenizers"):
        assert not any("toy" in f.read_text() for f in (ROOT / package).glob("*.py")), package
