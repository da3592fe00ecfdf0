"""``layerscope status``: where a study stands, per probe and model, without running Snakemake.

For every planned shard a quick check (no arrays read): does the file exist, does HDF5 open it,
does it carry the ``complete`` mark and the format version, and was it made with the config hash
the plan expects now (a shard of an older config is *refused*: the merge would refuse it too).
Accelerator time is summed from the shard rules' Snakemake ``benchmark:`` files
(``results/<study>/benchmarks/<probe>/shards/<model>/<shard>.tsv``, ``Layout.shard_benchmark``: wall seconds ``s``, peak RSS
``max_rss`` in MB) times the GPUs each shard asked for (``probes.<p>.resources.gpus``).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from layerscope.plan import Plan

__all__ = ["ShardState", "ModelStatus", "shard_state", "study_status", "format_status", "read_benchmark"]


@dataclass(frozen=True)
class ShardState:
    state: str  # done | missing | refused
    reason: str = ""


@dataclass
class ModelStatus:
    probe: str
    model: str
    total: int = 0
    done: int = 0
    missing: int = 0
    refused: int = 0
    resumable: int = 0  # training shards with a resumable state on disk (killed or running)
    wall_hours: float = 0.0
    gpu_hours: float = 0.0
    max_rss_mb: float = 0.0
    benchmarks: int = 0
    reasons: list[str] = field(default_factory=list)


def shard_state(path: str | Path, expect_hash: str) -> ShardState:
    """The quick check of one shard file (attributes only)."""
    import h5py

    from layerscope.h5io import FORMAT_VERSION

    p = Path(path)
    if not p.exists():
        return ShardState("missing")
    try:
        with h5py.File(p, "r") as f:
            attrs = {k: f.attrs[k] for k in ("complete", "format_version", "config_hash") if k in f.attrs}
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        return ShardState("refused", f"{p}: unreadable ({type(e).__name__})")
    if not attrs.get("complete"):
        return ShardState("refused", f"{p}: incomplete (no 'complete' mark)")
    if attrs.get("format_version") != FORMAT_VERSION:
        return ShardState("refused", f"{p}: format version {attrs.get('format_version')!r}")
    got = attrs.get("config_hash")
    got = got.decode() if isinstance(got, bytes) else str(got)
    if got != expect_hash:
        return ShardState("refused", f"{p}: config hash {got}, the config now gives {expect_hash}")
    return ShardState("done")


def read_benchmark(path: str | Path) -> tuple[float, float]:
    """(seconds, max RSS MB) of a Snakemake benchmark TSV: the last row (the last attempt)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows:
        return 0.0, 0.0

    def num(v: Any) -> float:
        try:
            return float(v)
        except (TypeError, ValueError):  # "NA" where psutil could not measure
            return 0.0

    return num(rows[-1].get("s")), num(rows[-1].get("max_rss"))


def study_status(plan: "Plan", workdir: str | Path = ".") -> list[ModelStatus]:
    wd = Path(workdir)
    out = []
    for probe, impl in plan.probes.items():
        res = plan.config["probes"][probe].get("resources") or {}
        gpus = int(res.get("gpus", 1 if impl.gpu else 0))
        for model in plan.models_of(probe):
            st = ModelStatus(probe, model)
            expect = plan.config_hash(probe, model)
            for _, label in plan.shards(probe, model):
                rel = plan.shard_path(probe, model, label)
                s = shard_state(wd / rel, expect)
                st.total += 1
                setattr(st, s.state, getattr(st, s.state) + 1)
                if s.reason:
                    st.reasons.append(s.reason)
                if (wd / rel).with_name(Path(rel).name.removesuffix(".h5") + ".resume").is_dir():
                    st.resumable += 1
                bench = wd / plan.layout.shard_benchmark(probe, model, label)
                if bench.is_file():
                    secs, rss = read_benchmark(bench)
                    st.benchmarks += 1
                    st.wall_hours += secs / 3600.0
                    st.gpu_hours += gpus * secs / 3600.0
                    st.max_rss_mb = max(st.max_rss_mb, rss)
            out.append(st)
    return out


def format_status(rows: list[ModelStatus], show_reasons: int = 3) -> str:
    head = f"{'probe':<18} {'model':<18} {'shards':>6} {'done':>5} {'missing':>7} {'refused':>7} {'resumable':>9} " \
           f"{'wall h':>8} {'GPU h':>8} {'max RSS MB':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.probe:<18} {r.model:<18} {r.total:>6} {r.done:>5} {r.missing:>7} {r.refused:>7} {r.resumable:>9} "
                     f"{r.wall_hours:>8.3f} {r.gpu_hours:>8.3f} {r.max_rss_mb:>10.0f}")
    tot = [sum(getattr(r, k) for r in rows) for k in ("total", "done", "missing", "refused", "resumable")]
    lines.append("-" * len(head))
    lines.append(f"{'total':<18} {'':<18} {tot[0]:>6} {tot[1]:>5} {tot[2]:>7} {tot[3]:>7} {tot[4]:>9} "
                 f"{sum(r.wall_hours for r in rows):>8.3f} {sum(r.gpu_hours for r in rows):>8.3f} "
                 f"{max([r.max_rss_mb for r in rows] or [0]):>10.0f}")
    reasons = [x for r in rows for x in r.reasons]
    for x in reasons[:show_reasons]:
        lines.append(f"refused: {x}")
    if len(reasons) > show_reasons:
        lines.append(f"refused: ... and {len(reasons) - show_reasons} more")
    if tot[2] or tot[3]:
        lines.append("to make the missing and refused shards: snakemake (with the same --profile/--configfile)")
    return "\n".join(lines)


def default_config(workdir: str | Path = ".") -> str:
    return os.fspath(Path(workdir) / "config.yaml")
