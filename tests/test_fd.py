"""Frechet distances on torch-fidelity's DINOv2 and CLIP extractors beside FID (eval.fd_features, eval.fd_weights).

Weights are served over loopback by the test itself, never downloaded. CLIP: torch-fidelity builds the network from
the shapes of the file's state dict, so a randomly initialised CLIP of torch-fidelity's own classes at ViT-B/32's
patch size and input resolution, but 2 layers of width 64, goes through the real loader and forward. DINOv2:
torch-fidelity 0.4 loads it only through torch.hub (the facebookresearch/dinov2 repository's code in torch's hub
folder, the weights under their published name); the repository is not available offline, so the hub folder gets
a small hubconf of the same form (a model whose `pretrained` weights come from torch.hub's checkpoint cache by the
published URL), which tests the plumbing: the file the option names is the one torch.hub's code loads.
"""
from __future__ import annotations

import hashlib
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch_fidelity.feature_extractor_clip import MODEL_METADATA as CLIP_METADATA
from torch_fidelity.feature_extractor_clip import CLIPVisual
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from bench import evaluate as E
from bench import features as FE
from bench import keys as K
from bench import metrics as M
from bench.cache import read_meta
from bench.errors import ConfigError
from bench.options import EvalConfig
from bench.weights import sha256_prefix
from tests import tolerance as T
from tests.clitools import job_results, run_cli
from tests.test_metrics import emoji_images
from tests.test_weights import hub, server  # noqa: F401 - fixtures: an empty torch hub cache, a loopback server

CLIP = "clip-vit-b-32"
DINO = "dinov2-vit-s-14"


class TracedCLIPFile(torch.nn.Module):
    """What torch-fidelity reads from a CLIP file: a TorchScript archive whose state dict holds `visual.*` and the
    text projection (its width gives the embedding size)."""

    def __init__(self, seed: int, embed_dim: int = 32, width: int = 64, layers: int = 2):
        super().__init__()
        torch.manual_seed(seed)
        self.visual = CLIPVisual(embed_dim, 224, layers, width, 32).visual  # ViT-B/32's patch and resolution
        self.text_projection = torch.nn.Parameter(torch.randn(width, embed_dim) / width ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)


def clip_file(path: Path, seed: int) -> Path:
    with warnings.catch_warnings():  # the tracer's notes on shape checks inside multi-head attention
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)  # CLIP files are TorchScript archives, as published
        torch.jit.trace(TracedCLIPFile(seed).eval(), torch.zeros(1, 3, 224, 224)).save(str(path))
    return path


@pytest.fixture(scope="module")
def clip_bytes(tmp_path_factory) -> bytes:
    return clip_file(tmp_path_factory.mktemp("clip") / "clip.pt", seed=0).read_bytes()


def publish(folder: Path, stem: str, data: bytes) -> str:
    name = f"{stem}-{hashlib.sha256(data).hexdigest()[:8]}.pt"
    (folder / name).write_bytes(data)
    return name


def test_the_choices_are_torch_fidelitys_dinov2_and_clip_extractors():
    ours = set(K.FD_KEYS)
    theirs = {n for n in FEATURE_EXTRACTORS_REGISTRY if n.startswith(("dinov2-", "clip-"))}
    assert ours == theirs and len(ours) == 13
    assert K.FD_KEYS[DINO] == "fd_dinov2_vit_s_14" and K.FD_KEYS[DINO].lower_is_better
    assert all(k not in K.SCHEMA for k in K.FD_KEYS.values())  # the default results carry none of them


def test_clip_download_is_checked_against_the_sha256_torch_fidelity_pins():
    weights = FE.fd_weights(CLIP)
    digest = CLIP_METADATA[CLIP]["hash"]
    assert weights.file_name == f"{CLIP}-{digest}.pt" and sha256_prefix(weights.file_name) == digest
    assert weights.option == "eval.fd_weights.clip-vit-b-32" and weights.url.endswith(f"{digest}/ViT-B-32.pt")


def test_served_clip_weights_give_features_and_are_fetched_once(hub, server, clip_bytes):  # noqa: F811
    folder, base = server
    name = publish(folder, "clip-test", clip_bytes)
    extractor = FE.load_fd_extractor(CLIP, f"{base}/{name}")
    assert extractor.weights_path == hub / name and extractor.weights_sha256 == hashlib.sha256(clip_bytes).hexdigest()
    feats = FE.images_to_features(emoji_images(5), extractor, batch_size=2)[FE.FEATURE_FD]
    assert feats.shape == (5, 32) and torch.isfinite(feats).all()
    assert len({tuple(r.tolist()) for r in feats}) == 5  # one embedding per image, not a constant
    (folder / name).unlink()  # reused, not fetched again
    assert FE.load_fd_extractor(CLIP, f"{base}/{name}").weights_path == hub / name


