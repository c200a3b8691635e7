"""The cost plan (bench/cost.py) against torch's own FLOP counter and its arithmetic."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from bench import cost as C
from bench import keys as K
from priors import build_prior
from priors.flops import causal_pairs
from priors.transformer import Transformer

V, GRID = 16, (4, 4)

pytestmark = pytest.mark.usefixtures("one_thread")


def attention_flops(prior) -> int:
    """The attention part of one forward of every transformer (pairs read, priors/flops.py's convention)."""
    total = 0
    for m in prior.modules():
        if isinstance(m, Transformer):
            c = m.cfg
            pairs = causal_pairs(0, c.seq_len) if c.causal else c.seq_len ** 2
            total += 4 * c.d_model * c.n_layer * (pairs + (c.seq_len ** 2 if c.cross_attn else 0))
    return total


@pytest.mark.parametrize("name,T", [("ar", 2), ("imagebart", 2), ("imagebart", 4), ("absorbing", 5)])
def test_training_flops_equal_torchs_flop_counter(name, T):
    """One training step of every unit under FlopCounterMode (forward and backward) gives exactly the plan's
    matmul FLOPs; the counter does not see the CPU attention kernel, whose FLOPs the plan adds on top."""
    torch.manual_seed(0)
    prior = build_prior(name, V, GRID, T=T, budget=60000, cfg={"n_layer": 2, "n_head": 2})
    batch = 8
    x = torch.randint(0, V, (batch, GRID[0] * GRID[1]), generator=torch.Generator().manual_seed(1))
    counted = 0
    for unit in prior.units():
        with FlopCounterMode(display=False) as counter:
            loss, _ = prior.unit_loss(unit, x, torch.Generator().manual_seed(0))
            loss.backward()
        counted += counter.get_total_flops()
    planned = C.training_flops(prior, batch, steps=1, val_every=10 ** 9, val_batches=0)
    assert planned - 3 * batch * attention_flops(prior) == counted
    # Validation forwards: val_batches x batch forwards every val_every steps and once at the end.
    with_val = C.training_flops(prior, batch, steps=10, val_every=5, val_batches=2)
    per_seq = sum(C.unit_forward_flops(prior).values())
    assert with_val == per_seq * batch * (3 * 10 + 2 * 3)


def test_inception_flops_are_the_published_size():
    """About 5.7 billion multiply-adds per 299 x 299 image (Szegedy et al. 2016 report about 5 billion for the
    network without its auxiliary head): 2 FLOPs each."""
    from bench.features import load_feature_extractor
    flops = C.inception_flops_per_image(load_feature_extractor())
    assert 2 * 5.0e9 <= flops <= 2 * 6.0e9


class SwiGLU(torch.nn.Module):
    """DINOv2 ViT-g's FFN as its hub code defines it: one projection to twice the hidden width, SiLU of one half
    times the other, one projection back."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.w12, self.w3 = torch.nn.Linear(width, 2 * hidden), torch.nn.Linear(hidden, width)

    def forward(self, x):
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(torch.nn.functional.silu(a) * b)


def equivalent_vit(name: str) -> torch.nn.Module:
    """torchvision's ViT at DINOv2 `name`'s patch, width, depth, FFN and torch-fidelity's input size, on the meta
    device, without a classification head (DINOv2's hub models end in the normed class token)."""
    from torchvision.models.vision_transformer import VisionTransformer

    width, depth, ffn = C.DINOV2_ARCH[name]
    with torch.device("meta"):
        vit = VisionTransformer(C.DINOV2_SIZE, C.DINOV2_PATCH, depth, width // 64, width, 4 * width)
        vit.heads = torch.nn.Identity()
        if ffn == "swiglu":
            for layer in vit.encoder.layers:
                layer.mlp = SwiGLU(width, C.swiglu_hidden(width))
    return vit.eval()


def counted_flops(net: torch.nn.Module, size: int) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(torch.zeros(1, 3, size, size, device="meta"))
    return counter.get_total_flops()


@pytest.mark.parametrize("name", list(C.DINOV2_ARCH))
def test_dinov2_flops_formula_equals_the_flop_counter_on_an_equivalent_vit(name):
    """DINOv2's code cannot be built offline: its formula is checked, exactly, against FlopCounterMode on a ViT of
    the same shapes that can (the patch convolution, q/k/v and output projections, the attention's two products,
    the MLP or SwiGLU)."""
    assert C.fd_flops_per_image(name) == counted_flops(equivalent_vit(name), C.DINOV2_SIZE)


def test_dinov2_shapes_are_the_published_ones():
    """ViT-S/B/L/g: 21M, 86M, 300M and 1.1B parameters (Oquab et al. 2023, Table 20), the patch embedding's
    positional table at 518 px aside; ViT-g's SwiGLU hidden width 4096 (layers/swiglu_ffn.py's rounding)."""
    assert C.swiglu_hidden(1536) == 4096
    published = {"dinov2-vit-s-14": 21e6, "dinov2-vit-b-14": 86e6, "dinov2-vit-l-14": 300e6, "dinov2-vit-g-14": 1.1e9}
    for name, params in published.items():
        n = sum(p.numel() for p in equivalent_vit(name).parameters())
        assert abs(n - params) <= 0.05 * params, (name, n)  # the table rounds to 2 significant digits


@pytest.mark.parametrize("name", [n for n, a in C.CLIP_ARCH.items() if a[2] is not None])
def test_clip_vit_flops_are_the_vit_formula_plus_the_projection(name):
    """torch-fidelity's CLIP ViT counted on the meta device against the same formula the DINOv2 plan uses, with the
    final projection to the embedding (a width x embedding matmul of the class token): two counts, one by torch's
    counter on torch-fidelity's network, one by arithmetic, agree exactly."""
    layers, width, patch, size, embed = C.CLIP_ARCH[name]
    assert C.fd_flops_per_image(name) == C.vit_flops(size, patch, width, layers) + 2 * width * embed
    assert C.fd_feature_width(name) == embed and C.fd_input_size(name) == size


def test_clip_flops_are_counted_without_weights_or_device_memory():
    """The meta network holds no storage: the plan never touches a weights file, even for RN50x64."""
    net = C.clip_visual("clip-rn50x64")
    assert all(p.is_meta for p in net.parameters())
    assert C.fd_flops_per_image("clip-rn50x64") > C.fd_flops_per_image("clip-rn50") > 0


def fd_cfg(eval_cfg: dict) -> OmegaConf:
    return OmegaConf.create({"train": {"batch_size": 8, "steps": 100, "val_every": 50, "val_batches": 2},
                             "eval": {"num_samples": 20, **eval_cfg}})


def test_fd_part_counts_the_images_fd_sees_and_na_ones_cost_nothing(tmp_path, monkeypatch):
    """clip-vit-b-32 with its weights in torch's hub cache runs: the reference rows, the samples and both baseline
    rows' val images (N = 20 <= 30 val images), no completions; dinov2-vit-s-14 without them is n/a and adds
    nothing. The FD part adds to the hours at Inception's utilisation and to the disk by its reference features."""
    from bench import features as FE

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / FE.fd_weights("clip-vit-b-32").file_name).write_bytes(b"weights")
    torch.manual_seed(0)
    prior = build_prior("ar", V, GRID, T=2, budget=60000, cfg={"n_layer": 2, "n_head": 2})
    counts = {"n_train": 300, "n_val": 30, "n_reference": 100, "n_completions": 10}
    args = (prior, prior.num_params())
    plain = C.estimate(*args, fd_cfg({}), counts, 32, 1e10, ("this CPU", 1e11))
    cost = C.estimate(*args, fd_cfg({"fd_features": ["clip-vit-b-32", "dinov2-vit-s-14"]}), counts, 32, 1e10,
                      ("this CPU", 1e11))
    clip, dino = cost.fd
    assert (clip.name, dino.name) == ("clip-vit-b-32", "dinov2-vit-s-14")
    assert clip.images == 100 + 20 + 2 * 20 and clip.unavailable is None
    assert clip.flops == clip.images * C.fd_flops_per_image("clip-vit-b-32")
    assert clip.disk_bytes == 100 * 512 * 4  # reference rows x embedding width x float32
    assert (dino.images, dino.flops, dino.disk_bytes) == (0, 0.0, 0) and "hub cache" in dino.unavailable
    assert cost.disk_bytes == plain.disk_bytes + clip.disk_bytes and cost.fd_flops == clip.flops
    extra = clip.flops / C.UTILISATION["inception"] / 1e11 / 3600
    assert cost.hours["this CPU"] == pytest.approx(plain.hours["this CPU"] + extra, rel=1e-12)
    lines = "\n".join(cost.lines())
    assert "clip-vit-b-32 160 images" in lines and "dinov2-vit-s-14 n/a at evaluation" in lines
    assert "costs nothing" in lines and "Inception and FD 30%" in lines
    record = cost.as_results()[K.PLAN_FD]
    assert record["clip-vit-b-32"]["flops"] == clip.flops and record["dinov2-vit-s-14"]["unavailable"]
    assert K.PLAN_FD not in plain.as_results() and plain.fd == []
    # Fewer val images than N: the baseline rows have no sample metrics, so no FD forwards either.
    few = C.estimate(*args, fd_cfg({"num_samples": 40, "fd_features": "clip-vit-b-32"}), counts, 32, 1e10, None)
    assert few.fd[0].images == 100 + 40
    # A weights option (download, a URL, a PATH) runs the extractor: counted without fetching the file (one that
    # cannot be had fails the job by itself).
    named = fd_cfg({"fd_features": ["dinov2-vit-s-14"], "fd_weights": {"dinov2-vit-s-14": "download"}})
    assert C.estimate(*args, named, counts, 32, 1e10, None).fd[0].unavailable is None
    # DINOv2 weights named by a PATH without DINOv2's code in torch's hub folder: n/a, as the evaluation finds it
    # (bench.features.load_dinov2), since the plan applies the same file rule.
    (tmp_path / "d.pth").write_bytes(b"weights")
    by_path = fd_cfg({"fd_features": ["dinov2-vit-s-14"], "fd_weights": {"dinov2-vit-s-14": str(tmp_path / "d.pth")}})
    assert "DINOv2's code" in C.estimate(*args, by_path, counts, 32, 1e10, None).fd[0].unavailable
    # The sweep's total counts the part once per evaluation key, as Inception.
    shared = C.total([cost, cost, plain], [{"tokens": "t", "train": "a", "eval": e} for e in ("e1", "e1", "e2")])
    assert shared.fd[0].images == clip.images and shared.fd[0].flops == clip.flops
    twice = C.total([cost, cost])
    assert twice.fd[0].flops == 2 * clip.flops and twice.fd[1].unavailable == dino.unavailable
    assert twice.disk_bytes == 2 * cost.disk_bytes


def test_estimate_adds_phases_at_their_utilisation():
    torch.manual_seed(0)
    prior = build_prior("ar", V, GRID, T=2, budget=60000, cfg={"n_layer": 2, "n_head": 2})
    cfg = OmegaConf.create({"train": {"batch_size": 8, "steps": 100, "val_every": 50, "val_batches": 2},
                            "eval": {"num_samples": 40}})
    counts = {"n_train": 300, "n_val": 30, "n_reference": 100, "n_completions": 10}
    cost = C.estimate(prior, prior.num_params(), cfg, counts, resolution=32, inception_per_image=1e10,
                      own_peak=("this CPU", 1e11))
    assert cost.train_flops == C.training_flops(prior, 8, 100, 50, 2)
    assert cost.sample_flops == prior.sample_flops() * 50
    # Reference, samples, completions; the baseline rows have no sample metrics (30 val images < N = 40), only
    # their completion rows.
    assert cost.inception_images == 100 + 40 + 10 + 2 * 10
    want = (cost.train_flops / 0.4 + cost.sample_flops / 0.1 + cost.inception_flops / 0.3) / 1e11 / 3600
    assert cost.hours["this CPU"] == pytest.approx(want, rel=1e-12)  # the same three divisions
    assert cost.hours["H100 SXM"] < cost.hours["A100"] < cost.hours["this CPU"]
    released = C.estimate(prior, prior.num_params(), cfg, counts, 32, 1e10, None, train=False)
    assert released.train_flops == 0 and "this CPU" not in released.hours
    both = C.total([cost, cost])
    assert both.train_flops == 2 * cost.train_flops and both.hours["A100"] == pytest.approx(2 * cost.hours["A100"])
    # Two points that share their tokens and their training (AR at two T) count them once, evaluation twice.
    shared = C.total([cost, cost], [{"tokens": "t", "train": "a", "eval": "e1"}, {"tokens": "t", "train": "a",
                                                                              "eval": "e2"}])
    assert shared.train_flops == cost.train_flops and shared.tokenizer_flops == cost.tokenizer_flops
    assert shared.sample_flops == 2 * cost.sample_flops and shared.inception_images == 2 * cost.inception_images
    assert any("FLOPs" in line for line in cost.lines()) and "A100" in cost.lines()[1]


def test_stage_plan_sweep_prints_every_job_and_the_total_and_runs_nothing(tmp_path, monkeypatch):
    """With eval.fd_features: clip-vit-b-32 named by a file (a small CLIP of torch-fidelity's classes; the plan
    counts the published architecture), dinov2-vit-s-14 with nothing in an empty hub cache (n/a, costs nothing),
    clip-vit-b-16 to be downloaded (the plan counts it and downloads nothing: offline, a download would fail)."""
    from tests.clitools import job_results, run_cli
    from tests.test_fd import clip_file

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    clip = clip_file(tmp_path / "clip.pt", seed=0)
    p = run_cli(["-m", "experiment=smoke", "logger=none", "stage=plan", "prior=ar,imagebart", "T=3",
                 "eval.fd_features=[clip-vit-b-32,dinov2-vit-s-14,clip-vit-b-16]",
                 f"eval.fd_weights={{clip-vit-b-32:'{clip}',clip-vit-b-16:download}}",
                 f"paths.cache={tmp_path / 'cache'}", "name=plan"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    log = p.stdout + p.stderr
    assert "sweep plan: prior=ar T=3 seed=0" in log and "sweep plan: prior=imagebart T=3 seed=0" in log
    assert "sweep plan: total over 2 job(s)" in log and "H100 SXM" in log and "this CPU" in log
    # The FD part per job (the planner's line and the job's own plan: 64 reference rows, 16 samples, both baseline
    # rows' 16 val images) and in the total (two evaluations: twice that).
    fd_images = 64 + 16 + 2 * 16
    assert log.count(f"clip-vit-b-32 {fd_images} images") == 2 * 2
    total = next(line for line in log.splitlines() if "sweep plan: FD extractors" in line)
    assert f"clip-vit-b-32 {2 * fd_images} images" in total and "dinov2-vit-s-14 n/a at evaluation" in total
    # Before the first job: the total comes before Hydra launches anything.
    assert log.index("sweep plan: total") < log.index("stage=plan: stopping before any stage")
    assert not (tmp_path / "cache").exists()  # nothing computed, nothing cached
    assert not list((tmp_path / "torch_home").rglob("*.pt"))  # nothing downloaded
    jobs = job_results(tmp_path / "multirun" / "plan")
    assert len(jobs) == 2 and all(j["status"] == "ok" for j in jobs)
    for j in jobs:
        # Reference, samples, completions, and both baseline rows' 16 val images and 8 completion rows.
        assert j["plan_train_flops"] > 0 and j["plan_sample_flops"] > 0
        assert j["plan_inception_images"] == 64 + 16 + 8 + 2 * (16 + 8)
        fd = j["plan_fd"]
        assert fd["clip-vit-b-32"]["images"] == fd_images and fd["clip-vit-b-32"]["disk_bytes"] == 64 * 512 * 4
        assert fd["dinov2-vit-s-14"]["flops"] == 0 and fd["dinov2-vit-s-14"]["unavailable"]
        assert fd["clip-vit-b-16"]["images"] == fd_images and not fd["clip-vit-b-16"]["unavailable"]
        assert set(j["plan_hours"]) == {"A100", "H100 SXM", "this CPU"} and j["fid"] is None
    report = (tmp_path / "reports" / "plan" / "report.md").read_text()
    assert "## Cost: planned and measured" in report and "planned min, this CPU" in report
