"""Weights fetched only when asked (bench/weights.py): IS with real logits where a weights file can be had, n/a with
the reason where not. Served over loopback by the test itself: a randomly initialised torch-fidelity Inception
(plumbing only) and files whose content does not match their name."""
from __future__ import annotations

import functools
import hashlib
import http.server
import math
import threading
from pathlib import Path

import pytest
import torch

from bench import features as FE

from bench import keys as K
from bench import metrics as M
from bench.errors import ConfigError
from image_tokenizers.vqgan_train import VGG16_FILE, lpips_available, provide_vgg16
from bench.weights import sha256_prefix
from tests.clitools import job_results, run_cli
from tests.test_metrics import emoji_images, torch_fidelity_inception_skeleton


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty torch hub cache for the test (and for CLI runs it starts: TORCH_HOME)."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    before = torch.hub.get_dir()
    torch.hub.set_dir(str(home / "hub"))
    yield home / "hub" / "checkpoints"
    torch.hub.set_dir(before)


@pytest.fixture
def server(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/served; yields (folder, base URL)."""
    folder = tmp_path / "served"
    folder.mkdir()
    handler = functools.partial(QuietHandler, directory=str(folder))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def publish(folder: Path, stem: str, data: bytes) -> str:
    """Write data as STEM-<sha256 prefix>.pth, the way weight files are published; its name."""
    name = f"{stem}-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    (folder / name).write_bytes(data)
    return name


@pytest.fixture(scope="module")
def inception_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("inception") / "w.pth"
    torch.save(torch_fidelity_inception_skeleton(seed=0).state_dict(), path)
    return path.read_bytes()


def test_a_served_inception_gives_is_a_value_and_is_fetched_once(hub, server, inception_bytes):
    folder, base = server
    name = publish(folder, "weights-inception-test", inception_bytes)
    extractor = FE.load_feature_extractor(f"{base}/{name}")
    assert extractor.has_logits and (hub / name).is_file()
    assert sha256_prefix(name) and hashlib.sha256((hub / name).read_bytes()).hexdigest().startswith(sha256_prefix(name))
    feats = FE.images_to_features(emoji_images(4), extractor, batch_size=4)
    metrics, unavailable = M.compute_metrics(None, feats, isc_splits=2)
    assert K.IS_MEAN not in unavailable and math.isfinite(metrics[K.IS_MEAN]) and metrics[K.IS_MEAN] >= 1
    # Reused, not fetched again: the server no longer has it.
    (folder / name).unlink()
    assert FE.load_feature_extractor(f"{base}/{name}").weights_path == hub / name


def test_a_file_that_does_not_match_its_name_is_refused_and_not_kept(hub, server, inception_bytes):
    folder, base = server
    good = publish(folder, "weights-inception-test", inception_bytes)
    bad = good.replace(sha256_prefix(good), "00000000")
    (folder / bad).write_bytes(inception_bytes)
    with pytest.raises(ConfigError, match=r"^eval\.inception_weights=.*sha256 does not start with 00000000") as e:
        FE.load_feature_extractor(f"{base}/{bad}")
    assert "\n" not in str(e.value) and not (hub / bad).exists()
    (folder / "weights-inception.pth").write_bytes(inception_bytes)
    with pytest.raises(ConfigError, match=r"carries no sha256 prefix"):
        FE.load_feature_extractor(f"{base}/weights-inception.pth")


def test_an_unreachable_download_is_one_line_naming_the_option(hub, server):
    _, base = server
    with pytest.raises(ConfigError, match=r"^eval\.inception_weights=.*could not download .*put the file at") as e:
        FE.load_feature_extractor(f"{base}/missing-12345678.pth")  # 404
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"^tokenizer\.train\.vgg16_weights=http://127\.0\.0\.1:9/"):
        provide_vgg16("http://127.0.0.1:9/vgg16-397923af.pth")  # nothing listens on the discard port


def test_vgg16_must_be_torchvisions_file(hub, server, tmp_path):
    folder, base = server
    name = publish(folder, "vgg16", b"not the ImageNet weights")
    with pytest.raises(ConfigError, match=r"^tokenizer\.train\.vgg16_weights=.*not vgg16-397923af\.pth"):
        provide_vgg16(f"{base}/{name}")  # fetched (it matches its own name), then refused as LPIPS's backbone
    assert not (hub / VGG16_FILE).exists() and not lpips_available()
    with pytest.raises(ConfigError, match=r"^tokenizer\.train\.vgg16_weights=.*no such file"):
        provide_vgg16(str(tmp_path / "nope.pth"))


def test_without_weights_is_is_na_and_says_how_to_turn_it_on(hub):
    extractor = FE.load_feature_extractor()  # empty hub cache: the offline pool-only route
    assert not extractor.has_logits
    assert "eval.inception_weights=download" in M.NO_LOGITS_REASON


def test_the_cli_reports_is_with_served_weights(copy_token_cache, tmp_path, hub, server, inception_bytes):
    folder, base = server
    name = publish(folder, "weights-inception-test", inception_bytes)
    cache = copy_token_cache(tmp_path / "cache")
    p = run_cli(["experiment=smoke", "logger=none", "prior=ar", f"paths.cache={cache}",
                 f"eval.inception_weights={base}/{name}"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    [r] = job_results(tmp_path / "outputs")
    assert r["is_mean"] is not None and r["is_mean"] >= 1 and "is_mean" not in (r.get("unavailable") or {})
    assert name in r["feature_extractor"]
