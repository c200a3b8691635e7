"""ImageBART releases: each scale of the loaded chain gives the official code's logits on the same random weights.

tests/fixtures/releases/imagebart/ was written by `python tools/release_fixtures.py imagebart --checkout ...` from
the official repository: two tiny chains in the official on-disk format (one Lightning checkpoint and one config per
scale, listed by a configs/sampling-style yaml), the official modules' logits of every scale on fixed inputs (with
the EMA weights the release samples with), the official schedules, and the key lists of the repository's FFHQ
4-scale and LSUN-churches 3-scale configs built on the meta device.
"""
from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from image_tokenizers.taming import vqgan_keys
from releases import imagebart as ib
from tests.tolerance import EPS32, code_distances, conv_network_error, log_softmax_error, rows_close, transformer_error

FIXTURES = Path(__file__).parent / "fixtures" / "releases" / "imagebart"
CHAINS = {"geometric": 3, "custom": 2}  # chain -> n_scales
TAMING = Path(__file__).parent / "fixtures" / "releases" / "taming"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def official() -> dict:
    return torch.load(FIXTURES / "outputs.pt", weights_only=True)


@pytest.fixture(scope="module")
def releases() -> dict[str, ib.ImageBARTRelease]:
    return {chain: ib.load_sampling_config(str(FIXTURES / chain / "sampling.yaml")) for chain in CHAINS}


def scale_error(model) -> float:
    """transformer_error of one scale's logits: the encoder and decoder chained (their layers add), at the widest
    reduction (d_model or the attention width), over the L (+1 prefix) positions and the encoder's memory."""
    dec = model.decoder.cfg
    layers = dec.n_layer + (model.encoder.cfg.n_layer if model.encoder is not None else 0)
    memory = model.encoder.cfg.seq_len if model.encoder is not None else 0
    return transformer_error(max(dec.d_model, dec.inner_dim), layers, dec.seq_len + 1, memory)


SCALES = [(chain, s) for chain, n in CHAINS.items() for s in range(1, n + 1)]


@pytest.mark.parametrize("chain,s", SCALES)
def test_each_scales_logits_equal_the_official_ones(releases, official, chain, s):
    """Official scale s is the project's scale t = s + 1: same inputs (x_{s-1} teacher-forced, x_s), same logits,
    residual-scaled ones included; float32 rounding only."""
    model = releases[chain].prior.scales[f"scale{s + 1}"]
    o = official[chain]
    with torch.no_grad():
        logits = model(o["x_prev"], o["x_t"] if model.encoder is not None else None)  # (B, L, V)
    theirs = o[f"scale{s}_logits"]
    assert logits.shape == theirs.shape
    assert (logits - theirs).abs().max() <= scale_error(model) * theirs.abs().max()


@pytest.mark.parametrize("chain,s", SCALES)
def test_each_scales_likelihood_is_the_official_models(releases, official, chain, s):
    """The project's per-scale log-likelihood (its NLL and ELBO code) is the official model's cross-entropy."""
    prior = releases[chain].prior
    o = official[chain]
    theirs = o[f"scale{s}_logits"].double().log_softmax(-1).gather(-1, o["x_prev"].unsqueeze(-1)).squeeze(-1).sum(1)
    with torch.no_grad():
        ours = prior.seq_log_prob(s + 1, o["x_prev"], o["x_t"])  # (B,) nats
    # each of the L log-probabilities within log_softmax_error of the official one; the sequence sums L of them
    L = o["x_prev"].shape[1]
    model = prior.scales[f"scale{s + 1}"]
    assert (ours.double() - theirs).abs().max() <= L * log_softmax_error(o[f"scale{s}_logits"], scale_error(model))


@pytest.mark.parametrize("chain", CHAINS)
def test_schedule_is_the_official_one(releases, official, chain):
    """Official beta_s (s = 1..n, float32) is the project's beta_{s+1}; the last is 1 (x_T pure noise)."""
    ours = torch.tensor(releases[chain].prior.betas[2:], dtype=torch.float64)
    theirs = official[chain]["betas"][1:].double()
    # The metric-table schedule is computed in float64 on both sides (a few roundings apart) and then rounded to
    # float32: at most one float32 unit apart. The geometric one is the same float32 division on both sides.
    assert ((ours - theirs).abs() <= EPS32 * theirs.abs()).all()
    assert ours[-1] == 1.0 and releases[chain].prior.T == CHAINS[chain] + 1


