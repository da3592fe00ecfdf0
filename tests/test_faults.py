"""Fault injection: faults a cluster really produces, on the real shards of all five probes.

The shards are generated ONCE per session by Snakemake on a reduced config (every probe, tiny
models, a few images); each fault corrupts a *copy* and asserts the exact outcome: the merge
refuses with the file named and the rebuild command, or Snakemake recomputes, and a table never
changes silently. The outcomes are documented in docs/reliability.md.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from conftest import run_snakemake
from layerscope.errors import ShardError, WriteError
from layerscope.merge import merge_to_tables, nonfinite_summary

pytestmark = pytest.mark.slow

PROBES = {  # probe -> (model, a dataset the fault targets: group regex part, stats dataset)
    "dinov3_channels": "dinov3_tiny",
    "sdxl_ablation": "sdxl_tiny",
    "wan_logits": "wan_tiny",
    "sd3_textgrad": "sd3_tiny",
    "sd3_recon_train": "sd3_tiny",
}

RESULTS = Path("results/default")  # the default study's namespace (config key `study`)

CONFIG = {
    "runtime": {"device": "cpu", "threads": 1},
    "datasets": {"photos": {"kind": "skimage"}},
    "models": {
        "dinov3_tiny": {"family": "dinov3", "source": "tiny:default", "seed": 0},
        "sdxl_tiny": {"family": "sdxl", "source": "tiny:default", "seed": 0},
        "clip_tiny": {"family": "clip", "source": "tiny:default", "seed": 0},
        "sd3_tiny": {"family": "sd3", "source": "tiny:default", "seed": 0, "dtype": "fp32"},
        "wan_tiny": {"family": "wan", "source": "tiny:default", "seed": 0},
    },
    "probes": {
        "dinov3_channels": {"models": ["dinov3_tiny"], "dataset": "photos", "slices": 2, "batch_size": 4,
                            "image_size": 32, "max_images": 4},
        "sdxl_ablation": {"models": ["sdxl_tiny"], "prompts": ["a red cube"], "seeds": [0],
                          "groups": ["down_blocks.1.attentions.0"], "steps": 1, "guidance_scale": 5.0,
                          "height": 32, "width": 32, "clip_model": "clip_tiny", "aux_models": ["clip_tiny"]},
        "wan_logits": {"models": ["wan_tiny"], "prompt": "an eagle", "text": "umt5", "max_sequence_length": 8,
                       "num_frames": 9, "num_frame_per_block": 3, "latent_size": [4, 4], "steps": [0],
                       "chunks": [0, -1], "layer_groups": [[0, 1]], "seeds": [42], "query_chunk": 16, "first_k": 3},
        "sd3_textgrad": {"models": ["sd3_tiny"], "dataset": "photos", "max_images": 2, "timesteps": [250],
                         "seeds": [0], "slices": 1, "max_sequence_length": 16, "topk": 4, "batch_size": 2},
        "sd3_recon_train": {"models": ["sd3_tiny"], "dataset": "photos", "gammas": [0.5], "targets": [0],
                            "seeds": [0], "steps": 2, "batch_size": 2, "learning_rate": 0.001, "mode": "full",
                            "max_sequence_length": 16},
    },
}


@pytest.fixture(scope="session")
def study5(tmp_path_factory) -> Path:
    """One finished run of all five probes (about a minute on 2 cores)."""
    wd = tmp_path_factory.mktemp("study5")
    (wd / "study.yaml").write_text(yaml.safe_dump(CONFIG))
    run_snakemake(wd, config=wd / "study.yaml")
    return wd


def shard_paths(root: Path, probe: str) -> list[Path]:
    d = root / RESULTS / probe / "shards" / PROBES[probe]
    return sorted(p.relative_to(root) for p in d.glob("*.h5") if not p.name.endswith(".logits.h5"))


@pytest.fixture
def work(study5, tmp_path, monkeypatch):
    """A private copy of the study's shards (relative paths, as Snakemake passes them)."""
    for probe in PROBES:
        src = study5 / RESULTS / probe / "shards"
        shutil.copytree(src, tmp_path / RESULTS / probe / "shards")
    shutil.copytree(study5 / RESULTS / "data", tmp_path / RESULTS / "data")  # the slice indexes the shards read
    monkeypatch.chdir(tmp_path)
    for probe in PROBES:
        expect_hash(probe)  # before any fault touches the copies
    return tmp_path


