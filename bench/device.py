"""Where and how a job computes: device, compute precision, threads, autocast, sync and peak memory."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch
from threadpoolctl import threadpool_limits

from bench.errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16")


def resolve_device(want: Any) -> torch.device:
    want = str(want)
    if want == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={want}: CUDA is not available on this machine")
    if not (want == "cpu" or want.startswith("cuda")):
        raise ConfigError(f"device={want} is not one of: auto, cpu, cuda")
    return torch.device(want)


def resolve_precision(want: Any, device: torch.device) -> str:
    """The compute precision of training, sampling and completion: "bf16" (autocast) or "fp32".
    auto is bf16 on CUDA and fp32 on CPU; NLL and metrics are always computed in float32."""
    want = str(want)
    if want not in PRECISIONS:
        raise ConfigError(f"precision={want} is not one of: {', '.join(PRECISIONS)}")
    return "bf16" if want == "bf16" or (want == "auto" and device.type == "cuda") else "fp32"


def available_cpus() -> int:
    """CPUs this process may run on (SLURM's cpus_per_task, taskset), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_threads(want: Any) -> int:
    """`threads`: auto = the CPUs this process may use. Every launcher on one machine then gives a job the
    same count (joblib's workers would otherwise get cpu_count // n_jobs), so float reductions, and so the
    results, do not depend on how the job was launched."""
    if str(want) == "auto":
        return available_cpus()
    if isinstance(want, bool) or not isinstance(want, int) or want < 1:
        raise ConfigError(f"threads={want} must be a positive integer or auto")
    if want > available_cpus():
        # More threads than CPUs only wait on each other (and change the float reductions for nothing).
        raise ConfigError(f"threads={want} exceeds the {available_cpus()} CPUs this process may use")
    return int(want)


def set_threads(n: int) -> None:
    """torch's intra-op threads and numpy's BLAS threads (the metrics' float64 linear algebra): a BLAS splits a
    product's sums by thread, so a job launched where the BLAS would pick another count (a joblib worker gets
    cpu_count // n_jobs) would round its metrics differently."""
    torch.set_num_threads(int(n))
    threadpool_limits(limits=int(n), user_api="blas")


def autocast(device: torch.device, precision: str):
    """bf16 autocast where the job's precision says so; nothing otherwise."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLEAR_REFS = Path("/proc/self/clear_refs")
STATUS = Path("/proc/self/status")


def memory_bytes(device: torch.device) -> int | None:
    """The memory a job may fill: the GPU's total, or the CPU's available memory (None where unknown)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak_memory(device: torch.device) -> str | None:
    """Start a fresh peak-memory window; returns why no peak can be measured, or None.

    CUDA: torch's peak allocated counter. CPU: the kernel's peak RSS (VmHWM) of this process, reset by
    writing 5 to /proc/self/clear_refs, so an earlier job of the same process (basic launcher) does not leak
    into this one's figure."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return None
    try:
        CLEAR_REFS.write_text("5")
        return None
    except OSError as e:
        return f"cannot reset the CPU peak RSS ({CLEAR_REFS}: {e.strerror or e}), so no per-job peak"


def peak_memory_mb(device: torch.device) -> float | None:
    """Peak since reset_peak_memory: CUDA allocated memory, or the process's peak RSS on CPU (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        return None
    return None
