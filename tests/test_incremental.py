"""Sweeps that grow: on a finished study, a dry run plans exactly the new cells, and nothing for
execution knobs; two studies in one working directory write disjoint trees.

The reference for "which slice holds a new image" is written here from the documented rule
(sha256 of the item's name, first 60 bits, modulo the slice count), not taken from the package.
"""

from __future__ import annotations

import copy
import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import run_snakemake

pytestmark = pytest.mark.slow

N_IMAGES = 6
DINO_SLICES, TG_SLICES = 3, 2


def job_counts(stdout: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in stdout.split("Job stats:", 1)[-1].splitlines():
        m = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if m and m.group(1) != "total":
            counts[m.group(1)] = int(m.group(2))
    return counts


def planned_outputs(stdout: str) -> set[str]:
    return {o.strip() for line in re.findall(r"^\s*output: (.*)$", stdout, re.M) for o in line.split(",")}


def slice_of(name: str, n: int) -> int:
    return int(hashlib.sha256(name.encode()).hexdigest()[:15], 16) % n


def write_image(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)


BASE = {
    "runtime": {"device": "cpu", "threads": 1},
    "datasets": {"imgs": {"kind": "folder", "path": "imgs"}},
    "models": {
        "dino_a": {"family": "dinov3", "source": "tiny:default", "seed": 0},
        "dino_b": {"family": "dinov3", "source": "tiny:default", "seed": 1},
        "dino_c": {"family": "dinov3", "source": "tiny:default", "seed": 2},
        "sd3_tiny": {"family": "sd3", "source": "tiny:default", "seed": 0},
    },
    "probes": {
        "dinov3_channels": {"models": ["dino_a", "dino_b"], "dataset": "imgs", "slices": DINO_SLICES,
                            "batch_size": 4, "image_size": 32},
        "sd3_textgrad": {"models": ["sd3_tiny"], "dataset": "imgs", "slices": TG_SLICES, "timesteps": [500],
                         "seeds": [0], "max_sequence_length": 8, "batch_size": 4},
    },
}


def write_config(wd: Path, cfg: dict, name: str = "study.yaml") -> Path:
    p = wd / name
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


def dry(wd: Path, cfg: dict, name: str = "edit.yaml"):
    return run_snakemake(wd, "-n", config=write_config(wd, cfg, name))


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    wd = tmp_path_factory.mktemp("grow")
    (wd / "imgs").mkdir()
    for i in range(N_IMAGES):
        write_image(wd / "imgs" / f"img{i}.png", i)
    run_snakemake(wd, config=write_config(wd, BASE))
    return wd


def test_finished_study_has_nothing_to_do(study):
    r = run_snakemake(study, "-n", config=study / "study.yaml")
    assert "Nothing to be done" in r.stdout + r.stderr, r.stdout[-2000:]


def _all_knobs(c: dict) -> None:
    """Every execution knob at once (each alone would be a dry run of its own: seconds each)."""
    c["probes"]["dinov3_channels"]["models"] = ["dino_b", "dino_a"]  # list order
    c["probes"]["dinov3_channels"]["batch_size"] = 1  # batch-invariant (exec_keys)
    c["probes"]["sd3_textgrad"]["batch_size"] = 1
    c["probes"]["sd3_textgrad"]["memory_budget_mb"] = 64
    c["probes"]["sd3_textgrad"]["resources"] = {"mem_mb": 999, "runtime": 5, "gpus": 0}
    c["probes"]["sd3_textgrad"]["threads"] = 2
    c["runtime"]["threads"] = 2
    c["runtime"]["device"] = "auto"


@pytest.mark.parametrize("edit", [
    pytest.param(lambda c: None, id="copy-of-config"),
    pytest.param(_all_knobs, id="threads-device-order-batch-resources"),
])
def test_execution_knobs_rerun_nothing(study, edit):
    cfg = copy.deepcopy(BASE)
    edit(cfg)
    r = dry(study, cfg, "copy.yaml")
    assert "Nothing to be done" in r.stdout + r.stderr, r.stdout[-3000:]


def test_adding_a_model_plans_only_its_jobs(study):
    cfg = copy.deepcopy(BASE)
    cfg["probes"]["dinov3_channels"]["models"] = ["dino_a", "dino_c", "dino_b"]
    r = dry(study, cfg)
    assert job_counts(r.stdout) == {"build_tiny_model": 1, "dinov3_channels_spec": 1,
                                    "dinov3_channels_shard": DINO_SLICES, "dinov3_channels_merge": 1,
                                    "dinov3_channels_figures": 1, "all": 1}, r.stdout[-3000:]
    shards = {o for o in planned_outputs(r.stdout) if o.endswith(".h5")}
    assert shards == {f"results/default/dinov3_channels/shards/dino_c/slice-{i}of{DINO_SLICES}.h5" for i in range(DINO_SLICES)}


def test_adding_a_seed_plans_only_its_shards(study):
    cfg = copy.deepcopy(BASE)
    cfg["probes"]["sd3_textgrad"]["seeds"] = [0, 7]
    r = dry(study, cfg)
    assert job_counts(r.stdout) == {"sd3_textgrad_shard": TG_SLICES, "sd3_textgrad_merge": 1,
                                    "sd3_textgrad_figures": 1, "all": 1}, r.stdout[-3000:]
    shards = {o for o in planned_outputs(r.stdout) if o.endswith(".h5")}
    assert shards == {f"results/default/sd3_textgrad/shards/sd3_tiny/timestep-500__seed-7__slice-{i}of{TG_SLICES}.h5"
                      for i in range(TG_SLICES)}


def test_adding_an_image_plans_only_the_slices_holding_it(study):
    new = study / "imgs" / "zz_new.png"
    write_image(new, 99)
    try:
        r = run_snakemake(study, "-n", config=study / "study.yaml")
    finally:
        new.unlink()
    k_dino, k_tg = slice_of("zz_new.png", DINO_SLICES), slice_of("zz_new.png", TG_SLICES)
    assert job_counts(r.stdout) == {"dataset_slice": 2, "dinov3_channels_shard": 2, "dinov3_channels_merge": 2,
                                    "dinov3_channels_figures": 1, "sd3_textgrad_shard": 1, "sd3_textgrad_merge": 1,
                                    "sd3_textgrad_figures": 1, "all": 1}, r.stdout[-3000:]
    out = planned_outputs(r.stdout)
    assert {o for o in out if o.endswith(".h5")} == {
        f"results/default/dinov3_channels/shards/dino_a/slice-{k_dino}of{DINO_SLICES}.h5",
        f"results/default/dinov3_channels/shards/dino_b/slice-{k_dino}of{DINO_SLICES}.h5",
        f"results/default/sd3_textgrad/shards/sd3_tiny/timestep-500__seed-0__slice-{k_tg}of{TG_SLICES}.h5",
    }
    assert {o for o in out if o.endswith("index.tsv")} == {
        f"results/default/data/imgs/max-0/{k_dino}of{DINO_SLICES}/index.tsv",
        f"results/default/data/imgs/max-0/{k_tg}of{TG_SLICES}/index.tsv",
    }
    # with the image gone again the study is complete as it was
    assert "Nothing to be done" in (lambda r: r.stdout + r.stderr)(run_snakemake(study, "-n", config=study / "study.yaml"))


def test_changing_an_image_in_place_plans_only_its_slices(study):
    import os

    img = study / "imgs" / "img0.png"
    saved, st = img.read_bytes(), img.stat()
    write_image(img, 1234)
    try:
        r = run_snakemake(study, "-n", config=study / "study.yaml")
    finally:
        img.write_bytes(saved)
        os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))
    k_dino, k_tg = slice_of("img0.png", DINO_SLICES), slice_of("img0.png", TG_SLICES)
    assert {o for o in planned_outputs(r.stdout) if o.endswith(".h5")} == {
        f"results/default/dinov3_channels/shards/dino_a/slice-{k_dino}of{DINO_SLICES}.h5",
        f"results/default/dinov3_channels/shards/dino_b/slice-{k_dino}of{DINO_SLICES}.h5",
        f"results/default/sd3_textgrad/shards/sd3_tiny/timestep-500__seed-0__slice-{k_tg}of{TG_SLICES}.h5",
    }, r.stdout[-3000:]


