"""Build `reports/<name>/` from finished sweep folders (docs/design.md, "Results and the report").

    python bench/report.py multirun/NAME [more sweep dirs...] [--out reports/NAME]

Needs no torch: every table is a groupby of `bench.results.load_results(...)`. A point is every override
except seed and name; seeds are aggregated within a point (mean and 95% t-interval), a single seed shows its
interval over its samples. Each point is tested against the `compare_to` prior's row (bench/stats.py), with Holm's
correction over the table (every tested column, the Frechet distances of eval.fd_features included where
present). Prose that depends on a prior (what its NLL and validation values are, its extra bounds) comes from what
the prior declared and its jobs recorded, never from its name.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench import keys as K
from bench import stats as S
from bench.keys import BASELINE_KEYS, COLUMN_KEYS, KEYS
from bench.results import ResultsError, drop_stale, finite, load_results

ReportError = ResultsError
TESTED = tuple(k for k in COLUMN_KEYS if KEYS[k].interval)  # columns tested against the compare_to row


def present_fd_keys(points: list["Point"]) -> tuple[str, ...]:
    """The Frechet distances on other extractors (eval.fd_features) that some point has."""
    return tuple(k for k in K.FD_KEYS.values() if any(k in pt.est for pt in points))


def tested_keys(points: list["Point"]) -> tuple[str, ...]:
    """The columns tested against the compare_to row and shown in table.tex: TESTED and present_fd_keys."""
    return TESTED + present_fd_keys(points)


@dataclass
class Point:
    key: tuple
    prior: str
    label: str  # the prior's own name for reports
    T: Any  # None where T does not apply
    settings: dict[str, str]  # the point's settings besides prior and T
    jobs: pd.DataFrame  # one job per seed
    rank: int = 0  # the prior's first position in the sweep's job order: priors appear as the user listed them
    est: dict[str, S.Estimate] = field(default_factory=dict)
    p: dict[str, float | None] = field(default_factory=dict)
    significant: dict[str, bool | None] = field(default_factory=dict)

    @property
    def n_seeds(self) -> int:
        return len(self.jobs)

    @property
    def name(self) -> str:
        """The label with its T where T applies: how the report's sentences name the point."""
        return self.label if self.T is None else f"{self.label} T={self.T}"

    def order(self) -> tuple:
        return self.rank, self.T if self.T is not None else -1, tuple(sorted(self.settings.items()))


def row_estimate(row: Any, key: str) -> S.Estimate:
    """One evaluation's value with its `<key>_se` and `<key>_ci` (a results row, a baseline row)."""
    ci, se = row.get(f"{key}{K.CI_SUFFIX}"), row.get(f"{key}{K.SE_SUFFIX}")
    return S.Estimate(float(row[key]), se if finite(se) else None,
                      tuple(ci) if isinstance(ci, (list, tuple)) and len(ci) == 2 else None)


def estimate(jobs: pd.DataFrame, key: str) -> S.Estimate:
    """One seed: the job's value and interval over its samples. Several: mean over seeds and the t-interval."""
    values = [v for v in jobs[key] if finite(v)]
    if not values:
        return S.Estimate(float("nan"), None, None)
    if len(jobs) == 1:
        return row_estimate(jobs.iloc[0], key)
    return S.seed_estimate(values)


def prior_ranks(df: pd.DataFrame) -> dict[str, int]:
    """Each prior's first job number in the grid: priors are shown in the order the sweep named them."""
    return {prior: i for i, prior in reversed(list(enumerate(df[K.PRIOR])))}


def label_of(row: Any) -> str:
    return row.get(K.PRIOR_LABEL) if isinstance(row.get(K.PRIOR_LABEL), str) else row[K.PRIOR]


def declared(df: pd.DataFrame, key: str) -> dict[str, Any]:
    """The union of a map the jobs recorded from their priors' declarations (e.g. K.EXTRA_BOUNDS), job order."""
    out: dict[str, Any] = {}
    for m in df.get(key, []):
        if isinstance(m, dict):
            out.update(m)
    return out


def fd_columns(df: pd.DataFrame) -> tuple[str, ...]:
    """The Frechet distances on other extractors (eval.fd_features) that some job wrote: columns only then."""
    return tuple(k for k in K.FD_KEYS.values() if k in df and any(finite(v) for v in df[k]))


def points_of(df: pd.DataFrame) -> list[Point]:
    ok = df[df[K.STATUS] == "ok"]
    # A prior whose T does not apply shares one evaluation over its T values: one job per (point, seed).
    ok = ok.drop_duplicates(subset=["point", K.SEED], keep="first")
    estimated = COLUMN_KEYS + fd_columns(ok) + tuple(declared(ok, K.EXTRA_BOUNDS))
    points = []
    ranks = prior_ranks(df)
    for key, jobs in ok.groupby("point", sort=False):
        j = jobs.iloc[0]
        settings = {k: v for k, v in key if k not in (K.PRIOR, K.T)}
        T = None if j.get(K.T_APPLIES) == "none" else j.get(K.T)
        pt = Point(key, j[K.PRIOR], label_of(j), T, settings, jobs.sort_values(K.SEED), rank=ranks[j[K.PRIOR]])
        for k in estimated:
            pt.est[k] = estimate(pt.jobs, k) if k in pt.jobs else S.Estimate(float("nan"), None, None)
        points.append(pt)
    return sorted(points, key=Point.order)


