"""Run every probe's benchmark and print one per-probe table: note's method vs probe (time, peak
memory, ratio).  ``make bench`` calls it; ``benchmarks/gpu.sh`` calls it with ``--mode gpu|cpu-reduced``.

Each script prints its own table; comparisons reported through ``benchlib.report`` are collected
(``LAYERSCOPE_BENCH_JSON``) into the summary.  A script that reports no comparison is listed as such.

    python benchmarks/run_all.py [--mode cpu|cpu-reduced|gpu] [--markdown OUT.md] [--only sdxl_ablation,...]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# (probe, script, args per mode).  'cpu': the tiny defaults on this machine's CPU; 'cpu-reduced': the
# same comparisons at the smallest size (gpu.sh without a GPU, and its test); 'gpu': real geometry,
# random weights, bf16.
GPU = ["--device", "cuda", "--dtype", "bf16"]
BENCHES: list[tuple[str, str, dict[str, list[str]]]] = [
    ("sdxl_ablation", "bench_sdxl_ablation.py", {
        "cpu": ["--reps", "5"],
        "cpu-reduced": ["--arch", "wide", "--reps", "1"],
        "gpu": ["--geometry", "real", "--size", "1024", "--steps", "4", "--reps", "3", *GPU]}),
    ("wan_logits", "bench_wan_logits.py", {
        "cpu": ["--reps", "3"],
        "cpu-reduced": ["--note-only", "--frames", "6", "--reps", "1"],
        "gpu": ["--note-only", "--geometry", "real", "--frames", "9", "--reps", "2", *GPU]}),
    ("dinov3_channels", "bench_dinov3_channels.py", {
        "cpu": ["--reps", "3"],
        "cpu-reduced": ["--arch", "small", "--size", "64", "--batches", "1", "--reps", "1"],
        "gpu": ["--arch", "vitl16", "--batch", "64", "--batches", "4", "--reps", "3", *GPU]}),
    ("sd3_textgrad", "bench_sd3_textgrad.py", {
        "cpu": [], "cpu-reduced": ["--blocks", "4", "--reps", "1"], "gpu": []}),
    ("sd3_recon_train", "bench_sd3_recon.py", {
        "cpu": [], "cpu-reduced": ["--repeats", "2"], "gpu": []}),
    # statistics overhead, merge throughput, dry-run scaling: no note method to compare with
    ("foundation", "bench_foundation.py", {"cpu": []}),
]


def _supported(script: Path, args: list[str]) -> list[str]:
    """Drop options a script (owned by another probe) does not accept, with their values."""
    help_text = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True).stdout
    out, i = [], 0
    while i < len(args):
        opt = args[i]
        val = [args[i + 1]] if i + 1 < len(args) and not args[i + 1].startswith("--") else []
        if opt in help_text:
            out += [opt, *val]
        i += 1 + len(val)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["cpu", "cpu-reduced", "gpu"], default="cpu")
    ap.add_argument("--markdown", help="also write the summary as a markdown file")
    ap.add_argument("--only", default=os.environ.get("BENCH_ONLY", ""), help="comma-separated probes (env BENCH_ONLY)")
    args = ap.parse_args()
    only = {x for x in args.only.split(",") if x}
    fd, jpath = tempfile.mkstemp(suffix=".jsonl")
    os.close(fd)
    env = dict(os.environ, LAYERSCOPE_BENCH_JSON=jpath, PYTHONPATH=os.pathsep.join(
        [str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    failed, silent, secs = [], [], {}
    for probe, script, modes in BENCHES:
        if (only and probe not in only) or args.mode not in modes:
            continue
        path = HERE / script
        if not path.exists():
            silent.append(f"{probe}: {script} missing")
            continue
        cmd = [sys.executable, str(path), *_supported(path, modes[args.mode])]
        print(f"\n### {probe}: {' '.join(cmd[1:])}", flush=True)
        n_before = sum(1 for _ in open(jpath))
        t = time.perf_counter()
        rc = subprocess.run(cmd, env=env).returncode
        secs[probe] = time.perf_counter() - t
        if rc:
            failed.append(f"{probe} (exit {rc})")
        elif sum(1 for _ in open(jpath)) == n_before:
            silent.append(f"{probe}: {script} reports no note-vs-probe row (see its own table above)")
    rows = [json.loads(ln) for ln in open(jpath) if ln.strip()]
    os.unlink(jpath)
    from benchlib import table

    summary = table(rows)
    machines = sorted({r["machine"] for r in rows})
    print("\n## note's method vs probe\n")
    print(summary)
    print("\nmeasured on: " + "; ".join(machines))
    for s in silent:
        print(f"note: {s}")
    if args.markdown:
        lines = [f"# Benchmarks: note's method vs probe ({args.mode})", "",
                 f"Run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} by `benchmarks/run_all.py --mode {args.mode}`.", "",
                 "Measured on: " + "; ".join(machines), "", summary, ""]
        lines += [f"- {s}" for s in silent] + [f"- FAILED: {f}" for f in failed]
        lines += [f"- {p}: {s:.0f} s wall" for p, s in secs.items()]
        Path(args.markdown).write_text("\n".join(lines) + "\n")
        Path(args.markdown).with_suffix(".jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if failed:
        print("FAILED: " + ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