HASHES: dict[str, str] = {}  # probe -> config hash of the pristine shards (the 'current config')


def expect_hash(probe: str) -> str:
    if probe not in HASHES:
        with h5py.File(shard_paths(Path("."), probe)[-1]) as f:
            HASHES[probe] = str(f.attrs["config_hash"])
    return HASHES[probe]


def merge(probe: str, out: str = "tables") -> dict[str, bytes]:
    paths = shard_paths(Path("."), probe)
    written = merge_to_tables(probe, PROBES[probe], paths, Path(out) / probe, expect_hash(probe))
    return {p.name: p.read_bytes() for p in written}


@pytest.fixture(scope="session")
def baseline(study5, tmp_path_factory) -> dict[str, dict[str, bytes]]:
    """Tables merged from the pristine shards, in a copy laid out like every fault's."""
    root = tmp_path_factory.mktemp("baseline")
    for probe in PROBES:
        shutil.copytree(study5 / RESULTS / probe / "shards", root / RESULTS / probe / "shards")
    old = os.getcwd()
    os.chdir(root)
    try:
        return {probe: merge(probe) for probe in PROBES}
    finally:
        os.chdir(old)


def assert_refused(probe: str, bad: Path, *fragments: str) -> str:
    with pytest.raises(ShardError) as ei:
        merge(probe, out="refused")
    msg = str(ei.value)
    assert f"{bad}: " in msg, msg
    rebuild = msg.rsplit("rebuild them with: ", 1)[-1]
    assert rebuild.startswith("snakemake --forcerun ") and str(bad) in rebuild.split(), msg
    for f in fragments:
        assert f in msg, msg
    assert not Path("refused").exists(), "a refused merge wrote a table"
    return msg


def stats_datasets(path: Path) -> list[str]:
    out: list[str] = []
    with h5py.File(path) as f:
        f.visititems(lambda n, o: out.append(n) if isinstance(o, h5py.Dataset) else None)
    return out


def payload_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """dataset -> (file offset, stored size) of its raw bytes (chunk 0 for chunked data)."""
    out = {}
    with h5py.File(path) as f:
        def visit(n, o):
            if isinstance(o, h5py.Dataset) and o.size:
                if o.chunks:
                    info = o.id.get_chunk_info(0)
                    out[n] = (info.byte_offset, info.size)
                else:
                    off = o.id.get_offset()
                    if off is not None:
                        out[n] = (off, o.id.get_storage_size())
        f.visititems(visit)
    return out


def resign(path: Path) -> None:
    """Recompute the attribute checksum after an edit: the shard is then exactly what a buggy or
    foreign writer would have produced (checksums valid), so only the layout/value/provenance
    checks can refuse it. Without this, the attribute CRC refuses the edit as corruption."""
    from layerscope.h5io import attrs_crc

    with h5py.File(path, "a") as f:
        f.attrs["attrs_crc32"] = attrs_crc(f)


def flip(path: Path, offset: int, bit: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ (1 << bit)]))


# ------------------------------------------------------------------ faults inside one shard

def _first_group_with(path: Path, name: str) -> str | None:
    for d in stats_datasets(path):
        if d.rsplit("/", 1)[-1] == name:
            return d.rsplit("/", 1)[0]
    return None


