"""Watching a study: progress lines, benchmark files, shard provenance, `layerscope status`,
out-of-memory as one line; and the Snakemake plumbing around them (per-probe SLURM resources,
dry runs of several models' tables before any shard folder exists)."""

from __future__ import annotations

import io
import re
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from conftest import REPO, run_snakemake

SHARD = "results/default/dinov3_channels/shards/dinov3_tiny/slice-{}of2.h5"


# ------------------------------------------------------------------------------------- progress
def test_progress_lines_rate_eta_and_throttle():
    from layerscope.progress import Progress, format_eta

    now = [100.0]
    out = io.StringIO()
    p = Progress("p m/s", 10, "images", every=5, stream=out, clock=lambda: now[0])
    for dt, n in [(1, 1), (1, 1), (1, 2), (4, 2), (10, 4)]:  # t = 1, 2, 3, 7, 17 s
        now[0] += dt
        p.update(n)
    lines = out.getvalue().splitlines()
    # first update always; t=2,3 within 5 s of it: silent; t=7 (6 s later): printed; the last always
    assert len(lines) == 3 and "\r" not in out.getvalue()
    assert lines[0] == f"layerscope progress: p m/s: 1/10 images (10.0%) 1 images/s ETA {format_eta(9.0)}"
    rate = 6 / 7  # 6 items in 7 s
    assert lines[1] == f"layerscope progress: p m/s: 6/10 images (60.0%) {rate:.3g} images/s ETA {format_eta(4 / rate)}"
    assert lines[2].startswith("layerscope progress: p m/s: 10/10 images (100.0%) ") and lines[2].endswith("ETA 0s")
    assert format_eta(3725) == "1h02m" and format_eta(65) == "1m05s" and format_eta(float("nan")) == "?"
    # a resumed run: items done before the restart do not count toward the rate
    out2 = io.StringIO()
    q = Progress("x", 10, "steps", every=0, stream=out2, clock=lambda: now[0], start=6)
    now[0] += 2
    q.update(1)
    assert "7/10 steps (70.0%) 0.5 steps/s ETA 6s" in out2.getvalue()


# -------------------------------------------------------------------------------- out of memory
def _dinov3_spec(tmp_path, dinov3_dir, photos_index):
    from layerscope.data import build_slice, read_index
    from layerscope.plan import Plan, validate_config

    lst = tmp_path / "photos.lst"
    lst.write_text("".join(f"{r.path}\t{r.caption}\n" for r in read_index(photos_index)))
    cfg = {"runtime": {"device": "cpu"}, "models": {"d": {"family": "dinov3", "source": str(dinov3_dir)}},
           "datasets": {"photos": {"kind": "list", "path": str(lst)}},
           "probes": {"dinov3_channels": {"models": ["d"], "dataset": "photos", "slices": 1, "max_images": 2,
                                          "image_size": 32}}}
    validate_config(cfg)
    plan = Plan(cfg, tmp_path)
    (model, label), = plan.shards("dinov3_channels")
    idx, = plan.data_inputs("dinov3_channels", model, label)  # the shard's data slice, as the rule builds it
    build_slice("photos", plan.dataset("photos"), 2, "0of1", tmp_path / idx)
    return plan.spec_json("dinov3_channels", model, label)


@pytest.mark.parametrize("exc", [
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.10 GiB"),
    MemoryError(),
])
def test_out_of_memory_is_one_line_resource_error(tmp_path, dinov3_dir, photos_index, monkeypatch, capsys, exc):
    from layerscope.cli import main as cli
    from layerscope.errors import ResourceError
    from layerscope.probes.dinov3_channels import DinoV3Channels

    monkeypatch.chdir(tmp_path)
    spec = _dinov3_spec(tmp_path, dinov3_dir, photos_index)

    def oom(self, spec, writer):
        writer.write("partial", {"x": np.zeros(3)})
        raise exc

    monkeypatch.setattr(DinoV3Channels, "run_shard", oom)
    out = tmp_path / "s.h5"
    assert cli(["run-shard", "--spec", spec, "--out", str(out)]) == ResourceError.exit_code
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("layerscope: error: out of memory in shard ") and str(out) in err
    assert "probes.dinov3_channels.batch_size" in err and "resources" in err
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        assert "(Tried to allocate 20.00 GiB)" in err
    assert not out.exists() and not list(tmp_path.glob("*.tmp*"))


