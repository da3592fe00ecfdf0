"""Shards -> tables -> figures, probe-agnostic.

The merge refuses, all at once and by name, every shard that is corrupt, incomplete, from another
probe or model, written under another config (config hash), saw other data (index digest), or
whose recorded axes disagree with its file name; and it refuses an incomplete set of data slices.
Its error names the command that rebuilds the bad shards.
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import Iterable

import numpy as np

from layerscope.h5io import Shard, ShardError, atomic_path, rerun_command
from layerscope.plan import parse_shard_label
from layerscope.probes import get_probe
from layerscope.probes.base import Probe, parse_slice

log = logging.getLogger("layerscope.merge")


_FLOAT_KINDS = {"mean", "m2", "max_abs", "finite", "metric", "float", "max"}
_INT_KINDS = {"count", "index", "int", "hist"}


def _check_kind(name: str, arr: np.ndarray, kind: str) -> str | None:
    """Why ``arr`` is not a valid stored ``kind`` (see GroupLayout), or None."""
    a = np.asarray(arr)
    if kind in _FLOAT_KINDS and a.dtype.kind != "f":
        return f"dataset {name} has dtype {a.dtype}, expected a float"
    if kind in _INT_KINDS and a.dtype.kind not in "iu":
        return f"dataset {name} has dtype {a.dtype}, expected an integer"
    if kind == "bool" and a.dtype.kind != "b":
        return f"dataset {name} has dtype {a.dtype}, expected bool"
    if kind == "uint8" and a.dtype != np.uint8:
        return f"dataset {name} has dtype {a.dtype}, expected uint8"
    if kind in ("count", "index", "hist") and a.size and int(a.min()) < 0:
        return f"dataset {name} holds a negative count ({int(a.min())})"
    if kind in ("mean", "m2", "max_abs", "finite"):
        bad = ~np.isfinite(a)
        if bad.any():
            return f"dataset {name} holds {int(bad.sum())} non-finite stored value(s) (e.g. {a[bad].ravel()[0]})"
    if kind in ("m2", "max_abs") and a.size and float(a.min()) < 0:
        return f"dataset {name} holds a negative value ({float(a.min())}) where only >= 0 is possible"
    if kind == "metric" and np.isinf(a).any():
        return f"dataset {name} holds {int(np.isinf(a).sum())} infinite value(s)"
    if kind == "max" and (np.isnan(a).any() or np.isposinf(a).any()):
        return f"dataset {name} holds NaN or +inf"
    return None


def _check_moments(d: dict[str, np.ndarray]) -> str | None:
    """Relations every stored Moments record satisfies (see stats.Moments)."""
    n, mean, m2, mx = (np.asarray(d[k]) for k in ("count", "mean", "m2", "max_abs"))
    if not (n.shape == mean.shape == m2.shape == mx.shape and (("nonfinite" not in d) or np.shape(d["nonfinite"]) == n.shape)):
        return f"moments of different shapes (count {n.shape}, mean {mean.shape}, m2 {m2.shape}, max_abs {mx.shape})"
    tol = 1e-9
    if (np.abs(mean) > mx * (1 + tol) + 1e-300).any():
        c = int(np.argmax(np.abs(mean) - mx))
        return f"channel {c}: |mean| {abs(float(mean.ravel()[c]))} exceeds max_abs {float(mx.ravel()[c])}"
    if (m2 > n * mx.astype(np.float64) ** 2 * (1 + tol) + 1e-300).any():
        c = int(np.argmax(m2 - n * mx.astype(np.float64) ** 2))
        return f"channel {c}: m2 {float(m2.ravel()[c])} exceeds count * max_abs**2 (impossible)"
    empty = n == 0
    if (empty & ((mean != 0) | (m2 != 0) | (mx != 0))).any():
        return "a channel with count 0 has non-zero moments"
    if "hist" in d and int(np.asarray(d["hist"]).sum()) != int(n.sum()):
        return f"hist holds {int(np.asarray(d['hist']).sum())} values but count sums to {int(n.sum())}"
    if "topk_value" in d and len(d["topk_value"]):
        tv = np.asarray(d["topk_value"])
        if float(tv.max()) > float(mx.max(initial=0.0)) * (1 + tol):
            return f"top-k value {float(tv.max())} exceeds every channel's max_abs"
        if "topk_channel" in d and (np.asarray(d["topk_channel"]) >= n.shape[-1]).any():
            return "top-k channel index out of range"
    return None


def check_layout(sh: Shard, probe: Probe) -> list[str]:
    """Everything wrong with one shard's structure and stored values, checked against the probe's
    declared layout before any number is merged; [] when it is sound."""
    why: list[str] = []
    matched: dict[int, int] = {}
    for g, d in sh.groups.items():
        for i, gl in enumerate(probe.layout):
            if re.fullmatch(gl.pattern, g):
                matched[i] = matched.get(i, 0) + 1
                for name, kind in gl.datasets.items():
                    optional = kind.endswith("?")
                    kind = kind.rstrip("?")
                    if name not in d:
                        if not optional:
                            why.append(f"group {g}: dataset {name} is missing")
                        continue
                    w = _check_kind(name, d[name], kind)
                    if w:
                        why.append(f"group {g}: {w}")
                for a in gl.attrs:
                    if a not in sh.group_attrs.get(g, {}):
                        why.append(f"group {g}: attribute {a} is missing")
                if {"count", "mean", "m2", "max_abs"} <= set(d) and not why:
                    w = _check_moments(d)
                    if w:
                        why.append(f"group {g}: {w}")
                break
    for i, gl in enumerate(probe.layout):
        if matched.get(i, 0) < gl.min_groups:
            why.append(f"no group matching {gl.pattern} (expected at least {gl.min_groups})")
    try:
        expected = probe.expected_groups(sh)
    except (KeyError, ValueError, TypeError) as e:
        expected = None
        why.append(f"attributes that define its layout are missing or malformed ({e.__class__.__name__}: {e})")
    if expected is not None:
        missing = [g for g in expected if g not in sh.groups]
        if missing:
            why.append(f"{len(missing)} group(s) missing: {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    return why


def _stale_data(sh: Shard) -> str | None:
    """Why a shard's recorded data digest differs from its slice's index as it is now (the data
    changed after the shard ran), or None. Indexes that are not on disk here are not judged."""
    import json

    from layerscope.data import index_digest

    try:
        spec = sh.json_attr("spec")
        recorded = json.loads(str(sh.attrs.get("data_digest") or "{}"))
    except (KeyError, ValueError, TypeError):
        return None
    for name, ds in (spec.get("datasets") or {}).items():
        template = ds.get("slice_index") or ds.get("index")
        if not template:
            continue
        path = Path(str(template).format(slice=sh.axes.get("slice", "0of1")))
        if not path.is_file():
            continue
        current = index_digest(path)
        if recorded.get(name) != current:
            return (f"saw data {recorded.get(name)} of dataset '{name}', but its slice index {path} is now "
                    f"{current} (stale: the data changed after the shard ran)")
    return None


def _group_set_mismatch(shards: list[Shard], probe: Probe) -> list[tuple[Path, str]]:
    """Shards that agree on the probe's ``layout_varies_with`` axes must hold the same groups."""
    by_key: dict[tuple, list[Shard]] = {}
    for sh in shards:
        by_key.setdefault(tuple(sh.axes.get(a) for a in probe.layout_varies_with), []).append(sh)
    out = []
    for group in by_key.values():
        union = set().union(*(set(sh.groups) for sh in group))
        for sh in group:
            missing = sorted(union - set(sh.groups))
            if missing:
                out.append((sh.path, f"{len(missing)} group(s) that other shards hold are missing: "
                                     f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}"))
    return out


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
        if not why:
            why += check_layout(sh, p)
        if why:
            problems.append((path, "; ".join(why)))
        else:
            shards.append(sh)
    if not problems:
        problems += _group_set_mismatch(shards, p)
    if not problems:
        # shards of one data slice must have seen the same data; slices differ (each records its own)
        by_slice: dict[str, set] = {}
        for sh in shards:
            by_slice.setdefault(sh.axes.get("slice", ""), set()).add(sh.attrs.get("data_digest"))
        for sh in shards:
            digests = by_slice[sh.axes.get("slice", "")]
            if len(digests) > 1:
                problems.append((sh.path, f"saw dataset index {sh.attrs.get('data_digest')}; shards of its slice disagree ({', '.join(sorted(map(str, digests)))})"))
            else:
                stale = _stale_data(sh)
                if stale:
                    problems.append((sh.path, stale))
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
            msg = (f"{probe}/{model} table {name}: {int(df['nonfinite'].sum())} non-finite values were excluded "
                   f"from the statistics (column 'nonfinite')")
            log.warning(msg)
            print(f"layerscope: warning: {msg}", file=sys.stderr)
        with atomic_path(out_dir / f"{name}.csv") as tmp:
            df.to_csv(tmp, index=False)
        written.append(out_dir / f"{name}.csv")
    return written


def nonfinite_summary(table_paths: Iterable[str | Path]) -> list[str]:
    """One line per existing table with non-finite activations counted in its ``nonfinite``
    column: what the Snakefile's onsuccess/onerror handler prints on the console at the end of
    every run (the merge rule's own warning goes to its log only). Plain csv: no pandas needed."""
    import csv

    lines = []
    for t in table_paths:
        t = Path(t)
        if not t.is_file():
            continue
        with open(t, newline="") as f:
            r = csv.DictReader(f)
            if not r.fieldnames or "nonfinite" not in r.fieldnames:
                continue
            total = 0
            for row in r:
                try:
                    total += int(float(row["nonfinite"] or 0))
                except ValueError:
                    continue
        if total:
            lines.append(f"layerscope: warning: {t}: {total} non-finite activation value(s) counted and excluded "
                         f"from the statistics (column 'nonfinite'; marked in the figures)")
    return lines


def plot_from_tables(probe: str, table_dirs: Iterable[str | Path], fig_dir: str | Path, caption: str = "",
                     figures: Iterable[str] | None = None) -> list[Path]:
    """Concatenate every model's tables (adding a 'model' column) and draw the probe's figures.

    ``figures``: the declared figure names (the figure rule passes the plan's,
    :meth:`layerscope.plan.Plan.figure_names`; default the probe's static ``figures``). The probe
    draws into a scratch folder; only if it wrote exactly each declared figure's PNG and PDF
    (:func:`layerscope.plots.figure_files`), nothing missing and nothing more, are they moved into
    ``fig_dir``. Otherwise a DataError names the difference and ``fig_dir`` gets nothing: a figure
    the plan declares but the tables cannot draw (stale tables) is never silently skipped, and a
    figure nobody declared is never left untracked beside the declared ones."""
    import shutil

    import pandas as pd

    from layerscope.errors import DataError
    from layerscope.layout import FIGURE_SUFFIX, VECTOR_SUFFIX
    from layerscope.plots import figure_files

    p = get_probe(probe)
    names = list(p.figures if figures is None else figures)
    tables: dict[str, list[pd.DataFrame]] = {t: [] for t in p.tables}
    table_dirs = [Path(d) for d in table_dirs]
    for d in table_dirs:
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
    tmp_dir = fig_dir / ".partial-figures"
    shutil.rmtree(tmp_dir, ignore_errors=True)  # a failed run's leftovers are not this run's figures
    tmp_dir.mkdir()
    try:
        p.plot(merged, tmp_dir, caption)
        want = [f for n in names for f in figure_files(n)]
        have = sorted(f.name for f in tmp_dir.iterdir())
        missing = [f for f in want if f not in have]
        extra = [f for f in have if f not in want]
        if missing or extra:
            raise DataError(
                f"probe {probe} plot from tables {', '.join(map(str, table_dirs))}: "
                + (f"declared figure file(s) not drawn: {', '.join(missing)} (tables older than the config? "
                   f"rerun the {probe}_merge rule)" if missing else "")
                + ("; " if missing and extra else "")
                + (f"undeclared figure file(s) drawn: {', '.join(extra)} (declare them in the probe's figure_names)"
                   if extra else ""))
        out = []
        for f in want:
            (tmp_dir / f).replace(fig_dir / f)
            out.append(fig_dir / f)
        # the folder is this rule's alone: a figure file no longer declared (a prompt or model removed
        # from the config) would otherwise linger beside the current ones, untracked
        for old in sorted(fig_dir.iterdir()):
            if old.is_file() and old.suffix in (FIGURE_SUFFIX, VECTOR_SUFFIX) and old.name not in want:
                old.unlink()
                print(f"layerscope: removed {old} (a figure no longer declared)", file=sys.stderr)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return out