STORED_STAT_FAULTS = {
    # fault -> (dataset name, value writer, expected message fragment); applied where the probe has it
    "nan_mean": ("mean", lambda a: np.where(np.arange(a.size).reshape(a.shape) == 0, np.nan, a), "non-finite stored value"),
    "inf_m2": ("m2", lambda a: np.where(np.arange(a.size).reshape(a.shape) == 0, np.inf, a), "non-finite stored value"),
    "negative_count": ("count", lambda a: a - (a.max() + 1) * (np.arange(a.size).reshape(a.shape) == 0), "negative count"),
    "max_below_mean": ("max_abs", lambda a: a * 0.0 + np.where(np.arange(a.size).reshape(a.shape) == 0, 0.0, a), None),
    "inf_metric": ("strength", lambda a: np.where(np.arange(a.size) == 0, np.inf, a), "infinite value"),
    "nan_logit_sum": ("logit_sum", lambda a: np.where(np.arange(a.size).reshape(a.shape) == 0, np.nan, a), "non-finite stored value"),
    "negative_tokens": ("n_valid_tokens", lambda a: a - (a.max() + 1) * (np.arange(a.size) == 0), "negative count"),
}


@pytest.mark.parametrize("fault", sorted(STORED_STAT_FAULTS))
@pytest.mark.parametrize("probe", sorted(PROBES))
def test_bad_stored_statistics_are_refused(work, probe, fault):
    """NaN/inf/negative counts written into stored statistics (checksums recomputed by HDF5, so
    only the value checks can catch them): refused with file, group and dataset named."""
    name, change, fragment = STORED_STAT_FAULTS[fault]
    bad = shard_paths(work, probe)[0]
    group = _first_group_with(bad, name)
    if group is None:
        pytest.skip(f"{probe} stores no {name}")
    with h5py.File(bad, "a") as f:
        ds = f[f"{group}/{name}"]
        before = ds[()]
        new = change(before.astype(np.float64) if fault == "max_below_mean" else before).astype(before.dtype)
        if fault == "max_below_mean":  # a max_abs below |mean| where the mean is non-zero
            m = f[f"{group}/mean"][()]
            c = int(np.argmax(np.abs(m)))
            new = before.copy()
            new.ravel()[c] = abs(m.ravel()[c]) / 2
            fragment = f"channel {c}: |mean|"
        assert not np.array_equal(new, before, equal_nan=True)
        ds[...] = new
    assert_refused(probe, bad, f"group {group}", fragment)


@pytest.mark.parametrize("probe", sorted(PROBES))
def test_missing_group_is_refused(work, probe):
    bad = shard_paths(work, probe)[-1]
    groups = sorted({d.rsplit("/", 1)[0] for d in stats_datasets(bad)})
    victim = groups[len(groups) // 2]
    with h5py.File(bad, "a") as f:
        del f[victim]
    resign(bad)  # as a buggy writer would have left it: only the declared layout can notice
    assert_refused(probe, bad, victim)


@pytest.mark.parametrize("probe", sorted(PROBES))
def test_missing_dataset_inside_a_group_is_refused_not_a_keyerror(work, probe):
    bad = shard_paths(work, probe)[0]
    victim = stats_datasets(bad)[-1]
    group, name = victim.rsplit("/", 1)
    with h5py.File(bad, "a") as f:
        del f[victim]
    resign(bad)
    assert_refused(probe, bad, f"group {group}: dataset {name} is missing")


@pytest.mark.parametrize("probe", sorted(PROBES))
def test_truncated_shard_is_refused(work, probe):
    bad = shard_paths(work, probe)[0]
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) * 2 // 3])
    assert_refused(probe, bad, "corrupt")