def test_slices_cover_every_image_once(study):
    """The slice index files the study wrote partition the folder: every image in exactly one."""
    import csv

    for n in (DINO_SLICES, TG_SLICES):
        seen: list[str] = []
        for i in range(n):
            with open(study / f"results/default/data/imgs/max-0/{i}of{n}/index.tsv") as f:
                rows = list(csv.DictReader(f, delimiter="\t"))
            assert all(slice_of(Path(r["path"]).name, n) == i for r in rows)
            seen += [Path(r["path"]).name for r in rows]
        assert sorted(seen) == sorted(f"img{i}.png" for i in range(N_IMAGES))


def test_two_studies_write_disjoint_trees(study):
    """A second study in the same working directory writes under results/b/ only, and leaves the
    first one complete and untouched."""
    def files():
        return {p.relative_to(study).as_posix(): p.stat().st_mtime_ns for p in (study / "results").rglob("*") if p.is_file()}

    before = files()
    cfg = {"study": "b", "runtime": {"device": "cpu"}, "datasets": BASE["datasets"], "models": {"dino_a": BASE["models"]["dino_a"]},
           "probes": {"dinov3_channels": {"models": ["dino_a"], "dataset": "imgs", "slices": 1, "image_size": 32}}}
    run_snakemake(study, config=write_config(study, cfg, "b.yaml"))
    after = files()
    new = set(after) - set(before)
    assert {f for f in after if f in before and after[f] != before[f]} == set()  # study default untouched
    assert new and all(f.startswith("results/b/") for f in new)
    assert not any(f.startswith("results/b/") for f in before)
    assert {p.name for p in (study / "results").iterdir()} == {"default", "b"}
    assert (study / "results/b/dinov3_channels/figures/magnitude_vs_layer.png").is_file()
    assert (study / "results/b/dinov3_channels/tables/dino_a/channels.csv").is_file()
    r = run_snakemake(study, "-n", config=study / "study.yaml")
    assert "Nothing to be done" in r.stdout + r.stderr
