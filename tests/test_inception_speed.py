"""The default Inception route (default_1.pt's weights in torch-fidelity's module, batch norms folded) gives the
TorchScript's pool features, and the throughput benchmark runs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bench import features as FE
from bench.data import emoji_root, list_images, load_image
from tests import tolerance as T


@pytest.fixture(scope="module")
def emoji4():
    files = list_images(emoji_root())
    return torch.from_numpy(np.stack([load_image(f, 32) for f in files[::1000][:4]]))  # spread over the set


def test_default_route_pool_features_equal_the_torchscript(emoji4):
    path = FE.fid_helper_weights_path()
    adopted = FE.TorchFidelityInceptionFromTorchScript(path)
    reference = FE.TorchScriptFIDInception(path)
    a = adopted(emoji4)[FE.FEATURE_POOL]
    b = reference(emoji4)[FE.FEATURE_POOL]
    assert a.shape == b.shape == (4, FE.POOL_DIM) and set(adopted(emoji4[:1])) == {FE.FEATURE_POOL}
    # Float32 rounding of two routes through the same weights (batch norms folded into the convolutions or not):
    # each row within conv_network_error of exact (0.13% of its norm), so within twice it. Measured 1.5e-6 to
    # 1.9e-6 relative to the largest feature. A real mapping error is far above: swapping two same-shaped branches
    # gives 1.3 (Mixed_6b) to 2.1 (Mixed_7c), a batch-norm eps of 1e-5 instead of TF's 1e-3 gives 4e-2.
    assert T.max_row_rel_diff(a, b) <= 2 * T.conv_network_error(reference.net)
    assert not adopted.has_logits and "default_1.pt" in adopted.name and "torch-fidelity" in adopted.name
    assert adopted.weights_sha256 == reference.weights_sha256 and len(adopted.weights_sha256) == 64


def test_default_extractor_is_the_fast_route_unless_torch_fidelity_weights_are_cached():
    if FE.torch_fidelity_cached_weights_path().is_file():
        pytest.skip("torch-fidelity's own weights are cached: the default is then TorchFidelityInception")
    assert isinstance(FE.load_feature_extractor(), FE.TorchFidelityInceptionFromTorchScript)


def test_cpu_chunking_does_not_change_features(emoji4, monkeypatch):
    extractor = FE.TorchFidelityInceptionFromTorchScript(FE.fid_helper_weights_path())
    whole = extractor(emoji4)[FE.FEATURE_POOL]
    monkeypatch.setattr(FE, "CPU_CHUNK", 3)  # 4 images -> forwards of 3 and 1
    chunked = extractor(emoji4)[FE.FEATURE_POOL]
    # Other batch shapes may take other conv kernels: the rounding bound of one route on either side.
    assert T.rows_close(chunked, whole, 2 * T.conv_network_error(extractor.net))


def test_a_torchscript_that_is_not_the_fid_inception_is_rejected(tmp_path):
    path = tmp_path / "other.pt"
    torch.jit.script(torch.nn.Conv2d(3, 4, 3)).save(str(path))
    with pytest.raises(ValueError, match="not the TF-FID Inception TorchScript"):
        FE.torchscript_to_torch_fidelity_state_dict(path)


def test_inception_speed_benchmark_runs(capsys):
    import benchmarks.inception_speed as bench_speed

    out = bench_speed.main(["--n", "2", "--repeats", "1", "--batch", "2", "--sources", "torch-fidelity"])
    reference = FE.TorchScriptFIDInception(FE.fid_helper_weights_path())
    assert out["images_per_second"]["torch-fidelity@2"] > 0
    assert out["max_row_rel_diff"]["torch-fidelity"] <= 2 * T.conv_network_error(reference.net)
    assert "| torch-fidelity | 2 |" in capsys.readouterr().out
