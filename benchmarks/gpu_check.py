"""The GPU checks, one short script: a bf16 training step, sampling speed at batch 50 and peak memory per prior.

    python benchmarks/gpu_check.py [--out DIR] [--T 2 3 5 9] [--budget N] [--quick]

Every point is built at the paper preset's shapes (conf/experiment/ffhq_tab3.yaml: the budget split as in
ImageBART Tab. 3, n_layer 24, n_head 16, train batch 32) on a 16x16 token grid over a 1024-code book (the f16
FFHQ VQGAN), with each prior's own conf/prior/*.yaml options. Per point it measures

- train: `--train-steps` timed AdamW steps of one unit (ImageBART: scale 2, an encoder-decoder scale, and the
  decoder-only last scale) after 2 warm-up steps, under bf16 autocast as `bench.train` trains; loss finite;
  seconds per step, tokens per second, peak allocated memory;
- sample: one warm-up batch, then `--sample-batches` timed `sample()` calls at `--sample-batch` (50, the speed
  protocol of ImageBART Fig. 8) under bf16 autocast as the eval stage samples; seconds per image, NFE, peak memory,
  model FLOPs per image (priors/flops.py) and the achieved share of the measured bf16 matmul peak;
- sample_compiled (unless --no-compile): the same with `Prior.set_compile("on")` (torch.compile of the decode
  step / the absorbing full pass, static KV cache): the warm-up batch compiles and is reported as
  warmup_seconds; same_tokens_fraction compares its first timed batch with the eager one (same seed; bf16
  kernels of another float order may flip a few draws).

The weights are random (speed and memory do not depend on them). Results go to DIR/gpu_check.json and a
markdown table on stdout; DIR defaults to $OUT when set (the device machine's output folder), else ".".
`--quick` shrinks everything (8x8 grid, 256 codes, 4 layers, 300k parameters, small batches) so that the
script itself can be checked on a CPU in seconds (tests/test_benchmarks.py does, with --compile-backend eager:
dynamo's graph capture without inductor's code generation).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import priors.transformer  # noqa: E402
from bench.device import autocast, sync  # noqa: E402
from priors import build_prior  # noqa: E402
from priors.flops import matmul_peak_flops, sample_flops_per_image  # noqa: E402


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None


def prior_options(name: str, preset: dict) -> dict:
    """conf/prior/NAME.yaml with the preset's prior overrides, as a job would see them (minus `name`)."""
    opts = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "prior" / f"{name}.yaml"), resolve=True)
    opts.update(preset.get("prior", {}))
    opts.pop("name", None)
    return opts


