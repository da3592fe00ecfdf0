"""Shards -> tables -> figures, probe-agnostic.

The merge refuses, all at once and by name, every shard that is corrupt, incomplete, from another
probe or model, written under another config (config hash), saw other data (index digest), or
whose recorded axes disagree with its file name; and it refuses an incomplete set of data slices.
Its error names the command that rebuilds the bad shards.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable

from layerscope.h5io import Shard, ShardError, atomic_path, rerun_command
from layerscope.plan import parse_shard_label
from layerscope.probes import get_probe
from layerscope.probes.base import parse_slice

log = logging.getLogger("layerscope.merge")


def load_shards(paths: Iterable[str | Path], probe: str, model: str, expect_hash: str | None = None) -> list[Shard]:
    """Read and cross-check every shard; raise one ShardError listing every bad file."""
    p = get_probe(probe)
    paths = [Path(x) for x in paths]
    if not paths:
        raise ShardError(f"no shards given for probe {probe}, model {model}")
    shards: list[Shard] = []
    problems: list[tuple[Path, str]] = []
    for path in paths:
        try:
            sh = Shard(path)
        except ShardError as e:
            problems.append((path, str(e).split(": ", 1)[-1]))
            continue
        why = []
        if sh.probe != probe:
            why.append(f"written by probe '{sh.probe}', expected '{probe}'")
        if sh.model != model:
            why.append(f"written for model '{sh.model}', expected '{model}'")
        try:
            expected_axes = parse_shard_label(path.stem, p.axes)
            if sh.axes != expected_axes:
                why.append(f"records axes {sh.axes}, but its file name says {expected_axes}")
        except ValueError as e:
            why.append(str(e))
        if expect_hash and sh.attrs.get("config_hash") != expect_hash:
            why.append(f"config hash {sh.attrs.get('config_hash')} differs from the current config's {expect_hash} (stale or foreign shard)")
        if why:
            problems.append((path, "; ".join(why)))
        else:
            shards.append(sh)
    if not problems:
        # shards of one data slice must have seen the same data; slices differ (each records its own)
        by_slice: dict[str, set] = {}
        for sh in shards:
            by_slice.setdefault(sh.axes.get("slice", ""), set()).add(sh.attrs.get("data_digest"))
        for sh in shards:
            digests = by_slice[sh.axes.get("slice", "")]
            if len(digests) > 1:
                problems.append((sh.path, f"saw dataset index {sh.attrs.get('data_digest')}; shards of its slice disagree ({', '.join(sorted(map(str, digests)))})"))
        if "slice" in p.axes and not problems:
            by_rest: dict[tuple, list[tuple[int, int]]] = {}
            for sh in shards:
                rest = tuple((a, v) for a, v in sh.axes.items() if a != "slice")
                by_rest.setdefault(rest, []).append(parse_slice(sh.axes["slice"]))
            for rest, sl in by_rest.items():
                ns = {n for _, n in sl}
                if len(ns) != 1 or sorted(i for i, _ in sl) != list(range(next(iter(ns)))):
                    raise ShardError(f"{probe}/{model} {dict(rest)}: data slices {sorted(sl)} do not cover the data exactly once")
    if problems:
        lines = [f"refusing to merge {len(problems)} bad shard(s) of {probe}/{model}:"]
        lines += [f"  {path}: {why}" for path, why in problems]
        lines.append(f"rebuild them with: {rerun_command([p for p, _ in problems])}")
        raise ShardError("\n".join(lines))
    return shards


def merge_to_tables(probe: str, model: str, paths: Iterable[str | Path], out_dir: str | Path, expect_hash: str | None = None) -> list[Path]:
    """Merge one (probe, model)'s shards and write its tables as CSV (atomically)."""
    p = get_probe(probe)
    shards = load_shards(paths, probe, model, expect_hash)
    tables = p.merge(shards)
    missing = set(p.tables) - set(tables)
    if missing:
        raise RuntimeError(f"probe {probe} merge did not produce tables {sorted(missing)}")
    out_dir = Path(out_dir)
    written = []
    for name in p.tables:
        df = tables[name]
        if "nonfinite" in df.columns and len(df) and df["nonfinite"].sum() > 0:
            log.warning("%s/%s table %s: %d non-finite values were excluded from the statistics (column 'nonfinite')",
                        probe, model, name, int(df["nonfinite"].sum()))
        with atomic_path(out_dir / f"{name}.csv") as tmp:
            df.to_csv(tmp, index=False)
        written.append(out_dir / f"{name}.csv")
    return written


def plot_from_tables(probe: str, table_dirs: Iterable[str | Path], fig_dir: str | Path, caption: str = "") -> list[Path]:
    """Concatenate every model's tables (adding a 'model' column) and draw the probe's figures."""
    import pandas as pd

    p = get_probe(probe)
    tables: dict[str, list[pd.DataFrame]] = {t: [] for t in p.tables}
    for d in table_dirs:
        d = Path(d)
        for t in p.tables:
            f = d / f"{t}.csv"
            if not f.is_file():
                raise FileNotFoundError(f"missing table {f} (run the {probe}_merge rule)")
            df = pd.read_csv(f)
            if "model" not in df.columns:
                df.insert(0, "model", d.name)
            tables[t].append(df)
    merged = {t: pd.concat(v, ignore_index=True) for t, v in tables.items()}
    fig_dir = Path(fig_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    tmp_dir = fig_dir / f".partial-figures"
    tmp_dir.mkdir(exist_ok=True)
    p.plot(merged, tmp_dir, caption)
    out = []
    for f in p.figures:
        src = tmp_dir / f"{f}.png"
        if not src.is_file():
            raise RuntimeError(f"probe {probe} plot did not write {f}.png")
        src.replace(fig_dir / f"{f}.png")
        out.append(fig_dir / f"{f}.png")
    for extra in tmp_dir.iterdir():  # any additional figures the probe drew
        extra.replace(fig_dir / extra.name)
    tmp_dir.rmdir()
    return out
