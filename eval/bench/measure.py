"""Timing and peak memory of one benchmark case.

Timing: ``warmup`` untimed calls, then up to ``repeats`` timed ones, stopping once ``budget_s``
seconds of timed calls are used up; the median is reported. A warm-up call slower than the
budget counts as the measurement. On CUDA the device is synchronised around each call.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` above what was allocated before the
case. On CPU the peak resident set (``VmHWM``, reset at the start) minus the resident set before
the case; that figure is only clean in a fresh process (:mod:`vistok.eval.bench.isolate`).
"""
from __future__ import annotations

import contextlib
import gc
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for ``precision == "bf16"``, otherwise nothing."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _seconds(step: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    step()
    sync(device)
    return time.perf_counter() - start


def measure_interleaved(steps: Mapping[str, Callable[[], Any]], device: torch.device, *, warmup: int, repeats: int,
                        budget_s: float, count_slow_warmup: bool = True) -> dict[str, dict[str, Any]]:
    """Time several steps whose timed calls alternate (in alternating order), so all see the same load.

    On a shared machine load changes over seconds; timing one step after the other would compare
    different loads. Returns {name: {"median_s", "best_s", "times_s", "warmup_s"}}. When
    ``count_slow_warmup`` and one warm-up call of a step alone exceeds the budget, that call is
    its measurement (with a "note"; large reference cases take tens of seconds per call on a CPU)
    and the step is not timed again. ``repeats=0`` only warms up.
    """
    warmups: dict[str, list[float]] = {name: [] for name in steps}
    slow: set[str] = set()
    for name, step in steps.items():
        for _ in range(warmup):
            warmups[name].append(_seconds(step, device))
            if count_slow_warmup and warmups[name][-1] > budget_s:
                slow.add(name)
                break
    active = [name for name in steps if name not in slow]
    times: dict[str, list[float]] = {name: [] for name in active}
    began = time.perf_counter()
    for repeat in range(repeats if active else 0):
        for name in (active if repeat % 2 == 0 else active[::-1]):
            times[name].append(_seconds(steps[name], device))
        if time.perf_counter() - began > budget_s:
            break

    results: dict[str, dict[str, Any]] = {}
    for name in steps:
        if times.get(name):
            results[name] = {"median_s": statistics.median(times[name]), "best_s": min(times[name]),
                             "times_s": times[name], "warmup_s": warmups[name]}
            continue
        last = warmups[name][-1] if warmups[name] else float("nan")
        results[name] = {"median_s": last, "best_s": last, "times_s": [last] if name in slow else [],
                         "warmup_s": warmups[name]}
        if name in slow:
            results[name]["note"] = "one call exceeded the time budget; it is the measurement"
    return results


def measure(step: Callable[[], Any], device: torch.device, *, warmup: int, repeats: int, budget_s: float,
            count_slow_warmup: bool = True) -> dict[str, Any]:
    """Time one step; see :func:`measure_interleaved`."""
    return measure_interleaved({"step": step}, device, warmup=warmup, repeats=repeats, budget_s=budget_s,
                               count_slow_warmup=count_slow_warmup)["step"]


def proc_kib(path: str, field: str) -> int | None:
    """A ``FIELD:  N kB`` line of a /proc file (status, meminfo) in KiB; None where unreadable."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def available_memory_bytes() -> int | None:
    kib = proc_kib("/proc/meminfo", "MemAvailable")
    return kib * 1024 if kib is not None else None


class PeakMemory:
    """Peak memory of a block above the level before it (see the module docstring).

    On CPU the process-wide peak RSS is reset through ``/proc/self/clear_refs`` (Linux >= 4.0);
    where that is impossible, the growth of ``ru_maxrss`` is a lower bound.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes: int | None = None
        self.method = ""

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated above the allocation before the case"
            return self
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self._hwm = True
            self._base = (proc_kib("/proc/self/status", "VmRSS") or 0) * 1024
            self.method = "peak RSS (VmHWM, reset at the case start) minus RSS before the case"
        except OSError:
            self._hwm = False
            self._base = _max_rss_bytes()
            self.method = "ru_maxrss growth during the case (lower bound: the peak could not be reset)"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self._hwm:
            self.peak_bytes = (proc_kib("/proc/self/status", "VmHWM") or 0) * 1024 - self._base
        else:
            self.peak_bytes = max(0, _max_rss_bytes() - self._base)


def _max_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