def time_train(prior, unit: str, batch: int, steps: int, device: torch.device, precision: str,
               g: torch.Generator) -> dict:
    module = prior.units()[unit]
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01)
    prior.train()
    reset_peak(device)
    losses, times = [], []
    for i in range(2 + steps):
        x = torch.randint(0, prior.vocab_size, (batch, prior.seq_len), generator=g, device=device)  # (B, L)
        sync(device)
        t0 = time.perf_counter()
        with autocast(device, precision):
            loss, _ = prior.unit_loss(unit, x, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        sync(device)
        if i >= 2:  # the first two steps pay for kernel selection and the optimizer's state allocation
            times.append(time.perf_counter() - t0)
            losses.append(float(loss))
    del opt
    s = sum(times) / len(times)
    return {"unit": unit, "unit_params": sum(p.numel() for p in module.parameters()), "batch": batch,
            "seconds_per_step": s, "tokens_per_second": batch * prior.seq_len / s,
            "loss_finite": all(math.isfinite(v) for v in losses), "last_loss": losses[-1],
            "peak_memory_mib": peak_mib(device)}


@torch.no_grad()
def time_sample(prior, batch: int, batches: int, device: torch.device, precision: str, seed: int,
                compile_mode: str = "off") -> tuple[dict, torch.Tensor]:
    """Sampling speed of one path; also the first timed batch's tokens (seeded by `seed`, for comparisons)."""
    prior.eval()
    prior.set_compile(compile_mode)
    reset_peak(device)
    g = torch.Generator(device=device).manual_seed(seed + 1)
    sync(device)
    t0 = time.perf_counter()
    with autocast(device, precision):
        x = prior.sample(batch, generator=g)  # warm-up batch, as in the eval stage; compiles when compile is on
    sync(device)
    warmup = time.perf_counter() - t0
    g.manual_seed(seed)
    times, first = [], None
    for _ in range(batches):
        sync(device)
        t0 = time.perf_counter()
        with autocast(device, precision):
            x = prior.sample(batch, generator=g)
        sync(device)
        times.append(time.perf_counter() - t0)
        first = x if first is None else first
    prior.set_compile("off")
    ok = bool(((x >= 0) & (x < prior.vocab_size)).all())
    s = sum(times) / len(times) / batch
    return {"batch": batch, "compile": compile_mode, "seconds_per_image": s, "images_per_second": 1.0 / s,
            "warmup_seconds": warmup, "nfe": prior.nfe(), "tokens_in_range": ok,
            "peak_memory_mib": peak_mib(device)}, first


def add_efficiency(sample: dict, prior, peak: float) -> dict:
    """Model FLOPs per image (priors/flops.py), the FLOP/s they were done at, and that as a share of the peak."""
    flops = sample_flops_per_image(prior)
    achieved = None if flops is None else flops / sample["seconds_per_image"]
    sample.update(flops_per_image=flops, flop_per_s=achieved,
                  share_of_peak=None if achieved is None else achieved / peak)
    return sample


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for gpu_check.json")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--priors", nargs="+", default=["ar", "imagebart", "absorbing"])
    parser.add_argument("--T", nargs="+", type=int, default=[2, 3, 5, 9], help="ImageBART chain lengths; "
                        "absorbing sampling steps (trained once); AR is measured once")
    parser.add_argument("--budget", type=int, default=None, help="parameters per prior (default: the preset's)")
    parser.add_argument("--train-steps", type=int, default=5)
    parser.add_argument("--sample-batch", type=int, default=50)
    parser.add_argument("--sample-batches", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, to check the script on a CPU")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="skip the compiled sampling path (sample_compiled)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of the compiled path (eager: graph capture only, for tests)")
    parser.add_argument("--peak-seconds", type=float, default=2.0, help="length of the matmul peak benchmark")
    args = parser.parse_args()
    priors.transformer.COMPILE_BACKEND = args.compile_backend

    preset = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "experiment" / "ffhq_tab3.yaml"), resolve=False)
    vocab, grid, train_batch = 1024, (16, 16), int(preset["train"]["batch_size"])
    budget = int(args.budget or preset["budget"]["params"])
    if args.quick:
        preset["prior"] = {"n_layer": 4, "n_head": 4}
        vocab, grid, train_batch = 256, (8, 8), 4
        budget = args.budget or 300_000
        args.sample_batch = min(args.sample_batch, 4)
        args.train_steps = min(args.train_steps, 2)
        args.peak_seconds = min(args.peak_seconds, 0.2)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    peak = matmul_peak_flops(device, seconds=args.peak_seconds)  # bf16 on CUDA, float32 on a CPU
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
           "torch": torch.__version__, "cuda": torch.version.cuda, "precision": args.precision,
           "budget": budget, "vocab": vocab, "grid": list(grid), "prior_overrides": preset.get("prior", {}),
           "quick": args.quick, "matmul_peak_flop_per_s": peak, "compile_backend": args.compile_backend}
    print(json.dumps(env))

    points = []
    for name in args.priors:
        if name == "ar":
            points.append((name, None, True))
        elif name == "imagebart":
            points += [(name, T, True) for T in args.T]
        else:  # absorbing: one training, sampled per T
            points += [(name, T, i == 0) for i, T in enumerate(args.T)]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, failed = [], 0
    for name, T, train in points:
        row = {"prior": name, "T": T}
        t_point = time.perf_counter()
        try:
            torch.manual_seed(0)
            g = torch.Generator(device=device).manual_seed(0)
            with torch.device(device):  # built in place: an 800M model is not initialised on the CPU first
                prior = build_prior(name, vocab, grid, T=T if T is not None else 2, budget=budget,
                                    cfg=prior_options(name, preset))
            row["params"] = prior.num_params()
            if train:
                units = list(prior.units())
                row["train"] = [time_train(prior, u, train_batch, args.train_steps, device, args.precision, g)
                                for u in ([units[0], units[-1]] if len(units) > 1 else units)]
            row["sample"], eager = time_sample(prior, args.sample_batch, args.sample_batches, device, args.precision, 0)
            add_efficiency(row["sample"], prior, peak)
            if args.compile:
                row["sample_compiled"], tokens = time_sample(prior, args.sample_batch, args.sample_batches, device,
                                                             args.precision, 0, compile_mode="on")
                add_efficiency(row["sample_compiled"], prior, peak)
                row["sample_compiled"]["same_tokens_fraction"] = float((tokens == eager).double().mean())
        except Exception as e:  # one point failing (e.g. out of memory) must not lose the others
            row["error"] = f"{type(e).__name__}: {e}"
            failed += 1
        row["seconds"] = time.perf_counter() - t_point
        rows.append(row)
        print(json.dumps(row), flush=True)
        prior = None
        gc.collect()
        (out_dir / "gpu_check.json").write_text(json.dumps({"env": env, "points": rows}, indent=1))

    print(f"\n| prior | T | params | train s/step (unit) | train tok/s | train peak MiB | sample s/img "
          f"(batch {args.sample_batch}) | NFE | sample peak MiB | share of peak | compiled s/img | compile s "
          f"| compiled share of peak | same tokens |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    fmt = lambda v, f: "–" if v is None else format(v, f)  # noqa: E731
    for r in rows:
        if "error" in r:
            print(f"| {r['prior']} | {r['T'] or '–'} | – | {r['error'][:80]} | | | | | | | | | | |")
            continue
        tr = r.get("train") or []
        c = r.get("sample_compiled", {})
        print(f"| {r['prior']} | {r['T'] or '–'} | {r['params'] / 1e6:.1f}M | "
              + "; ".join(f"{t['seconds_per_step']:.3f} ({t['unit']})" for t in tr) + " | "
              + "; ".join(f"{t['tokens_per_second']:.0f}" for t in tr) + " | "
              + "; ".join(fmt(t['peak_memory_mib'], '.0f') for t in tr) + " | "
              f"{r['sample']['seconds_per_image']:.4f} | {r['sample']['nfe']} | "
              f"{fmt(r['sample']['peak_memory_mib'], '.0f')} | {fmt(r['sample']['share_of_peak'], '.1%')} | "
              f"{fmt(c.get('seconds_per_image'), '.4f')} | {fmt(c.get('warmup_seconds'), '.1f')} | "
              f"{fmt(c.get('share_of_peak'), '.1%')} | {fmt(c.get('same_tokens_fraction'), '.3f')} |")
    print(f"\nwrote {out_dir / 'gpu_check.json'}")
    bad = [r for r in rows if "error" not in r and (not r["sample"]["tokens_in_range"]
                                                    or not r.get("sample_compiled", {}).get("tokens_in_range", True)
                                                    or not all(t["loss_finite"] for t in r.get("train") or []))]
    return 1 if failed or bad else 0


if __name__ == "__main__":
    sys.exit(main())
