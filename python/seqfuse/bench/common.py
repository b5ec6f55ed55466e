"""Timing, machine limits and tables shared by the benchmarks.

Times are medians of repeated runs after warm-up, with CUDA work timed by events on
the current stream. Every figure a benchmark reports is measured in the same run:
the machine's memory bandwidth (a large device copy) and matmul rate are measured
here, not quoted.
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import time
from typing import Callable

import torch

# Seconds of repeated calls each timing takes at least (python -m seqfuse.bench --min-time).
MIN_TIME = 0.3


class Rows(list):
    """A family's result rows; each row is also printed as one JSON line ("row: {...}")
    when it is added, so a run that is cut short (the GPU suite's time limits) still
    leaves every row it measured in its log."""

    def append(self, row: dict) -> None:
        print("row: " + json.dumps(row, default=str), flush=True)
        super().append(row)

    def extend(self, rows) -> None:
        for row in rows:
            self.append(row)

    def __iadd__(self, rows):
        self.extend(rows)
        return self


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], device: str, *, min_time: float | None = None,
            warmup: int = 2, max_reps: int = 200) -> float:
    """Median seconds per call of fn(), over at least `min_time` (default MIN_TIME) s."""
    min_time = MIN_TIME if min_time is None else min_time
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_time and len(times) < max_reps):
        if device.startswith("cuda"):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_paired(fn_a: Callable[[], object], fn_b: Callable[[], object], device: str, *,
                min_time: float | None = None, warmup: int = 2,
                max_reps: int = 200) -> tuple[float, float, float]:
    """fn_a and fn_b called alternately (a, b, a, b, ...) for at least `min_time` s each:
    their median seconds per call and the median of the per-pair ratios b / a. On a
    machine whose speed drifts, both calls of a pair see the same moment, so the ratio
    holds where two medians taken a second apart do not."""
    min_time = MIN_TIME if min_time is None else min_time
    for _ in range(warmup):
        fn_a(), fn_b()
    a: list[float] = []
    b: list[float] = []
    start = time.perf_counter()
    while len(a) < 3 or (time.perf_counter() - start < 2 * min_time and len(a) < max_reps):
        for fn, times in ((fn_a, a), (fn_b, b)):
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            times.append(time.perf_counter() - t0)
    ratio = statistics.median(y / x for x, y in zip(a, b))
    return statistics.median(a), statistics.median(b), ratio


def memory_bandwidth(device: str, nbytes: int = 1 << 28) -> float:
    """Achievable memory bandwidth in bytes/s: a device-to-device copy of nbytes
    (each byte read once and written once)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    return 2 * nbytes / time_fn(lambda: dst.copy_(src), device)


def matmul_rate(device: str, dtype: torch.dtype, n: int = 4096) -> float:
    """Achievable dense matmul rate in FLOP/s for n x n x n products."""
    if not device.startswith("cuda"):
        n = min(n, 1024)
    x = torch.randn(n, n, device=device, dtype=dtype)
    y = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / time_fn(lambda: x @ y, device)


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A plain-text table of the given columns; floats get 4 significant digits."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "-" if v is None else str(v)
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c)
              for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))
    return "\n".join([line(columns), line(["-" * w for w in widths]), *map(line, cells)])


def write_json(path: str, family: str, device: str, limits: dict, rows: list[dict]) -> None:
    import seqfuse

    record = {
        "family": family,
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "seqfuse_build": seqfuse.build_info(),
        "commit": git_commit(),
        "limits": limits,
        "rows": rows,
    }
    with open(path, "w") as f:
        json.dump(record, f, indent=1, default=str)