def test_training_oom_names_the_training_settings():
    from types import SimpleNamespace

    from layerscope.cli import _oom_message

    msg = _oom_message(SimpleNamespace(probe="sd3_recon_train", model="m"), Path("x.h5"),
                       RuntimeError("CUDA out of memory. Tried to allocate 512.00 MiB"))
    assert "\n" not in msg and "(Tried to allocate 512.00 MiB)" in msg
    for key in ("gradient_checkpointing: true", "mixed_precision: bf16", "optimizer: adamw8bit", "mode: lora"):
        assert key in msg


def test_adamw8bit_without_bitsandbytes_is_a_config_error(monkeypatch):
    import builtins

    from layerscope.errors import ConfigError
    from layerscope.training import FineTuneConfig, make_optimizer

    real = builtins.__import__

    def no_bnb(name, *a, **k):
        if name == "bitsandbytes":
            raise ImportError("no bitsandbytes")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    with pytest.raises(ConfigError, match=r"^optimizer: adamw8bit needs the bitsandbytes package") as e:
        make_optimizer([torch.nn.Parameter(torch.zeros(2))], FineTuneConfig(optimizer="adamw8bit"))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"optimizer: 'sgd' is not one of adamw, adamw8bit"):
        FineTuneConfig(optimizer="sgd")


# ------------------------------------------------------------------- a finished study, observed
@pytest.fixture(scope="module")
def study(tmp_path_factory):
    wd = tmp_path_factory.mktemp("obs")
    cfg = {
        "runtime": {"device": "cpu", "threads": 1},
        "datasets": {"photos": {"kind": "skimage"}},
        "models": {"dinov3_tiny": {"family": "dinov3", "source": "tiny:default", "seed": 0}},
        "probes": {"dinov3_channels": {"models": ["dinov3_tiny"], "dataset": "photos", "slices": 2, "batch_size": 2,
                                       "image_size": 32, "max_images": 8, "resources": {"gpus": 2}}},
    }
    (wd / "study.yaml").write_text(yaml.safe_dump(cfg))
    run_snakemake(wd, config=wd / "study.yaml", env={"LAYERSCOPE_PROGRESS_SECONDS": "0"})
    return wd


@pytest.mark.slow
def test_benchmarks_progress_provenance_and_status(study, capsys):
    from layerscope.cli import main as cli

    bench = study / "results/default/benchmarks"
    names = sorted(str(p.relative_to(bench)) for p in bench.rglob("*.tsv"))
    assert names == ["data/photos/max-8/0of2.tsv", "data/photos/max-8/1of2.tsv", "dinov3_channels/figures.tsv", "dinov3_channels/merge/dinov3_tiny.tsv",
                     "dinov3_channels/shards/dinov3_tiny/slice-0of2.tsv", "dinov3_channels/shards/dinov3_tiny/slice-1of2.tsv",
                     "dinov3_channels/specs/dinov3_tiny.tsv", "models/dinov3_tiny.tsv"]
    # progress: one flushed line per batch of 2 images, no carriage returns; slice 1 of 2 holds the
    # first 8 photographs whose name's sha256 (first 60 bits) is odd
    import hashlib

    from layerscope.data import SKIMAGE_PHOTOS

    n1 = sum(int(hashlib.sha256(s.encode()).hexdigest()[:15], 16) % 2 for s in list(SKIMAGE_PHOTOS)[:8])
    log = (study / "results/default/logs/dinov3_channels/shards/dinov3_tiny/slice-1of2.log").read_text()
    got = re.findall(rf"layerscope progress: dinov3_channels dinov3_tiny/slice-1of2: (\d+)/{n1} images", log)
    assert got == [str(min(i, n1)) for i in range(2, n1 + 2, 2)] and "\r" not in log
    # provenance: what actually ran
    with h5py.File(study / SHARD.format(0), "r") as f:
        a = dict(f.attrs)
    assert (a["device"], a["dtype"], a["gpu_name"], a["cuda_version"]) == ("cpu", "float32", "none", str(torch.version.cuda or "none"))
    assert a["torch_version"] == torch.__version__ and a["peak_accelerator_mem_mb"] == 0.0
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert a["git_revision"] in (head, head + "+dirty") or (not head and a["git_revision"] == "unknown")

    # status: GPU hours = wall seconds of the shard benchmarks x 2 GPUs, summed here from the TSVs
    secs = sum(pd.read_csv(study / "results/default/benchmarks/dinov3_channels/shards/dinov3_tiny" / f"slice-{i}of2.tsv",
                           sep="\t")["s"].iloc[-1] for i in range(2))
    assert cli(["status", "--config", str(study / "study.yaml"), "--workdir", str(study)]) == 0
    row = _status_row(capsys.readouterr().out)
    assert row[:5] == ["dinov3_channels", "dinov3_tiny", "2", "2", "0"] and row[5] == "0"
    assert float(row[8]) == pytest.approx(2 * secs / 3600, abs=1e-3) and float(row[7]) == pytest.approx(secs / 3600, abs=1e-3)

    # a flipped shard is refused (unreadable), a deleted one missing, one of another config refused
    p0, p1 = study / SHARD.format(0), study / SHARD.format(1)
    data0, data1 = p0.read_bytes(), p1.read_bytes()
    try:
        p0.write_bytes(b"\x00" * 64 + data0[64:])
        p1.unlink()
        assert cli(["status", "--config", str(study / "study.yaml"), "--workdir", str(study)]) == 0
        out = capsys.readouterr().out
        assert _status_row(out)[2:6] == ["2", "0", "1", "1"] and f"refused: {p0}: unreadable" in out
        p0.write_bytes(data0)
        p1.write_bytes(data1)
        with h5py.File(p1, "a") as f:
            f.attrs["config_hash"] = "0123abcd"
        assert cli(["status", "--config", str(study / "study.yaml"), "--workdir", str(study)]) == 0
        out = capsys.readouterr().out
        assert _status_row(out)[2:6] == ["2", "1", "0", "1"] and "config hash 0123abcd" in out
    finally:
        p0.write_bytes(data0)
        p1.write_bytes(data1)


