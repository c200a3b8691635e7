"""Build `reports/<name>/` from finished sweep folders (DESIGN.md section 6).

    python bench/report.py multirun/NAME [more sweep dirs...] [--out reports/NAME]

Needs no torch: every table is a groupby of `bench.results.load_results(...)`. A point is every override
except seed and name; seeds are aggregated within a point (mean and 95% t-interval), a single seed shows its
interval over its samples. Each point is tested against the `compare_to` prior's row (bench/stats.py), with Holm's
correction over the table.
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench import stats as S
from bench.results import BASELINE_KEYS, COLUMN_KEYS, KEYS, ResultsError, drop_stale, finite, load_results

ReportError = ResultsError
BASELINE_LABEL = {"real_val": "real val images", "reconstruction": "tokenizer reconstructions"}
TESTED = tuple(k for k in COLUMN_KEYS if KEYS[k].interval)  # columns tested against the compare_to row


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
    ci, se = row.get(f"{key}_ci"), row.get(f"{key}_se")
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
    return {prior: i for i, prior in reversed(list(enumerate(df["prior"])))}


def label_of(row: Any) -> str:
    return row.get("prior_label") if isinstance(row.get("prior_label"), str) else row["prior"]


def points_of(df: pd.DataFrame) -> list[Point]:
    ok = df[df["status"] == "ok"]
    # A prior whose T does not apply shares one evaluation over its T values: one job per (point, seed).
    ok = ok.drop_duplicates(subset=["point", "seed"], keep="first")
    points = []
    ranks = prior_ranks(df)
    for key, jobs in ok.groupby("point", sort=False):
        j = jobs.iloc[0]
        settings = {k: v for k, v in key if k not in ("prior", "T")}
        T = None if j.get("T_applies") == "none" else j.get("T")
        pt = Point(key, j["prior"], label_of(j), T, settings, jobs.sort_values("seed"), rank=ranks[j["prior"]])
        for k in COLUMN_KEYS + ("elbo_eq6_bits_per_token",):
            pt.est[k] = estimate(pt.jobs, k)
        points.append(pt)
    return sorted(points, key=Point.order)


def nll_values(job: pd.Series) -> np.ndarray | None:
    path = Path(job["job_dir"]) / "nll_per_sequence.npy"
    return _load_nll(str(path), path.stat().st_mtime_ns) if path.is_file() else None


@functools.lru_cache(maxsize=256)
def _load_nll(path: str, mtime_ns: int) -> np.ndarray:
    """Read once per file version: every point's test and the A/A check load the reference row's array."""
    return np.load(path)


def compare(pt: Point, ref: Point, key: str) -> float | None:
    """p-value of pt == ref on one metric."""
    if pt.n_seeds >= 2 and ref.n_seeds >= 2:
        return S.welch_test([v for v in pt.jobs[key] if finite(v)], [v for v in ref.jobs[key] if finite(v)])
    if key == "nll_bits_per_token":
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
    family = [(pt, k) for pt in points if pt is not ref for k in TESTED]
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
             for (lab, applies), _ in df.groupby(["prior_label", "T_applies"], sort=False, dropna=True)]
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


def varying_settings(points: list[Point]) -> list[str]:
    keys = sorted({k for pt in points for k in pt.settings})
    return [k for k in keys if len({pt.settings.get(k) for pt in points}) > 1]


def main_table(points: list[Point], baselines: dict[str, Any] | None, ref: Point | None) -> str:
    extra = varying_settings(points)
    head = ["Prior", "T", *extra, "seeds", *(KEYS[k].title for k in COLUMN_KEYS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if baselines:
        for name in ("real_val", "reconstruction"):
            row = baselines.get(name) or {}
            cells = []
            for k in COLUMN_KEYS:
                if k in BASELINE_KEYS and finite(row.get(k)):
                    cells.append(fmt_estimate(row_estimate(row, k), KEYS[k].digits))
                else:
                    cells.append("–")
            lines.append(f"| *{BASELINE_LABEL[name]}* | – | " + "– | " * len(extra) + "– | " + " | ".join(cells) + " |")
    for pt in points:
        cells = []
        for k in COLUMN_KEYS:
            cell = fmt_estimate(pt.est[k], KEYS[k].digits)
            if k == "nll_bits_per_token" and cell != "n/a":
                kind = pt.jobs.iloc[0].get("nll_kind")
                cell += {"exact": " (exact)", "elbo": " (≤, ELBO)", "order_bound": " (≤, sampler bound)"}.get(kind, "")
            if pt.significant.get(k):
                cell += " *"
            cells.append(cell)
        T = "–" if pt.T is None else str(pt.T)
        mark = " (ref.)" if pt is ref else ""
        lines.append(f"| {pt.label}{mark} | {T} | " + "".join(f"{pt.settings.get(k, '')} | " for k in extra)
                     + f"{pt.n_seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def resolution_text(points: list[Point], ref: Point | None, n_tests: int) -> list[str]:
    """In words: what the sweep can and cannot resolve, and what the A/A pair (if any) found."""
    out = []
    if ref is None:
        return ["No row of the `compare_to` prior: no significance tests."]
    n_sig = sum(bool(v) for pt in points for v in pt.significant.values())
    n_raw = sum(1 for pt in points for p in pt.p.values() if p is not None and p < 0.05)
    out.append(f"`*`: differs from the {ref.label} row at the 95% level after Holm's correction over the "
               f"table's {n_tests} comparisons ({n_sig} marked). Without the correction {n_raw} would be marked, "
               f"of which about {0.05 * n_tests:.1f} are expected by chance alone when nothing differs.")
    widths = []
    for k in ("fid", "kid_mean", "completion_fid", "nll_bits_per_token"):
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
            tested = {k: v for k, v in pt.significant.items() if v is not None and k != "nll_bits_per_token"}
            sig = [KEYS[k].title for k, v in tested.items() if v]
            out.append(f"A/A check: {pt.name} is the same model as the {ref.label} row (identical "
                       f"per-sequence NLL), sampled with other random streams; {len(sig)} of its {len(tested)} "
                       f"sample-metric comparisons came out significant" + (f" ({', '.join(sig)})." if sig else
                                                                              ", as it should."))
    return out


def copies_text(points: list[Point]) -> list[str]:
    """What the Train match column means, and how many samples were exact copies of a training grid."""
    if not any(finite(pt.est["train_match"].value) for pt in points):
        return []

    def values(pt: Point, key: str) -> list[float]:
        return [v for v in pt.jobs.get(key, []) if finite(v)]

    n = [v for pt in points for v in values(pt, "n_match_samples")]
    worst = max(((max(vs), pt) for pt in points if (vs := values(pt, "train_copies"))), key=lambda c: c[0],
                default=None)
    return ["Train match: per sample, the largest share of token positions its grid shares with one training grid "
            "(1 = a copy), averaged" + (f" over {fmt_value(max(n), 0)} samples" if n else "")
            + "; the baseline rows give the level of unseen images (the val images' own codes). The reference is "
            "drawn from the train split, so sample metrics reward recall: a row well above the baseline level owes "
            "part of its FID to it. Exact copies of a training grid: "
            + ("none in any row." if worst is None or worst[0] == 0 else
               f"at most {100 * worst[0]:.1f}% of the samples ({worst[1].name}; `train_copies` in results.csv)."), ""]


def training_table(df: pd.DataFrame) -> str:
    """One row per training run (distinct train_key): each unit's best validation value and step, their sum, time."""
    lines = []
    ranks = prior_ranks(df)
    ok = df[(df["status"] == "ok") & df["train_key"].notna()].drop_duplicates(subset=["train_key"])
    for _, r in ok.iterrows():
        units = r.get("train_units") or {}
        if not isinstance(units, dict) or not units:
            continue
        cells = "; ".join(f"{u} {v['best_val']:.3f} ({v['best_step']})" for u, v in units.items())
        total = sum(v["best_val"] for v in units.values())
        minutes = [f"{r.get(k) / 60:.1f}" if finite(r.get(k)) else "n/a"
                   for k in ("train_seconds", "train_wall_seconds")]
        T = r.get("T") if r.get("T_applies") == "training" else "–"
        lines.append(((ranks[r["prior"]], T if T != "–" else 0, r.get("seed") or 0),
                      f"| {label_of(r)} | {T} | {r.get('seed')} | {cells} | {total:.3f} | {' | '.join(minutes)} |"))
    if not lines:
        return ""
    return "\n".join(["| Prior | T | seed | per model: best val (step) | sum | train min (summed) | wall min |",
                      "|---|---|---|---|---|---|---|", *[ln for _, ln in sorted(lines)]])


