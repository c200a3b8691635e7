"""Inception throughput on this machine: the same TF-FID weights (`default_1.pt`) through both sources.

    python benchmarks/inception_speed.py [--n 64] [--repeats 3] [--batch 8 16 64] [--threads N] [--resolution 32]

Sources (same weights, same uint8 -> 299x299 input):
  torchscript      the TorchScript graph of `default_1.pt` (TorchScriptFIDInception)
  torch-fidelity   its weights in torch-fidelity's InceptionV3 module with batch norms folded
                   (TorchFidelityInceptionFromTorchScript, the default extractor when torch-fidelity's own weights
                   are not cached)
  torch-fidelity-unfolded   the same without folding the batch norms

Every (source, network batch) pair is timed `--repeats` times, interleaved (round-robin), after one warm-up
call, so that a machine shared with other work slows all of them alike; the median images/s is printed, with
the load average before and after (others using the CPU lower every number, not the ratios much). Each timed
call sends `--n` images of the emoji set at `--resolution` through `extractor(images)` with the network
batch forced to the given size. Also printed: the max |difference| of the pool features against the
TorchScript's, relative to the largest feature.
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import features as FE  # noqa: E402
from bench import metrics as M  # noqa: E402
from bench.data import emoji_root, list_images, load_image  # noqa: E402


def emoji_batch(n: int, resolution: int) -> torch.Tensor:
    """n emoji spread over the whole set (every k-th file), uint8 (n, 3, R, R)."""
    files = list_images(emoji_root())
    step = max(1, len(files) // n)
    return torch.from_numpy(np.stack([load_image(f, resolution) for f in files[::step][:n]]))


def build_extractor(source: str) -> FE.FeatureExtractor:
    path = FE.fid_helper_weights_path()
    if source == "torchscript":
        return FE.TorchScriptFIDInception(path)
    extractor = FE.TorchFidelityInceptionFromTorchScript(path)
    if source == "torch-fidelity-unfolded":  # the same module and weights without folding the batch norms
        buf = io.BytesIO()
        torch.save(FE.torchscript_to_torch_fidelity_state_dict(path), buf)
        buf.seek(0)
        net = M.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=buf)
        extractor.net = net.to(memory_format=torch.channels_last).eval()
    return extractor


SOURCES = ("torchscript", "torch-fidelity", "torch-fidelity-unfolded")


def time_call(extractor: FE.FeatureExtractor, images: torch.Tensor, batch: int) -> float:
    old = FE.CPU_CHUNK
    FE.CPU_CHUNK = batch  # the network batch on the CPU
    try:
        t0 = time.perf_counter()
        extractor(images)
        return len(images) / (time.perf_counter() - t0)
    finally:
        FE.CPU_CHUNK = old


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64, help="images per timed call")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, nargs="+", default=[FE.CPU_CHUNK, 64], help="network batch sizes")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    images = emoji_batch(args.n, args.resolution)
    ex = {k: build_extractor(k) for k in args.sources}
    ref = build_extractor("torchscript")(images[:8])[FE.FEATURE_POOL]
    # Relative to each row's norm: the quantity float32 rounding bounds (tests/tolerance.py conv_network_error).
    diffs = {k: float(((e(images[:8])[FE.FEATURE_POOL] - ref).norm(dim=1) / ref.norm(dim=1)).max())
             for k, e in ex.items()}
    pairs = [(k, b) for k in ex for b in args.batch]
    for k, b in pairs:  # warm-up (first calls allocate and pick kernels)
        time_call(ex[k], images[:b], b)
    load_before = os.getloadavg()[0]
    speeds: dict[tuple[str, int], list[float]] = {p: [] for p in pairs}
    for _ in range(args.repeats):
        for k, b in pairs:
            speeds[(k, b)].append(time_call(ex[k], images, b))
    load_after = os.getloadavg()[0]
    print(f"# Inception throughput, {args.n} images of {args.resolution}x{args.resolution} -> 299x299, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, torch {torch.__version__}")
    print(f"# load average (1 min) before / after: {load_before:.2f} / {load_after:.2f}")
    print("| source | network batch | images/s (median) | runs | max row rel. pool diff vs torchscript |")
    print("| --- | --- | --- | --- | --- |")
    out = {}
    for k, b in pairs:
        med = statistics.median(speeds[(k, b)])
        out[f"{k}@{b}"] = med
        print(f"| {k} | {b} | {med:.2f} | {' '.join(f'{s:.1f}' for s in speeds[(k, b)])} | {diffs[k]:.2e} |")
    return {"images_per_second": out, "max_row_rel_diff": diffs}


if __name__ == "__main__":
    main()
