"""Shard files: one HDF5 file of mergeable partial statistics per shard job.

Layout (format version 2; see docs/shard-format.md):

    /                       attrs: format_version, probe, model, axes (JSON), config_hash,
                                   data_digest, spec (JSON), versions (JSON), created_utc, host,
                                   complete (True, set last)
    /<group path>/<dataset> arrays written by the probe, e.g.
    /stats/blocks.3.hook_resid_post/patch/{count,mean,m2,max_abs,nonfinite,hist,topk_*}

Every dataset carries a checksum, verified whenever it is read (and all attributes one CRC-32,
root attribute ``attrs_crc32``, because HDF5 leaves dense attribute storage unchecksummed): arrays are stored chunked with
HDF5's Fletcher-32 filter (``fletcher32=True``, with or without gzip); scalars and string data,
which HDF5 cannot filter, carry a CRC-32 of their bytes in the dataset attribute ``crc32``.  The
file is written with ``libver="latest"``, whose superblock, object headers (attributes
included) and heaps carry HDF5's own metadata checksums, so a flipped bit anywhere that holds
information is refused as corrupt rather than read as a number.  ``Shard`` reads a file in one
low-level pass (``_read_tree``): the checks are cheap, h5py's high-level objects per dataset were
not.

Writes are atomic: the file is built under a hidden temporary name in the same directory and
renamed into place only after it is complete and closed.  A failed or killed job (SIGTERM from
Snakemake or ``scancel``) removes its temporary file; a SIGKILL can leave one behind, but never a
file at the output path, and the next attempt cleans stale temporaries of the same output.
"""

from __future__ import annotations

import datetime as _dt
import errno
import re
import zlib
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
from h5py import h5d, h5o, h5s

from layerscope.h5read import _has_fletcher32, _read_attrs  # low-level readers

FORMAT_VERSION = 2  # 2: every dataset checksummed (format 1 had none)
TMP_PREFIX = ".partial-"

__all__ = ["FORMAT_VERSION", "ShardWriter", "Shard", "ShardError", "package_versions", "atomic_path", "rerun_command"]


from layerscope.errors import ShardError, WriteError  # noqa: E402  (re-exported)


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
    tmp = _tmp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _clean_stale(path)
    except OSError as e:
        raise WriteError(f"cannot write {path}: {_os_cause(e)}") from None
    with _terminate_as_exception():
        try:
            yield tmp
            os.replace(tmp, path)
        except BaseException as e:
            try:
                if tmp.exists():
                    tmp.unlink()
            except OSError:
                pass
            cause = _write_cause(e)
            if cause is not None:  # disk full, quota, permissions, I/O error: one line, no traceback
                raise WriteError(f"cannot write {path}: {cause}; the partial file was removed, rerun the job") from None
            raise


def _os_cause(e: OSError) -> str:
    return os.strerror(e.errno) + f" [{errno.errorcode.get(e.errno, e.errno)}]" if e.errno else str(e)


