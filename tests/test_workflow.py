"""The Snakemake study end to end on a small config: outputs, single-shard reruns, refusals."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import run_snakemake

pytestmark = pytest.mark.slow

SHARD = "results/default/dinov3_channels/shards/dinov3_tiny/slice-{}of2.h5"
TABLES = "results/default/dinov3_channels/tables/dinov3_tiny"


def job_counts(dry_run_stdout: str) -> dict[str, int]:
    """Parse Snakemake's 'Job stats' table of a dry run."""
    counts: dict[str, int] = {}
    block = dry_run_stdout.split("Job stats:", 1)[-1]
    for line in block.splitlines():
        m = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if m and m.group(1) != "total":
            counts[m.group(1)] = int(m.group(2))
    return counts


@pytest.fixture(scope="module")
def study(tmp_path_factory, repo):
    """A finished run of a dinov3-only config with two data slices."""
    wd = tmp_path_factory.mktemp("study")
    cfg = {
        "runtime": {"device": "cpu", "threads": 1},
        "datasets": {"photos": {"kind": "skimage"}},
        "models": {"dinov3_tiny": {"family": "dinov3", "source": "tiny:default", "seed": 0}},
        "probes": {"dinov3_channels": {"models": ["dinov3_tiny"], "dataset": "photos", "slices": 2,
                                       "batch_size": 6, "image_size": 64, "max_images": 8}},
    }
    (wd / "study.yaml").write_text(yaml.safe_dump(cfg))
    run_snakemake(wd, config=wd / "study.yaml")
    return wd


def test_study_writes_tables_and_figures(study):
    for f in ("std_max_abs_per_layer", "outlier_channels_heatmap", "magnitude_vs_layer"):
        p = study / "results/default/dinov3_channels/figures" / f"{f}.png"
        assert p.stat().st_size > 10_000
    ch = pd.read_csv(study / TABLES / "channels.csv")
    assert set(ch["rep"]) == {"pre", "per_layer_ln", "global_ln"} and set(ch["role"]) == {"cls", "patch"}
    # 8 images -> 8 CLS rows and 8 x 16 patch rows per channel
    assert set(ch[ch.role == "cls"]["count"]) == {8} and set(ch[ch.role == "patch"]["count"]) == {128}


def test_deleting_one_shard_reruns_only_it_and_its_dependents(study):
    keep = study / SHARD.format(0)
    before = keep.stat().st_mtime_ns
    old = pd.read_csv(study / TABLES / "channels.csv")
    (study / SHARD.format(1)).unlink()
    dry = run_snakemake(study, "-n", config=study / "study.yaml")
    assert job_counts(dry.stdout) == {"dinov3_channels_shard": 1, "dinov3_channels_merge": 1,
                                      "dinov3_channels_figures": 1, "all": 1}, dry.stdout
    assert f"output: {SHARD.format(1)}" in dry.stdout and f"output: {SHARD.format(0)}" not in dry.stdout
    run_snakemake(study, config=study / "study.yaml")
    assert keep.stat().st_mtime_ns == before
    pd.testing.assert_frame_equal(old, pd.read_csv(study / TABLES / "channels.csv"))


def _merge_log(study) -> str:
    return (study / "results/default/logs/dinov3_channels/merge/dinov3_tiny.log").read_text()


