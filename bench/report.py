"""Build `reports/<name>/` from finished sweep folders (DESIGN.md section 6).

    python bench/report.py multirun/NAME [more sweep dirs...] [--out reports/NAME]

Needs no torch: it reads each job's results.json and .hydra/config.yaml.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

PRIOR_ORDER = ("ar", "imagebart", "absorbing")
PRIOR_LABEL = {"ar": "AR (Taming)", "imagebart": "ImageBART", "absorbing": "Absorbing (Unleashing)"}
# (results key, column title, digits, lower is better)
COLUMNS = (
    ("fid", "FID", 2), ("kid_mean", "KID", 4), ("is_mean", "IS", 2),
    ("precision", "Prec.", 3), ("recall", "Rec.", 3), ("density", "Dens.", 3), ("coverage", "Cov.", 3),
    ("nll_bits_per_token", "NLL (bits/tok)", 3), ("completion_fid", "Compl. FID", 2),
    ("sample_seconds_per_image", "s/img", 4), ("nfe", "NFE", 0), ("params", "Params", 0),
)
CSV_KEYS = ("prior", "T", "seed", "status", "error", "params", "train_steps", "train_seconds",
            "nll_bits_per_token", "nll_stderr", "nll_kind", "fid", "kid_mean", "kid_std", "is_mean", "is_std",
            "precision", "recall", "density", "coverage", "completion_fid", "sample_seconds_per_image",
            "samples_per_second", "decode_seconds_per_image", "nfe", "batch_size", "peak_memory_mb", "n_samples",
            "feature_extractor", "device", "tokens_key", "train_key", "job_dir")


class ReportError(ValueError):
    pass


# ---- collecting ------------------------------------------------------------

def find_jobs(sweep_dirs: Iterable[Path]) -> list[dict[str, Any]]:
    jobs = []
    for sweep in sweep_dirs:
        sweep = Path(sweep)
        if not sweep.is_dir():
            raise ReportError(f"{sweep}: no such sweep folder")
        for path in sorted(sweep.rglob("results.json")):
            if ".hydra" in path.parts or "wandb" in path.parts:
                continue
            try:
                r = json.loads(path.read_text())
            except ValueError as e:
                r = {"status": "failed", "error": f"unreadable results.json ({e})"}
            r["job_dir"] = str(path.parent)
            if "prior" not in r or r.get("prior") is None:
                r["prior"] = "?"
            jobs.append(r)
    if not jobs:
        raise ReportError(f"no results.json under {', '.join(map(str, sweep_dirs))}")
    return jobs


def point_of(r: dict[str, Any]) -> tuple[str, int | None]:
    """AR does not depend on T: all its T points are one row."""
    return (r["prior"], None if r["prior"] == "ar" else r.get("T"))


def job_order(r: dict[str, Any]) -> tuple[int, int, int]:
    """Sort key of jobs and rows: prior in PRIOR_ORDER (others last), then T, then seed."""
    rank = PRIOR_ORDER.index(r["prior"]) if r["prior"] in PRIOR_ORDER else len(PRIOR_ORDER)
    return rank, r.get("T") or 0, r.get("seed") or 0


def dedupe_ar(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """AR's T points reuse one result: keep one job per (seed, eval cache) so seeds are not double-counted."""
    seen, out = set(), []
    for r in jobs:
        if r.get("prior") == "ar" and r.get("status") == "ok":
            key = (r.get("seed"), r.get("eval_dir") or r.get("train_key"))
            if key in seen:
                continue
            seen.add(key)
        out.append(r)
    return out


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def aggregate(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in dedupe_ar(jobs):
        if r.get("status") == "ok":
            groups[point_of(r)].append(r)
    rows = []
    for (prior, T), rs in groups.items():
        row = {"prior": prior, "T": T, "n_seeds": len(rs), "nll_kind": rs[0].get("nll_kind"),
               "batch_size": rs[0].get("batch_size")}
        for key, *_ in COLUMNS:
            row[key] = mean_std([r.get(key) for r in rs])
        row["unavailable"] = {k: v for r in rs for k, v in (r.get("unavailable") or {}).items()}
        rows.append(row)
    rows.sort(key=job_order)
    return rows


# ---- formatting ------------------------------------------------------------

def fmt(ms: tuple[float | None, float | None], digits: int, n: int) -> str:
    m, s = ms
    if m is None:
        return "n/a"
    if digits == 0:
        text = f"{m / 1e6:.2f}M" if m >= 1e5 else f"{m:.0f}"
        return text
    text = f"{m:.{digits}f}"
    if n > 1 and s is not None:
        text += f" ± {s:.{digits}f}"
    return text


def main_table(rows: list[dict[str, Any]]) -> str:
    head = "| Prior | T | seeds | " + " | ".join(c[1] for c in COLUMNS) + " |"
    sep = "|" + "---|" * (3 + len(COLUMNS))
    lines = [head, sep]
    for r in rows:
        cells = []
        for key, _, digits in COLUMNS:
            cell = fmt(r[key], digits, r["n_seeds"])
            if key == "nll_bits_per_token" and cell != "n/a":
                cell += " (exact)" if r.get("nll_kind") == "exact" else " (≤, ELBO)"
            cells.append(cell)
        T = "–" if r["T"] is None else str(r["T"])
        lines.append(f"| {PRIOR_LABEL.get(r['prior'], r['prior'])} | {T} | {r['n_seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---- figures ---------------------------------------------------------------

def training_table(jobs: list[dict[str, Any]]) -> str:
    """One row per training run (distinct train_key): each unit's best validation value and step, their sum, time."""
    seen, lines = set(), []
    for r in sorted(jobs, key=job_order):
        units = r.get("train_units") or {}
        if not units or r.get("train_key") in seen:
            continue
        seen.add(r.get("train_key"))
        cells = "; ".join(f"{u} {v['best_val']:.3f} ({v['best_step']})" for u, v in units.items())
        total = sum(v["best_val"] for v in units.values())
        secs = r.get("train_seconds")
        T = r.get("T") if r["prior"] == "imagebart" else "–"
        lines.append(f"| {PRIOR_LABEL.get(r['prior'], r['prior'])} | {T} | {r.get('seed')} | {cells} | {total:.3f} | "
                     + (f"{secs / 60:.1f}" if secs is not None else "n/a") + " |")
    if not lines:
        return ""
    return "\n".join(["| Prior | T | seed | per model: best val (step) | sum | train min |",
                      "|---|---|---|---|---|---|", *lines])


def figures(rows: list[dict[str, Any]], out: Path) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    made = []
    colors = {"ar": "tab:gray", "imagebart": "tab:blue", "absorbing": "tab:orange"}

    def vs_T(key: str, ylabel: str, fname: str, title: str) -> None:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        drawn = False
        for prior in PRIOR_ORDER:
            pts = [(r["T"], r[key]) for r in rows if r["prior"] == prior and r[key][0] is not None]
            if not pts:
                continue
            drawn = True
            if prior == "ar":
                m, s = pts[0][1]
                ax.axhline(m, color=colors[prior], ls="--", label=PRIOR_LABEL[prior])
                if s:
                    ax.axhspan(m - s, m + s, color=colors[prior], alpha=0.15)
                continue
            pts.sort()
            ts = [p[0] for p in pts]
            ms = [p[1][0] for p in pts]
            ss = [p[1][1] or 0.0 for p in pts]
            ax.errorbar(ts, ms, yerr=ss, marker="o", capsize=3, color=colors.get(prior), label=PRIOR_LABEL.get(prior, prior))
        if not drawn:
            plt.close(fig)
            return
        ax.set_xlabel("T (ImageBART chain length / absorbing sampling steps)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)
        made.append((title, f"figures/{fname}"))

    vs_T("fid", "FID ↓", "fid_vs_T.png", "FID vs T")
    vs_T("nll_bits_per_token", "bits per token ↓", "nll_vs_T.png", "NLL vs T (AR exact, others ELBO)")
    vs_T("completion_fid", "completion FID ↓", "completion_fid_vs_T.png", "Upper-half completion FID vs T")

    pts = [r for r in rows if r["fid"][0] is not None and r["sample_seconds_per_image"][0] is not None]
    if pts:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for prior in PRIOR_ORDER:
            rs = sorted((r for r in pts if r["prior"] == prior), key=lambda r: r["sample_seconds_per_image"][0])
            if not rs:
                continue
            xs = [r["sample_seconds_per_image"][0] for r in rs]
            ys = [r["fid"][0] for r in rs]
            ax.plot(xs, ys, marker="o", color=colors.get(prior), label=PRIOR_LABEL.get(prior, prior),
                    ls="none" if prior == "ar" else "-")
            for r, x, y in zip(rs, xs, ys):
                if r["T"] is not None:
                    ax.annotate(f"T={r['T']}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        from matplotlib.ticker import LogFormatterSciNotation, NullFormatter

        ax.xaxis.set_major_formatter(LogFormatterSciNotation())
        ax.xaxis.set_minor_formatter(NullFormatter())
        batch = pts[0].get("batch_size")
        ax.set_xlabel("seconds per image (token generation" + (f", batch {batch})" if batch else ")"))
        ax.set_ylabel("FID ↓")
        ax.set_title("Quality vs sampling speed")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "fid_vs_speed.png", dpi=120)
        plt.close(fig)
        made.append(("Quality vs sampling speed", "figures/fid_vs_speed.png"))
    return made


# ---- the report ------------------------------------------------------------

def shown_path(path: Path) -> str:
    """A path as the reader knows it: relative to the working directory when it lies below it."""
    rel = os.path.relpath(Path(path).resolve())
    return rel if not rel.startswith("..") else str(path)


def read_yaml_text(path: Path) -> str | None:
    return path.read_text() if path.is_file() else None


def write_report(sweep_dirs: list[Path], out: Path, title: str | None = None) -> Path:
    jobs = find_jobs(sweep_dirs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = aggregate(jobs)
    failed = [r for r in jobs if r.get("status") != "ok"]
    ok = [r for r in jobs if r.get("status") == "ok"]

    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_KEYS, extrasaction="ignore")
        w.writeheader()
        for r in sorted(jobs, key=lambda r: (str(r.get("prior")), r.get("T") or 0, r.get("seed") or 0)):
            w.writerow({k: r.get(k) for k in CSV_KEYS})

    md = [f"# {title or 'priorbench report: ' + out.name}", ""]
    md += [f"{len(jobs)} jobs ({len(ok)} ok, {len(failed)} failed) from "
           + ", ".join(f"`{shown_path(d)}`" for d in sweep_dirs) + ". Mean ± std over seeds. AR does not depend on T and is "
           "shown once; ImageBART's T is its chain length, absorbing's T its number of sampling steps.", ""]
    md += ["## Main results", "", main_table(rows), ""]
    extra = sorted({k: v for r in rows for k, v in r["unavailable"].items()}.items())
    if extra:
        md += ["Unavailable metrics:", ""] + [f"- `{k}`: {v}" for k, v in extra] + [""]
    if ok:
        ref = ok[0]
        md += ["Protocol: features `" + str(ref.get("feature_extractor")) + f"`, {ref.get('n_samples')} samples per "
               f"point, speed at batch {ref.get('batch_size')} on `{ref.get('device')}`"
               + (f" in {ref['compute_precision']}" if ref.get("compute_precision") else "")
               + " (token generation only; "
               "decoding is in results.csv).", ""]

    toks = [r["tokenizer"] for r in ok if r.get("tokenizer")]
    if toks:
        t = toks[0]
        md += ["## Tokenizer", "", "| K_eff | codebook | usage | perplexity | grid | val PSNR (dB) | rFID |",
               "|---|---|---|---|---|---|---|",
               f"| {t.get('vocab_size')} | {t.get('n_embed')} | {100 * (t.get('codebook_usage') or 0):.1f}% | "
               f"{(t.get('codebook_perplexity') or 0):.1f} | {'x'.join(map(str, t.get('grid') or []))} | "
               f"{(t.get('recon_psnr') or 0):.2f} | "
               + (f"{t['recon_fid']:.2f}" if t.get("recon_fid") is not None else "n/a") + " |", ""]

    training = training_table(ok)
    if training:
        md += ["## Training", "",
               "Best validation value per trained model (bits/token, at the step in brackets; the checkpoint the "
               "evaluation uses). ImageBART's scale 2 is Eq. 8's cross-entropy and scales t > 2 the Eq. 7 KL terms, "
               "so their sum is its ELBO on the validation batches; absorbing's is its Eq. 6 ELBO. Jobs that share "
               "a training run (AR at every T, absorbing at every T) are shown once.", "", training, ""]

    figs = figures(rows, out / "figures")
    if figs:
        md += ["## Figures", ""]
        for caption, rel in figs:
            md += [f"![{caption}]({rel})", ""]

    grids = []
    for r in sorted(dedupe_ar(ok), key=job_order):
        if r.get("seed") != ok[0].get("seed"):
            continue
        label = r["prior"] + ("" if r["prior"] == "ar" else f"_T{r.get('T')}")
        for kind in ("samples_grid", "completion_grid"):
            src = Path(r["job_dir"]) / f"{kind}.png"
            if src.is_file():
                dst = out / "grids" / f"{label}_{kind}.png"
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
                grids.append((label, kind, f"grids/{dst.name}"))
    if grids:
        md += ["## Samples and completions", "",
               "Completion grids: top row the input with its upper half masked (grey: those tokens are generated), "
               "middle the completion, bottom the tokenizer's reconstruction of the original tokens.", ""]
        for label, kind, rel in grids:
            md += [f"**{label}**, {kind.replace('_', ' ')}:", "", f"![{label} {kind}]({rel})", ""]

    if failed:
        md += ["## Failed jobs", "", "| prior | T | seed | error | job |", "|---|---|---|---|---|"]
        for r in failed:
            err = str(r.get("error") or "").replace("|", "\\|")
            md += [f"| {r.get('prior')} | {r.get('T')} | {r.get('seed')} | {err} | `{Path(r['job_dir']).name}` |"]
        md += [""]

    md += ["## Environment", ""]
    if ok:
        env = ok[0]
        md += [f"- device: `{env.get('device')}`", f"- torch: `{env.get('torch')}`, CUDA: `{env.get('cuda')}`",
               f"- commit: `{env.get('commit')}`"]
    stage_totals: dict[str, float] = defaultdict(float)
    for r in jobs:
        for k, v in (r.get("stage_seconds") or {}).items():
            stage_totals[k] += v or 0.0
    if stage_totals:
        md += ["- wall time per stage, summed over jobs: " +
               ", ".join(f"{k} {v:.1f} s" for k, v in stage_totals.items())]
    cfg_text = None
    for r in ok or jobs:
        cfg_text = read_yaml_text(Path(r["job_dir"]) / ".hydra" / "config.yaml")
        if cfg_text:
            break
    if cfg_text:
        md += ["", "<details><summary>Resolved config of the first job</summary>", "", "```yaml",
               cfg_text.rstrip(), "```", "", "</details>"]
    md += [""]
    (out / "report.md").write_text("\n".join(md))
    return out / "report.md"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="(Re)build a priorbench report from finished sweep folders.")
    p.add_argument("sweep_dirs", nargs="+", type=Path, help="sweep folders (multirun/NAME) holding job results")
    p.add_argument("--out", type=Path, default=None, help="report folder (default: reports/<first sweep name>)")
    args = p.parse_args(argv)
    out = args.out or Path("reports") / args.sweep_dirs[0].resolve().name
    try:
        path = write_report(args.sweep_dirs, out)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"report written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
