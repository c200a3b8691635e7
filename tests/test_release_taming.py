"""Taming Transformers releases: the loader's outputs equal the official code's on the same random weights.

tests/fixtures/releases/taming/ was written by `python tools/release_fixtures.py taming --checkout ...` from the
official repository: a tiny unconditional Net2NetTransformer in the official on-disk format (Lightning checkpoint
and project.yaml), the official modules' outputs on fixed inputs, and the key list of a release-sized model.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from releases import taming
from releases.mingpt import gpt_keys
from tests.tolerance import (assert_nearest_codes_equal, conv_network_error, log_softmax_error, rows_close,
                             transformer_error)

FIXTURES = Path(__file__).parent / "fixtures" / "releases" / "taming"
CKPT, CONFIG = str(FIXTURES / "last.ckpt"), str(FIXTURES / "project.yaml")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def release() -> taming.TamingRelease:
    return taming.load(CKPT, CONFIG)


@pytest.fixture(scope="module")
def official() -> dict:
    return torch.load(FIXTURES / "outputs.pt", weights_only=True)


def test_next_token_logits_equal_the_official_minGPT(release, official):
    shape = release.prior.model.cfg
    with torch.no_grad():
        logits = release.prior.logits(official["codes"])  # (B, L, V): [sos, z_0 .. z_{L-2}] as taming feeds it
    assert logits.shape == official["code_logits"].shape
    # Same function, other operation order (stacked qkv, fused attention): float32 rounding only.
    # transformer_error bounds each logit's error relative to the largest logit magnitude.
    bound = transformer_error(shape.d_model, shape.n_layer, shape.seq_len) * official["code_logits"].abs().max()
    assert (logits - official["code_logits"]).abs().max() <= bound


def test_nll_is_the_official_models_cross_entropy(release, official):
    """The project's NLL code on the release gives the official model's exact likelihood of the codes."""
    codes, logits = official["codes"], official["code_logits"].double()
    logp = logits.log_softmax(-1).gather(-1, codes.unsqueeze(-1)).squeeze(-1)  # (B, L)
    expected = -logp.sum(1) / (codes.shape[1] * math.log(2))
    nll = release.prior.nll(codes)
    assert nll.kind == "exact"
    shape = release.prior.model.cfg
    # A logit error of rel * max|logit| moves each log-probability by at most 2 rel max|logit| (log_softmax is
    # 2-Lipschitz in the max norm), and so the mean over positions as well, here in bits.
    bound = (log_softmax_error(official["code_logits"], transformer_error(shape.d_model, shape.n_layer,
                                                                           shape.seq_len)) / math.log(2))
    assert (nll.per_sequence - expected).abs().max().item() <= bound


def test_first_stage_encodes_and_decodes_as_the_official_vqgan(release, official):
    vq = release.tokenizer
    with torch.no_grad():
        z = vq.quant_conv(vq.encoder(official["images"]))  # (B, C, h, w)
        idx = vq.encode_to_indices(official["images"]).reshape(len(z), -1)
        decoded = vq.decode_indices(official["codes"].reshape(-1, 8, 8))
    # outside the distances' rounding band the nearest code is fixed on every kernel and must be the official one
    assert_nearest_codes_equal(idx, official["encoded"], z, vq.quantize.embedding.weight,
                               conv_network_error(vq.encoder))
    assert rows_close(decoded.flatten(1), official["decoded"].flatten(1), conv_network_error(vq.decoder))


def test_release_samples_through_the_cached_sampler(release):
    prior = release.prior
    g = torch.Generator().manual_seed(0)
    cached = prior.sample(2, torch.Generator().manual_seed(0))
    uncached = prior.sample(2, g, use_cache=False)
    assert cached.shape == (2, 64) and 0 <= int(cached.min()) and int(cached.max()) < 32
    assert torch.equal(cached, uncached)
    assert prior.start_id == 0 and prior.model.tok_emb.num_embeddings == 32  # taming's SOS is code 0


def test_release_sized_keys_equal_the_official_modules(tmp_path):
    """The loader expects exactly the keys and shapes the official code builds for a release-sized model."""
    listed = json.loads((FIXTURES / "release_keys.json").read_text())
    config = tmp_path / "project.yaml"
    config.write_text(yaml.safe_dump(listed["config"]))
    first, shape, _ = taming.read_config(str(config), "release.config")
    vq = taming.config_from_taming_model(first, "first stage")
    from image_tokenizers.taming import vqgan_keys

    expected = {f"first_stage_model.{k}": list(s) for k, s in vqgan_keys(vq).items()}
    expected |= {k: list(s) for k, s in gpt_keys(shape, "transformer.").items()}
    assert expected == listed["keys"]
    assert shape.n_layer == 24 and shape.block_size == 256 and vq.n_embed == 1024


# ---- wrong files ------------------------------------------------------------------------------------------------
def one_line_error(ckpt: str, config: str) -> str:
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        taming.load(ckpt, config)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_truncated_download_is_one_line(tmp_path):
    cut = tmp_path / "last.ckpt"
    cut.write_bytes(Path(CKPT).read_bytes()[:200_000])
    message = one_line_error(str(cut), CONFIG)
    assert f"release.ckpt={cut}" in message and "cannot be loaded" in message


def test_another_config_names_the_first_mismatching_key(tmp_path):
    conf = yaml.safe_load(Path(CONFIG).read_text())
    conf["model"]["params"]["transformer_config"]["params"]["n_layer"] = 3
    other = tmp_path / "project.yaml"
    other.write_text(yaml.safe_dump(conf))
    message = one_line_error(CKPT, str(other))
    assert message.endswith("missing key transformer.blocks.2.ln1.weight")
    conf["model"]["params"]["transformer_config"]["params"].update(n_layer=2, n_embd=32)
    other.write_text(yaml.safe_dump(conf))
    assert "transformer.pos_emb has shape (1, 64, 16), config gives (1, 64, 32)" in one_line_error(CKPT, str(other))


def test_another_familys_files_are_refused(tmp_path):
    # a first-stage project.yaml given as the prior's config
    conf = yaml.safe_load(Path(CONFIG).read_text())
    vqgan_yaml = tmp_path / "vqgan.yaml"
    vqgan_yaml.write_text(yaml.safe_dump({"model": conf["model"]["params"]["first_stage_config"]}))
    assert "model.target=taming.models.vqgan.VQModel is not " + taming.TARGET in one_line_error(CKPT, str(vqgan_yaml))
    # a VQGAN-only checkpoint given with the transformer's config
    sd = torch.load(CKPT, weights_only=True)["state_dict"]
    only_vq = tmp_path / "vqgan.ckpt"
    torch.save({"state_dict": {k: v for k, v in sd.items() if k.startswith("first_stage_model.")}}, only_vq)
    assert one_line_error(str(only_vq), CONFIG).endswith("missing key transformer.pos_emb")
    # a conditional model
    conf["model"]["params"]["cond_stage_config"] = {"target": "taming.modules.misc.coord.CoordStage"}
    conf["model"]["params"]["unconditional"] = False
    cond = tmp_path / "cond.yaml"
    cond.write_text(yaml.safe_dump(conf))
    assert "a conditional model" in one_line_error(CKPT, str(cond))
    # a missing file
    shutil.copy(CONFIG, tmp_path / "p.yaml")
    assert "file not found" in one_line_error(str(tmp_path / "nope.ckpt"), str(tmp_path / "p.yaml"))


# ---- the 256-px release-shaped model (tests/fixtures/releases/taming/e2e, tools/release_fixtures.py --e2e) -------
E2E = FIXTURES / "e2e"


@pytest.fixture(scope="module")
def e2e_release() -> taming.TamingRelease:
    return taming.load(str(E2E / "last.ckpt"), str(E2E / "project.yaml"))


@pytest.fixture(scope="module")
def e2e_official() -> dict:
    return torch.load(E2E / "outputs.pt", weights_only=True)


@pytest.fixture(scope="module")
def e2e_encoded(e2e_release, e2e_official) -> tuple[torch.Tensor, torch.Tensor]:
    """(prequant z, code indices) of the fixture's 256-px image by the loaded first stage."""
    vq = e2e_release.tokenizer
    images = e2e_official["pixels"].float() / 127.5 - 1  # the same float32 operations as the official run's input
    with torch.no_grad():
        return vq.quant_conv(vq.encoder(images)), vq.encode_to_indices(images)