def nll_values(job: pd.Series) -> np.ndarray | None:
    path = Path(job["job_dir"]) / "nll_per_sequence.npy"
    return _load_nll(str(path), path.stat().st_mtime_ns) if path.is_file() else None


@functools.lru_cache(maxsize=256)
def _load_nll(path: str, mtime_ns: int) -> np.ndarray:
    """Read once per file version: every point's test and the A/A check load the reference row's array."""
    return np.load(path)


# Columns measured in a row's own token codes: rows on different tokens (a release's own first stage) are not
# tested against each other on them (bits per token of another codebook, agreement with other training grids).
TOKEN_COLUMNS = (K.NLL_BITS_PER_TOKEN, K.TRAIN_MATCH)


def compare(pt: Point, ref: Point, key: str) -> float | None:
    """p-value of pt == ref on one metric; None where they cannot be compared."""
    if key in TOKEN_COLUMNS and pt.jobs.iloc[0].get(K.TOKENS_KEY) != ref.jobs.iloc[0].get(K.TOKENS_KEY):
        return None
    if pt.n_seeds >= 2 and ref.n_seeds >= 2:
        return S.welch_test([v for v in pt.jobs[key] if finite(v)], [v for v in ref.jobs[key] if finite(v)])
    if key == K.NLL_BITS_PER_TOKEN:
        a, b = nll_values(pt.jobs.iloc[0]), nll_values(ref.jobs.iloc[0])
        if a is not None and b is not None and a.shape == b.shape:
            return S.paired_test(a, b)[2]
    a, b = pt.est[key], ref.est[key]
    if not (finite(a.value) and finite(b.value)):
        return None
    return S.independent_test(a.value, a.se, b.value, b.se)


def test_against(points: list[Point], ref: Point | None) -> int:
    """Fill p-values and Holm decisions against the reference row; returns the family size."""
    if ref is None:
        return 0
    keys = tested_keys(points)
    family = [(pt, k) for pt in points if pt is not ref for k in keys]
    pvals = [compare(pt, ref, k) for pt, k in family]
    for (pt, k), p, sig in zip(family, pvals, S.holm(pvals)):
        pt.p[k], pt.significant[k] = p, sig
    return sum(p is not None for p in pvals)


# ---- formatting ------------------------------------------------------------

T_MEANING = {"none": "does not apply to", "training": "changes the trained model of",
             "sampling": "only changes sampling and evaluation of"}


def t_meaning(df: pd.DataFrame) -> str:
    """What T means per prior, from each prior's own declaration (`T_applies`)."""
    parts = [f"{T_MEANING.get(applies, applies)} {lab}"
             for (lab, applies), _ in df.groupby([K.PRIOR_LABEL, K.T_APPLIES], sort=False, dropna=True)]
    return "T " + "; it ".join(parts) + "." if parts else ""


def fmt_value(v: Any, digits: int) -> str:
    if not finite(v):
        return "n/a"
    if digits == 0:
        return f"{v / 1e6:.2f}M" if abs(v) >= 1e5 else f"{v:.0f}"
    return f"{v:.{digits}f}"


def fmt_estimate(e: S.Estimate, digits: int) -> str:
    text = fmt_value(e.value, digits)
    if text != "n/a" and e.ci is not None and digits > 0:
        text += f" [{e.ci[0]:.{digits}f}, {e.ci[1]:.{digits}f}]"
    return text


def shown_setting(value: Any) -> str:
    """A setting as tables, legends and file names show it: a path by its file name (results.csv keeps it
    whole), so a released row's files do not fill the table."""
    return re.sub(r"[^\s,\[\]=]*/([^/\s,\[\]]+)", r"\1", str(value))


def varying_settings(points: list[Point]) -> list[str]:
    keys = sorted({k for pt in points for k in pt.settings})
    return [k for k in keys if len({pt.settings.get(k) for pt in points}) > 1]


