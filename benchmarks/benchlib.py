"""Shared helpers of the benchmarks: interleaved timing, peak memory, one summary row per comparison.

Every benchmark compares *the note's method* (written from its design note) with *the probe's way*
in the same process on the same inputs.  Timings are interleaved (A B A B ...) so a shared
machine's load drift hits both alike; ratios are reported as min and median over repetitions.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` above the memory in use before the call;
on CPU the peak resident set size above the RSS before the call, sampled every millisecond from
``/proc/self/statm`` (torch's CPU allocator is invisible to tracemalloc).  CPU peaks are therefore
coarse (allocator caching, sampling) and meaningful only when they differ by a lot.

``LAYERSCOPE_BENCH_JSON=<file>``: each comparison is appended to that file as one JSON line
(probe, comparison, note/probe seconds, peak MB, ratios, machine); ``benchmarks/run_all.py``
collects them into the per-probe table ``make bench`` prints.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import threading
import time
from typing import Any, Callable, Sequence

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return 0


def measure(fn: Callable[[], Any], device: str = "cpu") -> tuple[float, float, Any]:
    """Run ``fn`` once: (seconds, peak MB above the memory in use before it, result)."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        return dt, (torch.cuda.max_memory_allocated() - base) / 2**20, out
    base = _rss_bytes()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            stop.wait(0.001)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t = time.perf_counter()
    try:
        out = fn()
    finally:
        dt = time.perf_counter() - t
        stop.set()
        th.join()
    peak[0] = max(peak[0], _rss_bytes())
    return dt, (peak[0] - base) / 2**20, out


def compare(note: Callable[[], Any], probe: Callable[[], Any], reps: int, device: str = "cpu",
            warmup: bool = True) -> dict[str, Any]:
    """Interleaved repetitions of both methods; times, peaks and the ratio note/probe per repetition."""
    if warmup:
        note(), probe()
    tn, tp, mn, mp = [], [], [], []
    out_n = out_p = None
    for _ in range(reps):
        a, ma, out_n = measure(note, device)
        b, mb, out_p = measure(probe, device)
        tn.append(a), tp.append(b), mn.append(ma), mp.append(mb)
    ratios = [a / b for a, b in zip(tn, tp)]
    return {"note_s": statistics.median(tn), "probe_s": statistics.median(tp), "note_min_s": min(tn), "probe_min_s": min(tp),
            "note_peak_mb": max(mn), "probe_peak_mb": max(mp), "ratio_min": min(ratios), "ratio_median": statistics.median(ratios),
            "reps": reps, "note_out": out_n, "probe_out": out_p}


def machine(device: str = "cpu") -> str:
    """One line naming what measured: GPU name or CPU model and the threads torch used."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} thread(s)"


def report(probe: str, comparison: str, res: dict[str, Any], device: str = "cpu", unit: str = "", **extra: Any) -> None:
    """Print one comparison line and append it to ``$LAYERSCOPE_BENCH_JSON`` when set."""
    print(f"[{probe}] {comparison}: note {res['note_s']:.4f} s / {res['note_peak_mb']:.0f} MB, "
          f"probe {res['probe_s']:.4f} s / {res['probe_peak_mb']:.0f} MB, "
          f"ratio {res['ratio_min']:.2f}x min / {res['ratio_median']:.2f}x median over {res['reps']} reps{unit}")
    path = os.environ.get("LAYERSCOPE_BENCH_JSON")
    if path:
        row = {k: v for k, v in res.items() if not k.endswith("_out")}
        row.update(probe=probe, comparison=comparison, device=device, machine=machine(device), **extra)
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of summary rows: note's method vs probe, time (median), peak memory, and the
    ratio three ways: min and median of the per-repetition ratios, and fastest note run over
    fastest probe run (the most robust to other load on a shared machine)."""
    out = ["| probe | comparison | note's method: s (peak MB) | probe: s (peak MB) | probe throughput | ratio note/probe: min / median / fastest runs | device |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        thr = f"{r['items'] / r['probe_s']:.3g} {r['item']}/s" if r.get("items") and r.get("item") else ""
        out.append(f"| {r['probe']} | {r['comparison']} | {r['note_s']:.4g} ({r['note_peak_mb']:.0f}) | "
                   f"{r['probe_s']:.4g} ({r['probe_peak_mb']:.0f}) | {thr} | {r['ratio_min']:.2f}x / {r['ratio_median']:.2f}x / {r['note_min_s'] / r['probe_min_s']:.2f}x | {r['device']} |")
    return "\n".join(out)
