"""Unleashing Transformers releases: the loader's outputs equal the official code's on the same random weights.

tests/fixtures/releases/unleashing/ was written by `python tools/release_fixtures.py unleashing --checkout ...`
from the official repository: a tiny absorbing diffusion sampler and VQGAN in the official on-disk format (bare
state dicts `absorbing_ema_<step>.th`, `vqgan_ema_<step>.th`; hparams.yaml holds the authors' hyperparameters of
the tiny model), the official modules' outputs on fixed inputs, and the key lists of the released configurations.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from priors.absorbing import AbsorbingPrior
from releases import unleashing
from releases.mingpt import project_state_dict
from releases.unleashing_vqgan import autoencoder_keys
from tests.tolerance import (EPS32, assert_nearest_codes_equal, conv_network_error, gamma, log_softmax_error,
                             rows_close, transformer_error)

FIXTURES = Path(__file__).parent / "fixtures" / "releases" / "unleashing"
SAMPLER, VQGAN, HPARAMS = (str(FIXTURES / n) for n in ("absorbing_ema_0.th", "vqgan_ema_0.th", "hparams.yaml"))
TAMING = Path(__file__).parent / "fixtures" / "releases" / "taming"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def release() -> unleashing.UnleashingRelease:
    return unleashing.load(SAMPLER, VQGAN, HPARAMS)


@pytest.fixture(scope="module")
def official() -> dict:
    return torch.load(FIXTURES / "outputs.pt", weights_only=True)


def logit_error(release) -> float:
    """transformer_error of the release's denoiser: relative to the largest logit magnitude."""
    cfg = release.prior.model.cfg
    return transformer_error(cfg.d_model, cfg.n_layer, cfg.seq_len)


def test_denoiser_logits_equal_the_official_transformer(release, official):
    """On codes with none, some, most and all positions masked (mask id = codebook_size, as the authors')."""
    x_t, V = official["x_t"], yaml.safe_load(Path(HPARAMS).read_text())["codebook_size"]
    assert (x_t == V).sum(1).tolist()[0] == 0 and (x_t[-1] == V).all()  # the authors' mask_id = codebook_size
    assert release.prior.mask_id == V and release.prior.model.tok_emb.num_embeddings == V + 1
    with torch.no_grad():
        logits = release.prior.model(x_t)  # (B, L, V)
    assert logits.shape == official["logits"].shape == (4, 64, 32)
    # Same function, other operation order (stacked qkv, fused attention): float32 rounding only.
    bound = logit_error(release) * official["logits"].abs().max()
    assert (logits - official["logits"]).abs().max() <= bound


def test_elbo_is_the_official_training_elbo(release, official):
    """The project's Eq. 6 estimate on the official run's own (t, mask) equals the official vb_loss; its
    reweighted loss differs from theirs by the documented (N - t + 1) / (N - t) (priors/absorbing.py)."""
    codes, t, mask = official["codes"], official["t"], official["mask"]
    theirs_loss, theirs_elbo = official["train_loss"][:, 0].double(), official["train_loss"][:, 1].double()
    with torch.no_grad():
        loss, elbo = release.prior.sequence_losses(codes, t, mask)
    L = N = codes.shape[1]
    # Each masked log-probability moves by at most log_softmax_error (the logits' own error carried through);
    # each side sums the m masked cross-entropies in float32 (gamma_m of their sum) and rounds the few scalings.
    lse = log_softmax_error(official["logits"], logit_error(release))
    m = mask.sum(1).double()
    ce = theirs_elbo * t.double() * L * math.log(2) / N  # the official masked cross-entropy sum, nats
    scale = N / t.double() / (L * math.log(2))
    bound = scale * (m * lse + 2 * gamma(L, EPS32) * ce) + 8 * EPS32 * theirs_elbo
    assert ((elbo.double() - theirs_elbo).abs() <= bound).all()
    assert (t < N).all()  # so the official (N - t) / N weight is not zero
    t = t.double()
    ratio = (N - t + 1) / (N - t)
    # The same masked cross-entropy under another weight: (N - t + 1) / N instead of Eq. 6's N / t, so the
    # ELBO's bound scaled by their quotient, plus the roundings of the weights on either side.
    w = t * (N - t + 1) / N ** 2
    assert ((loss.double() - ratio * theirs_loss).abs() <= w * bound + 8 * EPS32 * ratio * theirs_loss).all()


