"""Atomic shard writes and refusal of bad shards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from layerscope.h5io import Shard, ShardError, ShardWriter


def test_round_trip_and_provenance(tmp_path):
    out = tmp_path / "s.h5"
    with ShardWriter(out, {"probe": "p", "model": "m", "axes": {"slice": "0of1"}, "config_hash": "abc"}) as w:
        w.write("stats/blocks.0.hook_x/cls", {"count": np.arange(3)}, attrs={"layer": 0})
    sh = Shard(out)
    assert sh.probe == "p" and sh.model == "m" and sh.axes == {"slice": "0of1"}
    np.testing.assert_array_equal(sh.groups["stats/blocks.0.hook_x/cls"]["count"], [0, 1, 2])
    assert sh.group_attrs["stats/blocks.0.hook_x/cls"]["layer"] == 0
    assert set(sh.json_attr("versions")) >= {"torch", "diffusers", "transformers", "peft"}
    assert [p.name for p in tmp_path.iterdir()] == ["s.h5"]


def test_exception_leaves_nothing(tmp_path):
    out = tmp_path / "s.h5"
    with pytest.raises(RuntimeError):
        with ShardWriter(out, {"probe": "p"}) as w:
            w.write("g", {"a": np.ones(3)})
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


SLOW_WRITER = textwrap.dedent("""
    import sys, time, numpy as np
    from layerscope.h5io import ShardWriter
    with ShardWriter(sys.argv[1], {"probe": "p"}) as w:
        w.write("g", {"a": np.ones(10)})
        print("writing", flush=True)
        time.sleep(60)
