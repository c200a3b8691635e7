"""Sampling speed per path (uncached, eager cached, compiled), its share of the matmul peak and of its roofline.

    python benchmarks/sampling_speed.py [--shapes default 256] [--priors ar imagebart absorbing]
        [--paths uncached eager aten compiled] [--threads N] [--decode-threads N] [--repeats 3] [--json FILE]
        [--profile [--profile-rows 15]]

Shapes (random weights: speed does not depend on them):
- default: the embedded default sweep's shapes: batch 50 (ImageBART Fig. 8), an 8x8 grid (64 tokens), V=130,
  400k parameters per model (ImageBART: per scale), 4 layers, 4 heads;
- 256: a 16x16 grid (256 tokens), V=1024, 4M parameters, batch 8 (the uncached runs take ~30 s each).
Samplers: AR `sample()`; the ImageBART decoder: one encoder-decoder scale (T=3, scale t=2, its encoder pass
included) through `sample_scale`; absorbing `sample()` with T=--absorbing-T steps (it has no cache).
Paths: uncached (the whole prefix recomputed at every token), eager (static KV cache, one token per call; on a
CPU the fused code of priors/cpu_decode.py runs the prefill, the steps and the encoder's and absorbing's passes),
aten (eager with the fused code off: ATen's kernels, the path before it) and compiled (`Prior.set_compile("on")`:
torch.compile of the decode step / the full pass; its first call compiles, timed apart as "compile s"). All paths of a sampler draw from the same seed and must give the
same tokens; the script checks it. Timings are interleaved rounds (every path once per round, uncached
only in the first --uncached-repeats rounds) and the table shows medians, so a busy moment of a shared
machine hits every path alike; the load average at the start and the end is printed with them. The peak and the
bandwidth are measured at the start and again at the end, and the shares (JSON and the closing lines) use the
better of the two: a measurement in a busy moment would overstate them.

Efficiency: FLOP/s use the model FLOPs of priors/flops.py and the peak of priors.flops.matmul_peak_flops
(float32 square matmuls at the same thread count). "% of limit" is the path's share of its roofline
(priors/roofline.py): max(FLOPs / peak, bytes read / read bandwidth) over the measured time, with the bytes
counted from the architecture (weights once per call, the keys and values each call reads) and the bandwidth
measured by priors.roofline.read_bandwidth; "(compute)" or "(bandwidth)" names the bound that sets it.

--decode-threads: intra-op threads of the cached decoding loops (priors.transformer.DECODE_THREADS: auto by
default, one thread under passive OpenMP waiting and all of --threads otherwise; N; 0 = all of --threads).
--profile: after the timings, each cached path runs once under torch.profiler and once under a dispatch mode,
and a table gives per network call each operator's calls, self time and bytes read (its tensor inputs; views
read nothing), the heaviest --profile-rows first and the rest summed (the fused CPU code of the eager path runs
outside ATen's operators: profile the aten path for its kernels). The prefill and
ImageBART's encoder pass are in the profiled run, spread over its calls; inside a compiled graph the bytes
are not counted.

On a CPU shared with other jobs, OpenMP's default spin-waiting makes every small per-token op wait for busy
cores, so the script asks for passive waiting (OMP_WAIT_POLICY=PASSIVE), as bench/run.py does, unless the caller
set a policy (it must be set before torch is imported). On a machine with nothing else running,
OMP_WAIT_POLICY=active measures what spinning threads give (the cached loops then use all of --threads).
Measured figures: docs/speed.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import Counter

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import priors.cpu_decode  # noqa: E402
import priors.transformer  # noqa: E402
from bench.device import sync  # noqa: E402
from priors.absorbing import AbsorbingPrior  # noqa: E402
from priors.ar import ARPrior  # noqa: E402
from priors.flops import decoder_sample_flops, encoder_flops, matmul_peak_flops, sample_flops_per_image  # noqa: E402
from priors.imagebart import ImageBARTPrior  # noqa: E402
from priors.roofline import (decoder_sample_bytes, encoder_bytes, read_bandwidth, roofline_seconds,  # noqa: E402
                             sample_bytes)

SHAPES = {  # name: (V, grid, parameters per model, batch)
    "default": (130, (8, 8), 400_000, 50),
    "256": (1024, (16, 16), 4_000_000, 8),
}
PATHS = ("uncached", "eager", "aten", "compiled")


class Sampler:
    """One sampler at one shape: how to run each path, and its model FLOPs and bytes read per image per path."""

    def __init__(self, name: str, prior, run, flops: dict[str, float], nbytes: dict[str, float],
                 paths: tuple[str, ...], tokens: int):
        self.name, self.prior, self._run, self.flops, self.paths = name, prior, run, flops, paths
        self.bytes, self.tokens = nbytes, tokens  # tokens: network calls (decode steps) of one run

    def run(self, path: str, seed: int) -> torch.Tensor:
        self.prior.set_compile("on" if path == "compiled" else "off")
        g = torch.Generator(device=self.prior.device).manual_seed(seed)
        # "aten": the eager path with the fused CPU code off (priors/cpu_decode.py), ATen's kernels only.
        priors.cpu_decode.FUSED_DECODE = False if path == "aten" else "auto"
        try:
            return self._run(g, path != "uncached")
        finally:
            priors.cpu_decode.FUSED_DECODE = "auto"


def build(shape: str, device: torch.device, absorbing_T: int, which: list[str]) -> list[Sampler]:
    V, grid, budget, batch = SHAPES[shape]
    L = grid[0] * grid[1]
    out = []
    if "ar" in which:
        torch.manual_seed(0)
        ar = ARPrior.from_budget(V, grid, budget=budget, n_layer=4, n_head=4).to(device).eval()
        out.append(Sampler("ar", ar, lambda g, cached: ar.sample(batch, g, use_cache=cached),
                           {p: sample_flops_per_image(ar, use_cache=p != "uncached") for p in PATHS},
                           {p: sample_bytes(ar, batch, use_cache=p != "uncached") / batch for p in PATHS}, PATHS, L))
    if "imagebart" in which:
        torch.manual_seed(0)
        # T=3: the budget is split over T-1=2 scales, so 2x the budget gives each scale the AR model's budget.
        ib = ImageBARTPrior.from_budget(V, grid, budget=2 * budget, T=3, n_layer=4, n_head=4).to(device).eval()
        x_t = torch.randint(0, V, (batch, L), generator=torch.Generator(device=device).manual_seed(0),
                            device=device)  # (B, L)
        scale = ib.scales["scale2"]
        flops = {p: encoder_flops(scale.encoder.cfg, L) + decoder_sample_flops(
            scale.decoder.cfg, L, use_cache=p != "uncached", memory=L) for p in PATHS}
        nbytes = {p: (encoder_bytes(scale.encoder.cfg, L, batch) + decoder_sample_bytes(
            scale.decoder.cfg, L, batch, use_cache=p != "uncached", memory=L)) / batch for p in PATHS}
        out.append(Sampler("imagebart decoder (T=3, t=2)", ib,
                           lambda g, cached: ib.sample_scale(2, x_t, g, use_cache=cached), flops, nbytes, PATHS, L))
    if "absorbing" in which:
        torch.manual_seed(0)
        ab = AbsorbingPrior.from_budget(V, grid, budget=budget, n_layer=4, n_head=4, T=absorbing_T).to(device).eval()
        out.append(Sampler(f"absorbing (T={absorbing_T})", ab, lambda g, cached: ab.sample(batch, g),
                           {p: sample_flops_per_image(ab) for p in PATHS},
                           {p: sample_bytes(ab, batch) / batch for p in PATHS}, ("eager", "aten", "compiled"),
                           absorbing_T))
    return out


def bench_shape(shape: str, args, device: torch.device, peak: float, bandwidth: float) -> list[dict]:
    V, grid, budget, batch = SHAPES[shape]
    print(f"\n## shapes '{shape}': batch {batch}, {grid[0] * grid[1]} tokens, V={V}, {budget:,} parameters "
          f"per model, 4 layers, 4 heads", flush=True)
    rows = []
    for s in build(shape, device, args.absorbing_T, args.priors):
        paths = [p for p in s.paths if p in args.paths]
        ref, compile_s, times = None, None, {p: [] for p in paths}
        with torch.no_grad():
            for p in paths:  # warm-up: allocator, thread pool, kernels; the compiled path compiles here
                if p == "uncached":
                    continue  # its first call is as warm as the others (no compilation, same kernels)
                t0 = time.perf_counter()
                out = s.run(p, seed=0)
                if p == "compiled":
                    compile_s = time.perf_counter() - t0
            same = {}
            for r in range(args.repeats):
                for p in paths:
                    if p == "uncached" and r >= args.uncached_repeats:
                        continue
                    sync(device)
                    t0 = time.perf_counter()
                    out = s.run(p, seed=1)
                    sync(device)
                    times[p].append(time.perf_counter() - t0)
                    if ref is None:
                        ref = out
                    same[p] = same.get(p, True) and torch.equal(out, ref)
        s.prior.set_compile("off")
        print(f"{s.name}: params {s.prior.num_params():,}" + (f", compile {compile_s:.1f} s" if compile_s else ""))
        base = statistics.median(times["uncached"]) if times.get("uncached") else None
        for p in paths:
            sec = statistics.median(times[p])
            flops = s.flops[p] * batch / sec
            roof = roofline_seconds(s.flops[p] * batch, s.bytes[p] * batch, peak, bandwidth)
            row = {"shape": shape, "sampler": s.name, "path": p, "threads": torch.get_num_threads(),
                   "batch": batch, "seconds": sec, "seconds_all": times[p], "seconds_per_image": sec / batch,
                   "flops_per_image": s.flops[p], "flop_per_s": flops, "share_of_peak": flops / peak,
                   "bytes_per_image": s.bytes[p], "roofline_seconds": roof, "share_of_roofline": roof / sec,
                   "bound": "compute" if s.flops[p] / peak >= s.bytes[p] / bandwidth else "bandwidth",
                   "speedup_vs_uncached": None if base is None else base / sec, "same_tokens": same[p],
                   "compile_seconds": compile_s if p == "compiled" else None}
            rows.append(row)
            print(f"  {p:9s} {sec:8.3f} s  ({sec / batch * 1e3:7.2f} ms/img)  {s.flops[p] / 1e6:9.1f} MFLOP/img  "
                  f"{s.bytes[p] / 1e6:8.1f} MB/img  {flops / 1e9:6.1f} GFLOP/s = {flops / peak:6.1%} of peak, "
                  f"{roof / sec:6.1%} of limit ({row['bound']})"
                  + ("" if base is None else f"  {base / sec:6.1f}x vs uncached")
                  + f"  same tokens: {same[p]}   [{', '.join(f'{t:.3f}' for t in times[p])}]", flush=True)
        if args.profile:
            for p in paths:
                if p != "uncached":
                    print_profile(s, p, args.profile_rows, batch)
    return rows


def _reads(func, args, kwargs) -> int:
    """Bytes an operator call reads: its tensor inputs, less what it only writes (out=, the destination of
    copy_/fill_/zero_ and of the random fills) and nothing for a view."""
    if func.is_view:
        return 0
    name = func._schema.name
    skip_first = name in ("aten::copy_", "aten::fill_", "aten::zero_", "aten::exponential_", "aten::uniform_",
                          "aten::normal_", "aten::random_", "aten::index_put_")
    tensors = []
    for i, a in enumerate(args):
        if i == 0 and skip_first:
            continue
        tensors += a if isinstance(a, (list, tuple)) else [a]
    tensors += [v for k, v in kwargs.items() if k != "out"]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def print_profile(s: Sampler, path: str, rows: int, batch: int) -> None:
    """One run of the path under torch.profiler (time per operator) and under a dispatch mode (operator calls and
    the bytes each reads), per network call: L decode steps (AR, ImageBART decoder; the prefill and ImageBART's
    encoder pass are in the run and spread over its calls) or one full pass (absorbing)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.utils._python_dispatch import TorchDispatchMode

    class Reads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls, self.bytes = Counter(), Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            self.calls[func._schema.name] += 1
            self.bytes[func._schema.name] += _reads(func, args, kwargs)
            return func(*args, **kwargs)

    with torch.no_grad():
        s.run(path, seed=1)  # warm (the compiled path is compiled by now)
        wall = float("inf")
        for _ in range(3):  # the best of three: one busy moment of a shared machine would skew a single run
            t0 = time.perf_counter()
            s.run(path, seed=1)
            wall = min(wall, time.perf_counter() - t0)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            s.run(path, seed=1)
        reads = Reads()
        if path in ("eager", "aten"):  # a dispatch mode cannot look inside a compiled graph
            with reads:
                s.run(path, seed=1)
    s.prior.set_compile("off")
    n = s.tokens
    # Leaf operators only (self time): composite ones (linear, matmul) show in their parts.
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    events.sort(key=lambda e: -e.self_cpu_time_total)
    op_us = sum(e.self_cpu_time_total for e in events)
    total_calls = sum(e.count for e in events)
    print(f"  profile of {s.name}, {path}, per network call ({n} per run, batch {batch}): {wall / n * 1e3:.3f} ms "
          f"unprofiled (best of 3); under the profiler {op_us / n / 1e3:.3f} ms in {total_calls / n:.0f} operator "
          f"calls, {sum(reads.bytes.values()) / n / 1e6:.2f} MB read"
          + ("" if reads.calls else " (not counted inside a compiled graph)"))
    print(f"    {'operator':44s} {'calls':>7s} {'us':>8s} {'share':>6s} {'MB read':>8s}")
    shown = events[:rows]
    for e in shown:
        mb = f"{reads.bytes[e.key] / n / 1e6:8.3f}" if e.key in reads.calls else f"{'-':>8s}"
        print(f"    {e.key[:44]:44s} {e.count / n:7.1f} {e.self_cpu_time_total / n:8.1f} "
              f"{e.self_cpu_time_total / op_us:6.1%} {mb}")
    rest = events[rows:]
    if rest:
        us = sum(e.self_cpu_time_total for e in rest)
        mb = sum(reads.bytes[e.key] for e in rest) / n / 1e6
        print(f"    {f'{len(rest)} other operators':44s} {sum(e.count for e in rest) / n:7.1f} {us / n:8.1f} "
              f"{us / op_us:6.1%} {mb:8.3f}")


