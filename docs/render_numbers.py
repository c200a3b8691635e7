"""Render the numbers that README.md and docs/ quote from the checked-in default report.

Every sentence or table that quotes the report sits between two markers in the markdown,

    <!-- numbers:begin NAME -->
    ...rendered text...
    <!-- numbers:end -->

and is rendered here by BLOCKS[NAME] from the report's summary.csv (one row per point) and results.csv (the
baseline rows, exact copies, stage times). Hand copies drift when a report is regenerated; rendered text cannot.
Numbers from other runs stay constants here, each next to the command that gave them.

    python docs/render_numbers.py           # rewrite every block in README.md and docs/*.md
    python docs/render_numbers.py --check   # name the stale blocks and exit 1 (tests/test_docs.py does the same)

Needs pandas only (no torch).
"""
from __future__ import annotations

import argparse
import ast
import re
import sys
import textwrap
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "reports" / "2026-12-05_08-36-16"
# The studies of docs/default.md (temperature, capacity, data limit, memorisation) ran on the earlier split (before
# pictogram families were grouped and the selection split held out): their "default report" rows are that split's
# report, so each study compares like with like.
EARLIER = ROOT / "reports" / "2026-11-28_04-13-11"
EARLIER_BLOCKS = ("temperature-table", "temperature-gap", "capacity", "data-limit-table", "memorised", "codebook")
BLOCK = re.compile(r"(<!-- numbers:begin (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- numbers:end -->)", re.S)

# The sample metrics of the A/A check (the NLL of the same weights is equal by construction, so it is left out).
SAMPLE_METRICS = ("fid", "kid_mean", "prdc_precision", "recall", "density", "coverage", "completion_fid",
                  "train_match")
LABELS = {"ar": "AR", "imagebart": "ImageBART", "absorbing": "Absorbing"}
CHAIN = (2, 3, 5, 9)
WIDTH = 116  # the line width of the hand-written markdown


class Report:
    """The checked-in report's files, read the way its table reads them."""

    def __init__(self, folder: Path = REPORT):
        self.folder = Path(folder)
        self.summary = pd.read_csv(self.folder / "summary.csv")
        self.results = pd.read_csv(self.folder / "results.csv")
        # Every job carries the same two baseline rows (computed once per sweep); the first job's are the table's.
        self.baselines = ast.literal_eval(self.results.baselines.iloc[0])

    def row(self, prior: str, T: int | None = None) -> pd.Series:
        rows = self.summary[self.summary.prior == prior]
        if T is not None and rows["T"].notna().any():
            rows = rows[rows["T"] == T]
        if len(rows) != 1:
            raise KeyError(f"summary.csv has {len(rows)} rows for prior={prior} T={T}")
        return rows.iloc[0]

    def value(self, prior: str, key: str, T: int | None = None) -> float:
        return float(self.row(prior, T)[key])

    def ci(self, prior: str, key: str, T: int | None = None) -> tuple[float, float]:
        r = self.row(prior, T)
        return float(r[f"{key}_ci_lo"]), float(r[f"{key}_ci_hi"])

    def baseline(self, which: str, key: str) -> float:
        return float(self.baselines[which][key])

    def copies(self) -> float:
        """The largest share of exact training copies over every job."""
        return float(self.results.train_copies.max())

    def stage_minutes(self) -> dict[str, float]:
        total: dict[str, float] = {}
        for cell in self.results.stage_seconds:
            for stage, s in ast.literal_eval(cell).items():
                total[stage] = total.get(stage, 0.0) + s / 60
        return total

    def evaluations_run(self) -> int:
        """Jobs whose eval stage ran rather than found its result cached (a cached stage takes milliseconds)."""
        return sum(ast.literal_eval(cell)["eval"] > 1.0 for cell in self.results.stage_seconds)

    def median_half_width(self, key: str) -> float:
        half = (self.summary[f"{key}_ci_hi"] - self.summary[f"{key}_ci_lo"]) / 2
        return float(np.median(half.dropna()))


def f(x: float, digits: int) -> str:
    return f"{x:.{digits}f}"


def interval(r: Report, prior: str, key: str, T: int | None, digits: int) -> str:
    lo, hi = r.ci(prior, key, T)
    return f"{f(r.value(prior, key, T), digits)} [{f(lo, digits)}, {f(hi, digits)}]"


def series(r: Report, prior: str, key: str, digits: int) -> str:
    return " / ".join(f(r.value(prior, key, T), digits) for T in CHAIN)


def mark(r: Report, prior: str, key: str, T: int | None) -> str:
    # Empty (NaN) for the reference row itself and for metrics a row has no test of.
    sig = r.row(prior, T).get(f"{key}_significant")
    return " *" if isinstance(sig, (bool, np.bool_)) and sig else ""


