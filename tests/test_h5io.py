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
