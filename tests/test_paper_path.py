"""The paper-scale path, scaled down: `experiment=ffhq_tab3` (256 px, a taming f16 tokenizer, 16 x 16 token grids,
the whole train split as reference) for all three priors at T = 2 and 3, through the real CLI and its report.

Everything that only exists at that scale except the sizes: a 256-token grid to generate, decode and complete,
the f16 taming tokenizer (a release-shaped checkpoint made here with random weights and narrow channels), the
reference drawn from the whole train split, per-scale budgets (checked at 800M by the plan test below)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from image_tokenizers.vqmodel import VQGANConfig, VQModel
from tests.clitools import job_results, run_cli
from tests.test_vqgan import images, save_taming

# taming's f16 layout (five levels, attention at 16 x 16) at a width a CPU test can afford
F16_NARROW = dict(resolution=256, ch=32, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=1, attn_resolutions=(16,),
                  z_channels=64, embed_dim=64, n_embed=256, double_z=False)


@pytest.fixture(scope="module")
def paper_inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("paper")
    folder = root / "images"
    folder.mkdir()
    for i, im in enumerate(images(40, 72)):  # twemoji upscaled to 256 px
        Image.fromarray(im.permute(1, 2, 0).numpy()).resize((256, 256), Image.BICUBIC).save(folder / f"{i:03d}.png")
    torch.manual_seed(0)
    ckpt, config = save_taming(root, VQModel(VQGANConfig(**F16_NARROW)))
    return {"root": root, "images": folder, "ckpt": Path(ckpt), "config": Path(config)}


def paper_args(inputs: dict[str, Path], cache: Path) -> list[str]:
    return ["experiment=ffhq_tab3", f"data.path={inputs['images']}", f"tokenizer.ckpt={inputs['ckpt']}",
            f"tokenizer.config={inputs['config']}", "data.val_fraction=0.25", f"paths.cache={cache}", "logger=none"]


SHRINK = ["budget.params=300000", "prior.n_layer=2", "prior.n_head=2", "train.steps=8", "train.batch_size=4",
          "train.warmup_steps=2", "train.val_every=4", "train.val_batches=1", "train.ckpt_every=4",
          "eval.num_samples=8", "eval.completion_samples=4", "eval.match_samples=8", "eval.batch_size=4",
          "eval.prdc_samples=8", "eval.bootstrap=50"]


@pytest.mark.slow
def test_the_256px_paper_path_runs_end_to_end_for_every_prior(paper_inputs, tmp_path):
    p = run_cli(["-m", "prior=ar,imagebart,absorbing", "T=2,3", "name=paper",
                 *paper_args(paper_inputs, tmp_path / "c"), *SHRINK], cwd=tmp_path, timeout=3000)
    assert p.returncode == 0, p.stderr[-4000:]
    jobs = job_results(tmp_path / "multirun" / "paper")
    assert len(jobs) == 6 and all(j["status"] == "ok" for j in jobs), [j.get("error") for j in jobs]
    for j in jobs:
        assert j["tokenizer"]["grid"] == [16, 16] and j["tokenizer"]["n_embed"] == 256
        assert j["n_reference"] + j["nll_sequences"] == 40  # the whole train split is the reference
        s = np.load(Path(j["eval_dir"]) / "samples.npz")
        assert s["tokens"].shape == (8, 256) and s["images"].shape == (8, 3, 256, 256)
        assert s["completions"].shape == (4, 256)  # completed token grids
        assert j["fid"] is not None and j["completion_fid"] is not None and j["nll_bits_per_token"] is not None
    report = (tmp_path / "reports" / "paper" / "report.md").read_text()
    for label in ("AR (Taming)", "ImageBART", "Absorbing"):
        assert label in report
    assert "16x16" in report


# Slow (23 s): the plan's FLOPs and memory are checked by default at small sizes (tests/test_cost.py,
# tests/test_memory.py); this plans the preset's own 800M sizes.
@pytest.mark.slow
def test_the_tab3_budget_splits_over_scales_at_800m(paper_inputs, tmp_path):
    """The preset's own sizes, planned (nothing runs): every prior within 10% of 800M parameters, ImageBART's
    split over its T - 1 scales; the plan names the phases at that size."""
    # One T: AR's model does not depend on T, and ImageBART at T=2 is that same single model; T=5 splits the
    # budget over four scales.
    p = run_cli(["-m", "prior=ar,imagebart", "T=5", "stage=plan", "name=plan800",
                 *paper_args(paper_inputs, tmp_path / "c")], cwd=tmp_path, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    jobs = {(j["prior"], j["T"]): j for j in job_results(tmp_path / "multirun" / "plan800")}
    assert set(jobs) == {("ar", 5), ("imagebart", 5)}
    for j in jobs.values():
        assert abs(j["plan_train_flops"] / (3 * 32 * 200_000) / 256 / 2 / 800e6 - 1) < 0.5  # ~2 FLOPs/param/token
    results = [json.loads((Path(j["job_dir"]) / "results.json").read_text()) for j in jobs.values()]
    assert all(r["plan_memory_bytes"] > 17 * 2 ** 30 for r in results)  # 800M parameters: weights, optimizer, activations
    log = p.stdout + p.stderr
    assert "parameters" in log and not (tmp_path / "c").exists()
    for line in log.splitlines():
        if "sweep plan: prior=" in line:
            params = int(line.split(": ")[2].split(" parameters")[0].replace(",", ""))
            assert abs(params - 800e6) <= 0.1 * 800e6, line