def main_table(points: list[Point], baselines: dict[str, Any] | None, ref: Point | None) -> str:
    extra = varying_settings(points)
    columns = COLUMN_KEYS + present_fd_keys(points)
    head = ["Prior", "T", *extra, "seeds", *(KEYS[k].title for k in columns)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if baselines:
        for name in K.BASELINE_ROWS:
            row = baselines.get(name) or {}
            cells = []
            for k in columns:
                if (k in BASELINE_KEYS or k in K.FD_KEYS.values()) and finite(row.get(k)):
                    cells.append(fmt_estimate(row_estimate(row, k), KEYS[k].digits))
                else:
                    cells.append("–")
            lines.append(f"| *{name.title}* | – | " + "– | " * len(extra) + "– | " + " | ".join(cells) + " |")
    for pt in points:
        cells = []
        for k in columns:
            cell = fmt_estimate(pt.est[k], KEYS[k].digits)
            if k == K.NLL_BITS_PER_TOKEN and cell != "n/a":
                kind = pt.jobs.iloc[0].get(K.NLL_KIND)
                cell += {"exact": " (exact)", "elbo": " (≤, ELBO)", "order_bound": " (≤, sampler bound)"}.get(kind, "")
            if pt.significant.get(k):
                cell += " *"
            cells.append(cell)
        T = "–" if pt.T is None else str(pt.T)
        mark = " (ref.)" if pt is ref else ""
        lines.append(f"| {pt.label}{mark} | {T} | " + "".join(f"{shown_setting(pt.settings.get(k, ''))} | " for k in extra)
                     + f"{pt.n_seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def resolution_text(points: list[Point], ref: Point | None, n_tests: int) -> list[str]:
    """In words: what the sweep can and cannot resolve, and what the A/A pair (if any) found."""
    out = []
    if ref is None:
        return ["No row of the `compare_to` prior: no significance tests."]
    n_sig = sum(bool(v) for pt in points for v in pt.significant.values())
    n_raw = sum(1 for pt in points for p in pt.p.values() if p is not None and p < 0.05)
    fd = [KEYS[k].title for k in present_fd_keys(points)]
    family = f" (every tested column, the FD columns {', '.join(fd)} included)" if fd else ""
    out.append(f"`*`: differs from the {ref.label} row at the 95% level after Holm's correction over the "
               f"table's {n_tests} comparisons{family} ({n_sig} marked). Without the correction {n_raw} would be "
               f"marked, of which about {0.05 * n_tests:.1f} are expected by chance alone when nothing differs.")
    widths = []
    for k in (K.FID, K.KID_MEAN, K.COMPLETION_FID, K.NLL_BITS_PER_TOKEN):
        half = [(e.ci[1] - e.ci[0]) / 2 for pt in points if (e := pt.est[k]).ci is not None]
        if half:
            # Two independent estimates with half-width h differ significantly (unadjusted) at about sqrt(2) h.
            widths.append(f"{KEYS[k].title} ±{np.median(half):.{KEYS[k].digits}f} (a gap below about "
                          f"{math.sqrt(2) * np.median(half):.{KEYS[k].digits}f} cannot be resolved)")
    if widths:
        out.append("Median 95% half-widths: " + "; ".join(widths) + ".")
    ref_nll = nll_values(ref.jobs.iloc[0])
    for pt in points:
        if pt is ref or ref_nll is None:
            continue
        other = nll_values(pt.jobs.iloc[0])
        # The same weights through another prior's code: equal per-sequence NLL up to float rounding.
        if other is not None and other.shape == ref_nll.shape and np.allclose(other, ref_nll, rtol=1e-6, atol=1e-9):
            tested = {k: v for k, v in pt.significant.items() if v is not None and k != K.NLL_BITS_PER_TOKEN}
            sig = [KEYS[k].title for k, v in tested.items() if v]
            out.append(f"A/A check: {pt.name} is the same model as the {ref.label} row (identical "
                       f"per-sequence NLL), sampled with other random streams; {len(sig)} of its {len(tested)} "
                       f"sample-metric comparisons came out significant" + (f" ({', '.join(sig)})." if sig else
                                                                              ", as it should."))
    return out


def copies_text(points: list[Point]) -> list[str]:
    """What the Train match column means, and how many samples were exact copies of a training grid."""
    if not any(finite(pt.est[K.TRAIN_MATCH].value) for pt in points):
        return []

    def values(pt: Point, key: str) -> list[float]:
        return [v for v in pt.jobs.get(key, []) if finite(v)]

    n = [v for pt in points for v in values(pt, K.N_MATCH_SAMPLES)]
    worst = max(((max(vs), pt) for pt in points if (vs := values(pt, K.TRAIN_COPIES))), key=lambda c: c[0],
                default=None)
    return ["Train match: per sample, the largest share of token positions its grid shares with one training grid "
            "(1 = a copy), averaged" + (f" over {fmt_value(max(n), 0)} samples" if n else "")
            + "; the baseline rows give the level of unseen images (the val images' own codes). The reference is "
            "drawn from the train split, so sample metrics reward recall: a row well above the baseline level owes "
            "part of its FID to it. Exact copies of a training grid: "
            + ("none in any row." if worst is None or worst[0] == 0 else
               f"at most {100 * worst[0]:.1f}% of the samples ({worst[1].name}; `train_copies` in results.csv)."), ""]


def training_table(df: pd.DataFrame) -> str:
    """One row per training run (distinct train_key): each unit's best selection-split value and step, their sum,
    time."""
    lines = []
    ranks = prior_ranks(df)
    ok = df[(df[K.STATUS] == "ok") & df[K.TRAIN_KEY].notna()].drop_duplicates(subset=[K.TRAIN_KEY])
    for _, r in ok.iterrows():
        units = r.get(K.TRAIN_UNITS) or {}
        if not isinstance(units, dict) or not units:
            continue
        cells = "; ".join(f"{u} {v['best_val']:.3f} ({v['best_step']})" for u, v in units.items())
        total = sum(v["best_val"] for v in units.values())
        minutes = [f"{r.get(k) / 60:.1f}" if finite(r.get(k)) else "n/a"
                   for k in (K.TRAIN_SECONDS, K.TRAIN_WALL_SECONDS)]
        T = r.get(K.T) if r.get(K.T_APPLIES) == "training" else "–"
        lines.append(((ranks[r[K.PRIOR]], T if T != "–" else 0, r.get(K.SEED) or 0),
                      f"| {label_of(r)} | {T} | {r.get(K.SEED)} | {cells} | {total:.3f} | {' | '.join(minutes)} |"))
    if not lines:
        return ""
    return "\n".join(["| Prior | T | seed | per model: best on selection split (step) | sum | train min (summed) "
                      "| wall min |",
                      "|---|---|---|---|---|---|---|", *[ln for _, ln in sorted(lines)]])


def cost_table(df: pd.DataFrame) -> str:
    """Per job: the plan's estimated minutes on each device beside the measured job minutes."""
    if K.PLAN_HOURS not in df.columns:
        return ""
    rows = df[df[K.PLAN_HOURS].apply(lambda h: isinstance(h, dict) and bool(h))]
    if rows.empty:
        return ""
    devices = list(dict.fromkeys(name for h in rows[K.PLAN_HOURS] for name in h))
    ranks = prior_ranks(df)
    lines = []
    for _, r in rows.iterrows():
        planned = [f"{60 * r[K.PLAN_HOURS][d]:.3g}" if d in r[K.PLAN_HOURS] else "n/a" for d in devices]
        measured = f"{r[K.JOB_SECONDS] / 60:.2f}" if finite(r.get(K.JOB_SECONDS)) else "n/a"
        lines.append(((ranks[r[K.PRIOR]], r.get(K.T) or 0, r.get(K.SEED) or 0),
                      f"| {label_of(r)} | {r.get(K.T)} | {r.get(K.SEED)} | {' | '.join(planned)} | {measured} |"))
    head = " | ".join(f"planned min, {d}" for d in devices)
    return "\n".join([f"| Prior | T | seed | {head} | measured job min |", "|---" * (len(devices) + 4) + "|",
                      *[ln for _, ln in sorted(lines)]])


# ---- figures ---------------------------------------------------------------

@dataclass
class Figures:
    """The figures of one report: shared colours per prior, one line per (prior, settings) group."""
    points: list[Point]
    out: Path
    made: list[tuple[str, str]] = field(default_factory=list)  # (caption, path relative to the report)

    def __post_init__(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        self.plt = plt
        self.out.mkdir(parents=True, exist_ok=True)
        palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        priors = dict.fromkeys(pt.prior for pt in self.points)
        self.colors = {prior: palette[i % len(palette)] for i, prior in enumerate(priors)}
        self.labels = {pt.prior: pt.label for pt in self.points}
        self.groups: dict[tuple, list[Point]] = {}
        for pt in self.points:
            self.groups.setdefault((pt.prior, tuple(sorted(pt.settings.items()))), []).append(pt)

    def name_of(self, prior: str, settings: tuple) -> str:
        return self.labels[prior] + ("" if not settings else " (" + ", ".join(f"{k}={shown_setting(v)}" for k, v in settings)
                                                                + ")")

    def save(self, fig: Any, fname: str, title: str) -> None:
        fig.tight_layout()
        fig.savefig(self.out / f"{fname}.png", dpi=120)
        fig.savefig(self.out / f"{fname}.pdf", metadata={"CreationDate": None})  # the same figure, the same bytes
        self.plt.close(fig)
        self.made.append((title, f"figures/{fname}.png"))

    def finish(self, fig: Any, ax: Any, xlabel: str, ylabel: str, fname: str, title: str) -> None:
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=8 if len(title) > 45 else None)  # a long title stays inside the figure
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        self.save(fig, fname, title)

    def vs_T(self, key: str, ylabel: str, fname: str, title: str) -> None:
        """One line per group over T (95% error bars); a prior T does not apply to as a band."""
        fig, ax = self.plt.subplots(figsize=(5, 3.5))
        drawn = False
        for (prior, settings), pts in self.groups.items():
            pts = [p for p in pts if finite(p.est[key].value)]
            if not pts:
                continue
            drawn = True
            color = self.colors.get(prior)
            if pts[0].T is None:  # T does not apply: a horizontal line with its interval
                e = pts[0].est[key]
                ax.axhline(e.value, color=color, ls="--", label=self.name_of(prior, settings))
                if e.ci:
                    ax.axhspan(e.ci[0], e.ci[1], color=color, alpha=0.15)
                continue
            pts.sort(key=lambda p: p.T)
            ms = [p.est[key].value for p in pts]
            err = np.array([[m - (p.est[key].ci or (m, m))[0], (p.est[key].ci or (m, m))[1] - m]
                            for p, m in zip(pts, ms)]).T
            ax.errorbar([p.T for p in pts], ms, yerr=err, marker="o", capsize=3, color=color,
                        label=self.name_of(prior, settings))
        if not drawn:
            self.plt.close(fig)
            return
        self.finish(fig, ax, "T (chain length / sampling steps)", ylabel, fname, title)

    def fid_vs_speed(self) -> None:
        """FID against seconds per image, log scale; T annotated where it applies."""
        from matplotlib.ticker import LogFormatterSciNotation, NullFormatter

        speed = K.SAMPLE_SECONDS_PER_IMAGE
        pts = [p for p in self.points if finite(p.est[K.FID].value) and finite(p.est[speed].value)]
        if not pts:
            return
        fig, ax = self.plt.subplots(figsize=(5, 3.5))
        for (prior, settings), group in self.groups.items():
            rs = sorted((p for p in group if p in pts), key=lambda p: p.est[speed].value)
            if not rs:
                continue
            xs = [p.est[speed].value for p in rs]
            ys = [p.est[K.FID].value for p in rs]
            ax.plot(xs, ys, marker="o", color=self.colors.get(prior), label=self.name_of(prior, settings),
                    ls="none" if rs[0].T is None else "-")
            for p, x, y in zip(rs, xs, ys):
                if p.T is not None:
                    ax.annotate(f"T={p.T}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(LogFormatterSciNotation())
        ax.xaxis.set_minor_formatter(NullFormatter())
        batch = pts[0].jobs.iloc[0].get(K.BATCH_SIZE)
        self.finish(fig, ax, "seconds per image (token generation" + (f", batch {batch})" if finite(batch) else ")"),
                    "FID ↓", "fid_vs_speed", "Quality vs sampling speed")


NLL_KIND_WORDS = {"exact": "exact", "elbo": "ELBO", "order_bound": "sampler bound"}


def nll_kinds_text(points: list[Point]) -> str:
    """What each prior's NLL is, from the kinds its jobs recorded: "AR (Taming) exact; ImageBART ELBO"."""
    kinds: dict[str, list[str]] = {}
    for pt in points:
        kind = pt.jobs.iloc[0].get(K.NLL_KIND)
        if isinstance(kind, str) and kind not in kinds.setdefault(pt.label, []):
            kinds[pt.label].append(kind)
    return "; ".join(f"{label} {', '.join(NLL_KIND_WORDS.get(k, k) for k in ks)}" for label, ks in kinds.items() if ks)


def figures(points: list[Point], out: Path) -> list[tuple[str, str]]:
    """The report's figures as (caption, relative path): FID, NLL and completion FID over T, FID vs speed."""
    f = Figures(points, out)
    f.vs_T(K.FID, "FID ↓ (95% interval)", "fid_vs_T", "FID vs T")
    kinds = nll_kinds_text(points)
    f.vs_T(K.NLL_BITS_PER_TOKEN, "bits per token ↓", "nll_vs_T", "NLL vs T" + (f" ({kinds})" if kinds else ""))
    f.vs_T(K.COMPLETION_FID, "completion FID ↓", "completion_fid_vs_T", "Upper-half completion FID vs T")
    f.fid_vs_speed()
    return f.made


# ---- machine-readable outputs ----------------------------------------------

def summary_frame(points: list[Point], ref: Point | None) -> pd.DataFrame:
    """One row per point: mean, standard error, 95% interval, p-value against the reference, significance."""
    rows = []
    for pt in points:
        # Plain str column names (not bench.keys.Key): the table goes on to W&B, which checks exact types.
        row: dict[str, Any] = {str(K.PRIOR): pt.prior, str(K.T): pt.T, **pt.settings, "n_seeds": pt.n_seeds,
                               "is_reference": pt is ref}
        for k, e in pt.est.items():
            row[str(k)] = e.value if finite(e.value) else None
            row[f"{k}_se"] = e.se
            row[f"{k}_ci_lo"], row[f"{k}_ci_hi"] = e.ci if e.ci else (None, None)
            if k in pt.p:
                row[f"{k}_p"] = pt.p[k]
                row[f"{k}_significant"] = pt.significant.get(k)
        rows.append(row)
    return pd.DataFrame(rows)


def latex_table(points: list[Point]) -> str:
    """booktabs: mean ± 95% half-width, the best value of each column in bold; the tested columns, FD ones
    included where some point has them."""
    keys = tested_keys(points)
    best = {}
    for k in keys:
        vals = [pt.est[k].value for pt in points if finite(pt.est[k].value)]
        if vals and KEYS[k].lower_is_better is not None:
            best[k] = min(vals) if KEYS[k].lower_is_better else max(vals)
    lines = [r"\begin{tabular}{ll" + "r" * len(keys) + "}", r"\toprule",
             "Prior & $T$ & " + " & ".join(KEYS[k].title.replace("%", r"\%") for k in keys) + r" \\", r"\midrule"]
    for pt in points:
        cells = []
        for k in keys:
            e, d = pt.est[k], KEYS[k].digits
            if not finite(e.value):
                cells.append("--")
                continue
            text = f"{e.value:.{d}f}"
            if e.ci:
                text += rf" $\pm$ {(e.ci[1] - e.ci[0]) / 2:.{d}f}"
            cells.append(rf"\textbf{{{text}}}" if best.get(k) == e.value else text)
        T = "--" if pt.T is None else str(pt.T)
        lines.append(f"{pt.label} & {T} & " + " & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", ""]
    return "\n".join(lines)


# ---- the report ------------------------------------------------------------

def shown_path(path: Path) -> str:
    """A path as the reader knows it: relative to the working directory when it lies below it."""
    rel = os.path.relpath(Path(path).resolve())
    return rel if not rel.startswith("..") else str(path)


@dataclass
class Sweep:
    """What every section of the report reads: the jobs, their points and the test against the reference row."""
    sweep_dirs: list[Path]
    out: Path
    df: pd.DataFrame  # the fresh jobs
    stale: pd.DataFrame  # job folders of an earlier launch, ignored
    points: list[Point]
    ref: Point | None
    n_tests: int

    @property
    def ok(self) -> pd.DataFrame:
        return self.df[self.df[K.STATUS] == "ok"]

    @property
    def failed(self) -> pd.DataFrame:
        return self.df[self.df[K.STATUS] != "ok"]

    @property
    def first(self) -> pd.Series | None:
        return self.ok.iloc[0] if len(self.ok) else None


def load_sweep(sweep_dirs: list[Path], out: Path) -> Sweep:
    all_jobs = load_results(*sweep_dirs, include_stale=True)
    df = drop_stale(all_jobs, sweep_dirs)
    points = points_of(df)
    compare_to = next((v for v in df.get("cfg.compare_to", pd.Series(dtype=object)) if isinstance(v, str)), None)
    ref = next((pt for pt in points if pt.prior == compare_to), None)
    n_tests = test_against(points, ref)
    return Sweep(list(sweep_dirs), Path(out), df, all_jobs[all_jobs["stale"]], points, ref, n_tests)


def header_section(sw: Sweep, title: str | None) -> list[str]:
    stale = (f"; {len(sw.stale)} stale job folder(s) of an earlier launch under the same name ignored"
             if len(sw.stale) else "")
    return [f"# {title or 'priorbench report: ' + sw.out.name}", "",
            f"{len(sw.df)} jobs ({len(sw.ok)} ok, {len(sw.failed)} failed) from "
            + ", ".join(f"`{shown_path(d)}`" for d in sw.sweep_dirs) + stale
            + ". A point is every setting except the seed; a prior that T does not apply to is shown once. "
            + t_meaning(sw.df), ""]


def main_section(sw: Sweep) -> list[str]:
    """The main table, what N and the intervals are, closeness to the training set, what the sweep resolves."""
    baselines = next((b for b in sw.ok.get(K.BASELINES, []) if isinstance(b, dict)), None)
    md = ["## Main results", "", main_table(sw.points, baselines, sw.ref), ""]
    first = sw.first
    if first is None:
        return md
    n_s, n_c = first.get(K.N_SAMPLES), first.get(K.N_COMPLETIONS)
    md += [f"N per column: FID, KID, IS and PRDC at N = {fmt_value(n_s, 0)} samples (PRDC against as many reference "
           f"images); completion FID at N = {fmt_value(n_c, 0)} completions; the reference is a seeded random "
           f"sample of {fmt_value(first.get(K.N_REFERENCE), 0)} train images, the same for every row and "
           f"column. Baseline rows are at the same N: real val images (the best a prior can reach at that N) "
           f"and the tokenizer's reconstructions of them (a perfect prior over these tokens).", "",
           f"Intervals: 95%, for the metric at this N with the reference fixed. One seed: FID and completion FID "
           f"from subsets of the samples drawn without replacement at two sizes "
           f"({fmt_value(first.get(K.N_BOOTSTRAP), 0)} replicates); KID from its U-statistic variance; PRDC from "
           "subsets (coverage at two sizes), recall and coverage with a binomial floor; IS from the bootstrap "
           "(docs/protocol.md); NLL: mean ± 1.96 standard errors over validation sequences. Several seeds: mean "
           "and t-interval over seeds.", "",
           "NLL rule: every prior's NLL is its exact likelihood or the upper bound it declares (NLL kind) of the model "
           "at temperature 1 without top-k/top-p truncation, whatever the sampling settings of the row; the samples, "
           "completions and their metrics use the sampling settings. " + data_text(sw), ""]
    md += bounds_text(sw)
    md += copies_text(sw.points)
    return md + resolution_text(sw.points, sw.ref, sw.n_tests) + [""]


def released_rows(sw: Sweep) -> list[pd.Series]:
    return [r for _, r in sw.ok.iterrows() if isinstance(r.get(K.RELEASE), dict)]


def data_text(sw: Sweep) -> str:
    """Which data the rows' models saw: trained priors' selection split, released priors' none."""
    trained = [r for _, r in sw.ok.iterrows() if not isinstance(r.get(K.RELEASE), dict)]
    out = []
    if trained:
        first = trained[0]
        out.append(f"Data: each prior picks its best checkpoint on a selection split of "
                   f"{fmt_value(first.get(K.N_SELECTION), 0)} train images (whole split groups, like val; "
                   f"data.selection_seed={fmt_value(first.get(K.SELECTION_SEED), 0)}) that it does not train on; the "
                   "NLL and the completion inputs are on the val split, which neither training nor checkpoint "
                   "selection sees.")
    if released_rows(sw):
        out.append("Released rows (\"(released)\") are the authors' checkpoints evaluated as released: nothing is "
                   "trained or selected here, and what their authors trained on is theirs (Released checkpoints, "
                   "below).")
    return " ".join(out)


def released_section(sw: Sweep) -> list[str]:
    """The released rows' sources and sampling settings beside their papers'."""
    rows = released_rows(sw)
    if not rows:
        return []

    def settings(d: dict[str, Any]) -> str:
        return ", ".join(f"{k}={v}" for k, v in d.items()) or "defaults"

    lines = ["| Prior | T | files (sha256 prefix) | paper's sampling | this row's sampling | differs |",
             "|---|---|---|---|---|---|"]
    seen = set()
    notes: list[str] = []
    for r in rows:
        rec = r[K.RELEASE]
        T = "–" if r.get(K.T_APPLIES) == "none" else r.get(K.T)
        row = (f"| {label_of(r)} | {T} | " + "; ".join(f"`{name}` ({sha[:12]})" for name, sha in rec["files"])
               + f" | {settings(rec['paper_sampling'])} | {settings(rec['sampling'])} | "
               + (", ".join(rec["differs"]) or "none") + " |")
        if row not in seen:
            seen.add(row)
            lines.append(row)
        notes += [n for n in rec.get("notes") or [] if n not in notes]
    md = ["## Released checkpoints", "",
          "Each released row loads its authors' files (docs/releases.md) with their own first stage, and runs "
          "through the same sampler, NLL, completion and metric code as every other row, on this report's data and "
          "reference. Its numbers compare with the other rows of this report, not with its paper's (another "
          "reference set, N and Inception port). The sampling settings its paper reports with are listed beside the "
          "row's own; set `prior.sample.*` (and T) to match them.", "", *lines, ""]
    return md + [f"- {n}" for n in notes] + ([""] if notes else [])


def bounds_text(sw: Sweep) -> list[str]:
    """The extra bounds the priors declared (Prior.extra_bounds), with each point's value: not table columns."""
    lines = []
    for key, label in declared(sw.ok, K.EXTRA_BOUNDS).items():
        vals = [f"{pt.name} {fmt_estimate(pt.est[key], 3)}" for pt in sw.points if finite(pt.est[key].value)]
        if vals:
            lines.append(f"- {label} (`{key}`, bits/token): " + "; ".join(vals))
    return ["Other likelihood bounds the priors report:", "", *lines, ""] if lines else []


def protocol_section(sw: Sweep) -> list[str]:
    extra = sorted({k: v for u in sw.ok.get(K.UNAVAILABLE, []) if isinstance(u, dict) for k, v in u.items()}.items())
    md = ["Unavailable metrics:", ""] + [f"- `{k}`: {v}" for k, v in extra] + [""] if extra else []
    first = sw.first
    if first is None:
        return md
    col = "cfg.prior.sample.completion_passes"
    passes = sorted({str(int(v)) for v in (sw.ok[col] if col in sw.ok else []) if finite(v)})
    peak = fmt_value((first.get(K.PEAK_FLOPS) or float("nan")) / 1e9, 1)
    return md + ["Protocol: features `" + str(first.get(K.FEATURE_EXTRACTOR)) + f"`, speed at batch "
                 f"{fmt_value(first.get(K.BATCH_SIZE), 0)} on `{first.get(K.DEVICE)}` in "
                 f"{first.get(K.COMPUTE_PRECISION)} with {fmt_value(first.get(K.THREADS), 0)} thread(s), "
                 f"{'compiled' if first.get(K.COMPILE) == 'on' else 'eager'} decode steps (token generation only, "
                 "warm-up batch excluded; decoding is in results.csv); % limit = sampling's roofline time, max(model "
                 f"FLOPs / the measured matmul peak ({peak} GFLOP/s), bytes read / the measured read bandwidth), over "
                 "its measured time"
                 + (f"; completion with {', '.join(passes)} extra forward-backward pass(es) where a prior has the "
                    "option `sample.completion_passes` (0: a single masked reverse pass)" if passes else "") + ".", ""]


def tokenizer_section(sw: Sweep) -> list[str]:
    """One row per set of tokens the rows use (released rows bring their own first stage)."""
    by_tokens: dict[Any, tuple[dict[str, Any], list[str]]] = {}
    for _, r in sw.ok.iterrows():
        if isinstance(r.get(K.TOKENIZER), dict):
            t, users = by_tokens.setdefault(r.get(K.TOKENS_KEY), (r[K.TOKENIZER], []))
            if label_of(r) not in users:
                users.append(label_of(r))
    if not by_tokens:
        return []
    several = len(by_tokens) > 1
    lines = ["| " + ("rows | " if several else "") + "K_eff | codebook | usage | perplexity | grid | val PSNR (dB) | "
             "rFID (N) |", "|" + "---|" * (8 if several else 7)]
    for t, users in by_tokens.values():
        rfid = f"{t[K.RECON_FID]:.2f} ({t.get(K.RECON_FID_N)})" if finite(t.get(K.RECON_FID)) else "n/a"
        lines.append("| " + (f"{', '.join(users)} | " if several else "")
                     + f"{t.get('vocab_size')} | {t.get('n_embed')} | {100 * (t.get('codebook_usage') or 0):.1f}% | "
                       f"{(t.get('codebook_perplexity') or 0):.1f} | {'x'.join(map(str, t.get('grid') or []))} | "
                       f"{(t.get('recon_psnr') or 0):.2f} | {rfid} |")
    note = (["The rows use different tokens: the main table's baseline rows are those of the first row's tokenizer; "
             "each tokenizer's reconstruction FID is here. NLL and train match are measured in each row's own codes, "
             "so rows on different tokens are not tested against each other on those columns.", ""]
            if several else [])
    return ["## Tokenizer", "", *lines, "", *note]


def training_section(sw: Sweep) -> list[str]:
    training = training_table(sw.df)
    if not training:
        return []
    notes = {label_of(r): r.get(K.VALIDATION_NOTE) for _, r in sw.ok.iterrows()
             if isinstance(r.get(K.VALIDATION_NOTE), str) and r.get(K.VALIDATION_NOTE)}
    said = "".join(f" {label}: {note}." for label, note in notes.items())
    return ["## Training", "",
            "Best value on the selection split per trained model (bits/token, at the step in brackets; the "
            f"checkpoint the evaluation uses).{said} Jobs that share a training run are shown once.", "", training, ""]


def cost_section(sw: Sweep) -> list[str]:
    cost = cost_table(sw.df)
    if not cost:
        return []
    return ["## Cost: planned and measured", "",
            "Each job's plan before it ran (bench/cost.py: model FLOPs at a stated share of each device's peak; "
            "the job's own device at its measured matmul peak) beside the job's measured wall time. Shared "
            "stages are planned in every job but run once, so a job that found them cached takes less than "
            "planned.", "", cost, ""]


def figures_section(sw: Sweep) -> list[str]:
    figs = figures(sw.points, sw.out / "figures")
    if not figs:
        return []
    md = ["## Figures", "", "Also as PDF next to each PNG.", ""]
    for caption, rel in figs:
        md += [f"![{caption}]({rel})", ""]
    return md


def grids_section(sw: Sweep) -> list[str]:
    """Each point's sample and completion grids, copied next to the report."""
    grids = []
    varying = varying_settings(sw.points)
    for pt in sw.points:
        job = pt.jobs.iloc[0]
        name = pt.prior + ("" if pt.T is None else f"_T{pt.T}") + "".join(f"_{k}={shown_setting(v)}" for k, v in pt.settings.items()
                                                                         if k in varying)
        name = name.replace("/", "-")
        if len(name) > 120:  # file systems cap a name at 255 bytes; the full settings are in results.csv
            name = f"{name[:100]}_{hashlib.sha256(name.encode()).hexdigest()[:12]}"
        for kind in ("samples_grid", "completion_grid"):
            src = Path(job["job_dir"]) / f"{kind}.png"
            if src.is_file():
                dst = sw.out / "grids" / f"{name}_{kind}.png"
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
                grids.append((name, kind, f"grids/{dst.name}"))
    if not grids:
        return []
    md = ["## Samples and completions", "",
          "Completion grids: top row the input with its upper half masked (grey: those tokens are generated), "
          "middle the completion, bottom the tokenizer's reconstruction of the original tokens.", ""]
    for name, kind, rel in grids:
        md += [f"**{name}**, {kind.replace('_', ' ')}:", "", f"![{name} {kind}]({rel})", ""]
    return md


def failed_section(sw: Sweep) -> list[str]:
    if not len(sw.failed):
        return []
    md = ["## Failed jobs", "", "| prior | T | seed | error | job |", "|---|---|---|---|---|"]
    for _, r in sw.failed.iterrows():
        err = str(r.get(K.ERROR) or "").replace("|", "\\|")
        md += [f"| {r.get(K.PRIOR)} | {r.get(K.T)} | {r.get(K.SEED)} | {err} | `{Path(r['job_dir']).name}` |"]
    return md + [""]


def environment_section(sw: Sweep) -> list[str]:
    md = ["## Environment", ""]
    first = sw.first
    if first is not None:
        md += [f"- device: `{first.get(K.DEVICE)}`", f"- torch: `{first.get(K.TORCH)}`, CUDA: `{first.get(K.CUDA)}`",
               f"- commit: `{first.get(K.COMMIT)}`"]
    totals: dict[str, float] = {}
    for st in sw.df[K.STAGE_SECONDS]:
        for k, v in (st if isinstance(st, dict) else {}).items():
            totals[k] = totals.get(k, 0.0) + (v or 0.0)
    if totals:
        md += ["- wall time per stage, summed over jobs: " + ", ".join(f"{k} {v:.1f} s" for k, v in totals.items())]
    jobs = sw.ok if len(sw.ok) else sw.df
    cfg_path = next((Path(d) / ".hydra" / "config.yaml" for d in jobs["job_dir"]
                     if (Path(d) / ".hydra" / "config.yaml").is_file()), None)
    if cfg_path is not None:
        md += ["", "<details><summary>Resolved config of the first job</summary>", "", "```yaml",
               cfg_path.read_text().rstrip(), "```", "", "</details>"]
    return md + [""]


def write_report(sweep_dirs: list[Path], out: Path, title: str | None = None
                 ) -> tuple[Path, pd.DataFrame, pd.DataFrame]:
    """Write report.md, results.csv, summary.csv, table.tex and the figures to `out`: the tables, then the
    report's sections in order, each built by its own function from the loaded sweep.
    Returns (report.md's path, the jobs, the summary table with its intervals)."""
    sw = load_sweep(sweep_dirs, Path(out))
    out = sw.out
    out.mkdir(parents=True, exist_ok=True)
    sw.df.drop(columns=["point"]).to_csv(out / "results.csv", index=False)
    summary = summary_frame(sw.points, sw.ref)
    summary.to_csv(out / "summary.csv", index=False)
    (out / "table.tex").write_text(latex_table(sw.points))
    md = header_section(sw, title)
    for section in (main_section, released_section, protocol_section, tokenizer_section, training_section, cost_section,
                    figures_section, grids_section, failed_section, environment_section):
        md += section(sw)
    (out / "report.md").write_text("\n".join(md))
    return out / "report.md", sw.df, summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="(Re)build a priorbench report from finished sweep folders.")
    p.add_argument("sweep_dirs", nargs="+", type=Path, help="sweep folders (multirun/NAME) holding job results")
    p.add_argument("--out", type=Path, default=None, help="report folder (default: reports/<first sweep name>)")
    args = p.parse_args(argv)
    out = args.out or Path("reports") / args.sweep_dirs[0].resolve().name
    try:
        path, _, _ = write_report(args.sweep_dirs, out)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"report written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