""")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_job_leaves_no_output_file(tmp_path, sig):
    out = tmp_path / "shard.h5"
    p = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(out)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "writing"
    p.send_signal(sig)
    p.wait(timeout=30)
    assert p.returncode != 0
    assert not out.exists()
    left = [f.name for f in tmp_path.iterdir()]
    if sig == signal.SIGTERM:  # cleaned up
        assert left == []
    else:  # SIGKILL cannot be caught: only a hidden temporary may remain, and the next write removes it
        assert all(n.startswith(".partial-") for n in left)
        with ShardWriter(out, {"probe": "p"}) as w:
            w.write("g", {"a": np.ones(1)})
        assert [f.name for f in tmp_path.iterdir()] == ["shard.h5"]


def test_corrupt_and_incomplete_shards_are_refused(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + b"garbage" * 100)
    with pytest.raises(ShardError, match="bad.h5: corrupt"):
        Shard(bad)
    inc = tmp_path / "inc.h5"
    with h5py.File(inc, "w") as f:
        f.attrs["format_version"] = 1
    with pytest.raises(ShardError, match="incomplete"):
        Shard(inc)


def _fill_shard(out, n=200_000):
    with ShardWriter(out, {"probe": "p", "model": "m"}) as w:
        w.write("stats/g", {"mean": np.random.default_rng(0).normal(size=n)})


def test_injected_enospc_removes_temporary_and_names_path_and_cause(tmp_path, monkeypatch):
    import errno

    from layerscope.errors import WriteError

    real = h5py.Group.create_dataset

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(h5py.Group, "create_dataset", full)
    out = tmp_path / "shard.h5"
    with pytest.raises(WriteError) as ei:
        _fill_shard(out)
    msg = str(ei.value)
    assert "\n" not in msg and str(out) in msg and "No space left on device [ENOSPC]" in msg
    assert list(tmp_path.iterdir()) == []  # neither the output nor a hidden temporary
    monkeypatch.setattr(h5py.Group, "create_dataset", real)
    _fill_shard(out)  # the rerun writes exactly this shard
    assert Shard(out).groups["stats/g"]["mean"].shape == (200_000,)


def test_real_full_disk_on_tmpfs(tmp_path):
    """A real ENOSPC: a 256 KiB tmpfs (needs root and mount; skipped elsewhere)."""
    from layerscope.errors import WriteError

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        out = mnt / "shard.h5"
        with pytest.raises(WriteError) as ei:
            _fill_shard(out)  # 1.6 MB of float64 into 256 KiB
        msg = str(ei.value)
        assert "\n" not in msg and str(out) in msg and "ENOSPC" in msg, msg
        assert list(mnt.iterdir()) == []
        _fill_shard(out, n=1000)  # space again: the rerun succeeds
        assert Shard(out).groups["stats/g"]["mean"].shape == (1000,)
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_every_dataset_is_checksummed_and_a_flipped_payload_bit_is_refused(tmp_path):
    out = tmp_path / "s.h5"
    big = np.linspace(1.0, 2.0, 3000)
    with ShardWriter(out, {"probe": "p", "model": "m"}) as w:
        w.write("g", {"vec": np.arange(5.0), "big": big, "empty": np.zeros(0), "scalar": np.float64(0.25)}, compress=True)
    with h5py.File(out) as f:
        assert f["g/vec"].fletcher32 and f["g/big"].fletcher32 and f["g/big"].compression == "gzip"
        assert f["g/empty"].fletcher32 and "crc32" in f["g/scalar"].attrs
    sh = Shard(out)
    assert sh.groups["g"]["scalar"] == 0.25 and sh.groups["g"]["empty"].shape == (0,)
    # flip one bit inside each payload: found via its byte offset in the file
    for name, value in (("vec", np.arange(5.0)), ("scalar", np.float64(0.25))):
        raw = bytearray(out.read_bytes())
        needle = np.asarray(value).tobytes()
        at = raw.find(needle)
        assert at >= 0
        bad = tmp_path / f"bad-{name}.h5"
        raw[at + 3] ^= 0x10
        bad.write_bytes(bytes(raw))
        with pytest.raises(ShardError, match=f"bad-{name}.h5: corrupt"):
            Shard(bad)
    # a dataset without a checksum (an older or foreign writer) is refused by name
    with h5py.File(out, "a") as f:
        f["g"].create_dataset("plain", data=np.ones(3))
    with pytest.raises(ShardError, match="without a checksum: g/plain"):
        Shard(out)


def _every_dtype_shard(out: Path) -> dict[str, np.ndarray]:
    """A shard holding every kind of dataset a writer (ours or a foreign one) may leave: the
    reader's fast low-level path and its high-level fallback must both return exactly what
    h5py's own high-level read returns."""
    rng = np.random.default_rng(3)
    arrays = {
        "f64": rng.normal(size=7), "f32": rng.normal(size=(3, 5)).astype(np.float32),
        "i64": np.arange(-4, 6), "i32": np.arange(12, dtype=np.int32).reshape(3, 4), "u8": np.arange(9, dtype=np.uint8),
        "flag": np.array([True, False, True]), "empty": np.zeros((0, 4)), "empty_i": np.zeros(0, np.int64),
        "big": np.linspace(-3.0, 3.0, 5000), "nan_inf": np.array([np.nan, np.inf, -np.inf, 0.0, -0.0]),
        "scalar_f": np.float64(0.5), "scalar_i": np.int64(-7), "word": np.array(b"hello"),
        "words": np.array([b"a", b"bc", b"def"]),
    }
    with ShardWriter(out, {"probe": "p", "model": "m"}) as w:
        w.write("stats/blocks.0.hook_x/cls", arrays, attrs={"layer": 0, "rep": "x", "roles": ["a", "b"]}, compress=True)
        w.write("stats/blocks.1.hook_x/patch", {"count": np.arange(4)})
    with h5py.File(out, "a") as f:  # foreign but checksummed: big-endian, 3-D int16, gzip + Fletcher-32
        g = f["stats/blocks.1.hook_x/patch"]
        g.create_dataset("be", data=np.arange(6.0).astype(">f8"), fletcher32=True, chunks=True)
        g.create_dataset("i16", data=np.arange(24, dtype=np.int16).reshape(2, 3, 4), fletcher32=True, chunks=(1, 3, 4))
        g.create_dataset("gz", data=np.arange(3000.0), fletcher32=True, chunks=(1000,), compression="gzip")
    return arrays


def _attr_variety(out: Path) -> None:
    """Attributes of every type h5py writes, on the root and on groups, re-signed afterwards
    (``attrs_crc``) so that the shard stays valid."""
    from layerscope.h5io import attrs_crc

    with h5py.File(out, "a") as f:
        for obj in (f, f["stats/blocks.1.hook_x/patch"]):
            a = obj.attrs
            a["i"], a["f"], a["b"], a["s"], a["by"] = 3, 2.5, True, "héllo", np.bytes_(b"raw")
            a["u8"], a["f32"] = np.uint8(7), np.float32(1.5)
            a["ints"], a["floats2d"] = np.arange(4), np.ones((2, 3))
            a["strs"] = ["a", "bé"]  # variable-length strings
            a["fixed"] = np.array([b"ab", b"cd"])
            a["empty"] = h5py.Empty("f8")
            a.create("arr_t", data=np.arange(6.0).reshape(2, 3), dtype=np.dtype("(3,)f8"))  # top-level array type
        f.attrs["attrs_crc32"] = attrs_crc(f)


def _same(got: object, want: object) -> bool:
    if isinstance(want, h5py.Empty):
        return isinstance(got, h5py.Empty) and got.dtype == want.dtype
    return (type(got) is type(want) and np.asarray(got).dtype == np.asarray(want).dtype
            and np.shape(got) == np.shape(want) and np.array_equal(np.asarray(got), np.asarray(want)))