@pytest.mark.parametrize("probe", sorted(PROBES))
def test_bit_flip_in_any_stored_payload_is_refused(work, probe):
    """One flipped bit inside the raw bytes of every dataset in turn (statistics, images, losses):
    Fletcher-32 / CRC-32 refuse each; none reaches a table."""
    pristine = {p: p.read_bytes() for p in shard_paths(work, probe)}
    bad = next(iter(pristine))
    offsets = payload_offsets(bad)
    assert offsets
    rng = np.random.default_rng(13)
    names = sorted(offsets)
    # every statistics kind at least once, at most 8 datasets per probe (each check is a full merge)
    pick = sorted({n for n in names if n.rsplit("/", 1)[-1] in ("mean", "m2", "count", "logit_sum", "strength", "total")}
                  | set(rng.choice(names, size=min(4, len(names)), replace=False)))[:8]
    for name in pick:
        off, size = offsets[name]
        at = off + int(rng.integers(0, max(size, 1)))
        flip(bad, at, int(rng.integers(0, 8)))
        assert_refused(probe, bad, "corrupt")
        bad.write_bytes(pristine[bad])


@pytest.mark.parametrize("probe", sorted(PROBES))
def test_bit_flips_at_random_offsets_never_change_a_table(work, baseline, probe):
    """16 single-bit flips at random offsets anywhere in a shard (superblock, object headers,
    attributes, B-trees, payloads, free space): each is refused with the file named, or - where
    the bit carried no information - the tables are byte-identical to the pristine merge."""
    pristine = {p: p.read_bytes() for p in shard_paths(work, probe)}
    bad = next(iter(pristine))
    rng = np.random.default_rng(sum(map(ord, probe)))
    refused = 0
    for _ in range(16):
        flip(bad, int(rng.integers(0, len(pristine[bad]))), int(rng.integers(0, 8)))
        try:
            tables = merge(probe, out="flipped")
        except ShardError as e:
            assert f"{bad}: " in str(e) and f"snakemake --forcerun {bad}" in str(e), str(e)
            refused += 1
        else:
            assert tables == baseline[probe], "a flipped bit changed a table"
        bad.write_bytes(pristine[bad])
    assert refused >= 4  # most of a small shard is information (measured: 43-90 % of 30 flips)


# ------------------------------------------------------------------ faults between shards

@pytest.mark.parametrize("probe", sorted(PROBES))
def test_foreign_shard_is_refused(work, probe):
    """Another probe's shard under this probe's file name."""
    other = next(p for p in sorted(PROBES) if p != probe)
    bad = shard_paths(work, probe)[0]
    shutil.copyfile(shard_paths(work, other)[0], bad)
    assert_refused(probe, bad, f"written by probe '{other}'")


@pytest.mark.parametrize("probe", sorted(PROBES))
def test_stale_shard_from_another_config_is_refused(work, probe):
    bad = shard_paths(work, probe)[-1]
    with h5py.File(bad, "a") as f:
        f.attrs["config_hash"] = "0123456789abcdef"
    resign(bad)
    assert_refused(probe, bad, "stale or foreign shard")


@pytest.mark.parametrize("probe", ["dinov3_channels"])
def test_shards_that_saw_different_data_are_refused(work, probe):
    """A shard whose recorded data digest is not its slice's data as it is now: stale, refused
    (the other slice's shard is not)."""
    a, b = shard_paths(work, probe)
    with h5py.File(b, "a") as f:
        f.attrs["data_digest"] = '{"photos": "ffffffffffffffff"}'
    resign(b)
    msg = assert_refused(probe, b, "stale: the data changed after the shard ran")
    assert f"{a}: " not in msg


def test_missing_layout_attribute_is_refused(work):
    bad = shard_paths(work, "dinov3_channels")[0]
    with h5py.File(bad, "a") as f:
        del f.attrs["num_layers"]
    resign(bad)
    assert_refused("dinov3_channels", bad, "attributes that define its layout")