def _status_row(out: str) -> list[str]:
    return next(ln.split() for ln in out.splitlines() if ln.startswith("dinov3_channels "))


# --------------------------------------------------------------------- dry runs and resources
def _two_model_config(wd: Path, resources: dict) -> Path:
    cfg = {
        "runtime": {"device": "cpu", "threads": 1},
        "datasets": {"photos": {"kind": "skimage"}},
        "models": {"a": {"family": "dinov3", "source": "tiny:default", "seed": 0},
                   "b": {"family": "dinov3", "source": "tiny:default", "seed": 1}},
        "probes": {"dinov3_channels": {"models": ["a", "b"], "dataset": "photos", "slices": 2, "resources": resources}},
    }
    (wd / "c.yaml").write_text(yaml.safe_dump(cfg))
    return wd / "c.yaml"


@pytest.mark.slow
def test_dry_run_of_two_models_tables_and_slurm_resources_reach_the_job(tmp_path):
    res = {"gpus": 1, "gpu_model": "h100", "mem_mb": 9000, "slurm_partition": "gpu", "slurm_account": "proj",
           "qos": "short", "constraint": "ampere", "cpus_per_task": 3, "slurm_extra": "--exclusive"}
    cfg = _two_model_config(tmp_path, res)
    r = run_snakemake(tmp_path, "-n", "results/default/dinov3_channels/tables/a/channels.csv",
                      "results/default/dinov3_channels/tables/b/channels.csv", config=cfg)
    assert "MissingInput" not in r.stdout + r.stderr
    assert re.search(r"dinov3_channels_merge\s+2", r.stdout) and re.search(r"dinov3_channels_shard\s+4", r.stdout)
    lines = re.findall(r"resources: (.*)", r.stdout)
    shard = [x for x in lines if "gpu=" in x]
    assert len(shard) == 4
    for want in ("mem_mb=9000", "gpu=1", "gpu_model=h100", "slurm_partition=gpu", "slurm_account=proj", "qos=short",
                 "constraint=ampere", "cpus_per_task=3", "slurm_extra=--exclusive"):
        assert all(want in x for x in shard), (want, shard[0])


def test_slurm_extra_with_an_option_the_plugin_sets_fails_naming_the_field(tmp_path):
    cfg = _two_model_config(tmp_path, {"slurm_extra": "--qos=gpu_short --exclusive"})
    r = run_snakemake(tmp_path, "-n", config=cfg, check=False)
    assert r.returncode != 0
    assert "config field probes.dinov3_channels.resources.slurm_extra: --qos is set by the SLURM plugin itself" \
        in r.stdout + r.stderr and "use the resource qos instead" in r.stdout + r.stderr