def test_e2e_release_maps_256px_images_to_the_priors_16x16_grid(e2e_release, e2e_encoded):
    prior, vq = e2e_release.prior, e2e_release.tokenizer
    assert prior.grid == (16, 16) and prior.seq_len == 256 and prior.vocab_size == vq.vocab_size == 32
    assert vq.cfg.resolution == 256 and len(vq.cfg.ch_mult) == 5  # f = 2^4 = 16
    z, idx = e2e_encoded
    assert z.shape == (1, 4, 16, 16) and idx.shape == (1, 16, 16)
    assert len(idx.unique()) > 8  # the random first stage uses many codes, not one
    with torch.no_grad():
        images = vq.decode_indices(idx)
    assert images.shape == (1, 3, 256, 256) and torch.isfinite(images).all()


def test_e2e_next_token_logits_equal_the_official_minGPT(e2e_release, e2e_official):
    cfg = e2e_release.prior.model.cfg
    with torch.no_grad():
        logits = e2e_release.prior.logits(e2e_official["codes"])  # (B, 256, 32) on [sos, z_0 .. z_254]
    theirs = e2e_official["code_logits"]
    assert logits.shape == theirs.shape == (3, 256, 32)
    # as test_next_token_logits_equal_the_official_minGPT: float32 rounding of the same function
    bound = transformer_error(cfg.d_model, cfg.n_layer, cfg.seq_len) * theirs.abs().max()
    assert (logits - theirs).abs().max() <= bound


def test_e2e_first_stage_encodes_and_decodes_as_the_official_vqgan(e2e_release, e2e_official, e2e_encoded):
    vq, o = e2e_release.tokenizer, e2e_official
    z, idx = e2e_encoded
    with torch.no_grad():
        decoded = vq.decode_indices(o["codes"][:1].reshape(1, 16, 16))
    rel = conv_network_error(vq.encoder)
    assert rows_close(z.flatten(1), o["prequant"].flatten(1), rel)
    assert_nearest_codes_equal(idx, o["encoded"], z, vq.quantize.embedding.weight, rel)
    assert decoded.shape == o["decoded"].shape == (1, 3, 256, 256)
    assert rows_close(decoded.flatten(1), o["decoded"].flatten(1), conv_network_error(vq.decoder))
