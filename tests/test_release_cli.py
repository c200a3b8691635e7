"""Released checkpoints through the real command line: `experiment=release_<family>` names the authors' files,
the job evaluates them as released (nothing trained, the release's own first stage, its codes unremapped), the
report marks the rows, and a wrong file stops the job with one line before any stage runs."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
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