def test_one_step_nll_is_the_official_all_masked_likelihood(release, official):
    """At T = 1 the order bound is exact: -log p(x) = sum_i -log p(x_i | all masked), the official denoiser's
    cross-entropy on the all-masked input (the fixture's last row), in bits per token."""
    prior = release.prior
    codes = official["codes"][-1:]
    prior.set_sampling(T=1, sampler="random", temperature=1.0)
    try:
        nll = prior.nll(codes, torch.Generator().manual_seed(0))
    finally:
        prior.set_sampling(T=prior.seq_len, temperature=1.0)
    logits = official["logits"][-1].double()
    expected = -logits.log_softmax(-1).gather(1, codes[0].unsqueeze(1)).sum() / (64 * math.log(2))
    assert nll.kind == "order_bound" and torch.isfinite(nll.extra["elbo_eq6"]).all()
    # the mean over 64 positions of log-probabilities each within log_softmax_error, in bits
    bound = log_softmax_error(official["logits"], logit_error(release)) / math.log(2)
    assert abs(float(nll.per_sequence[0]) - float(expected)) <= bound


def test_vqgan_encodes_and_decodes_as_the_official_autoencoder(release, official):
    vq = release.tokenizer
    images = official["images"]  # the authors' [0, 1]; the tokenizer takes [-1, 1]
    with torch.no_grad():
        z = vq.encoder(images)  # (B, D, h, w)
        idx = vq.encode_to_indices(images * 2 - 1)
        decoded = vq.decode_indices(official["codes"].view(-1, 8, 8))
    rel = conv_network_error(vq.encoder) + 4 * EPS32  # the [0, 1] <-> [-1, 1] round trip: a few roundings
    assert rows_close(z.flatten(1), official["latents"].flatten(1), rel)
    # outside the distances' rounding band the nearest code is fixed on every kernel and must be the official one
    assert_nearest_codes_equal(idx, official["encoded"], z, vq.quantize.embedding.weight, rel)
    assert rows_close(((decoded + 1) / 2).flatten(1), official["decoded"].flatten(1),
                      conv_network_error(vq.generator) + 4 * EPS32)


def test_release_samples_completes_and_decodes(release):
    prior, vq = release.prior, release.tokenizer
    prior.set_sampling(T=8, sampler="random", temperature=release.paper_sampling["temperature"])
    try:
        codes = prior.sample(2, torch.Generator().manual_seed(0))
        keep = torch.zeros_like(codes, dtype=torch.bool)
        keep[:, :32] = True
        done = prior.complete(codes, keep, torch.Generator().manual_seed(1))
    finally:
        prior.set_sampling(T=prior.seq_len, temperature=1.0)
    assert codes.shape == (2, 64) and 0 <= int(codes.min()) and int(codes.max()) < 32  # never the mask id
    assert torch.equal(done[:, :32], codes[:, :32]) and int(done.max()) < 32
    with torch.no_grad():
        images = vq.decode_indices(codes.view(2, 8, 8))
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    assert release.paper_sampling == {"sampler": "random", "T": 256, "temperature": 0.9}
    assert len(release.sha256[0]) == 64 and release.sources == ("absorbing_ema_0.th", "vqgan_ema_0.th")


@pytest.mark.parametrize("dataset", ["ffhq", "churches", "bedrooms"])
def test_release_sized_keys_equal_the_official_modules(dataset):
    """The loader expects exactly the keys and shapes the official code builds from its per-dataset defaults."""
    listed = json.loads((FIXTURES / "release_keys.json").read_text())[dataset]
    h = unleashing.read_hparams(dataset, "release.config")
    for k, v in listed["hparams"].items():
        if k in unleashing.RELEASE_HPARAMS[dataset]:
            assert unleashing.RELEASE_HPARAMS[dataset][k] == v, k
    assert {k: list(s) for k, s in unleashing.sampler_keys(h).items()} == listed["sampler_keys"]
    ae = {k: v for k, v in listed["vqgan_keys"].items() if k.startswith("ae.")}
    assert {f"ae.{k}": list(s) for k, s in autoencoder_keys(h.vqgan).items()} == ae
    assert all(k.startswith(("disc.", "perceptual.")) for k in set(listed["vqgan_keys"]) - set(ae))
    assert listed["hparams"]["sample_steps"] == unleashing.PAPER_SAMPLING["T"]
    assert h.gpt.n_layer == 24 and h.gpt.vocab_size == 1025 and h.grid == (16, 16)


