"""Foundation benchmarks, side by side in one run (prints a table and the ratios against the goals).

1. Statistics overhead over a plain forward: DINOv3 with ViT-B/16 geometry (random weights) at
   224 px, every layer x 3 representations x 2 roles accumulated (goal <= 5 %). Forward and
   accumulation are timed separately, interleaved, and the minimum of each is kept (robust to
   other load on a shared machine).
2. Merge throughput: validating and merging N shards of ViT-B-sized statistics against merely
   reading every dataset of the same files with h5py.
3. Dry-run time of a 10,000-shard study against a bare Snakefile with the same number of jobs
   (goal <= 1.5x).

    python benchmarks/bench_foundation.py [--quick] [--only stats|merge|dry-run ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def bench_stats_overhead(batch: int, repeats: int, threads: int) -> dict[str, float]:
    import torch

    from layerscope.models.dinov3 import final_norms, tiny_model
    from layerscope.probes.dinov3_channels import ChannelAccumulator

    torch.set_num_threads(threads)
    model = tiny_model("vitb16", seed=0)
    cfg = model.config
    cls_norm, patch_norm = final_norms(model)
    x = torch.randn(batch, 3, cfg.image_size, cfg.image_size)
    ids = np.arange(batch, dtype=np.int64)
    plain, stats_only = [], []
    with torch.inference_mode():
        hs = model(pixel_values=x, output_hidden_states=True).hidden_states  # warm-up
        for _ in range(repeats):  # interleaved; minima are robust to other load on a shared machine
            t0 = time.perf_counter()
            hs = model(pixel_values=x, output_hidden_states=True).hidden_states
            plain.append(time.perf_counter() - t0)
            acc = ChannelAccumulator(list(range(cfg.num_hidden_layers)), cfg.hidden_size, cfg.num_register_tokens,
                                     8, cls_norm, patch_norm, cfg.layer_norm_eps)
            t0 = time.perf_counter()
            acc.update(hs, ids)
            stats_only.append(time.perf_counter() - t0)
    p, q = min(plain), min(stats_only)
    return {"plain_s": p, "stats_s": q, "overhead": q / p}


def make_shards(d: Path, n: int, layers: int = 12, channels: int = 768) -> list[Path]:
    from layerscope.h5io import ShardWriter
    from layerscope.probes.dinov3_channels import REPS, ROLES, hook_name
    from layerscope.stats import MagnitudeHistogram, Moments, TopK

    rng = np.random.default_rng(0)
    paths = []
    for s in range(n):
        spec = {"probe_cfg": {"topk": 8}}
        prov = {"probe": "dinov3_channels", "model": "m", "axes": {"slice": f"{s}of{n}"}, "config_hash": "h",
                "data_digest": "d", "spec": spec}
        p = d / f"slice-{s}of{n}.h5"
        with ShardWriter(p, prov) as w:
            w.set_attr("num_layers", layers)  # the probe's declared layout reads it
            for i in range(layers):
                for rep in REPS:
                    for role in ROLES:
                        x = rng.standard_normal((16, channels))
                        parts = (Moments.from_numpy(x), MagnitudeHistogram.from_numpy(x),
                                 TopK.from_numpy(x, np.arange(16), np.zeros(16, np.int64), 8))
                        w.write(f"stats/{hook_name(i, rep)}/{role}", {k: v for q in parts for k, v in q.to_dict().items()},
                                attrs={"layer": i, "rep": rep, "role": role})
        paths.append(p)
    return paths


def bench_merge(n_shards: int) -> dict[str, float]:
    import h5py

    from layerscope.merge import load_shards
    from layerscope.probes.dinov3_channels import DinoV3Channels

    with tempfile.TemporaryDirectory() as td:
        paths = make_shards(Path(td), n_shards)
        size = sum(p.stat().st_size for p in paths)

        def raw() -> None:
            def read(name: str, obj: object) -> None:  # must return None, or visititems stops
                if isinstance(obj, h5py.Dataset):
                    obj[()]

            for p in paths:
                with h5py.File(p, "r") as f:
                    f.visititems(read)

        def raw_low_level() -> None:  # the floor: no checks, no high-level objects
            for p in paths:
                with h5py.File(p, "r") as f:
                    fid = f.id

                    def read(name: bytes, info: h5py.h5o.ObjInfo) -> None:
                        if info.type == h5py.h5o.TYPE_DATASET:
                            ds = h5py.h5d.open(fid, name)
                            out = np.empty(ds.shape, ds.dtype)
                            if out.size:
                                ds.read(h5py.h5s.ALL, h5py.h5s.ALL, out)

                    h5py.h5o.visit(fid, read, info=True)

        def merged() -> None:
            DinoV3Channels().merge(load_shards(paths, "dinov3_channels", "m", "h"))

        t_raw, t_low, t_merge = [], [], []
        for _ in range(3):  # interleaved: each minimum is robust to other load on a shared machine
            t_raw.append(_timed(raw))
            t_low.append(_timed(raw_low_level))
            t_merge.append(_timed(merged))
    return {"shards": n_shards, "mb": size / 1e6, "raw_s": min(t_raw), "low_s": min(t_low), "merge_s": min(t_merge),
            "raw_mb_s": size / 1e6 / min(t_raw), "low_mb_s": size / 1e6 / min(t_low),
            "merge_mb_s": size / 1e6 / min(t_merge)}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


BARE = """
N = {n}
rule all:
    input: "merged.txt"