def test_the_ema_weights_are_the_ones_loaded(releases):
    sd = torch.load(FIXTURES / "geometric" / "scale2.ckpt", weights_only=True)["state_dict"]
    head = releases["geometric"].prior.scales["scale3"].decoder.head.weight
    assert torch.equal(head, sd["transformer_ema.decoderto_logitsweight"])
    assert not torch.equal(head, sd["transformer.decoder.to_logits.weight"])
    assert releases["geometric"].prior.scales["scale3"].log_scale == sd["transformer_ema.log_scalors"][1]


def test_a_released_chain_samples_and_completes_through_the_project_code(releases):
    prior = releases["geometric"].prior
    x = prior.sample(3, torch.Generator().manual_seed(0))
    assert x.shape == (3, 16) and 0 <= int(x.min()) and int(x.max()) < 16
    keep = torch.zeros(3, 16, dtype=torch.bool)
    keep[:, :8] = True
    done = prior.complete(x, keep, torch.Generator().manual_seed(1))
    assert torch.equal(done[:, :8], x[:, :8]) and int(done.max()) < 16
    assert prior.nll(x, torch.Generator().manual_seed(2)).kind == "elbo"
    assert releases["geometric"].top_k == [16, 16, 16] and releases["geometric"].paper_sampling["top_k"] is None


def test_first_stage_encodes_and_decodes_as_the_official_vqgan(releases, official):
    """Scale 1's first stage with its remap: ids are positions in the effective-code list, as the prior's."""
    vq, o = releases["geometric"].tokenizer, official["geometric"]
    assert vq is not None and vq.vocab_size == 16 and releases["custom"].tokenizer is None  # custom: no weights
    with torch.no_grad():
        z = vq.quant_conv(vq.encoder(o["images"]))  # (B, C, h, w)
        ours = vq.encode_to_indices(o["images"]).flatten()
        decoded = vq.decode_indices(o["x_prev"].reshape(-1, 4, 4))
    assert rows_close(z.flatten(1), o["prequant"].flatten(1), conv_network_error(vq.encoder))
    # The nearest of the 24 codes is decided by squared distances; encoder rounding moves them by at most
    # 2 |z| max|e| times its relative bound. Outside that band the full code is fixed on every kernel; it is then
    # the official id when it is in the remap list, and a random one of the 16 (officially too) when it is not.
    _, _, ranked, decided = code_distances(z, vq.quantize.embedding.weight, conv_network_error(vq.encoder))
    in_list = torch.isin(ranked.indices[:, 0], vq.quantize.used)
    known = decided & in_list
    assert known.float().mean() > 0.4  # the check has teeth: many positions are decided and in the list
    theirs = o["encoded"].flatten()
    assert torch.equal(ours[known], theirs[known])
    assert torch.equal(vq.quantize.used[ours[known]], ranked.indices[known, 0])  # positions in the list
    assert 0 <= int(ours.min()) and int(ours.max()) < 16
    assert rows_close(decoded.flatten(1), o["decoded"].flatten(1), conv_network_error(vq.decoder))


# ---- release-sized configurations ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def release_keys() -> dict:
    with gzip.open(FIXTURES / "release_keys.json.gz", "rt") as f:
        return json.load(f)


@pytest.mark.parametrize("name,n_scales", [("ffhq_4_scales_geometric", 4), ("churches_3_scales", 3)])
def test_release_sized_keys_equal_the_official_modules(release_keys, tmp_path, name, n_scales):
    """The loader expects exactly the keys and shapes the official code builds from the repository's configs, its
    schedule is theirs, and the release-sized weights map onto the project's modules (on the meta device)."""
    scales = release_keys[name]
    assert len(scales) == n_scales
    paths = []
    for i, scale in enumerate(scales):
        path = tmp_path / f"scale{i + 1}.yaml"
        path.write_text(yaml.safe_dump(scale["config"]))
        paths.append(str(path))
        spec = ib.read_scale_config(str(path), "release.config")
        listed = {k: s for k, s in scale["keys"].items() if not k.startswith("first_stage_model.")}
        assert {k: list(s) for k, s in ib.scale_keys(spec).items()} == listed
        if i == 0:  # the first stage the loader reads, with the release's remap list
            cfg, _ = ib.first_stage_config(str(path), str(FIXTURES / "release"), "release.config[0]")
            expected = {f"first_stage_model.{k}": list(s) for k, s in vqgan_keys(cfg).items()}
            expected["first_stage_model.quantize.used"] = [spec.vocab_size]
            assert len(np.load(cfg.remap)) == spec.vocab_size
            assert {k: s for k, s in scale["keys"].items() if k.startswith("first_stage_model.")} == expected
    specs, betas = ib.read_chain(paths, "release", data_dir=str(FIXTURES / "custom" / "data"))
    assert [abs(a - b) <= EPS32 * b for a, b in zip(betas, scales[0]["betas"][1:])] == [True] * n_scales
    with torch.device("meta"):
        prior = ib.prior_from_specs(specs, betas)
        L = 256
        for spec, scale in zip(specs, scales):
            sd = {k: torch.empty(s) for k, s in scale["keys"].items()}
            w = ib._weights(sd, spec)
            weights = ({"decoder." + k: v for k, v in ib.project_state_dict(w, spec.gpt, L, "").items()}
                       if spec.gpt is not None else ib.xt_state_dict(w, spec, L))
            prior.scales[f"scale{spec.s + 1}"].load_state_dict(weights)  # every name and shape, strictly
    assert prior.T == n_scales + 1 and prior.grid == (16, 16)


