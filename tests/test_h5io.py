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