def test_corrupt_shard_fails_merge_naming_file_and_rerun_command(study):
    bad = study / SHARD.format(1)
    saved = bad.read_bytes()
    try:
        bad.write_bytes(saved[: len(saved) // 3])
        r = run_snakemake(study, config=study / "study.yaml", check=False)
        assert r.returncode != 0
        log = _merge_log(study)
        assert f"{SHARD.format(1)}: corrupt" in log
        assert f"snakemake --forcerun {SHARD.format(1)}" in log
    finally:
        bad.write_bytes(saved)
        run_snakemake(study, config=study / "study.yaml")


def test_foreign_shard_is_refused(study):
    src, dst = study / SHARD.format(0), study / SHARD.format(1)
    saved = dst.read_bytes()
    try:
        shutil.copyfile(src, dst)  # slice 0's statistics under slice 1's name
        r = run_snakemake(study, config=study / "study.yaml", check=False)
        assert r.returncode != 0
        log = _merge_log(study)
        assert SHARD.format(1) in log and "its file name says {'slice': '1of2'}" in log
    finally:
        dst.write_bytes(saved)
        os.utime(dst)
        run_snakemake(study, config=study / "study.yaml")


def test_injected_shard_failure_leaves_no_output_and_single_shard_rerun_recovers(study):
    target = study / SHARD.format(0)
    r = run_snakemake(study, "--forcerun", SHARD.format(0), config=study / "study.yaml", check=False,
                      env={"LAYERSCOPE_FAULT": "fail:*slice-0of2.h5"})
    assert r.returncode != 0
    assert not target.exists()
    assert not list(target.parent.glob(".partial-*"))
    run_snakemake(study, SHARD.format(0), config=study / "study.yaml")
    assert target.exists()
    dry = run_snakemake(study, "-n", config=study / "study.yaml")
    assert job_counts(dry.stdout) == {"dinov3_channels_merge": 1, "dinov3_channels_figures": 1, "all": 1}


def test_retry_doubles_shard_memory_and_runtime(study):
    """The profile's `retries`: the second attempt of a failed shard asks for twice the memory and
    twice the time (the config's defaults: 8000 MB, 60 min), so OOM and TIMEOUT get a real retry."""
    r = run_snakemake(study, "--forcerun", SHARD.format(0), "--retries", "1", "--allowed-rules",
                      "dinov3_channels_shard", config=study / "study.yaml", check=False,
                      env={"LAYERSCOPE_FAULT": "fail:*slice-0of2.h5"})
    assert r.returncode != 0
    log = r.stdout + r.stderr
    res = re.findall(r"resources: (.*)", log)
    got = [(int(re.search(r"mem_mb=(\d+)", x).group(1)), int(re.search(r"runtime=(\d+)", x).group(1)))
           for x in res]
    assert got == [(8000, 60), (16000, 120)], log[-3000:]
    run_snakemake(study, SHARD.format(0), config=study / "study.yaml")


def test_user_error_is_not_retried_at_doubled_resources(study):
    """A shard that fails on bad input (a ConfigError, exit code in USER_ERROR_CODES) is retried at
    the base memory and runtime: more resources cannot fix a config. A real failure still doubles
    (test above)."""
    r = run_snakemake(study, "--forcerun", SHARD.format(0), "--retries", "1", "--allowed-rules",
                      "dinov3_channels_shard", config=study / "study.yaml", check=False,
                      env={"LAYERSCOPE_FAULT": "usererror:*slice-0of2.h5"})
    assert r.returncode != 0
    log = r.stdout + r.stderr
    got = [(int(re.search(r"mem_mb=(\d+)", x).group(1)), int(re.search(r"runtime=(\d+)", x).group(1)))
           for x in re.findall(r"resources: (.*)", log)]
    assert got == [(8000, 60), (8000, 60)], log[-3000:]
    shard_log = (study / "results/default/logs/dinov3_channels/shards/dinov3_tiny/slice-0of2.log").read_text().strip().splitlines()
    assert shard_log[-1].startswith("layerscope: error: config field probes: LAYERSCOPE_FAULT: injected user error"), shard_log[-3:]
    marker = study / "results/default/logs/user-errors" / (SHARD.format(0).removeprefix("results/default/") + ".err")
    assert marker.is_file()
    run_snakemake(study, SHARD.format(0), config=study / "study.yaml")
    assert not marker.exists()  # a success clears it: the next real failure doubles again


def test_bad_config_fails_dry_run_with_field_named(tmp_path, study):
    cfg = yaml.safe_load((study / "study.yaml").read_text())
    cfg["probes"]["dinov3_channels"]["slices"] = 0
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    r = run_snakemake(tmp_path, "-n", config=tmp_path / "bad.yaml", check=False)
    assert r.returncode != 0
    assert "config field probes.dinov3_channels.slices: 0 is less than the minimum of 1" in r.stdout + r.stderr
    cfg["probes"]["dinov3_channels"]["slices"] = 2
    cfg["models"]["dinov3_tiny"]["source"] = "/nonexistent/dinov3"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    r = run_snakemake(tmp_path, "-n", config=tmp_path / "bad.yaml", check=False)
    assert r.returncode != 0
    assert "config field models.dinov3_tiny.source: path '/nonexistent/dinov3' does not exist" in r.stdout + r.stderr


def figure_study(wd: Path, repo: Path) -> Path:
    """config.yaml (every probe) with sdxl_ablation on two models (one with a '-' in its name) and two prompts."""
    cfg = yaml.safe_load((repo / "config.yaml").read_text())
    cfg["models"]["sdxl-b"] = {**cfg["models"]["sdxl_tiny"], "seed": 1}
    cfg["probes"]["sdxl_ablation"].update(models=["sdxl_tiny", "sdxl-b"], prompts=["a red cube", "a blue dog"])
    (wd / "study.yaml").write_text(yaml.safe_dump(cfg))
    return wd / "study.yaml"


def test_every_figure_rule_declares_png_and_pdf_of_each_figure_and_each_sdxl_grid(tmp_path, repo):
    """Every file a figure rule writes is its declared output (Snakemake's --summary: output file ->
    rule, without running anything): each figure's PNG and PDF, and sdxl_ablation's grid per (model,
    prompt label) besides its two static figures."""
    from layerscope.probes import get_probe

    cfg = figure_study(tmp_path, repo)
    probes = list(yaml.safe_load(cfg.read_text())["probes"])
    r = run_snakemake(tmp_path, "--summary", config=cfg)
    got: dict[str, set[str]] = {}
    for line in r.stdout.splitlines():
        parts = line.split("\t")
        if len(parts) > 2 and parts[2].endswith("_figures"):
            got.setdefault(parts[2], set()).add(parts[0])
    grids = [f"comparison_grid-{m}-{p}" for m in ("sdxl_tiny", "sdxl-b") for p in ("p0", "p1")]
    for p in probes:
        names = [*get_probe(p).figures, *(grids if p == "sdxl_ablation" else [])]
        want = {f"results/default/{p}/figures/{n}.{ext}" for n in names for ext in ("png", "pdf")}
        assert got.get(f"{p}_figures") == want, (p, sorted(got.get(f"{p}_figures", ())), sorted(want))
    assert len(got["sdxl_ablation_figures"]) == 2 * (2 + 4)
    # the plot job is told exactly those names (a dry run prints its shell command)
    r = run_snakemake(tmp_path, "-n", "-p", "results/default/sdxl_ablation/figures/scores.png", config=cfg)
    cmd = next(ln for ln in r.stdout.splitlines() if "layerscope plot --probe sdxl_ablation" in ln)
    assert set(re.search(r"--figures (\S+)", cmd).group(1).split(",")) == {"comparison_grid", "scores", *grids}


def test_every_figure_has_its_own_caption_stating_its_samples(tmp_path, repo):
    """Each figure's report caption is its own .rst (a per-model grid: the shared <figure>-model.rst), not
    the default one, and says how many samples stand behind its error bands (or that it has none)."""
    from layerscope.plan import plan_from_file

    plan = plan_from_file(figure_study(tmp_path, repo), tmp_path)
    for p in plan.probes:
        for name, model in plan.figure_names(p).items():
            base = repo / "workflow/report" / p
            rst = base / f"{name}.rst" if model is None else base / f"{name.split('-', 1)[0]}-model.rst"
            assert rst.is_file(), f"{p}/{name}: no caption {rst.relative_to(repo)}"
            text = " ".join(rst.read_text().split())
            assert re.search(r"(CI|deviation|band|bars?)\b.{0,40}\bover\b.{0,80}\| length \}\}|no (confidence|error) band",
                             text), f"{rst.relative_to(repo)} does not state the samples behind its bands"