def test_edited_provenance_is_refused_by_the_attribute_checksum(work):
    """A provenance attribute changed after writing (bit rot in dense attribute storage, which
    HDF5 does not checksum, or a hand edit): refused as corrupt."""
    bad = shard_paths(work, "sd3_recon_train")[0]
    with h5py.File(bad, "a") as f:
        f.attrs["final_hook"] = "transformer_blocks.:.hook_text_out"
    assert_refused("sd3_recon_train", bad, "corrupt", "checksum mismatch in the attributes")


def test_dataset_without_checksum_is_refused(work):
    bad = shard_paths(work, "wan_logits")[0]
    with h5py.File(bad, "a") as f:
        g = f["stats/hook_latents"]
        data = g["mean"][()]
        del g["mean"]
        g.create_dataset("mean", data=data)  # same numbers, no Fletcher-32
    assert_refused("wan_logits", bad, "without a checksum: stats/hook_latents/mean")


# ------------------------------------------------------------------ non-finite activations travel

def test_nonfinite_activations_reach_tables_console_and_figures(work, baseline, tmp_path):
    """Counted non-finite activations (a legitimate shard) are merged, appear in the table's
    nonfinite column, in the console summary line, and as a mark in the figures."""
    import matplotlib

    matplotlib.use("Agg")
    import pandas as pd

    from layerscope.probes import get_probe

    sh = shard_paths(work, "dinov3_channels")[0]
    g = "stats/blocks.2.hook_resid_post/patch"
    with h5py.File(sh, "a") as f:
        nf = f[f"{g}/nonfinite"][()]
        nf[5] = 3  # three NaN seen in channel 5 of layer 2 (excluded from the moments)
        f[f"{g}/nonfinite"][...] = nf
    merge("dinov3_channels")
    ch = pd.read_csv("tables/dinov3_channels/channels.csv")
    row = ch[(ch.layer == 2) & (ch.rep == "pre") & (ch.role == "patch") & (ch.channel == 5)]
    assert int(row["nonfinite"].iloc[0]) == 3 and int(ch["nonfinite"].sum()) == 3
    lines = nonfinite_summary(sorted(Path("tables/dinov3_channels").glob("*.csv")))
    assert any("channels.csv: 3 non-finite" in ln for ln in lines), lines
    # figures: every affected facet carries the hatched band and the legend note
    from layerscope.plots import NONFINITE_LABEL, mark_nonfinite

    tables = {t: pd.read_csv(f"tables/dinov3_channels/{t}.csv").assign(model="m") for t in ("channels", "layers", "outliers")}
    get_probe("dinov3_channels").plot(tables, tmp_path)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1, 2, 3], [1, 2, 3, 4], label="std")
    assert mark_nonfinite(ax, tables["layers"], "layer") == 3
    labels = ax.get_legend().get_texts()
    assert NONFINITE_LABEL in [t.get_text() for t in labels]
    bands = [p for p in ax.patches if p.get_hatch() == "///"]
    assert len(bands) == 1 and abs(bands[0].get_x() - 1.6) < 1e-9  # layer 2 only
    plt.close(fig)


# ------------------------------------------------------------------ I/O faults