def test_a_mirror_whose_content_does_not_match_its_name_is_refused(hub, server, clip_bytes):  # noqa: F811
    folder, base = server
    (folder / "clip-test-00000000.pt").write_bytes(clip_bytes)
    with pytest.raises(ConfigError, match=r"^eval\.fd_weights\.clip-vit-b-32=.*sha256 does not start with 0000") as e:
        FE.load_fd_extractor(CLIP, f"{base}/clip-test-00000000.pt")
    assert "\n" not in str(e.value) and not (hub / "clip-test-00000000.pt").exists()


def test_a_file_that_is_not_a_clip_archive_is_one_line_naming_the_option(hub, tmp_path):  # noqa: F811
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a TorchScript archive")
    with pytest.raises(ConfigError, match=r"^eval\.fd_weights\.clip-vit-b-32=.*bad\.pt: not a CLIP") as e:
        FE.load_fd_extractor(CLIP, str(bad))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"^eval\.fd_weights\.clip-vit-b-32=.*: no such file"):
        FE.load_fd_extractor(CLIP, str(tmp_path / "nope.pt"))


def test_missing_weights_give_na_with_the_reason(hub):  # noqa: F811
    cfg = EvalConfig(fd_features=[DINO, CLIP])
    fds = E.load_fd(cfg)
    assert [fd.extractor for fd in fds] == [None, None]
    values, unavailable, feats = E.fd_metrics(fds, emoji_images(3), cfg, seed=0)
    assert values == {K.FD_KEYS[DINO]: None, K.FD_KEYS[CLIP]: None} and feats == {}
    for name in (DINO, CLIP):
        reason = unavailable[K.FD_KEYS[name]]
        assert "\n" not in reason and f"eval.fd_weights.{name}=download" in reason


# ---- DINOv2 through torch.hub ----------------------------------------------------------------------------------

HUBCONF = '''
import torch

URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth"


def dinov2_vits14(pretrained=True):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 14, 14), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    if pretrained:
        model.load_state_dict(torch.hub.load_state_dict_from_url(URL, map_location="cpu"), strict=True)
    return model
'''


def dino_weights(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 14, 14), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture
def dino_code(hub):  # noqa: F811
    code = hub.parent / FE.DINOV2_REPO_FOLDER
    code.mkdir(parents=True)
    (code / "hubconf.py").write_text(HUBCONF)
    return code


def test_dinov2_loads_the_file_the_option_names_without_touching_the_hub_cache(hub, dino_code, tmp_path):  # noqa: F811
    a, b = dino_weights(tmp_path / "a.pth", 1), dino_weights(tmp_path / "b.pth", 2)
    ex_a, ex_b = FE.load_fd_extractor(DINO, str(a)), FE.load_fd_extractor(DINO, str(b))
    state = torch.load(a, weights_only=True)
    loaded = ex_a.net.model.state_dict()
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    images = emoji_images(3)
    fa, fb = ex_a(images)[FE.FEATURE_FD], ex_b(images)[FE.FEATURE_FD]
    assert fa.shape == (3, 8) and torch.isfinite(fa).all() and not torch.equal(fa, fb)
    assert not list(hub.glob("dinov2*"))  # the user's hub cache holds no file of ours
    with pytest.raises(FE.FDUnavailable, match=r"no dinov2-vit-s-14 weights in torch's hub cache"):
        FE.load_fd_extractor(DINO)
    bad = tmp_path / "bad.pth"
    torch.save({"weight": torch.zeros(1)}, bad)
    with pytest.raises(ConfigError, match=r"^eval\.fd_weights\.dinov2-vit-s-14=.*not a DINOv2 dinov2_vits14") as e:
        FE.load_fd_extractor(DINO, str(bad))
    assert "\n" not in str(e.value)


def test_dinov2_without_its_code_is_na_naming_the_code(hub, tmp_path):  # noqa: F811
    with pytest.raises(FE.FDUnavailable, match=r"DINOv2's code .*facebookresearch/dinov2.*=download"):
        FE.load_fd_extractor(DINO, str(dino_weights(tmp_path / "a.pth", 1)))


