"""How far is each held-out emoji from the images the priors see? Prints the emoji split's counts (train, val,
selection, the priors' training images, and their groups), the nearest-neighbour RMS distance on [0, 1] at 16x16 from
each val image to train (min, 1st percentile, median) and from each selection image to the priors' training images,
and the closest val-train pairs by file name, to look at.

    python benchmarks/split_neighbours.py [--pairs 20] [--selection-seed 0]

Reads every twemoji file once at 16x16 (a few seconds); no cache, no torch.
"""
from __future__ import annotations

import argparse

import numpy as np
from omegaconf import OmegaConf

from bench.data import load_image, resolve_files, selection_files, split_groups

SIZE = 16  # the resolution the split's own picture check uses, whatever data.resolution is


def nearest(images: dict[str, np.ndarray], queries: list[str], pool: list[str]) -> tuple[np.ndarray, list[str]]:
    """RMS distance of each query to its nearest pool image, (N_query,), and that image's name."""
    q = np.stack([images[f] for f in queries])  # (N_q, 3 * 16 * 16)
    p = np.stack([images[f] for f in pool])  # (N_p, 3 * 16 * 16)
    d2 = ((q * q).sum(1)[:, None] + (p * p).sum(1)[None] - 2 * q @ p.T) / q.shape[1]  # (N_q, N_p)
    j = d2.argmin(1)
    return np.sqrt(np.clip(d2[np.arange(len(q)), j], 0, None)), [pool[k] for k in j]


def spread(d: np.ndarray) -> str:
    return f"min {d.min():.4f}, 1st percentile {np.percentile(d, 1):.4f}, median {np.median(d):.4f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=20, help="closest val-train pairs to list")
    ap.add_argument("--selection-seed", type=int, default=0)
    args = ap.parse_args()
    cfg = OmegaConf.create(dict(kind="emoji", resolution=32, val_fraction=0.1, limit=None, train_list=None,
                                val_list=None, selection_fraction=0.1, selection_seed=args.selection_seed))
    files = resolve_files(cfg)
    root, train, val = files
    selection = selection_files(cfg, files)
    fit = sorted(set(train) - set(selection))
    everything = sorted(train + val)
    group = dict(zip(everything, split_groups("emoji", root, everything)))
    for name, part in (("train", train), ("val", val), ("selection", selection), ("priors' training", fit)):
        print(f"{name}: {len(part)} images, {len({group[f] for f in part})} groups")
    images = {f: load_image(root / f, SIZE).reshape(-1).astype(np.float32) / 255 for f in everything}
    d, near = nearest(images, val, train)
    print(f"val -> train nearest RMS at {SIZE}x{SIZE}: {spread(d)}")
    print(f"selection -> priors' training nearest RMS: {spread(nearest(images, selection, fit)[0])}")
    for k in np.argsort(d)[:args.pairs]:
        print(f"  {d[k]:.4f}  {val[k]}  {near[k]}")


if __name__ == "__main__":
    main()