def test_release_sized_denoiser_maps_onto_the_absorbing_prior():
    """At the released size, the mapped weights are exactly the AbsorbingPrior's (built on the meta device),
    and the paper's sampling settings apply to it."""
    h = unleashing.read_hparams("ffhq", "release.config")
    with torch.device("meta"):
        prior = AbsorbingPrior(1024, h.grid, n_layer=h.gpt.n_layer, n_head=h.gpt.n_head, d_model=h.gpt.n_embd)
        sd = {k: torch.empty(s) for k, s in unleashing.sampler_keys(h).items()}
    mapped = project_state_dict(sd, h.gpt, 256, unleashing.DENOISER)
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape)
                                                              for k, v in prior.model.state_dict().items()}
    prior.set_sampling(**unleashing.PAPER_SAMPLING)
    assert prior.nfe() == 256 and prior.temperature == 0.9 and prior.mask_id == 1024


def test_vqgan_file_with_lpips_weights_loads(tmp_path):
    """A released VQGAN file also holds the LPIPS network (perceptual.*), which the loader skips."""
    sd = torch.load(VQGAN, weights_only=True)
    sd["perceptual.lin0.model.1.weight"] = torch.ones(1, 64, 1, 1)
    full = tmp_path / "vqgan_ema_0.th"
    torch.save(sd, full)
    assert unleashing.load(SAMPLER, str(full), HPARAMS).tokenizer.vocab_size == 32


# ---- wrong files ------------------------------------------------------------------------------------------------
def one_line_error(sampler: str, vqgan: str, hparams) -> str:
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        unleashing.load(sampler, vqgan, hparams)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_truncated_downloads_are_one_line(tmp_path):
    for name, path in (("ckpt", SAMPLER), ("first_stage", VQGAN)):
        cut = tmp_path / Path(path).name
        cut.write_bytes(Path(path).read_bytes()[:20_000])
        args = (str(cut), VQGAN) if name == "ckpt" else (SAMPLER, str(cut))
        message = one_line_error(*args, HPARAMS)
        assert f"release.{name}={cut}" in message and "cannot be loaded" in message


def test_other_hparams_name_the_first_mismatching_key(tmp_path):
    h = yaml.safe_load(Path(HPARAMS).read_text())
    other = tmp_path / "hparams.yaml"
    other.write_text(yaml.safe_dump({**h, "bert_n_layers": 3}))
    assert one_line_error(SAMPLER, VQGAN, str(other)).endswith("missing key _denoise_fn.blocks.2.ln1.weight")
    other.write_text(yaml.safe_dump({**h, "bert_n_emb": 32}))
    assert ("_denoise_fn.pos_emb has shape (1, 64, 16), config gives (1, 64, 32)"
            in one_line_error(SAMPLER, VQGAN, str(other)))
    other.write_text(yaml.safe_dump({**h, "nf": 64}))
    message = one_line_error(SAMPLER, VQGAN, str(other))
    assert message.startswith(f"release.first_stage={VQGAN} does not match") and message.endswith(
        "ae.encoder.blocks.0.weight has shape (32, 3, 3, 3), config gives (64, 3, 3, 3)")
    # a released preset against the tiny files: the first key of the sampler differs
    assert "_denoise_fn.pos_emb has shape (1, 64, 16), config gives (1, 256, 512)" in one_line_error(
        SAMPLER, VQGAN, "ffhq")


def test_refused_hyperparameters(tmp_path):
    h = yaml.safe_load(Path(HPARAMS).read_text())
    other = tmp_path / "hparams.yaml"
    for change, expected in (({"sampler": "autoregressive"}, "sampler=autoregressive is not absorbing"),
                             ({"quantizer": "gumbel"}, "quantizer=gumbel"),
                             ({"total_steps": 100}, "total_steps=100 differs from the 64 tokens"),
                             ({"latent_shape": [1, 4, 4]}, "latent_shape=[1, 4, 4] is not the VQGAN's [1, 8, 8]"),
                             ({"block_size": 32}, "block_size=32 is shorter than the 8x8 token grid"),
                             ({"ch_mult": ["one", 2]}, "a hyperparameter is not a number or list of numbers")):
        other.write_text(yaml.safe_dump({**h, **change}))
        assert expected in one_line_error(SAMPLER, VQGAN, str(other))
    assert "neither a released dataset" in one_line_error(SAMPLER, VQGAN, "celeba")
    other.write_text(yaml.safe_dump([1, 2]))
    assert "not a mapping of hyperparameters" in one_line_error(SAMPLER, VQGAN, str(other))