# ---- wrong files ---------------------------------------------------------------------------------------------------
def chain_files(chain: str = "geometric") -> tuple[list[str], list[str]]:
    n = CHAINS[chain]
    return ([str(FIXTURES / chain / f"scale{s}.ckpt") for s in range(1, n + 1)],
            [str(FIXTURES / chain / f"scale{s}.yaml") for s in range(1, n + 1)])


def one_line_error(ckpts: list[str], configs: list[str], data_dir: str | None = None) -> str:
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        ib.load(ckpts, configs, data_dir=data_dir)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_truncated_download_is_one_line(tmp_path):
    ckpts, configs = chain_files()
    cut = tmp_path / "scale2.ckpt"
    cut.write_bytes(Path(ckpts[1]).read_bytes()[:50_000])
    message = one_line_error([ckpts[0], str(cut), ckpts[2]], configs)
    assert f"release.ckpt[1]={cut}" in message and "cannot be loaded" in message


def test_another_config_names_the_first_mismatching_key(tmp_path):
    ckpts, configs = chain_files()
    conf = yaml.safe_load(Path(configs[1]).read_text())
    conf["model"]["params"]["transformer_config"]["params"]["enc_depth"] = 3
    other = tmp_path / "scale2.yaml"
    other.write_text(yaml.safe_dump(conf))
    message = one_line_error(ckpts, [configs[0], str(other), configs[2]])
    assert message.endswith("missing key transformer.encoder.attn_layers.layers.4.0.weight")
    assert f"release.ckpt[1]={ckpts[1]} does not match release.config[1]={other}" in message
    conf["model"]["params"]["transformer_config"]["params"].update(enc_depth=2, enc_attn_dim_head=8,
                                                                   dec_attn_dim_head=8)
    other.write_text(yaml.safe_dump(conf))
    assert ("transformer.encoder.attn_layers.layers.0.1.to_q.weight has shape (24, 16), config gives (16, 16)"
            in one_line_error(ckpts, [configs[0], str(other), configs[2]]))


def test_scales_of_another_chain_or_order_are_refused():
    ckpts, configs = chain_files()
    assert "entry 0 of 3" in one_line_error([ckpts[1], ckpts[0], ckpts[2]], [configs[1], configs[0], configs[2]])
    other_ckpts, other_configs = chain_files("custom")
    assert "scale 2 of n_scales=2" in one_line_error([ckpts[0], other_ckpts[1], ckpts[2]],
                                                     [configs[0], other_configs[1], configs[2]])
    assert "3 checkpoints for 2 configs" in one_line_error(ckpts, configs[:2])


def test_another_familys_files_are_refused(tmp_path):
    ckpts, configs = chain_files()
    # a Taming Transformers project.yaml given as a scale's config
    message = one_line_error(ckpts, [str(TAMING / "project.yaml"), *configs[1:]])
    assert "model.target=taming.models.cond_transformer.Net2NetTransformer is neither" in message
    assert "(not an ImageBART scale)" in message
    # a Taming Transformers checkpoint given with an ImageBART config
    assert one_line_error([str(TAMING / "last.ckpt"), *ckpts[1:]], configs).endswith("missing key sos_token")
    # a class-conditional scale
    conf = yaml.safe_load(Path(configs[0]).read_text())
    conf["model"]["params"]["conditioner_config"] = {"target": "imagebart.modules.misc.ClassEmbedder"}
    cond = tmp_path / "cond.yaml"
    cond.write_text(yaml.safe_dump(conf))
    assert "a class-conditional scale" in one_line_error(ckpts, [str(cond), *configs[1:]])
    # an x-transformers option the loader does not map
    conf = yaml.safe_load(Path(configs[0]).read_text())
    conf["model"]["params"]["transformer_config"]["params"]["enc_rotary_pos_emb"] = True
    rotary = tmp_path / "rotary.yaml"
    rotary.write_text(yaml.safe_dump(conf))
    assert "params.enc_rotary_pos_emb is an x-transformers option" in one_line_error(ckpts, [str(rotary), *configs[1:]])
    # a missing file
    assert "file not found" in one_line_error([*ckpts[:2], str(tmp_path / "nope.ckpt")], configs)