def test_the_reference_cache_key_changes_with_extractor_and_weights(hub, dino_code, tmp_path):  # noqa: F811
    cfg = EvalConfig()
    clip_a, clip_b = clip_file(tmp_path / "a.pt", 0), clip_file(tmp_path / "b.pt", 1)

    def key(name: str, path: Path) -> str:
        return E.fd_reference_key("data", E.FDFeatures(name, K.FD_KEYS[name], FE.load_fd_extractor(name, str(path))),
                                  cfg)

    keys = {key(CLIP, clip_a), key(CLIP, clip_b), key("clip-vit-b-16", clip_a),
            key(DINO, dino_weights(tmp_path / "d.pth", 1))}
    assert len(keys) == 4
    copy = tmp_path / "copy.pt"
    copy.write_bytes(clip_a.read_bytes())
    assert key(CLIP, copy) == key(CLIP, clip_a)  # keyed by the content, not the path
    # Selecting nothing keys like a config without the options; selecting an extractor adds its reference key.
    assert E.fd_key_part([], "data", cfg) == []
    fd = E.FDFeatures(CLIP, K.FD_KEYS[CLIP], FE.load_fd_extractor(CLIP, str(clip_a)))
    assert E.fd_key_part([fd], "data", cfg) == [[CLIP, key(CLIP, clip_a)]]
    assert E.eval_options_for_key({"num_samples": 3, "fd_features": [CLIP], "fd_weights": None}) == {"num_samples": 3}