def cost_table(df: pd.DataFrame) -> str:
    """Per job: the plan's estimated minutes on each device beside the measured job minutes."""
    if "plan_hours" not in df.columns:
        return ""
    rows = df[df["plan_hours"].apply(lambda h: isinstance(h, dict) and bool(h))]
    if rows.empty:
        return ""
    devices = list(dict.fromkeys(name for h in rows["plan_hours"] for name in h))
    ranks = prior_ranks(df)
    lines = []
    for _, r in rows.iterrows():
        planned = [f"{60 * r['plan_hours'][d]:.3g}" if d in r["plan_hours"] else "n/a" for d in devices]
        measured = f"{r['job_seconds'] / 60:.2f}" if finite(r.get("job_seconds")) else "n/a"
        lines.append(((ranks[r["prior"]], r.get("T") or 0, r.get("seed") or 0),
                      f"| {label_of(r)} | {r.get('T')} | {r.get('seed')} | {' | '.join(planned)} | {measured} |"))
    head = " | ".join(f"planned min, {d}" for d in devices)
    return "\n".join([f"| Prior | T | seed | {head} | measured job min |", "|---" * (len(devices) + 4) + "|",
                      *[ln for _, ln in sorted(lines)]])


# ---- figures ---------------------------------------------------------------

def figures(points: list[Point], out: Path) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogFormatterSciNotation, NullFormatter

    out.mkdir(parents=True, exist_ok=True)
    made = []
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {prior: palette[i % len(palette)] for i, prior in enumerate(dict.fromkeys(pt.prior for pt in points))}
    labels = {pt.prior: pt.label for pt in points}
    groups: dict[tuple, list[Point]] = {}
    for pt in points:
        groups.setdefault((pt.prior, tuple(sorted(pt.settings.items()))), []).append(pt)

    def name_of(prior: str, settings: tuple) -> str:
        return labels[prior] + ("" if not settings else " (" + ", ".join(f"{k}={v}" for k, v in settings) + ")")

    def save(fig, fname: str, title: str) -> None:
        fig.tight_layout()
        fig.savefig(out / f"{fname}.png", dpi=120)
        fig.savefig(out / f"{fname}.pdf", metadata={"CreationDate": None})  # the same figure, the same bytes
        plt.close(fig)
        made.append((title, f"figures/{fname}.png"))

    def vs_T(key: str, ylabel: str, fname: str, title: str) -> None:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        drawn = False
        for (prior, settings), pts in groups.items():
            pts = [p for p in pts if finite(p.est[key].value)]
            if not pts:
                continue
            drawn = True
            color = colors.get(prior)
            if pts[0].T is None:  # T does not apply: a horizontal line with its interval
                e = pts[0].est[key]
                ax.axhline(e.value, color=color, ls="--", label=name_of(prior, settings))
                if e.ci:
                    ax.axhspan(e.ci[0], e.ci[1], color=color, alpha=0.15)
                continue
            pts.sort(key=lambda p: p.T)
            ts = [p.T for p in pts]
            ms = [p.est[key].value for p in pts]
            err = np.array([[m - (p.est[key].ci or (m, m))[0], (p.est[key].ci or (m, m))[1] - m]
                            for p, m in zip(pts, ms)]).T
            ax.errorbar(ts, ms, yerr=err, marker="o", capsize=3, color=color, label=name_of(prior, settings))
        if not drawn:
            plt.close(fig)
            return
        ax.set_xlabel("T (chain length / sampling steps)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        save(fig, fname, title)

    vs_T("fid", "FID ↓ (95% interval)", "fid_vs_T", "FID vs T")
    vs_T("nll_bits_per_token", "bits per token ↓", "nll_vs_T", "NLL vs T (AR exact; others upper bounds)")
    vs_T("completion_fid", "completion FID ↓", "completion_fid_vs_T", "Upper-half completion FID vs T")

    pts = [p for p in points if finite(p.est["fid"].value) and finite(p.est["sample_seconds_per_image"].value)]
    if pts:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for (prior, settings), group in groups.items():
            rs = sorted((p for p in group if p in pts), key=lambda p: p.est["sample_seconds_per_image"].value)
            if not rs:
                continue
            xs = [p.est["sample_seconds_per_image"].value for p in rs]
            ys = [p.est["fid"].value for p in rs]
            ax.plot(xs, ys, marker="o", color=colors.get(prior), label=name_of(prior, settings),
                    ls="none" if rs[0].T is None else "-")
            for p, x, y in zip(rs, xs, ys):
                if p.T is not None:
                    ax.annotate(f"T={p.T}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(LogFormatterSciNotation())
        ax.xaxis.set_minor_formatter(NullFormatter())
        batch = pts[0].jobs.iloc[0].get("batch_size")
        ax.set_xlabel("seconds per image (token generation" + (f", batch {batch})" if finite(batch) else ")"))
        ax.set_ylabel("FID ↓")
        ax.set_title("Quality vs sampling speed")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        save(fig, "fid_vs_speed", "Quality vs sampling speed")
    return made


# ---- machine-readable outputs ----------------------------------------------

def summary_frame(points: list[Point], ref: Point | None) -> pd.DataFrame:
    """One row per point: mean, standard error, 95% interval, p-value against the reference, significance."""
    rows = []
    for pt in points:
        row: dict[str, Any] = {"prior": pt.prior, "T": pt.T, **pt.settings, "n_seeds": pt.n_seeds,
                               "is_reference": pt is ref}
        for k, e in pt.est.items():
            row[k] = e.value if finite(e.value) else None
            row[f"{k}_se"] = e.se
            row[f"{k}_ci_lo"], row[f"{k}_ci_hi"] = e.ci if e.ci else (None, None)
            if k in pt.p:
                row[f"{k}_p"] = pt.p[k]
                row[f"{k}_significant"] = pt.significant.get(k)
        rows.append(row)
    return pd.DataFrame(rows)


def latex_table(points: list[Point]) -> str:
    """booktabs: mean ± 95% half-width, the best value of each column in bold."""
    keys = TESTED
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


def write_report(sweep_dirs: list[Path], out: Path, title: str | None = None
                 ) -> tuple[Path, pd.DataFrame, pd.DataFrame]:
    """Write report.md, results.csv, summary.csv, table.tex and the figures to `out`.
    Returns (report.md's path, the jobs, the summary table with its intervals)."""
    all_jobs = load_results(*sweep_dirs, include_stale=True)
    stale = all_jobs[all_jobs["stale"]]
    df = drop_stale(all_jobs, sweep_dirs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ok = df[df["status"] == "ok"]
    failed = df[df["status"] != "ok"]
    points = points_of(df)
    compare_to = next((v for v in df.get("cfg.compare_to", pd.Series(dtype=object)) if isinstance(v, str)), None)
    ref = next((pt for pt in points if pt.prior == compare_to), None)
    n_tests = test_against(points, ref)
    baselines = next((b for b in ok.get("baselines", []) if isinstance(b, dict)), None)

    df.drop(columns=["point"]).to_csv(out / "results.csv", index=False)
    summary = summary_frame(points, ref)
    summary.to_csv(out / "summary.csv", index=False)
    (out / "table.tex").write_text(latex_table(points))

    first = ok.iloc[0] if len(ok) else None
    md = [f"# {title or 'priorbench report: ' + out.name}", ""]
    md += [f"{len(df)} jobs ({len(ok)} ok, {len(failed)} failed) from "
           + ", ".join(f"`{shown_path(d)}`" for d in sweep_dirs)
           + (f"; {len(stale)} stale job folder(s) of an earlier launch under the same name ignored" if len(stale) else "")
           + ". A point is every setting except the seed; a prior that T does not apply to is shown once. "
           + t_meaning(df), ""]
    md += ["## Main results", "", main_table(points, baselines, ref), ""]
    if first is not None:
        n_s, n_c = first.get("n_samples"), first.get("n_completions")
        md += [f"N per column: FID, KID, IS and PRDC at N = {fmt_value(n_s, 0)} samples (PRDC against as many reference "
               f"images); completion FID at N = {fmt_value(n_c, 0)} completions; the reference is a seeded random "
               f"sample of {fmt_value(first.get('n_reference'), 0)} train images, the same for every row and "
               f"column. Baseline rows are at the same N: real val images (the best a prior can reach at that N) "
               f"and the tokenizer's reconstructions of them (a perfect prior over these tokens).", "",
               f"Intervals: 95%, for the metric at this N with the reference fixed. One seed: FID and completion FID "
               f"from subsets of the samples drawn without replacement at two sizes "
               f"({fmt_value(first.get('n_bootstrap'), 0)} replicates); KID from its U-statistic variance; PRDC from "
               "subsets (coverage at two sizes), recall and coverage with a binomial floor; IS from the bootstrap "
               "(docs/protocol.md); NLL: mean ± 1.96 standard errors over validation sequences. Several seeds: mean "
               "and t-interval over seeds.", ""]
        md += copies_text(points)
        md += resolution_text(points, ref, n_tests) + [""]
    extra = sorted({k: v for u in ok.get("unavailable", []) if isinstance(u, dict) for k, v in u.items()}.items())
    if extra:
        md += ["Unavailable metrics:", ""] + [f"- `{k}`: {v}" for k, v in extra] + [""]
    col = "cfg.prior.sample.completion_passes"
    passes = sorted({str(int(v)) for v in (ok[col] if col in ok else []) if finite(v)})
    if first is not None:
        md += ["Protocol: features `" + str(first.get("feature_extractor")) + f"`, speed at batch "
               f"{fmt_value(first.get('batch_size'), 0)} on `{first.get('device')}` in "
               f"{first.get('compute_precision')} with {fmt_value(first.get('threads'), 0)} thread(s), "
               f"{'compiled' if first.get('compile') == 'on' else 'eager'} decode steps (token generation only, "
               "warm-up batch excluded; decoding is in results.csv); % peak = model FLOPs of sampling per second "
               f"over the device's measured matmul peak ({fmt_value((first.get('peak_flops') or float('nan')) / 1e9, 1)} "
               "GFLOP/s)"
               + (f"; completion with {', '.join(passes)} extra forward-backward pass(es) where a prior has the option "
                  "(0: ImageBART Tab. 3's single masked reverse pass)" if passes else "") + ".", ""]

    toks = [t for t in ok.get("tokenizer", []) if isinstance(t, dict)]
    if toks:
        t = toks[0]
        md += ["## Tokenizer", "", "| K_eff | codebook | usage | perplexity | grid | val PSNR (dB) | rFID (N) |",
               "|---|---|---|---|---|---|---|",
               f"| {t.get('vocab_size')} | {t.get('n_embed')} | {100 * (t.get('codebook_usage') or 0):.1f}% | "
               f"{(t.get('codebook_perplexity') or 0):.1f} | {'x'.join(map(str, t.get('grid') or []))} | "
               f"{(t.get('recon_psnr') or 0):.2f} | " + (f"{t['recon_fid']:.2f} ({t.get('recon_fid_n')})"
                                                        if finite(t.get("recon_fid")) else "n/a") + " |", ""]

    training = training_table(df)
    if training:
        md += ["## Training", "",
               "Best validation value per trained model (bits/token, at the step in brackets; the checkpoint the "
               "evaluation uses). ImageBART's scale 2 is Eq. 8's cross-entropy and scales t > 2 the Eq. 7 KL terms, "
               "so their sum is its ELBO on the validation batches; absorbing's is its Eq. 6 ELBO. Jobs that share "
               "a training run are shown once.", "", training, ""]

    cost = cost_table(df)
    if cost:
        md += ["## Cost: planned and measured", "",
               "Each job's plan before it ran (bench/cost.py: model FLOPs at a stated share of each device's peak; "
               "the job's own device at its measured matmul peak) beside the job's measured wall time. Shared "
               "stages are planned in every job but run once, so a job that found them cached takes less than "
               "planned.", "", cost, ""]

    figs = figures(points, out / "figures")
    if figs:
        md += ["## Figures", "", "Also as PDF next to each PNG.", ""]
        for caption, rel in figs:
            md += [f"![{caption}]({rel})", ""]

    grids = []
    varying = varying_settings(points)
    for pt in points:
        job = pt.jobs.iloc[0]
        name = pt.prior + ("" if pt.T is None else f"_T{pt.T}") + "".join(f"_{k}={v}" for k, v in pt.settings.items()
                                                                         if k in varying)
        name = name.replace("/", "-")
        for kind in ("samples_grid", "completion_grid"):
            src = Path(job["job_dir"]) / f"{kind}.png"
            if src.is_file():
                dst = out / "grids" / f"{name}_{kind}.png"
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
                grids.append((name, kind, f"grids/{dst.name}"))
    if grids:
        md += ["## Samples and completions", "",
               "Completion grids: top row the input with its upper half masked (grey: those tokens are generated), "
               "middle the completion, bottom the tokenizer's reconstruction of the original tokens.", ""]
        for name, kind, rel in grids:
            md += [f"**{name}**, {kind.replace('_', ' ')}:", "", f"![{name} {kind}]({rel})", ""]

    if len(failed):
        md += ["## Failed jobs", "", "| prior | T | seed | error | job |", "|---|---|---|---|---|"]
        for _, r in failed.iterrows():
            err = str(r.get("error") or "").replace("|", "\\|")
            md += [f"| {r.get('prior')} | {r.get('T')} | {r.get('seed')} | {err} | `{Path(r['job_dir']).name}` |"]
        md += [""]

    md += ["## Environment", ""]
    if first is not None:
        md += [f"- device: `{first.get('device')}`", f"- torch: `{first.get('torch')}`, CUDA: `{first.get('cuda')}`",
               f"- commit: `{first.get('commit')}`"]
    totals: dict[str, float] = {}
    for st in df["stage_seconds"]:
        for k, v in (st if isinstance(st, dict) else {}).items():
            totals[k] = totals.get(k, 0.0) + (v or 0.0)
    if totals:
        md += ["- wall time per stage, summed over jobs: " + ", ".join(f"{k} {v:.1f} s" for k, v in totals.items())]
    cfg_path = next((Path(d) / ".hydra" / "config.yaml" for d in (ok if len(ok) else df)["job_dir"]
                     if (Path(d) / ".hydra" / "config.yaml").is_file()), None)
    if cfg_path is not None:
        md += ["", "<details><summary>Resolved config of the first job</summary>", "", "```yaml",
               cfg_path.read_text().rstrip(), "```", "", "</details>"]
    md += [""]
    (out / "report.md").write_text("\n".join(md))
    return out / "report.md", df, summary


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
