"""Shard files: one HDF5 file of mergeable partial statistics per shard job.

Layout (format version 1; see docs/shard-format.md):

    /                       attrs: format_version, probe, model, axes (JSON), config_hash,
                                   data_digest, spec (JSON), versions (JSON), created_utc, host,
                                   complete (True, set last)
    /<group path>/<dataset> arrays written by the probe, e.g.
    /stats/blocks.3.hook_resid_post/patch/{count,mean,m2,max_abs,nonfinite,hist,topk_*}

Writes are atomic: the file is built under a hidden temporary name in the same directory and
renamed into place only after it is complete and closed.  A failed or killed job (SIGTERM from
Snakemake or ``scancel``) removes its temporary file; a SIGKILL can leave one behind, but never a
file at the output path, and the next attempt cleans stale temporaries of the same output.
"""

from __future__ import annotations

import datetime as _dt
import glob
import json
import os
import signal
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import h5py
import numpy as np

FORMAT_VERSION = 1
TMP_PREFIX = ".partial-"

__all__ = ["FORMAT_VERSION", "ShardWriter", "Shard", "ShardError", "package_versions", "atomic_path", "rerun_command"]


from layerscope.errors import ShardError  # noqa: E402  (re-exported)


def rerun_command(paths: list[str] | list[Path]) -> str:
    """The command that rebuilds the given shard files and everything that depends on them."""
    return "snakemake --forcerun " + " ".join(str(p) for p in paths) + "  (add the --profile you ran with)"


def package_versions() -> dict[str, str]:
    """Versions of the packages that determine a shard's numbers."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str] = {}
    for name in ("layerscope", "torch", "diffusers", "transformers", "peft", "numpy", "h5py"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def _tmp_name(path: Path) -> Path:
    return path.with_name(f"{TMP_PREFIX}{os.getpid()}-{path.name}")


def _clean_stale(path: Path) -> None:
    for stale in glob.glob(str(path.with_name(f"{TMP_PREFIX}*-{path.name}"))):
        try:
            os.remove(stale)
        except FileNotFoundError:
            pass


@contextmanager
def _terminate_as_exception() -> Iterator[None]:
    """Turn SIGTERM (Snakemake's and scancel's way to stop a job) into SystemExit so cleanup runs."""

    def handler(signum, frame):  # noqa: ARG001
        raise SystemExit(128 + signum)

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not in the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(path)
    tmp = _tmp_name(path)
    with _terminate_as_exception():
        try:
            yield tmp
            os.replace(tmp, path)
        except BaseException:
            if tmp.exists():
                tmp.unlink()
            raise


class ShardWriter:
    """Write one shard atomically.

    >>> with ShardWriter(out, provenance) as w:
    ...     w.write("stats/blocks.0.hook_resid_post/cls", {"count": ..., "mean": ...})
    """

    def __init__(self, path: str | Path, provenance: Mapping[str, Any]):
        self.path = Path(path)
        self.provenance = dict(provenance)
        self._ctx = None
        self._f: h5py.File | None = None

    def __enter__(self) -> "ShardWriter":
        self._ctx = atomic_path(self.path)
        tmp = self._ctx.__enter__()
        self._f = h5py.File(tmp, "w")
        for key, value in self.provenance.items():
            self._f.attrs[key] = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value
        self._f.attrs["format_version"] = FORMAT_VERSION
        self._f.attrs["versions"] = json.dumps(package_versions(), sort_keys=True)
        self._f.attrs["created_utc"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        self._f.attrs["host"] = socket.gethostname()
        return self

    @property
    def file(self) -> h5py.File:
        assert self._f is not None, "ShardWriter used outside its with-block"
        return self._f

    def set_attr(self, key: str, value: Any) -> None:
        self.file.attrs[key] = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value

    def write(self, group: str, arrays: Mapping[str, Any], attrs: Mapping[str, Any] | None = None, compress: bool = False) -> None:
        g = self.file.require_group(group)
        for name, arr in arrays.items():
            arr = np.asarray(arr)
            kw = {"compression": "gzip", "compression_opts": 4, "chunks": True} if compress and arr.size > 1024 else {}
            g.create_dataset(name, data=arr, **kw)
        for k, v in (attrs or {}).items():
            g.attrs[k] = json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v

    def __exit__(self, exc_type, exc, tb) -> bool:
        assert self._f is not None and self._ctx is not None
        try:
            if exc_type is None:
                self._f.attrs["complete"] = True
            self._f.close()
        finally:
            self._f = None
        return bool(self._ctx.__exit__(exc_type, exc, tb))


def _attr(v: Any) -> Any:
    if isinstance(v, bytes):
        v = v.decode()
    if isinstance(v, np.generic):
        v = v.item()
    return v


class Shard:
    """A validated, fully read shard (arrays are loaded eagerly; shards are small by design)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with h5py.File(self.path, "r") as f:
                self.attrs = {k: _attr(v) for k, v in f.attrs.items()}
                self.groups: dict[str, dict[str, np.ndarray]] = {}
                self.group_attrs: dict[str, dict[str, Any]] = {}

                def visit(name: str, obj: Any) -> None:
                    if isinstance(obj, h5py.Dataset):
                        parent, _, leaf = name.rpartition("/")
                        self.groups.setdefault(parent, {})[leaf] = obj[()]
                    elif isinstance(obj, h5py.Group) and len(obj.attrs):
                        self.group_attrs[name] = {k: _attr(v) for k, v in obj.attrs.items()}

                f.visititems(visit)
        except (OSError, KeyError, ValueError, RuntimeError) as e:
            raise ShardError(f"{self.path}: corrupt or unreadable HDF5 ({e.__class__.__name__}: {e})") from None
        if not self.attrs.get("complete"):
            raise ShardError(f"{self.path}: incomplete shard (no 'complete' mark)")
        if self.attrs.get("format_version") != FORMAT_VERSION:
            raise ShardError(f"{self.path}: format version {self.attrs.get('format_version')!r}, expected {FORMAT_VERSION}")

    def json_attr(self, key: str) -> Any:
        return json.loads(self.attrs[key])

    @property
    def probe(self) -> str:
        return str(self.attrs.get("probe"))

    @property
    def model(self) -> str:
        return str(self.attrs.get("model"))

    @property
    def axes(self) -> dict[str, str]:
        return self.json_attr("axes")

    def subgroups(self, prefix: str) -> list[str]:
        """Group paths below ``prefix`` that hold datasets, sorted."""
        prefix = prefix.rstrip("/") + "/"
        return sorted(g for g in self.groups if g.startswith(prefix))