# ---------------------------------------------------------------------------------------------------------------
# README.md


def main_table(r: Report) -> str:
    """The report's main table without KID, IS, PRDC and the cost columns."""
    lines = ["| prior | T | NLL (bits/token) | FID [95%] | completion FID | Train match | s/img |",
             "|---|---|---|---|---|---|---|"]
    for which, label in (("real_val", "*real val images*"), ("reconstruction", "*tokenizer reconstructions*")):
        lines.append(f"| {label} | – | – | {f(r.baseline(which, 'fid'), 1)} | "
                     f"{f(r.baseline(which, 'completion_fid'), 1)} | {f(r.baseline(which, 'train_match'), 3)} "
                     f"| – |")
    for prior, Ts in (("ar", (None,)), ("imagebart", CHAIN), ("absorbing", CHAIN)):
        for T in Ts:
            cells = [LABELS[prior] + (" (ref.)" if T is None else ""), "–" if T is None else str(T),
                     f(r.value(prior, "nll_bits_per_token", T), 3) + mark(r, prior, "nll_bits_per_token", T),
                     interval(r, prior, "fid", T, 1) + mark(r, prior, "fid", T),
                     f(r.value(prior, "completion_fid", T), 1) + mark(r, prior, "completion_fid", T),
                     f(r.value(prior, "train_match", T), 3) + mark(r, prior, "train_match", T),
                     f(r.value(prior, "sample_seconds_per_image", T), 4)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def trend(r: Report, prior: str, key: str, direction: str) -> str:
    """How key moves over the chain's T, in words: 'get worse' / 'get better' (lower is better) when every step goes
    that way, else 'not move in one direction'."""
    v = [r.value(prior, key, T) for T in CHAIN]
    steps = np.diff(v)
    if (steps > 0).all():
        return "get worse" if direction == "worse" else "not improve"
    if (steps < 0).all():
        return "get better" if direction == "better" else "not get worse"
    return "not move in one direction"


def worse_at(r: Report, prior: str, key: str) -> str:
    """The T at which the prior's key is significantly worse (higher) than AR's, as '3, 5 and 9' (or 'none')."""
    Ts = [str(T) for T in CHAIN if bool(r.row(prior, T).get(f"{key}_significant"))
          and r.value(prior, key, T) > r.value("ar", key)]
    return "none" if not Ts else Ts[0] if len(Ts) == 1 else ", ".join(Ts[:-1]) + " and " + Ts[-1]


def can_show(r: Report) -> str:
    fid_h, nll_h = r.median_half_width("fid"), r.median_half_width("nll_bits_per_token")
    kid_h, cfid_h = r.median_half_width("kid_mean"), r.median_half_width("completion_fid")
    cfid = r.summary.completion_fid
    aa = r.row("imagebart", 2)
    tested = [k for k in SAMPLE_METRICS if isinstance(aa.get(f"{k}_significant"), (bool, np.bool_))]
    n_sig = sum(bool(aa[f"{k}_significant"]) for k in tested)
    aa_text = (f"came out not different on all {len(tested)} sample metrics" if n_sig == 0 else
               f"came out different on {n_sig} of {len(tested)} sample metrics")
    rs2 = np.sqrt(2)
    return (
        f"At one seed the default resolves FID differences above about {f(rs2 * fid_h, 0)} (median 95% "
        f"half-width {f(fid_h, 1)}), KID above about {f(rs2 * kid_h, 3)}, completion FID above about "
        f"{f(rs2 * cfid_h, 0)} and NLL above about {f(rs2 * nll_h, 2)} bits/token. That is enough to see the "
        f"ImageBART chain {trend(r, 'imagebart', 'fid', 'worse')} with T at equal steps per model (FID "
        f"{series(r, 'imagebart', 'fid', 0)} for T = 2, 3, 5, 9; ELBO {series(r, 'imagebart', 'nll_bits_per_token', 2)} "
        f"bits/token), absorbing's sampler bound {trend(r, 'absorbing', 'nll_bits_per_token', 'better')} with more "
        f"sampling steps ({series(r, 'absorbing', 'nll_bits_per_token', 2)}; FID {series(r, 'absorbing', 'fid', 0)}) "
        f"and AR (FID {f(r.value('ar', 'fid'), 0)}, NLL {f(r.value('ar', 'nll_bits_per_token'), 2)}) ahead of "
        f"ImageBART at T = {worse_at(r, 'imagebart', 'fid')} and of absorbing at T = {worse_at(r, 'absorbing', 'fid')} "
        f"in FID. It cannot rank the "
        f"completion column (all within {f(cfid.min(), 0)}-{f(cfid.max(), 0)}), and PRDC is near its floor for "
        f"every prior (AR: precision {f(r.value('ar', 'prdc_precision'), 2)}, recall "
        f"{f(r.value('ar', 'recall'), 2)}, against {f(r.baseline('reconstruction', 'prdc_precision'), 2)} / "
        f"{f(r.baseline('reconstruction', 'recall'), 2)} for the reconstructions). The A/A pair (ImageBART T = 2 "
        f"is AR's model) {aa_text}. At 0.4M parameters and 500 steps per model AR's FID is still far above the "
        f"tokenizer's floor ({f(r.value('ar', 'fid'), 0)} against {f(r.baseline('reconstruction', 'fid'), 0)}): "
        f"what limits it is the data ({int(r.results.n_train_sequences.max()):,} training images, the train split "
        f"less the {int(r.results.n_selection.max())} held out for checkpoint selection), not the budget "
        f"([docs/default.md](docs/default.md#what-limits-the-samples)). So the default shows that the protocol "
        f"resolves differences; which prior wins at paper scale is what `experiment=ffhq_tab3` is for.")


# ---------------------------------------------------------------------------------------------------------------
# docs/default.md


def default_run(r: Report) -> str:
    m = r.stage_minutes()
    tm = r.summary.train_match
    return (
        f"The sweep spent, summed over its jobs, {f(m['tokens'], 1)} min on the tokenizer and tokens, "
        f"{f(m['reference'], 1)} on the reference features, {f(m['baselines'], 1)} on the baselines, "
        f"{f(m['train'], 1)} on training (ImageBART's scales two at once) and {f(m['eval'], 1)} on the "
        f"{r.evaluations_run()} evaluations that ran (the other AR jobs reuse AR's). Its baseline rows at N = 250: "
        f"real val images FID {f(r.baseline('real_val', 'fid'), 1)} "
        f"[{f(r.baselines['real_val']['fid_ci'][0], 1)}, {f(r.baselines['real_val']['fid_ci'][1], 1)}], "
        f"tokenizer reconstructions {f(r.baseline('reconstruction', 'fid'), 1)} "
        f"[{f(r.baselines['reconstruction']['fid_ci'][0], 1)}, "
        f"{f(r.baselines['reconstruction']['fid_ci'][1], 1)}]. Train match: real val images "
        f"{f(r.baseline('real_val', 'train_match'), 3)} "
        f"[{f(r.baselines['real_val']['train_match_ci'][0], 3)}, "
        f"{f(r.baselines['real_val']['train_match_ci'][1], 3)}], the priors {f(tm.min(), 2)}-{f(tm.max(), 2)}, "
        + ("no exact copies in any row: the default's priors do not recall their training images."
           if r.copies() == 0 else f"exact copies in up to {f(100 * r.copies(), 1)}% of a row's samples."))


# FID at prior.sample.temperature=0.9 and 0.8, same trained models (other run, see docs/default.md for the command).
TEMPERATURE = {("ar", None): (216.6, 210.8),
               ("imagebart", 2): (217.4, 213.7), ("imagebart", 3): (230.7, 236.1),
               ("imagebart", 5): (247.9, 249.1), ("imagebart", 9): (259.7, 268.7),
               ("absorbing", 2): (264.9, 258.4), ("absorbing", 3): (255.9, 252.4),
               ("absorbing", 5): (252.5, 246.7), ("absorbing", 9): (240.2, 241.6)}


def temperature_table(r: Report) -> str:
    lines = ["| prior | T | 1.0 (default report) | 0.9 | 0.8 |", "|---|---|---|---|---|"]
    for prior, Ts in (("ar", (None,)), ("imagebart", CHAIN), ("absorbing", CHAIN)):
        cols = [" / ".join(f(r.value(prior, "fid", T), 1) for T in Ts)]
        for i in (0, 1):
            cols.append(" / ".join(f(TEMPERATURE[(prior, T)][i], 1) for T in Ts))
        lines.append(f"| {LABELS[prior]} | {'–' if Ts == (None,) else ' / '.join(map(str, Ts))} | "
                     + " | ".join(cols) + " |")
    return "\n".join(lines)


def temperature_gap(r: Report) -> str:
    gain = max(r.value(prior, "fid", T) - min(TEMPERATURE[(prior, T)]) for prior, T in TEMPERATURE)
    return (f"Lowering the temperature gains at most {f(gain, 0)} FID points, nowhere near the reconstructions' "
            f"{f(r.baseline('reconstruction', 'fid'), 1)}; and it reorders the chain: ImageBART's longer chains "
            f"get worse at a lower temperature (each of T - 1 scales sharpens), absorbing's get better. The default "
            f"stays at 1.0, the models' own distributions, which is also what their NLL columns describe.")


def capacity(r: Report) -> str:
    return (f"Nor is the gap closed by capacity within this budget: AR with three times the parameters "
            f"(`python bench/run.py prior=ar budget.params=1200000`, same 500 steps, cached tokens; 132 s, training "
            f"106 s against 51 s) reaches NLL 5.70 and FID 210.0 [202.4, 217.5] against "
            f"{f(r.value('ar', 'nll_bits_per_token'), 2)} and {f(r.value('ar', 'fid'), 1)}: about "
            f"{f(r.value('ar', 'fid') - 210.0, 0)} FID points for twice the training time of every model.")


def data_limit_table(r: Report) -> str:
    step = ast.literal_eval(r.results[r.results.prior == "ar"].train_units.iloc[0])["model"]["best_step"]
    real = r.baselines["real_val"]
    return "\n".join([
        "| AR run (OVERRIDES) | NLL bits/token (checkpoint step) | FID [95%] | Train match | copies |",
        "|---|---|---|---|---|",
        f"| default report: 0.4M parameters, 500 steps | {f(r.value('ar', 'nll_bits_per_token'), 3)} ({step}) | "
        f"{interval(r, 'ar', 'fid', None, 1)} | {f(r.value('ar', 'train_match'), 3)} | "
        f"{f(100 * r.copies(), 0) if r.copies() else 0} |",
        "| `train.steps=2000` | 5.681 (700) | 210.1 [202.4, 217.9] | 0.151 | 0 |",
        "| `train.steps=2000 budget.params=1200000` | 5.553 (500) | 210.0 [202.5, 217.4] | 0.158 | 0 |",
        "| same, `train.val_every=2000` (the last weights, not the best) | 11.38 (2000) | **182.2** [173.8, 190.5] "
        "| **0.405** | 4.0% |",
        f"| *real val images (unseen glyphs)* | – | {f(real['fid'], 1)} | {f(real['train_match'], 3)} | "
        f"{f(100 * real['train_copies'], 0) if real['train_copies'] else 0} |"])


def memorised(r: Report) -> str:
    return (f"Its FID is 28 points better than its own best-validation weights' (210.0) because the reference is "
            f"drawn from the train split, and its Train match (0.405) is above the "
            f"{f(r.baseline('real_val', 'train_match'), 3)} of unseen images (real val images in the checked-in "
            f"report).")


def codebook(r: Report) -> str:
    return (f"Nor do the tokens help: a smaller codebook (`tokenizer.model.n_embed=128` / `64`: val PSNR 20.90 / "
            f"20.63 dB, rFID 154.0 / 151.9) makes each token cheaper to predict (AR 4.93 / 4.39 bits/token, not "
            f"comparable across K) but AR's FID stays put (222.6 / 220.1 against "
            f"{f(r.value('ar', 'fid'), 1)}).")


BLOCKS: dict[str, Callable[[Report], str]] = {
    "main-table": main_table,
    "can-show": can_show,
    "default-run": default_run,
    "temperature-table": temperature_table,
    "temperature-gap": temperature_gap,
    "capacity": capacity,
    "data-limit-table": data_limit_table,
    "memorised": memorised,
    "codebook": codebook,
}


def documents(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def render(text: str, report: Report, earlier: Report | None = None) -> str:
    """`text` with every block's body rendered anew; an unknown block name is an error, not a skipped block.
    EARLIER_BLOCKS read `earlier` (default: the EARLIER report)."""
    earlier = earlier or Report(EARLIER)

    def body(m: re.Match) -> str:
        name = m["name"]
        if name not in BLOCKS:
            raise KeyError(f"unknown numbers block {name!r}; known: {', '.join(BLOCKS)}")
        text = BLOCKS[name](earlier if name in EARLIER_BLOCKS else report).rstrip("\n")
        if not text.startswith("|"):  # prose is wrapped like the hand-written text around it; tables are not
            text = textwrap.fill(text, WIDTH, break_long_words=False, break_on_hyphens=False)
        return m.group(1) + text + "\n" + m.group(4)
    return BLOCK.sub(body, text)


def stale(report: Report, root: Path = ROOT) -> list[str]:
    """`file: block` for every block whose text differs from what the report renders."""
    out = []
    for path in documents(root):
        text = path.read_text()
        for old, new in zip(BLOCK.finditer(text), BLOCK.finditer(render(text, report))):
            if old["body"] != new["body"]:
                out.append(f"{path.relative_to(root)}: {old['name']}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="only report stale blocks (exit 1 if any)")
    p.add_argument("--report", type=Path, default=REPORT, help="the report folder (default: the checked-in one)")
    args = p.parse_args(argv)
    report = Report(args.report)
    if args.check:
        bad = stale(report)
        for line in bad:
            print(f"stale: {line}", file=sys.stderr)
        return 1 if bad else 0
    for path in documents():
        text = path.read_text()
        new = render(text, report)
        if new != text:
            path.write_text(new)
            print(f"rewrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
