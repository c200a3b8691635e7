"""The peak of live memory over a callable, for tests of bench/memory.py's estimates.

- `tensor_peak`: torch's CPU allocator as the profiler sees it (profile_memory=True records every allocation and
  free with its size and time): the largest sum of bytes allocated and not yet freed, counted from the call's
  start. Every tensor storage and every temporary ATen allocates through that allocator (attention scores,
  reduction buffers) counts; Python objects and memory freed that was allocated before the call do not.
  Intra-op threads report their allocations too, but run tests on one thread: an allocation and a free on two
  threads with one timestamp could be ordered either way.
- `numpy_peak`: tracemalloc's peak over the call (numpy reports its array buffers to it), for the numpy parts of
  the evaluation (PRDC and KID matrices).
"""
from __future__ import annotations

import tracemalloc
from typing import Any, Callable

from torch.profiler import ProfilerActivity, profile

MEMORY_EVENT = "[memory]"  # the profiler's name for an allocation (nbytes > 0) or a free (nbytes < 0)


def tensor_peak(fn: Callable[[], Any]) -> tuple[int, Any]:
    """(the peak of CPU tensor bytes allocated during fn() and alive at once, fn's result)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == MEMORY_EVENT]
    events.sort(key=lambda e: e.start_ns())  # stable: the recorded order breaks ties
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak, result


def numpy_peak(fn: Callable[[], Any]) -> tuple[int, Any]:
    """(tracemalloc's peak over fn(), above what was traced when it started; fn's result)."""
    tracemalloc.start()
    try:
        start, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        result = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - start, result
