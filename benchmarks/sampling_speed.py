"""Sampling speed with and without the KV cache, on the same weights.

    python benchmarks/sampling_speed.py [--batch 8] [--device cpu] [--threads N]

Builds the AR prior at 256 tokens (16x16 grid, V=1024, ~4M parameters) and times
`sample()` with the cache (one new token per network call) and without it (the
whole prefix recomputed at every step), after a warm-up, device synchronised.
Then the same for one ImageBART encoder-decoder scale (T=3, scale t=2: the
decoder cross-attends to the encoder memory) through its public `sample_scale`,
if `priors.imagebart` is importable. Both modes draw from the same generator
seed, so they must produce identical tokens; the script checks it.

The paper protocol (ImageBART Fig. 8) uses batch 50 on a GPU; the CPU default
batch is smaller so the uncached runs finish in about a minute on 2 cores.

On a CPU shared with other jobs, OpenMP's default spin-waiting makes every small
per-token op wait for busy cores: cached sampling measured 20x slower (34 s instead
of 1.9 s for 256 tokens) with 2 threads on a loaded 2-core machine. The script
therefore asks for passive waiting (OMP_WAIT_POLICY=PASSIVE) unless the caller set
a policy; it must be set before torch is imported.

The cached path is made of many tiny ops, so on a 2-core machine the speed-up depends
on what waking the second thread costs: on one such machine a LayerNorm of (8, 1, 236)
took 6 us with 1 thread and 80-120 us with 2, and the speed-ups were about 10x (AR)
and 9-11x (ImageBART decoder) at 2 threads against 19x and 18x with --threads 1
(the cached times barely change; the uncached ones use the second core).
"""
from __future__ import annotations

import argparse
import inspect
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from priors.ar import ARPrior  # noqa: E402

V, GRID = 1024, (16, 16)


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> tuple[float, torch.Tensor]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def report(what: str, n: int, t_cached: float, t_full: float, same: bool):
    print(f"{what}: batch {n}, {GRID[0] * GRID[1]} tokens")
    print(f"  with KV cache:     {t_cached:8.2f} s  ({t_cached / n:.3f} s/image)")
    print(f"  without KV cache:  {t_full:8.2f} s  ({t_full / n:.3f} s/image)")
    print(f"  speed-up:          {t_full / t_cached:8.1f}x   identical samples: {same}")


def bench_ar(args, device: torch.device):
    torch.manual_seed(0)
    prior = ARPrior.from_budget(V, GRID, budget=args.budget, T=None, n_layer=4, n_head=4).to(device)
    print(f"ar: d_model={prior.d_model}, n_layer=4, params={prior.num_params():,}, device={device}")
    gen = torch.Generator(device=device)
    gen.manual_seed(0)
    prior.sample(args.batch, gen, use_cache=True)  # warm-up: allocator, kernels, thread pool
    keep = torch.ones(args.batch, prior.seq_len, dtype=torch.bool, device=device)
    keep[:, -8:] = False  # warm-up of the uncached path at full length, 8 steps only
    prior.complete(torch.zeros_like(keep, dtype=torch.long), keep, gen, use_cache=False)
    gen.manual_seed(1)
    t_cached, a = timed(lambda: prior.sample(args.batch, gen, use_cache=True), device)
    gen.manual_seed(1)
    t_full, b = timed(lambda: prior.sample(args.batch, gen, use_cache=False), device)
    report("ar", args.batch, t_cached, t_full, torch.equal(a, b))
    return t_full / t_cached


def bench_imagebart(args, device: torch.device):
    try:
        from priors.imagebart import ImageBARTPrior
    except ImportError as e:
        print(f"imagebart: skipped, priors.imagebart is not importable ({e})")
        return None
    if "use_cache" not in inspect.signature(ImageBARTPrior.sample_scale).parameters:
        print("imagebart: skipped, ImageBARTPrior.sample_scale has no use_cache flag")
        return None
    torch.manual_seed(0)
    # T=3: scale t=2 is an encoder-decoder transformer; the budget is split over T-1=2 scales,
    # so each scale gets the AR model's budget and the two decoders are comparable.
    prior = ImageBARTPrior.from_budget(V, GRID, budget=2 * args.budget, T=3, n_layer=4, n_head=4).to(device)
    print(f"imagebart: T=3, scale t=2, params={prior.num_params():,}, d_model={prior.arch_config()['d_model']}")
    gen = torch.Generator(device=device)
    gen.manual_seed(0)
    x_t = torch.randint(0, V, (args.batch, GRID[0] * GRID[1]), generator=gen, device=device)  # (B, L)
    prior.sample_scale(2, x_t, gen, use_cache=True)  # warm-up
    gen.manual_seed(1)
    t_cached, a = timed(lambda: prior.sample_scale(2, x_t, gen, use_cache=True), device)
    gen.manual_seed(1)
    t_full, b = timed(lambda: prior.sample_scale(2, x_t, gen, use_cache=False), device)
    report("imagebart decoder (scale t=2 of T=3)", args.batch, t_cached, t_full, torch.equal(a, b))
    return t_full / t_cached


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="images per sample() call (paper: 50 on a GPU)")
    parser.add_argument("--budget", type=int, default=4_000_000, help="AR parameters (a few M)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--skip-imagebart", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")
    speedup = bench_ar(args, device)
    if not args.skip_imagebart:
        bench_imagebart(args, device)
    if device.type == "cpu" and speedup < 10:
        print(f"WARNING: the AR cached sampler is only {speedup:.1f}x faster (expected >= 10x at 256 tokens)")


if __name__ == "__main__":
    with torch.no_grad():
        main()
