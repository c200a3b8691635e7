"""Standard error / true spread of each interval metric, protocol estimator against the former bootstrap.

The simulation of tests/test_calibration.py (tests/calibration.py): Gaussian features with a low-rank or a
power-law spectrum, n = 250 samples (completion: 150) against 1000 fixed reference rows; R independent sample sets
give the true spread, S of them the reported standard errors. Prints sqrt(mean se^2) / sd with its Monte Carlo sd
(log scale) for both estimators.

    PYTHONPATH=. python benchmarks/interval_calibration.py [--replicates 300] [--with-se 30] [--full-dim]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import calibration as C  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replicates", type=int, default=300, help="independent sample sets per setting (true spread)")
    ap.add_argument("--with-se", type=int, default=30, help="of which get a standard error from each estimator")
    ap.add_argument("--full-dim", action="store_true", help="also the 2048-d power-law settings (slow)")
    args = ap.parse_args()
    R, S = args.replicates, args.with_se
    fid = [C.Setting("low rank 64, same", 250, 64, "lowrank", 64),
           C.Setting("low rank 64, shifted 0.3", 250, 64, "lowrank", 64, shift=0.3),
           C.Setting("power 256-d, same", 250, 256, "power"),
           C.Setting("power 256-d, fakes differ", 250, 256, "power", shift=0.2, scale=1.1),
           C.Setting("ffhq_tab3 n/d=24 (768 x 32-d), differ", 768, 32, "power", shift=0.1, m=2048),
           C.Setting("completion 150, low rank 64, same", 150, 64, "lowrank", 64)]
    kid = [C.Setting("low rank 64 of 512-d, same", 250, 512, "lowrank", 64),
           C.Setting("power 512-d, same", 250, 512, "power"),
           C.Setting("power 512-d, fakes differ", 250, 512, "power", shift=0.3, scale=1.1)]
    if args.full_dim:
        fid.append(C.Setting("power 2048-d, same", 250, 2048, "power"))
        kid.append(C.Setting("power 2048-d, same", 250, 2048, "power"))
    print(f"{'metric':8} {'setting':42} {'protocol':>16} {'bootstrap':>16}")
    for metric, settings, value, estimator in (("fid", fid, C.fid_value_only, C.fid_estimator),
                                               ("kid", kid, C.kid_value_only, C.kid_estimator)):
        for st in settings:
            t = time.time()
            real = st.draw(st.m, 0, fake=False)
            cells = []
            for old in (False, True):
                cal = C.calibrate((metric,), lambda s, st=st: st.draw(st.n, s, fake=True), value(real),
                                  estimator(real, old), R, S)
                cells.append(f"{cal.ratio[0]:.2f} (+-{cal.log_sd[0]:.2f})")
            print(f"{metric:8} {st.name:42} {cells[0]:>16} {cells[1]:>16}   {time.time() - t:.0f}s", flush=True)


if __name__ == "__main__":
    main()