def test_a_metric_schedule_needs_its_table(tmp_path):
    ckpts, configs = chain_files("custom")
    assert "give the repository's folder (release.root)" in one_line_error(ckpts, configs)
    message = one_line_error(ckpts, configs, str(tmp_path))
    assert "in_schedule_vs_metric.p is not there" in message
    shutil.copy(FIXTURES / "custom" / "data" / "in_schedule_vs_metric.p", tmp_path)
    assert ib.load(ckpts, configs, data_dir=str(tmp_path)).prior.T == 3
    # a table with anything but numbers inside is refused without running it
    (tmp_path / "in_schedule_vs_metric.p").write_bytes(
        b"cos\nsystem\n(S'true'\ntR.")  # protocol-0 pickle calling os.system
    assert "os.system is not allowed" in one_line_error(ckpts, configs, str(tmp_path))


def test_a_loaded_chain_rebuilds_from_its_arch_config(releases):
    """What the pipeline stores with a prior (arch_config) rebuilds the released architecture, weights and all."""
    prior = releases["geometric"].prior
    again = type(prior)(**prior.arch_config())
    again.load_state_dict(prior.state_dict())  # strict: every module the release options add is rebuilt
    assert again.arch_config() == prior.arch_config() and again.betas == prior.betas


def test_bad_scale_options_are_one_line_errors():
    from priors.imagebart import ImageBARTPrior

    for options, expected in (([{}], "expected a list of T-1=2 mappings"),
                              ([{}, {"width": 3}], "prior.scale_options[1] has unknown keys ['width']"),
                              ([{"start_id": 40}, {}], "start_id=40 must be a code id in [0, 32)")):
        with pytest.raises(ValueError) as e:
            ImageBARTPrior(32, (2, 2), T=3, n_layer=2, n_head=2, d_model=16, scale_options=options)
        assert expected in str(e.value) and "\n" not in str(e.value)


def test_first_stage_errors_are_one_line(tmp_path):
    ckpts, configs = chain_files()
    for c in configs:  # the configs without the repository folder their remap list is relative to
        shutil.copy(c, tmp_path)
    message = one_line_error(ckpts, [str(tmp_path / Path(c).name) for c in configs])
    assert "remap=data/vqgan_indices/tiny_indices.npy" in message and "not found" in message
    # a VQGAN checkpoint of another configuration for a chain whose scale 1 holds no first stage
    ckpts, configs = chain_files("custom")
    with pytest.raises(ValueError) as e:
        ib.load(ckpts, configs, data_dir=str(FIXTURES / "custom" / "data"), vqgan_ckpt=str(TAMING / "last.ckpt"))
    assert "\n" not in str(e.value) and str(e.value).startswith(f"first stage {TAMING / 'last.ckpt'}")


@pytest.mark.parametrize("static", [False, True])
def test_the_cached_decoder_steps_give_the_full_forwards_logits(releases, official, static):
    """The sampler's KV-cached steps on a released scale (memory of L + 1 with the scale prefix, attention width
    other than d_model, a code id as start) give the teacher-forced logits; static = the compiled form's positions."""
    model, o = releases["geometric"].prior.scales["scale2"], official["geometric"]
    x_prev, x_t = o["x_prev"], o["x_t"]
    start = torch.full_like(x_prev[:, :1], model.start_id)
    with torch.no_grad():
        memory = model.encode(x_t)
        full = model.decoder(torch.cat([start, x_prev[:, :-1]], 1), memory=memory)  # (B, L, V)
        cache = model.decoder.new_cache()
        steps = [model.decoder(start, memory=memory, cache=cache)[:, 0]]
        positions = cache.layers[0].positions
        for i in range(1, x_prev.shape[1]):
            pos = positions[i:i + 1] if static else i
            steps.append(model.decoder.decode(x_prev[:, i - 1:i], cache, pos)[:, 0])
    assert memory.shape[1] == 17 and model.decoder.cfg.inner_dim == 24 != model.decoder.cfg.d_model
    assert (torch.stack(steps, 1) - full).abs().max() <= scale_error(model) * full.abs().max()