def test_shard_read_equals_h5py_high_level_read_for_every_dtype(tmp_path):
    from layerscope.h5io import _attr

    out = tmp_path / "s.h5"
    arrays = _every_dtype_shard(out)
    _attr_variety(out)
    sh = Shard(out)
    ref: dict[str, dict[str, object]] = {}
    ref_attrs: dict[str, dict[str, object]] = {}
    with h5py.File(out, "r") as f:  # reference: h5py's high-level read of every dataset and attribute
        f.visititems(lambda n, o: ref.setdefault(n.rpartition("/")[0], {}).__setitem__(n.rpartition("/")[2], o[()])
                     if isinstance(o, h5py.Dataset) else None)
        f.visititems(lambda n, o: ref_attrs.__setitem__(n, {k: _attr(v) for k, v in o.attrs.items()})
                     if isinstance(o, h5py.Group) and len(o.attrs) else None)
        root = {k: _attr(v) for k, v in f.attrs.items()}
    assert sh.attrs.keys() == root.keys() and all(_same(sh.attrs[k], v) for k, v in root.items()), root
    assert sh.group_attrs.keys() == ref_attrs.keys()
    for g, want in ref_attrs.items():
        assert sh.group_attrs[g].keys() == want.keys(), g
        bad = {k: (sh.group_attrs[g][k], v) for k, v in want.items() if not _same(sh.group_attrs[g][k], v)}
        assert not bad, (g, bad)
    assert sh.attrs["s"] == "héllo" and sh.attrs["strs"].tolist() == ["a", "bé"] and sh.attrs["arr_t"].shape == (2, 3)
    assert set(sh.groups) == set(ref) == {"stats/blocks.0.hook_x/cls", "stats/blocks.1.hook_x/patch"}
    for g in ref:
        assert set(sh.groups[g]) == set(ref[g]), g
        for name, want in ref[g].items():
            got = sh.groups[g][name]
            assert type(got) is type(want), (g, name, type(got), type(want))
            assert np.asarray(got).dtype == np.asarray(want).dtype and np.shape(got) == np.shape(want), (g, name)
            np.testing.assert_array_equal(got, want)
    cls = sh.groups["stats/blocks.0.hook_x/cls"]
    for name, value in arrays.items():  # and what was written, independently of h5py's reading
        if np.asarray(value).dtype.kind not in "US":
            np.testing.assert_array_equal(cls[name], value)
    assert cls["nan_inf"][0] != cls["nan_inf"][0] and np.signbit(cls["nan_inf"][4])  # NaN and -0.0 survive
    np.testing.assert_array_equal(sh.groups["stats/blocks.1.hook_x/patch"]["be"], np.arange(6.0))
    assert sh.group_attrs["stats/blocks.0.hook_x/cls"] == {"layer": 0, "rep": "x", "roles": '["a", "b"]'}


def test_flipped_bit_in_every_chunked_dataset_is_refused(tmp_path):
    """One bit flipped in the stored bytes of each chunked dataset (raw, gzip, big-endian,
    multi-chunk), located by HDF5's own chunk index: every one is refused by name."""
    out = tmp_path / "s.h5"
    _every_dtype_shard(out)
    targets = []
    with h5py.File(out, "r") as f:
        def collect(name, obj):
            if isinstance(obj, h5py.Dataset) and obj.chunks and obj.size:
                info = obj.id.get_chunk_info(obj.id.get_num_chunks() - 1)  # the last chunk
                targets.append((name, info.byte_offset + info.size // 2))
        f.visititems(collect)
    assert len(targets) == 12  # 8 arrays of the writer (empty ones have no chunk) + count + 3 foreign
    pristine = out.read_bytes()
    for i, (name, at) in enumerate(targets):
        raw = bytearray(pristine)
        raw[at] ^= 0x04
        bad = tmp_path / f"bad-{i}.h5"
        bad.write_bytes(bytes(raw))
        with pytest.raises(ShardError, match=f"bad-{i}.h5: corrupt or unreadable HDF5"):
            Shard(bad)


def test_edited_or_added_group_attribute_is_refused(tmp_path):
    out = tmp_path / "s.h5"
    _every_dtype_shard(out)
    pristine = out.read_bytes()
    edits = [("stats/blocks.0.hook_x/cls", "layer", 1),  # a group that has attributes
             ("stats/blocks.1.hook_x/patch", "layer", 1),  # a group that had none
             ("stats", "note", "x")]  # an intermediate group
    for g, k, v in edits:
        out.write_bytes(pristine)
        with h5py.File(out, "a") as f:
            f[g].attrs[k] = v
        with pytest.raises(ShardError, match="checksum mismatch in the attributes"):
            Shard(out)