def _write_cause(e: BaseException) -> str | None:
    """The OS cause of a failed write, if ``e`` is one (h5py reports ENOSPC as a generic OSError
    or RuntimeError whose message carries 'errno = 28'); None for anything else (a bug, SIGTERM)."""
    if isinstance(e, WriteError):
        return str(e).split(": ", 1)[-1]
    if isinstance(e, OSError) and e.errno:
        return _os_cause(e)
    if isinstance(e, (OSError, RuntimeError)):
        m = re.search(r"errno = (\d+)", str(e))
        if m and int(m.group(1)):
            n = int(m.group(1))
            return os.strerror(n) + f" [{errno.errorcode.get(n, n)}]"
    return None


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
        tmp = self._ctx_tmp = self._ctx.__enter__()
        # Built in memory, written to disk in one plain write: HDF5 reports a failed write (ENOSPC)
        # while it closes objects only as an ignored exception in a destructor, and a file whose
        # write failed can crash h5py when closed; Python's own write raises a clean OSError.
        self._f = h5py.File(f"{tmp.name}-{id(self)}", "w", driver="core", backing_store=False,
                            libver="latest")  # libver latest: checksummed metadata
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
            if arr.ndim == 0 or arr.dtype.kind in "OSU":  # HDF5 cannot filter these: CRC in an attribute
                ds = g.create_dataset(name, data=arr)
                ds.attrs["crc32"] = payload_crc(arr)
                continue
            kw: dict[str, Any] = {"fletcher32": True, "chunks": True}
            if compress and arr.size > 1024:
                kw.update(compression="gzip", compression_opts=4)
            g.create_dataset(name, data=arr, **kw)
        for k, v in (attrs or {}).items():
            g.attrs[k] = json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v

    def __exit__(self, exc_type, exc, tb) -> bool:
        assert self._f is not None and self._ctx is not None
        f, self._f = self._f, None
        if exc_type is None:
            try:
                f.attrs["attrs_crc32"] = attrs_crc(f)
                f.attrs["complete"] = True
                f.flush()
                image = f.id.get_file_image()
                f.close()
                with open(self._ctx_tmp, "wb") as out:
                    out.write(image)
                    out.flush()
                    os.fsync(out.fileno())
                del image
                Shard(self._ctx_tmp)  # read back (checksums included) before it takes the output's name
            except BaseException as e:
                exc_type, exc, tb = type(e), e, e.__traceback__
        else:
            f.close()
        if exc is None:
            self._ctx.__exit__(None, None, None)
            return False
        if self._ctx.__exit__(exc_type, exc, tb):
            return True
        raise exc


_UNSIGNED_ATTRS = ("complete", "attrs_crc32")


def _attr_text(v: Any) -> str:
    v = _attr(v)
    if isinstance(v, np.ndarray):
        v = v.tolist()
    return repr(v)


def attrs_crc(f: h5py.File) -> int:
    """CRC-32 over every attribute of the file and its groups (names and values; the merge reads
    no dataset attribute but ``crc32``, which verifies itself against the payload).

    HDF5 checksums object headers but not the fractal heap where a group with many attributes
    keeps them ("dense" storage, e.g. a shard's root provenance), so a flipped bit there would be
    read as a different model name, hook or checkpoint path; this digest closes that gap."""
    parts: list[str] = []
    _attr_parts(parts, "/", dict(f.attrs.items()))
    f.visititems(lambda n, o: _attr_parts(parts, n, dict(o.attrs.items())) if isinstance(o, h5py.Group) else None)
    return zlib.crc32("\x01".join(parts).encode())


def _attr_parts(parts: list[str], name: str, attrs: Mapping[str, Any]) -> None:
    for k in sorted(attrs):
        if not (name == "/" and k in _UNSIGNED_ATTRS):
            parts.append(f"{name}\x00{k}\x00{_attr_text(attrs[k])}")


def payload_crc(arr: np.ndarray) -> int:
    """CRC-32 of an array's dtype, shape and bytes (for datasets HDF5 cannot checksum itself)."""
    arr = np.asarray(arr)
    head = f"{arr.dtype.str}{arr.shape}".encode()
    body = "\x00".join(map(str, arr.ravel().tolist())).encode() if arr.dtype.kind in "OSU" else arr.tobytes()
    return zlib.crc32(head + body)


def _attr(v: Any) -> Any:
    if isinstance(v, bytes):
        v = v.decode()
    if isinstance(v, np.generic):
        v = v.item()
    return v


_NUMERIC_KINDS = frozenset("biuf")


