"""Released checkpoints through the real command line: `experiment=release_<family>` names the authors' files,
the job evaluates them as released (nothing trained, the release's own first stage, its codes unremapped), the
report marks the rows, and a wrong file stops the job with one line before any stage runs."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from bench.cache import file_sha256
from tests.clitools import job_results, run_cli, run_cli_many
from tests.test_vqgan import images

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "releases"
TAMING, UNLEASHING, IMAGEBART = (FIXTURES / f for f in ("taming", "unleashing", "imagebart"))

# The tiny parity fixtures: 16-px images (taming, unleashing: f = 2, 8 x 8 grid; imagebart: 4 x 4)
TINY = {
    "taming": [f"release.ckpt={TAMING / 'last.ckpt'}", f"release.config={TAMING / 'project.yaml'}"],
    "unleashing": [f"release.ckpt={UNLEASHING / 'absorbing_ema_0.th'}",
                   f"release.first_stage={UNLEASHING / 'vqgan_ema_0.th'}",
                   f"release.config={UNLEASHING / 'hparams.yaml'}", "T=8"],
    "imagebart": [f"release.config={IMAGEBART / 'geometric' / 'sampling.yaml'}", "T=4"],
}
EVAL = ["eval.num_samples=8", "eval.completion_samples=4", "eval.match_samples=8", "eval.batch_size=4",
        "eval.prdc_samples=8", "eval.bootstrap=50", "data.val_fraction=0.25", "logger=none"]


def image_folder(root: Path, side: int, n: int = 24) -> Path:
    folder = root / f"images{side}"
    if not folder.is_dir():
        folder.mkdir(parents=True)
        for i, im in enumerate(images(n, 72)):
            Image.fromarray(im.permute(1, 2, 0).numpy()).resize((side, side), Image.BICUBIC).save(
                folder / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def folder16(tmp_path_factory) -> Path:
    return image_folder(tmp_path_factory.mktemp("rel"), 16)


def args(family: str, folder: Path, cache: Path, files: list[str] | None = None, resolution: int = 16) -> list[str]:
    return [f"experiment=release_{family}", f"data.path={folder}", f"data.resolution={resolution}",
            f"paths.cache={cache}", *(TINY[family] if files is None else files)]


def one_line_errors(cases: list[list[str]], cwd: Path) -> list[str]:
    """Each command line's error line; every one must exit 2 with one line and leave no cache behind."""
    out = []
    for case, r in zip(cases, run_cli_many([(c, cwd) for c in cases])):
        lines = [ln for ln in r["stderr"].splitlines() if ln.strip()]
        assert r["rc"] == 2 and len(lines) == 1 and lines[0].startswith("error: "), (case, r["stderr"][-2000:])
        out.append(lines[0][len("error: "):])
    assert not (cwd / "cache").exists()  # stopped before any stage
    return out


