"""Do the metrics behave on real data? Prints, against the cached reference features of the train split:

- FID of the real validation split (should be small: same distribution),
- FID of the tokenizer's reconstructions of the validation split (rFID),
- FID of decoded uniformly random tokens (should be far larger),
plus Inception feature-extraction throughput on this machine.

    python benchmarks/fid_sanity.py [paths.cache=./cache] [any run.py override...]

Run after `python bench/run.py stage=tokens` with the same overrides (it reuses the caches and builds nothing new
beyond what stage=tokens builds).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import open_dict  # noqa: E402

from bench import features as FE  # noqa: E402

from bench import metrics as M  # noqa: E402
from bench.data import load_data  # noqa: E402
from bench.evaluate import build_reference, load_reference  # noqa: E402
from bench.tokens import build_tokens, decode_tokens, job_tokenizer, load_tokenizer  # noqa: E402

CONF = Path(__file__).resolve().parent.parent / "conf"


def main(overrides: list[str]) -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.cache = str(Path(cfg.paths.cache).resolve())
    cache = Path(cfg.paths.cache)
    data = load_data(cfg.data, cache)
    tokens = build_tokens(*job_tokenizer(cfg), data, cache)
    extractor = FE.load_feature_extractor(cfg.eval.get("inception_weights"))
    ref_dir, _ = build_reference(data, extractor, cfg.eval, cache)
    _, ref_stats = load_reference(ref_dir)
    bs = int(cfg.eval.feature_batch_size)

    val = torch.from_numpy(data.val)
    t0 = time.perf_counter()
    val_feats = FE.images_to_features(val, extractor, batch_size=bs)
    throughput = len(val) / (time.perf_counter() - t0)

    model = load_tokenizer(cache / "tokenizer" / tokens.tokenizer_key, tokens.tokenizer)
    recon = decode_tokens(model, tokens.val, tokens.inverse, tokens.grid)
    g = torch.Generator().manual_seed(0)
    random_tokens = torch.randint(tokens.vocab_size, tokens.val.shape, generator=g)
    noise = decode_tokens(model, random_tokens, tokens.inverse, tokens.grid)

    rows = [
        ("real validation split", M.features_to_fid(ref_stats, val_feats["pool"])),
        ("tokenizer reconstructions of the validation split (rFID)",
         M.features_to_fid(ref_stats, FE.images_to_features(recon, extractor, batch_size=bs)["pool"])),
        ("decoded uniformly random tokens",
         M.features_to_fid(ref_stats, FE.images_to_features(noise, extractor, batch_size=bs)["pool"])),
    ]
    print(f"reference: {extractor.name}, {ref_stats['mu'].shape[0]}-d, train split ({cfg.eval.num_reference or 'all'} images)")
    for what, fid in rows:
        print(f"FID(train, {what}, n={len(val)}) = {fid:.2f}")
    print(f"Inception features: {throughput:.1f} images/s ({torch.get_num_threads()} threads, batch {bs})")


if __name__ == "__main__":
    main(sys.argv[1:])