def _read_tree(f: h5py.File, groups: dict[str, dict[str, np.ndarray]], group_attrs: dict[str, dict[str, Any]],
               parts: list[str], unchecked: list[str]) -> None:
    """Read every dataset and group attribute of ``f`` in one pass, verifying every checksum.

    Why low-level: a shard holds thousands of small datasets, and h5py's high-level objects cost
    more per dataset (an object per visited name, a creation property list per ``.fletcher32``, a
    file object per ``.attrs``) than the read itself; that overhead, not the checksums, held the
    merge below raw-read speed.  ``h5o.visit`` hands over each object's type and attribute count,
    a numeric Fletcher-32 dataset is read straight into a numpy array (HDF5 verifies the checksum
    of every chunk it reads: a mismatch raises ``OSError``), only what needs h5py's conversions
    (scalars and strings with their ``crc32`` attribute, anything unusual) goes through a
    high-level ``h5py.Dataset``, and attributes are read by ``_read_attrs``.  Objects are
    visited in name order, the order ``attrs_crc`` signed them in."""
    fid = f.id

    def visit(bname: bytes, info: h5o.ObjInfo) -> None:
        name = bname.decode("utf-8")
        if info.type == h5o.TYPE_DATASET:
            parent, _, leaf = name.rpartition("/")
            dsid = h5d.open(fid, bname)
            fletcher = _has_fletcher32(dsid)
            dtype, shape = dsid.dtype, dsid.shape
            if fletcher and shape is not None and dtype.kind in _NUMERIC_KINDS and dtype.subdtype is None \
                    and dtype.fields is None:
                value = np.zeros(shape, dtype=dtype)
                if value.size:
                    dsid.read(h5s.ALL, h5s.ALL, value)  # Fletcher-32 verified here
            else:
                ds = h5py.Dataset(dsid)
                value = ds[()]
                if not fletcher:
                    attrs = dict(ds.attrs.items())
                    if "crc32" not in attrs:
                        unchecked.append(name)
                    elif int(attrs["crc32"]) != payload_crc(np.asarray(value)):
                        raise ValueError(f"checksum mismatch in dataset {name}")
            groups.setdefault(parent, {})[leaf] = value
        else:
            # num_attrs comes from the (checksummed) object header: no attribute lookup without attributes
            attrs = _read_attrs(h5o.open(fid, bname), info.num_attrs) if info.num_attrs else {}
            _attr_parts(parts, name, attrs)
            if attrs:
                group_attrs[name] = {k: _attr(v) for k, v in attrs.items()}
        return None

    h5o.visit(fid, visit, info=True)


class Shard:
    """A validated, fully read shard (arrays are loaded eagerly; shards are small by design)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with h5py.File(self.path, "r") as f:
                root_attrs = _read_attrs(f.id, h5o.get_info(f.id).num_attrs)
                self.attrs = {k: _attr(v) for k, v in root_attrs.items()}
                self.groups: dict[str, dict[str, np.ndarray]] = {}
                self.group_attrs: dict[str, dict[str, Any]] = {}

                unchecked: list[str] = []
                parts: list[str] = []  # for the attribute CRC, collected in the same single pass
                _attr_parts(parts, "/", root_attrs)
                _read_tree(f, self.groups, self.group_attrs, parts, unchecked)
                has_attrs_crc = "attrs_crc32" in root_attrs
                if has_attrs_crc and int(root_attrs["attrs_crc32"]) != zlib.crc32("\x01".join(parts).encode()):
                    raise ValueError("checksum mismatch in the attributes (provenance or group metadata)")
        except (OSError, KeyError, ValueError, RuntimeError, UnicodeDecodeError, MemoryError, OverflowError) as e:
            # MemoryError / OverflowError: a flipped size in unchecksummed dense attribute storage
            raise ShardError(f"{self.path}: corrupt or unreadable HDF5 ({e.__class__.__name__}: {e})") from None
        if not self.attrs.get("complete"):
            raise ShardError(f"{self.path}: incomplete shard (no 'complete' mark)")
        if self.attrs.get("format_version") != FORMAT_VERSION:
            raise ShardError(f"{self.path}: format version {self.attrs.get('format_version')!r}, expected {FORMAT_VERSION}")
        if not has_attrs_crc:
            unchecked.insert(0, "(attributes)")
        if unchecked:
            raise ShardError(f"{self.path}: dataset(s) without a checksum: {', '.join(unchecked[:5])}"
                             f"{' ...' if len(unchecked) > 5 else ''}")

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