def test_full_disk_while_writing_tables_removes_temporary_and_names_path(work, monkeypatch):
    import builtins

    import pandas as pd

    real = pd.DataFrame.to_csv

    def full(self, path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(pd.DataFrame, "to_csv", full)
    with pytest.raises(WriteError) as ei:
        merge("dinov3_channels")
    msg = str(ei.value)
    assert "\n" not in msg and "tables/dinov3_channels/channels.csv" in msg and "ENOSPC" in msg
    assert not any(Path("tables").rglob("*")) or all(p.is_dir() for p in Path("tables").rglob("*"))
    monkeypatch.setattr(pd.DataFrame, "to_csv", real)
    merge("dinov3_channels")  # the rerun writes the tables
    del builtins


KILLED = """
import sys, time, numpy as np
from layerscope.h5io import ShardWriter
with ShardWriter(sys.argv[1], {"probe": "p"}) as w:
    w.write("g", {"a": np.ones(10)})
    print("writing", flush=True)
    time.sleep(60)
"""


def test_killed_shard_job_leaves_no_shard_and_the_rerun_replaces_it(work):
    out = shard_paths(work, "dinov3_channels")[0]
    out.unlink()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    p = subprocess.Popen([sys.executable, "-c", KILLED, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    assert p.stdout.readline().strip() == "writing"
    p.kill()
    p.wait(timeout=30)
    assert not out.exists()
    with pytest.raises(ShardError, match="bad shard"):
        merge_to_tables("dinov3_channels", "dinov3_tiny", [out], "t", None)


# ------------------------------------------------------------------ Snakemake: missing, changed, added

def _dry_jobs(wd: Path, cfg: Path) -> dict[str, int]:
    import re

    r = run_snakemake(wd, "-n", config=cfg)
    counts: dict[str, int] = {}
    for line in r.stdout.split("Job stats:", 1)[-1].splitlines():
        m = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if m and m.group(1) != "total":
            counts[m.group(1)] = int(m.group(2))
    return counts


def test_deleted_table_is_rebuilt_by_plain_snakemake(study5):
    t = study5 / RESULTS / "wan_logits/tables/wan_tiny/sink_metrics.csv"
    saved = t.read_bytes()
    t.unlink()
    try:
        assert _dry_jobs(study5, study5 / "study.yaml") == {"wan_logits_merge": 1, "wan_logits_figures": 1, "all": 1}
    finally:
        t.write_bytes(saved)


def test_changed_and_added_images_rerun_the_slice_index_and_only_its_shards(tmp_path):
    """A folder dataset: changing an image's bytes (same name) or adding one changes the
    dataset_slice param of the slice holding it, rebuilds that slice's index and the shards that read
    it; the data digest the shards record covers the image bytes."""
    from PIL import Image

    from layerscope.data import index_digest
    from layerscope.layout import Layout

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(imgs / f"im{i}.png")
    cfg = {"runtime": {"device": "cpu", "threads": 1},
           "datasets": {"mine": {"kind": "folder", "path": str(imgs)}},
           "models": {"dinov3_tiny": {"family": "dinov3", "source": "tiny:default", "seed": 0}},
           "probes": {"dinov3_channels": {"models": ["dinov3_tiny"], "dataset": "mine", "slices": 1,
                                          "batch_size": 2, "image_size": 16}}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    target = Layout("default").data_slice_index("mine", 0, "0of1")
    run_snakemake(tmp_path, target, config=tmp_path / "c.yaml")
    index = tmp_path / target
    d0, idx0 = index_digest(index), index.read_bytes()
    # unchanged: the index is up to date
    r = run_snakemake(tmp_path, "-n", target, config=tmp_path / "c.yaml")
    assert "dataset_slice" not in r.stdout
    # changed bytes, same name
    Image.new("RGB", (8, 8), (0, 200, 0)).save(imgs / "im1.png")
    r = run_snakemake(tmp_path, "-n", target, config=tmp_path / "c.yaml")
    assert "rule dataset_slice" in r.stdout, r.stdout[-2000:]
    run_snakemake(tmp_path, target, config=tmp_path / "c.yaml")
    assert index.read_bytes() == idx0 and index_digest(index) != d0  # same listing, new bytes, new digest
    # the digest is over image bytes even without the sidecar
    d1 = index_digest(index)
    sidecar = index.parent / "index.tsv.digest"
    if sidecar.exists():
        sidecar.unlink()
    assert index_digest(index) == d1
    # added image: its slice's index and shard rerun (one slice here)
    Image.new("RGB", (8, 8), (0, 0, 99)).save(imgs / "im3.png")
    jobs = _dry_jobs(tmp_path, tmp_path / "c.yaml")
    assert jobs.get("dataset_slice") == 1 and jobs.get("dinov3_channels_shard") == 1, jobs
