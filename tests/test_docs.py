"""README.md and docs/: the numbers they quote from the checked-in report are current, and every link resolves."""
from __future__ import annotations

import ast
import importlib.util
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("render_numbers", ROOT / "docs" / "render_numbers.py")
numbers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(numbers)

DOCS = numbers.documents(ROOT)

# Numbers of other runs that happen to equal a value of the report. The mirrored-training comparison ran the
# default beside it, so its "before" side is the default's value as measured in that run; the learning-rate
# study's validation curve passes through AR's NLL at step 500. docs/releases.md quotes the papers' own tables;
# docs/protocol.md the split's neighbour distances and the interval calibration's measured ratios.
OTHER_RUNS = {
    "docs/default.md": ("AR 5.855 ->", "AR 218.6 -> 220.7", "T = 9 246.5 -> 249.6", "5.91, 5.85, 5.82",
                        "T = 9 253.8 -> 256.3"),
    "docs/protocol.md": ("0.028 / 0.047 / 0.207", "same | 1.02 | 1.67", "fakes differ | 0.99 | 1.02",
                         "same | 1.02 / 1.01 / 1.02 | 1.01 / 1.22 / 1.02"),
    "docs/releases.md": ("| Churches | 6.86 | 6.09 |", "Churches 6.01, FFHQ 5.96", "6.24, 6.18"),
    "docs/speed.md": ("0.104 s, 12.1%; 0.104 s, 12.2%", "0.725 s, 14.6x", "0.217 s, 49.2x", "0.833 s, 18.9x",
                      "0.565 s, 12.7x"),  # sampling_speed.py runs
}


def prose(path: Path) -> str:
    """The file without fenced code and inline code, whose brackets are not links."""
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    heading = re.sub(r"[`*_]|<[^>]+>", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", heading).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M).splitlines():
        if m := re.match(r"#{1,6} (.+)", line):
            s = slug(m[1])
            out.add(s if s not in seen else f"{s}-{seen[s]}")
            seen[s] = seen.get(s, 0) + 1
    return out


def links(path: Path) -> list[str]:
    text = prose(path)
    found = re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r"""(?:src|href)=["']([^"']+)["']""", text)
    return [t for t in found if not re.match(r"[a-z]+:", t)]


def test_every_quoted_report_number_is_rendered_from_the_report():
    stale = numbers.stale(numbers.Report(), ROOT)
    assert not stale, f"stale numbers blocks (run python docs/render_numbers.py): {', '.join(stale)}"


def test_every_block_renderer_is_used_and_every_used_block_is_known():
    used = [m["name"] for path in DOCS for m in numbers.BLOCK.finditer(path.read_text())]
    assert set(used) == set(numbers.BLOCKS)


@pytest.mark.parametrize("edit", [
    ("summary.csv", "ar", None, "fid", 230.0),                       # README table, can-show, docs/default.md
    ("summary.csv", "imagebart", 9, "nll_bits_per_token", 7.5),      # README table and can-show
    ("summary.csv", "absorbing", 3, "fid_ci_hi", 299.0),             # README table's interval
    ("summary.csv", "absorbing", 5, "train_match", 0.5),             # README table, Train match range
    ("summary.csv", "imagebart", 2, "fid_significant", True),        # the A/A sentence and a mark
    ("results.csv", None, None, "baselines", ("reconstruction", "fid", 120.0)),
])
def test_changing_a_quoted_report_value_makes_the_docs_stale(tmp_path, edit):
    fname, prior, T, key, value = edit
    shutil.copytree(numbers.REPORT, tmp_path / "report", ignore=shutil.ignore_patterns("*.png", "*.pdf"))
    path = tmp_path / "report" / fname
    df = pd.read_csv(path)
    if fname == "results.csv":
        which, metric, v = value
        for i, cell in df[key].items():
            b = ast.literal_eval(cell)
            b[which][metric] = v
            df.at[i, key] = repr(b)
    else:
        at = (df.prior == prior) & ((df["T"] == T) if T is not None else df["T"].isna())
        assert at.sum() == 1
        df[key] = df[key].astype(object)
        df.loc[at, key] = value
    df.to_csv(path, index=False)
    assert numbers.stale(numbers.Report(tmp_path / "report"), ROOT) != []


def report_number_forms(report) -> set[str]:
    """Every value of summary.csv and the baseline rows as it would be quoted: 1-3 decimals, 3+ digits."""
    values = []
    for col in report.summary.columns:
        if col.endswith(("_se", "_p", "_significant")) or col in ("prior", "T", "n_seeds", "is_reference"):
            continue
        values += [v for v in report.summary[col].dropna() if isinstance(v, float)]
    for which in ("real_val", "reconstruction"):
        for v in report.baselines[which].values():
            values += [x for x in (v if isinstance(v, list) else [v]) if isinstance(x, float)]
    forms = set()
    for v in values:
        for d in (1, 2, 3):
            s = f"{v:.{d}f}"
            if len(s.replace(".", "").replace("-", "").lstrip("0")) >= 3:
                forms.add(s)
    return forms


def test_no_report_number_is_hand_copied_outside_a_rendered_block():
    forms = report_number_forms(numbers.Report())
    pattern = re.compile(r"(?<![\d.])(" + "|".join(re.escape(s) for s in sorted(forms)) + r")(?![\d])")
    copied = []
    for path in DOCS:
        rel = str(path.relative_to(ROOT))
        text = numbers.BLOCK.sub("", path.read_text())
        for allowed in OTHER_RUNS.get(rel, ()):
            assert allowed in text, f"{rel} no longer quotes {allowed!r}: drop it from OTHER_RUNS"
            text = text.replace(allowed, "")
        copied += [f"{rel}: {m[1]} in ...{text[max(0, m.start() - 40):m.end() + 10]!r}"
                   for m in pattern.finditer(text)]
    assert copied == []


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path):
    broken = []
    for target in links(path):
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor}")
    assert broken == []


def test_link_check_sees_a_broken_link_and_anchor(tmp_path):
    doc = tmp_path / "a.md"
    doc.write_text("# Title\n\n[x](missing.md) ![y](a.md#title) [z](a.md#nowhere) <img src=\"b.png\">\n")
    assert links(doc) == ["missing.md", "a.md#title", "a.md#nowhere", "b.png"]
    assert anchors(doc) == {"title"}


def test_readme_shows_the_report_figure_and_a_grid_and_stays_short():
    readme = ROOT / "README.md"
    targets = links(readme)
    assert any(t.endswith("figures/fid_vs_T.png") and (ROOT / t).exists() for t in targets)
    assert any("/grids/" in t and t.endswith("_samples_grid.png") and (ROOT / t).exists() for t in targets)
    assert len(readme.read_text().splitlines()) <= 170


def test_readme_keeps_the_setup_and_test_commands_that_ci_and_users_run():
    lines = (ROOT / "README.md").read_text().splitlines()
    setup = 'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[dev]"'
    assert f"{setup} && python bench/run.py -m prior=ar,imagebart,absorbing T=2,3,5,9" in lines
    assert f"{setup} && python -m pytest -q" in lines