def test_a_wrong_file_stops_the_job_with_one_line_naming_it(folder16, tmp_path):
    cache = tmp_path / "cache"
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "last.ckpt").write_bytes((TAMING / "last.ckpt").read_bytes()[:30_000])
    (cut / "vqgan_ema_0.th").write_bytes((UNLEASHING / "vqgan_ema_0.th").read_bytes()[:30_000])
    chain = tmp_path / "chain"
    shutil.copytree(IMAGEBART / "geometric", chain)
    (chain / "scale2.ckpt").write_bytes((chain / "scale2.ckpt").read_bytes()[:20_000])
    sampler, vqgan, hparams = (UNLEASHING / n for n in ("absorbing_ema_0.th", "vqgan_ema_0.th", "hparams.yaml"))
    project = TAMING / "project.yaml"
    cases = [
        # taming: another family's checkpoint, a truncated download, another family's config, a missing file
        args("taming", folder16, cache, [f"release.ckpt={sampler}", f"release.config={project}"]),
        args("taming", folder16, cache, [f"release.ckpt={cut / 'last.ckpt'}", f"release.config={project}"]),
        args("taming", folder16, cache, [f"release.ckpt={TAMING / 'last.ckpt'}", f"release.config={hparams}"]),
        args("taming", folder16, cache, [f"release.config={project}"]),
        # unleashing: a taming checkpoint as the sampler, a truncated VQGAN, the released sizes against tiny files
        args("unleashing", folder16, cache, [f"release.ckpt={TAMING / 'last.ckpt'}", f"release.first_stage={vqgan}",
                                             f"release.config={hparams}", "T=8"]),
        args("unleashing", folder16, cache, [f"release.ckpt={sampler}", f"release.first_stage={cut / 'vqgan_ema_0.th'}",
                                             f"release.config={hparams}", "T=8"]),
        args("unleashing", folder16, cache, [f"release.ckpt={sampler}", f"release.first_stage={vqgan}",
                                             "release.config=ffhq", "T=8"]),
        # imagebart: a taming project.yaml as its sampling yaml, a chain with a truncated scale
        args("imagebart", folder16, cache, [f"release.config={project}", "T=4"]),
        args("imagebart", folder16, cache, [f"release.config={chain / 'sampling.yaml'}", "T=4"]),
        # the job around the release: another prior, another tokenizer, another image size, another chain length
        args("taming", folder16, cache) + ["prior=absorbing"],
        args("taming", folder16, cache) + ["tokenizer=vqgan_tiny"],
        args("taming", folder16, cache, resolution=32),
        args("imagebart", folder16, cache, [f"release.config={IMAGEBART / 'geometric' / 'sampling.yaml'}", "T=3"],
             resolution=4),
    ]
    msgs = one_line_errors(cases, tmp_path)
    assert msgs[0] == (f"release.ckpt={sampler} does not match release.config={project}: missing key "
                       "first_stage_model.encoder.conv_in.weight")
    assert msgs[1].startswith(f"release.ckpt={cut / 'last.ckpt'} cannot be loaded")
    assert msgs[2].startswith(f"release.config={hparams}: model.target=None is not")
    assert msgs[3].startswith("release.ckpt is required for release.family=taming")
    assert msgs[4] == (f"release.ckpt={TAMING / 'last.ckpt'} does not match release.config={hparams}: missing key "
                       "_denoise_fn.pos_emb")
    assert msgs[5].startswith(f"release.first_stage={cut / 'vqgan_ema_0.th'} cannot be loaded")
    assert msgs[6].startswith(f"release.ckpt={sampler} does not match release.config=ffhq: ")
    assert msgs[6].endswith("_denoise_fn.pos_emb has shape (1, 64, 16), config gives (1, 256, 512)")
    assert msgs[7].startswith(f"release.config={project}: expected lists `checkpoints` and `configs`")
    assert msgs[8].startswith(f"release.ckpt[1]={chain / 'scale2.ckpt'} cannot be loaded")
    assert msgs[9] == "prior=absorbing: release.family=taming loads as prior=ar (experiment=release_taming sets it)"
    assert msgs[10].startswith("tokenizer=vqgan: a release is evaluated on its own first stage's codes")
    assert msgs[11] == ("data.resolution=32 gives a 16x16 token grid, but the released prior reads 8x8 (its first "
                        "stage was trained at 16 px): set data.resolution=16")
    assert msgs[12] == "T=3: this chain has T=4 (3 trained scales); T is its length"


# The release-shaped fixtures of tools/release_fixtures.py --e2e: each family's layout at 256 px (f = 16 first
# stages, 16 x 16 grids, 32 codes), random weights saved by the official code in the authors' on-disk format.
E2E = {
    "taming": [f"release.ckpt={TAMING / 'e2e' / 'last.ckpt'}", f"release.config={TAMING / 'e2e' / 'project.yaml'}"],
    "unleashing": [f"release.ckpt={UNLEASHING / 'e2e' / 'absorbing_ema_0.th'}",
                   f"release.first_stage={UNLEASHING / 'e2e' / 'vqgan_ema_0.th'}",
                   f"release.config={UNLEASHING / 'e2e' / 'hparams.yaml'}"],  # T = 256 from the preset
    "imagebart": [f"release.config={IMAGEBART / 'e2e' / 'sampling.yaml'}", "T=3"],
}
E2E_FILES = {"taming": [TAMING / "e2e" / "last.ckpt"],
             "unleashing": [UNLEASHING / "e2e" / "absorbing_ema_0.th", UNLEASHING / "e2e" / "vqgan_ema_0.th"],
             "imagebart": [IMAGEBART / "e2e" / n for n in ("scale1.ckpt", "scale2.ckpt", "vqgan/vqgan-e2e.ckpt")]}
LABELS = {"taming": "AR (Taming) (released)", "unleashing": "Absorbing (Unleashing) (released)",
          "imagebart": "ImageBART (released)"}