def test_tokenizer_refuses_bad_inputs(release):
    with pytest.raises(ValueError, match=r"encode_to_indices expects float \(B, 3, H, W\)"):
        release.tokenizer.encode_to_indices(torch.zeros(1, 16, 16, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"decode_indices expects integer \(B, h, w\)"):
        release.tokenizer.decode_indices(torch.zeros(1, 64))


def test_another_familys_files_are_refused(tmp_path):
    # the two files swapped
    assert one_line_error(VQGAN, VQGAN, HPARAMS).endswith("missing key _denoise_fn.pos_emb")
    assert one_line_error(SAMPLER, SAMPLER, HPARAMS).endswith("unexpected key Lt_count")
    # a Taming Transformers checkpoint and its project.yaml
    assert one_line_error(str(TAMING / "last.ckpt"), VQGAN, HPARAMS).endswith("missing key _denoise_fn.pos_emb")
    assert "no n_channels (not Unleashing Transformers hyperparameters)" in one_line_error(
        SAMPLER, VQGAN, str(TAMING / "project.yaml"))
    # a missing file
    shutil.copy(HPARAMS, tmp_path / "h.yaml")
    assert "file not found" in one_line_error(str(tmp_path / "nope.th"), VQGAN, str(tmp_path / "h.yaml"))


# ---- the 256-px release-shaped model (tests/fixtures/releases/unleashing/e2e, tools/release_fixtures.py --e2e) ---
E2E = FIXTURES / "e2e"
E2E_FILES = tuple(str(E2E / n) for n in ("absorbing_ema_0.th", "vqgan_ema_0.th", "hparams.yaml"))


@pytest.fixture(scope="module")
def e2e_release() -> unleashing.UnleashingRelease:
    sampler, vqgan, hparams = E2E_FILES
    return unleashing.load(sampler, vqgan, hparams=hparams)


@pytest.fixture(scope="module")
def e2e_official() -> dict:
    return torch.load(E2E / "outputs.pt", weights_only=True)


@pytest.fixture(scope="module")
def e2e_encoded(e2e_release, e2e_official) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents, code indices) of the fixture's 256-px image by the loaded VQGAN."""
    vq = e2e_release.tokenizer
    images = e2e_official["pixels"].float() / 255  # the official run's input, the authors' [0, 1]
    with torch.no_grad():
        return vq.encoder(images), vq.encode_to_indices(images * 2 - 1)


def test_e2e_release_maps_256px_images_to_the_priors_16x16_grid(e2e_release, e2e_encoded):
    prior, vq = e2e_release.prior, e2e_release.tokenizer
    assert prior.grid == (16, 16) and prior.seq_len == 256 and prior.vocab_size == vq.vocab_size == 32
    assert prior.mask_id == 32 and prior.n_steps == 256  # one diffusion step per token, as the releases
    z, idx = e2e_encoded
    assert z.shape == (1, 4, 16, 16) and idx.shape == (1, 16, 16)
    assert len(idx.unique()) > 8  # the random VQGAN uses many codes, not one
    with torch.no_grad():
        images = vq.decode_indices(idx)
    assert images.shape == (1, 3, 256, 256) and torch.isfinite(images).all()


def test_e2e_denoiser_logits_equal_the_official_transformer(e2e_release, e2e_official):
    x_t = e2e_official["x_t"]  # none, some, most and all of the 256 positions masked
    assert (x_t == 32).sum(1).tolist()[0] == 0 and (x_t[-1] == 32).all()
    with torch.no_grad():
        logits = e2e_release.prior.model(x_t)
    theirs = e2e_official["logits"]
    assert logits.shape == theirs.shape == (4, 256, 32)
    # as test_denoiser_logits_equal_the_official_transformer: float32 rounding of the same function
    assert (logits - theirs).abs().max() <= logit_error(e2e_release) * theirs.abs().max()


def test_e2e_vqgan_encodes_and_decodes_as_the_official_autoencoder(e2e_release, e2e_official, e2e_encoded):
    vq, o = e2e_release.tokenizer, e2e_official
    z, idx = e2e_encoded
    with torch.no_grad():
        decoded = vq.decode_indices(o["codes"][:1].view(1, 16, 16))
    rel = conv_network_error(vq.encoder) + 4 * EPS32  # as the tiny test: plus the [0, 1] <-> [-1, 1] round trip
    assert rows_close(z.flatten(1), o["latents"].flatten(1), rel)
    assert_nearest_codes_equal(idx, o["encoded"], z, vq.quantize.embedding.weight, rel)
    assert decoded.shape == o["decoded"].shape == (1, 3, 256, 256)
    assert rows_close(((decoded + 1) / 2).flatten(1), o["decoded"].flatten(1),
                      conv_network_error(vq.generator) + 4 * EPS32)