def fused_note(device: torch.device) -> str:
    """Whether the eager path runs the fused CPU code, and at which vector width, or why not."""
    if device.type != "cpu":
        return "fused CPU code: not on this device"
    lib, why = priors.cpu_decode.library()
    if lib is None:
        return f"fused CPU code: unavailable ({why})"
    return f"fused CPU code: {lib.pb_vector_width()}-float vectors"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["default", "256"], choices=list(SHAPES))
    parser.add_argument("--priors", nargs="+", default=["ar", "imagebart", "absorbing"],
                        choices=["ar", "imagebart", "absorbing"])
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds of every path (medians reported)")
    parser.add_argument("--uncached-repeats", type=int, default=1, help="rounds that also time the uncached path")
    parser.add_argument("--absorbing-T", type=int, default=5, help="absorbing sampling steps (the sweep default T)")
    parser.add_argument("--peak-seconds", type=float, default=2.0)
    parser.add_argument("--bandwidth-seconds", type=float, default=2.0)
    parser.add_argument("--decode-threads", default=priors.transformer.DECODE_THREADS,
                        type=lambda v: v if v == "auto" else int(v),
                        help="intra-op threads of the cached decoding loops: auto (one under passive OpenMP waiting, "
                             "else those of --threads), N, or 0 (those of --threads)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile each cached path: time, calls and bytes read per operator per step")
    parser.add_argument("--profile-rows", type=int, default=15, help="operators shown per profile (the rest summed)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of the compiled path (eager: graph capture only, for tests)")
    args = parser.parse_args()
    priors.transformer.COMPILE_BACKEND = args.compile_backend
    priors.transformer.DECODE_THREADS = args.decode_threads or None  # 0: None, no limit
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    peak = matmul_peak_flops(device, seconds=args.peak_seconds)
    bandwidth = read_bandwidth(device, seconds=args.bandwidth_seconds)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(f"torch {torch.__version__}, device {device}, threads={torch.get_num_threads()}, "
          f"decode threads {priors.transformer.decode_thread_limit() or torch.get_num_threads()} "
          f"(--decode-threads {args.decode_threads}), "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, ATen CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, {fused_note(device)}, compile backend {args.compile_backend}, "
          f"measured matmul peak "
          f"{peak / 1e9:.1f} GFLOP/s, read bandwidth {bandwidth / 1e9:.1f} GB/s, load average {load}")
    rows = []
    for shape in args.shapes:
        rows += bench_shape(shape, args, device, peak, bandwidth)
    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    # Measured again at the end: on a shared machine the first measurement may fall in a busy moment, and a
    # peak below what the samplers reached would overstate every share. The shares use the best of the two.
    peak_end = matmul_peak_flops(device, seconds=args.peak_seconds)
    bandwidth_end = read_bandwidth(device, seconds=args.bandwidth_seconds)
    print(f"\nload average at the end: {load_end}; measured again: matmul peak {peak_end / 1e9:.1f} GFLOP/s, "
          f"read bandwidth {bandwidth_end / 1e9:.1f} GB/s")
    best_peak, best_bandwidth = max(peak, peak_end), max(bandwidth, bandwidth_end)
    if (best_peak, best_bandwidth) != (peak, bandwidth):
        print(f"shares against the run's best peak {best_peak / 1e9:.1f} GFLOP/s and bandwidth "
              f"{best_bandwidth / 1e9:.1f} GB/s:")
    for r in rows:
        batch = r["batch"]
        r["roofline_seconds"] = roofline_seconds(r["flops_per_image"] * batch, r["bytes_per_image"] * batch,
                                                 best_peak, best_bandwidth)
        r["share_of_peak"] = r["flop_per_s"] / best_peak
        r["share_of_roofline"] = r["roofline_seconds"] / r["seconds"]
        if (best_peak, best_bandwidth) != (peak, bandwidth):
            print(f"  {r['shape']:7s} {r['sampler']:30s} {r['path']:9s} {r['share_of_peak']:6.1%} of peak, "
                  f"{r['share_of_roofline']:6.1%} of limit")
    if args.json:
        with open(args.json, "w") as f:
            measured = {"peak_flop_per_s": [peak, peak_end], "read_bytes_per_s": [bandwidth, bandwidth_end]}
            json.dump({"peak_flop_per_s": best_peak, "read_bytes_per_s": best_bandwidth, "measured": measured,
                       "threads": torch.get_num_threads(), "load_average": [load, load_end], "rows": rows}, f, indent=1)
    bad = [r for r in rows if not r["same_tokens"]]
    for r in bad:
        print(f"ERROR: {r['sampler']} ({r['shape']}): the {r['path']} path drew other tokens than the first path")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