@pytest.fixture(scope="module")
def released_sweeps(tmp_path_factory) -> Path:
    """Each family's 256-px release evaluated through the CLI, one sweep each, sharing one cache."""
    root = tmp_path_factory.mktemp("released")
    folder = image_folder(root, 256)
    for family in E2E:
        p = run_cli(["-m", f"name={family}", *args(family, folder, root / "cache", E2E[family], resolution=256),
                     *EVAL], cwd=root, timeout=1200)
        assert p.returncode == 0, (family, p.stderr[-4000:])
    return root


# The three 256-px sweeps take about 1 minute on 2 quiet cores (4-5 under a load of 4): slow.
@pytest.mark.slow
@pytest.mark.parametrize("family", list(E2E))
def test_a_256px_release_is_evaluated_as_released(released_sweeps, family):
    (job,) = job_results(released_sweeps / "multirun" / family)
    assert job["status"] == "ok", job.get("error")
    rel = job["release"]
    assert rel["family"] == family
    assert rel["files"] == [[f.name, file_sha256(f)] for f in E2E_FILES[family]]
    # nothing trained: the release is the checkpoint; its codes keep their ids (no effective-codebook remap)
    assert job["train_steps"] == 0 and job["train_units"] == {}
    assert job["tokenizer"]["grid"] == [16, 16] and job["tokenizer"]["vocab_size"] == job["tokenizer"]["n_embed"] == 32
    s = np.load(Path(job["eval_dir"]) / "samples.npz")
    assert s["tokens"].shape == (8, 256) and s["images"].shape == (8, 3, 256, 256)
    assert s["completions"].shape == (4, 256)
    for key in ("fid", "kid_mean", "nll_bits_per_token", "completion_fid"):
        assert np.isfinite(job[key]), key
    # the paper's sampling settings beside the job's, and which differ
    if family == "taming":
        assert rel["paper_sampling"]["top_k"] == 250 and rel["differs"] == ["top_k"]
    if family == "unleashing":
        assert job["T"] == 256 and rel["sampling"]["T"] == 256 and rel["differs"] == ["temperature"]
    report = (released_sweeps / "reports" / family / "report.md").read_text()
    assert "## Released checkpoints" in report and LABELS[family] in report
    for f in E2E_FILES[family]:
        assert f"`{f.name}` ({file_sha256(f)[:12]})" in report


@pytest.mark.slow
def test_the_three_releases_side_by_side_in_one_report(released_sweeps, tmp_path):
    out = tmp_path / "report"
    p = run_cli([*(str(released_sweeps / "multirun" / f) for f in E2E), "--out", str(out)], cwd=released_sweeps,
                script=Path(__file__).resolve().parent.parent / "bench" / "report.py")
    assert p.returncode == 0, p.stderr[-3000:]
    report = (out / "report.md").read_text()
    main = report.split("## Released checkpoints")[0]
    for label in LABELS.values():
        assert f"| {label}" in main
    released = report.split("## Released checkpoints")[1].split("\n## ")[0]
    assert sum(line.startswith("| ") for line in released.splitlines()) == 1 + len(E2E)  # head and one row each
    tokenizers = report.split("## Tokenizer")[1].split("\n## ")[0]
    assert "The rows use different tokens" in tokenizers  # each release brought its own first stage
    # tested against the AR release on the images' metrics, not on NLL or train match (other codes)
    summary = pd.read_csv(out / "summary.csv")
    others = summary[~summary["is_reference"]]
    assert len(others) == 2 and others["fid_p"].notna().all()
    assert others["nll_bits_per_token_p"].isna().all() and others["train_match_p"].isna().all()


def test_the_release_presets_document_every_option():
    """conf/config.yaml's release block lists each ReleaseOptions field, and each preset sets its family."""
    from dataclasses import fields

    from releases import FAMILIES, ReleaseOptions

    root = Path(__file__).resolve().parent.parent / "conf"
    block = yaml.safe_load((root / "config.yaml").read_text())["release"]
    assert set(block) == {f.name for f in fields(ReleaseOptions)} and all(v is None for v in block.values())
    for family, prior in FAMILIES.items():
        preset = yaml.safe_load((root / "experiment" / f"release_{family}.yaml").read_text())
        assert preset["release"]["family"] == family
        assert {"override /prior": prior} in preset["defaults"]
        assert {"override /tokenizer": "release"} in preset["defaults"]