# ---- the 256-px release-shaped chain (tests/fixtures/releases/imagebart/e2e, tools/release_fixtures.py --e2e) ----
# Laid out as the release: scale checkpoints without first-stage weights, the VQGAN checkpoint the configs name
# by ckpt_path (vqgan/), its remap list and the FFHQ schedule table (data/), all relative to the folder.
E2E = FIXTURES / "e2e"


@pytest.fixture(scope="module")
def e2e_release() -> ib.ImageBARTRelease:
    return ib.load_sampling_config(str(E2E / "sampling.yaml"))


@pytest.fixture(scope="module")
def e2e_official() -> dict:
    return torch.load(E2E / "outputs.pt", weights_only=True)


def test_e2e_chain_maps_256px_images_to_the_priors_16x16_grid(e2e_release, e2e_official):
    prior, vq = e2e_release.prior, e2e_release.tokenizer
    assert vq is not None  # from vqgan/vqgan-e2e.ckpt: scale 1's checkpoint holds no first stage
    assert prior.T == 3 and prior.grid == (16, 16) and prior.seq_len == 256
    assert prior.vocab_size == vq.vocab_size == 32 and len(vq.quantize.used) == 32  # 32 used codes of 40
    with torch.no_grad():
        idx = vq.encode_to_indices(e2e_official["pixels"].float() / 127.5 - 1)
        images = vq.decode_indices(idx)
    assert idx.shape == (1, 16, 16) and 0 <= int(idx.min()) and int(idx.max()) < 32 and len(idx.unique()) > 8
    assert images.shape == (1, 3, 256, 256) and torch.isfinite(images).all()
    assert e2e_release.sources == ["scale1.ckpt", "scale2.ckpt"] and e2e_release.top_k == [32, 32]


@pytest.mark.parametrize("s", [1, 2])
def test_e2e_each_scales_logits_equal_the_official_ones(e2e_release, e2e_official, s):
    """As test_each_scales_logits_equal_the_official_ones, at L = 256 with x-transformers' default heads of 64."""
    model = e2e_release.prior.scales[f"scale{s + 1}"]
    o = e2e_official
    with torch.no_grad():
        logits = model(o["x_prev"], o["x_t"] if model.encoder is not None else None)
    theirs = o[f"scale{s}_logits"]
    assert logits.shape == theirs.shape == (3, 256, 32)
    assert (logits - theirs).abs().max() <= scale_error(model) * theirs.abs().max()
    if model.encoder is not None:
        assert model.decoder.cfg.inner_dim == 2 * ib.DEFAULT_DIM_HEAD and model.encoder.cfg.seq_len == 257


def test_e2e_schedule_is_the_official_ffhq_table_schedule(e2e_release, e2e_official):
    ours = torch.tensor(e2e_release.prior.betas[2:], dtype=torch.float64)
    theirs = e2e_official["betas"][1:].double()
    # as test_schedule_is_the_official_one: the metric-table roots, float32 on both sides
    assert ((ours - theirs).abs() <= EPS32 * theirs.abs()).all() and ours[-1] == 1.0 and 0 < ours[0] < 1


def test_e2e_first_stage_encodes_and_decodes_as_the_official_vqgan(e2e_release, e2e_official):
    """The VQGAN checkpoint with the remap list, as the official chain builds it from the config: the near-tie and
    remap rules of test_first_stage_encodes_and_decodes_as_the_official_vqgan."""
    vq, o = e2e_release.tokenizer, e2e_official
    images = o["pixels"].float() / 127.5 - 1
    with torch.no_grad():
        z = vq.quant_conv(vq.encoder(images))
        ours = vq.encode_to_indices(images).flatten()
        decoded = vq.decode_indices(o["x_prev"][:1].reshape(1, 16, 16))
    rel = conv_network_error(vq.encoder)
    assert rows_close(z.flatten(1), o["prequant"].flatten(1), rel)
    _, _, ranked, decided = code_distances(z, vq.quantize.embedding.weight, rel)
    known = decided & torch.isin(ranked.indices[:, 0], vq.quantize.used)
    assert known.float().mean() > 0.4
    theirs = o["encoded"].flatten()
    assert torch.equal(ours[known], theirs[known])
    assert torch.equal(vq.quantize.used[ours[known]], ranked.indices[known, 0])
    assert decoded.shape == o["decoded"].shape == (1, 3, 256, 256)
    assert rows_close(decoded.flatten(1), o["decoded"].flatten(1), conv_network_error(vq.decoder))