rule shard:
    output: "shards/{{i}}.h5"
    shell: "touch {{output}}"
rule merge:
    input: expand("shards/{{i}}.h5", i=range(N))
    output: "merged.txt"
    shell: "touch {{output}}"
rule figures:
    input: "merged.txt"
    output: "fig.png"
    shell: "touch {{output}}"
"""


def bench_dry_run(n: int) -> dict[str, float]:
    import yaml

    snakemake = str(Path(sys.executable).with_name("snakemake"))
    with tempfile.TemporaryDirectory() as td:
        td = Path(td)
        cfg = {"datasets": {"photos": {"kind": "skimage"}},
               "models": {"m": {"family": "dinov3", "source": "tiny:default"}},
               "probes": {"dinov3_channels": {"models": ["m"], "dataset": "photos", "slices": n}}}
        (td / "study").mkdir()
        (td / "study" / "c.yaml").write_text(yaml.safe_dump(cfg))
        (td / "bare").mkdir()
        (td / "bare" / "Snakefile").write_text(BARE.format(n=n))
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}

        def study() -> None:
            subprocess.run([snakemake, "-n", "--quiet", "rules", "-s", str(REPO / "Snakefile"), "-d", str(td / "study"),
                            "--configfile", str(td / "study" / "c.yaml")], check=True, capture_output=True, env=env)

        def bare() -> None:
            subprocess.run([snakemake, "-n", "--quiet", "rules", "-d", str(td / "bare"), "-s", str(td / "bare" / "Snakefile")],
                           check=True, capture_output=True, env=env)

        t_study = min(_timed(study) for _ in range(2))
        t_bare = min(_timed(bare) for _ in range(2))
    return {"jobs": n, "study_s": t_study, "bare_s": t_bare, "ratio": t_study / t_bare}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", choices=("stats", "merge", "dry-run"), action="append",
                    help="run only these parts (repeatable); default: all three")
    args = ap.parse_args()
    parts = set(args.only or ("stats", "merge", "dry-run"))
    rows = []
    if "stats" in parts:
        s = bench_stats_overhead(batch=2 if args.quick else 4, repeats=3 if args.quick else 7, threads=args.threads)
        rows += [
            ("stats overhead: plain forward (ViT-B/16, 224 px)", f"{s['plain_s']:.3f} s", ""),
            ("stats overhead: all statistics of one forward (12 layers x 3 reps x 2 roles)", f"{s['stats_s']:.3f} s",
             f"overhead {100 * s['overhead']:+.1f} % of the forward (goal <= 5 %)"),
        ]
    if "merge" in parts:
        m = bench_merge(8 if args.quick else 64)
        rows += [
            (f"merge: raw h5py read of {m['shards']} checksummed shards ({m['mb']:.1f} MB)", f"{m['raw_s']:.3f} s",
             f"{m['raw_mb_s']:.0f} MB/s"),
            (f"merge: low-level h5py read (h5o.visit + h5d.read, no checks) of the same files", f"{m['low_s']:.3f} s",
             f"{m['low_mb_s']:.0f} MB/s"),
            (f"merge: verify checksums + layout + values, merge {m['shards']} shards", f"{m['merge_s']:.3f} s",
             f"{m['merge_mb_s']:.0f} MB/s = {m['raw_s'] / m['merge_s']:.2f}x raw read speed (goal >= 0.7x), "
             f"{m['low_s'] / m['merge_s']:.2f}x the low-level read"),
        ]
    if "dry-run" in parts:
        d = bench_dry_run(1000 if args.quick else 10_000)
        rows += [
            (f"dry run: bare Snakefile, {d['jobs']} shard jobs", f"{d['bare_s']:.2f} s", ""),
            (f"dry run: layerscope study, {d['jobs']} shard jobs", f"{d['study_s']:.2f} s", f"ratio {d['ratio']:.2f}x (goal <= 1.5x)"),
        ]
    w = max(len(r[0]) for r in rows)
    print(f"{'benchmark'.ljust(w)}  {'time':>10}  ratio")
    for name, t, r in rows:
        print(f"{name.ljust(w)}  {t:>10}  {r}")


if __name__ == "__main__":
    main()
