"""The report's tests against the compare_to row and its table.tex on synthetic results (bench/report.py): the
Frechet distances of eval.fd_features are tested and tabled like FID where some point has them."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from bench import keys as K
from bench import report as R
from bench import stats as S

FD = K.FD_KEYS["clip-vit-b-32"]


def write_job(sweep: Path, num: int, prior: str, values: dict[str, tuple[float, float]]) -> None:
    """One finished job of prior `prior` (one seed, T not applying) with each key's (value, standard error) and
    its 95% interval, as bench/evaluate.py writes them; compare_to=ar in its config."""
    d = sweep / f"{num}_{prior}_s0"
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"prior={prior}"]))
    (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"compare_to": "ar", "prior": {"name": prior}}))
    r = {K.STATUS: "ok", K.PRIOR: prior, K.PRIOR_LABEL: prior, K.T: 2, K.SEED: 0, K.T_APPLIES: "none"}
    for key, (value, se) in values.items():
        r.update({key: value, key.se: se, key.ci: [value - 1.96 * se, value + 1.96 * se]})
    (d / "results.json").write_text(json.dumps(r))


def sweep_of(tmp_path: Path, fd: dict[str, float | None]) -> R.Sweep:
    """ar (the reference), far and near, with the same FID (30, s.e. 1) and FD CLIP ViT-B/32 `fd[prior]` (s.e.
    0.5; None: the job did not select the extractor)."""
    sweep = tmp_path / "multirun" / "fd"
    for num, prior in enumerate(("ar", "far", "near")):
        values = {K.FID: (30.0, 1.0)}
        if fd.get(prior) is not None:
            values[FD] = (fd[prior], 0.5)
        write_job(sweep, num, prior, values)
    return R.load_sweep([sweep], tmp_path / "report")


def test_fd_columns_are_tested_against_the_reference_row_with_holm_over_all_columns(tmp_path):
    """far's FD is 10 above ar's (z = 10 / (0.5 sqrt 2) = 14: p below 1e-40, significant after any Holm
    factor); near's is 0.3 above (z = 0.42, p = 0.67: not significant at any factor). FID is equal everywhere
    (p = 1). The family: two rows x (FID, FD) = four comparisons."""
    sw = sweep_of(tmp_path, {"ar": 10.0, "far": 20.0, "near": 10.3})
    assert R.tested_keys(sw.points) == R.TESTED + (FD,)
    far, near = (next(pt for pt in sw.points if pt.prior == p) for p in ("far", "near"))
    assert far.significant[FD] is True and near.significant[FD] is False
    assert far.p[FD] < 1e-40 and near.p[FD] == pytest.approx(S.independent_test(10.3, 0.5, 10.0, 0.5), abs=0)
    assert far.significant[K.FID] is False and sw.n_tests == 4
    table = R.main_table(sw.points, None, sw.ref)
    far_row = next(line for line in table.splitlines() if line.startswith("| far |"))
    near_row = next(line for line in table.splitlines() if line.startswith("| near |"))
    assert far_row.rstrip(" |").endswith("*") and not near_row.rstrip(" |").endswith("*")
    text = " ".join(R.resolution_text(sw.points, sw.ref, sw.n_tests))
    assert "over the table's 4 comparisons (every tested column, the FD columns FD CLIP ViT-B/32 included)" in text


def test_table_tex_has_the_fd_column_with_the_best_in_bold(tmp_path):
    sw = sweep_of(tmp_path, {"ar": 10.0, "far": 20.0, "near": 10.3})
    tex = R.latex_table(sw.points)
    head = next(line for line in tex.splitlines() if line.startswith("Prior &"))
    assert head.rstrip(r" \\").endswith(FD.title)  # the last column, after the default tested ones
    rows = {line.split(" & ")[0]: line.rstrip(r" \\").split(" & ")[-1] for line in tex.splitlines()
            if line.split(" & ")[0] in ("ar", "far", "near")}
    # lower is better: ar's 10.00 is bold, the others plain, each with its 95% half-width 1.96 x 0.5
    assert rows == {"ar": r"\textbf{10.00 $\pm$ 0.98}", "far": r"20.00 $\pm$ 0.98", "near": r"10.30 $\pm$ 0.98"}


def test_only_fd_columns_some_point_has_are_tested_and_tabled(tmp_path):
    """No job selected an extractor: the family and table.tex are the default columns alone. One row without it:
    that row's cell is empty and untested, the others are tested."""
    none = sweep_of(tmp_path / "a", {})
    assert R.tested_keys(none.points) == R.TESTED and FD.title not in R.latex_table(none.points)
    assert none.n_tests == 2 and "FD columns" not in " ".join(R.resolution_text(none.points, none.ref, 2))
    some = sweep_of(tmp_path / "b", {"ar": 10.0, "far": 20.0})
    near = next(pt for pt in some.points if pt.prior == "near")
    assert near.p.get(FD) is None and near.significant.get(FD) is None and some.n_tests == 3
    near_row = next(line for line in R.latex_table(some.points).splitlines() if line.startswith("near &"))
    assert near_row.rstrip(r" \\").endswith("--")