def test_the_plan_hashes_weight_files_without_building_networks_or_downloading(hub, dino_code, tmp_path,  # noqa: F811
                                                                                monkeypatch):
    """plan_fd (stage=plan): the same reference keys as the loaded extractors, from the files alone; a file the job
    would download is not fetched (its keys are unknown until then: keyed as n/a, with the reason); absent weights
    are n/a with load_fd's reason."""
    clip_a, dino = clip_file(tmp_path / "a.pt", 0), dino_weights(tmp_path / "d.pth", 1)
    cfg = EvalConfig(fd_features=[CLIP, DINO, "clip-vit-b-16", "dinov2-vit-b-14"],
                     fd_weights={CLIP: str(clip_a), DINO: str(dino), "clip-vit-b-16": "download"})
    cfg.check_fd()
    loaded = [E.FDFeatures(n, K.FD_KEYS[n], FE.load_fd_extractor(n, str(f))) for n, f in ((CLIP, clip_a), (DINO, dino))]
    monkeypatch.setattr(FE, "load_fd_extractor", lambda *a, **k: pytest.fail("the plan built a network"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("the plan downloaded"))
    planned = E.plan_fd(cfg)
    assert [p.name for p in planned] == [CLIP, DINO, "clip-vit-b-16", "dinov2-vit-b-14"]
    for p, fd in zip(planned[:2], loaded):
        assert isinstance(p.extractor, FE.PlannedFD) and p.reason is None
        assert E.fd_reference_key("data", p, cfg) == E.fd_reference_key("data", fd, cfg)
    assert planned[2].extractor is None and "not downloaded yet" in planned[2].reason
    assert planned[3].extractor is None and "no dinov2-vit-b-14 weights in torch's hub cache" in planned[3].reason
    assert E.fd_key_part(planned, "data", cfg)[2:] == [["clip-vit-b-16", None], ["dinov2-vit-b-14", None]]


# ---- through the command line --------------------------------------------------------------------------------------

def test_the_job_reports_fd_whose_arithmetic_is_the_frechet_distance(copy_token_cache, tmp_path, hub, server,  # noqa: F811
                                                                      clip_bytes):
    folder, base = server
    name = publish(folder, "clip-test", clip_bytes)
    cache = copy_token_cache(tmp_path / "cache")
    p = run_cli(["experiment=smoke", "logger=none", "prior=ar", f"paths.cache={cache}", "eval.bootstrap=20",
                 f"eval.fd_features=[{CLIP},{DINO}]", f"eval.fd_weights={{{CLIP}:'{base}/{name}'}}"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    [r] = job_results(tmp_path / "outputs")
    key = K.FD_KEYS[CLIP]
    value = r[key]
    assert math.isfinite(value) and value >= 0 and key not in r[K.UNAVAILABLE]
    lo, hi = r[key.ci]
    assert lo <= value <= hi and r[key.se] > 0
    # DINOv2 selected without weights or code: n/a with the reason, the job carries on.
    assert r[K.FD_KEYS[DINO]] is None and "eval.fd_weights.dinov2-vit-s-14" in r[K.UNAVAILABLE][K.FD_KEYS[DINO]]
    for row in K.BASELINE_ROWS:
        assert math.isfinite(r[K.BASELINES][row][key])
    # The number is the Frechet distance of the stored features: the reference's (same train rows as FID's) and
    # the samples', computed here by torch-fidelity's d x d route.
    [ref_dir] = [d for d in (cache / "fd-reference").iterdir() if d.is_dir()]
    ref = torch.load(ref_dir / "features.pt", weights_only=True)
    [fid_ref] = [d for d in (cache / "reference").iterdir() if d.is_dir()]
    assert np.array_equal(np.load(ref_dir / "rows.npy"), np.load(fid_ref / "rows.npy"))
    x = np.load(Path(r[K.EVAL_DIR]) / f"sample_features_{CLIP}.npy")
    stats_ref, stats_x = M.features_to_statistics(ref), M.features_to_statistics(torch.from_numpy(x))
    assert len(x) == r[K.N_SAMPLES] and x.shape[1] == 32
    expected = M.statistics_to_fid(stats_ref, stats_x)
    # Each route within its rounding bound of the exact distance (tests/tolerance.py): the job's n x n
    # eigenproblem (n <= d) or d x d sqrtm, and torch-fidelity's sqrtm here.
    n, d = x.shape
    ours = T.fid_gram_error(x, stats_ref["sigma"]) if n <= d else T.fid_sqrtm_error(stats_ref["sigma"], stats_x["sigma"])
    tol = ours + T.fid_sqrtm_error(stats_ref["sigma"], stats_x["sigma"])
    assert value == pytest.approx(expected, rel=0, abs=tol)
    assert read_meta(ref_dir)["weights_sha256"] == hashlib.sha256(clip_bytes).hexdigest()
    # The plan counted the forwards the job made: the reference rows, the samples, and both baseline rows' val
    # images at N (their distances are above); DINOv2, n/a, cost nothing.
    assert r[K.PLAN_FD][CLIP]["images"] == len(ref) + len(x) + 2 * r[K.N_SAMPLES]
    assert r[K.PLAN_FD][DINO]["flops"] == 0 and r[K.PLAN_FD][DINO]["unavailable"]
    # The report shows the column the job wrote (baseline rows included), not the one that is n/a.
    from bench.report import write_report

    write_report([tmp_path / "outputs"], tmp_path / "report")
    main = (tmp_path / "report" / "report.md").read_text().split("## Main results", 1)[1].strip().split("\n\n")[0]
    table = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in main.splitlines()]
    assert key.title in table[0] and K.FD_KEYS[DINO].title not in table[0]
    column = table[0].index(key.title)
    cells = [row[column] for row in table[2:]]
    assert len(cells) == 3 and all(c[0].isdigit() for c in cells)  # real val, reconstructions, the prior
    assert cells[-1].startswith(f"{value:.2f} ")


def test_a_bad_extractor_name_is_one_line_through_the_cli(tmp_path):
    p = run_cli(["experiment=smoke", "logger=none", f"paths.cache={tmp_path / 'cache'}",
                 "eval.fd_features=[dinov2-vit-s-15]"], cwd=tmp_path)
    assert p.returncode == 2
    [line] = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert line.startswith("error: eval.fd_features: unknown extractor 'dinov2-vit-s-15'") and DINO in line
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())  # before any stage


def test_the_job_keys_change_with_the_extractor_and_not_without_one(hub, tmp_path):  # noqa: F811
    from hydra import compose, initialize_config_dir

    from bench import pipeline as P

    clip_a, clip_b = clip_file(tmp_path / "a.pt", 0), clip_file(tmp_path / "b.pt", 1)

    def keys(*overrides: str) -> dict[str, str]:
        with initialize_config_dir(config_dir=str(Path(P.__file__).resolve().parents[1] / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=["experiment=smoke", *overrides])
        settings = P.validate(cfg)
        job = P.Job(cfg, None, settings, {}, FE.load_feature_extractor(None), fds=E.load_fd(settings.eval))
        return P.stage_keys(job)

    default = keys()
    # Weights named for no selected extractor change nothing: the options enter the keys through the selection.
    assert keys(f"eval.fd_weights={{{CLIP}:'{clip_a}'}}") == default
    a = keys(f"eval.fd_features=[{CLIP}]", f"eval.fd_weights={{{CLIP}:'{clip_a}'}}")
    b = keys(f"eval.fd_features=[{CLIP}]", f"eval.fd_weights={{{CLIP}:'{clip_b}'}}")
    na = keys(f"eval.fd_features=[{DINO}]")  # n/a: keyed as such, so weights added later are computed
    for other in (a, b, na):
        assert {k: other[k] for k in ("data", "tokens", "reference", "train")} == \
            {k: default[k] for k in ("data", "tokens", "reference", "train")}
    assert len({d["eval"] for d in (default, a, b, na)}) == 4 and len({d["baselines"] for d in (default, a, b, na)}) == 4
