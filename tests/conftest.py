"""Shared fixtures. Torch uses one thread: CI has 2 cores and oversubscription is a 100x trap."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest_slurm import slurm_cluster  # noqa: F401,E402  (session fixture: a real single-node SLURM)

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def photos_index(tmp_path_factory) -> Path:
    """The default study's dataset (scikit-image photographs), indexed once per session."""
    from layerscope.data import build_index

    out = tmp_path_factory.mktemp("data") / "photos" / "index.tsv"
    return build_index("photos", {"kind": "skimage"}, out)


@pytest.fixture(scope="session")
def dinov3_dir(tmp_path_factory) -> Path:
    from layerscope.models.dinov3 import build_tiny

    out = tmp_path_factory.mktemp("models") / "dinov3_tiny"
    build_tiny("default", 0, out)
    return out


def snakemake_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("snakemake")
    return [str(exe) if exe.exists() else shutil.which("snakemake") or "snakemake"]


def run_snakemake(workdir: Path, *args: str, config: Path | None = None, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = snakemake_cmd() + ["-s", str(REPO / "Snakefile"), "-d", str(workdir), "--cores", "2"]
    cmd += list(args)
    if config is not None:  # last: --configfile takes several values
        cmd += ["--configfile", str(config)]
    e = {**os.environ, **(env or {})}
    e["PATH"] = f"{Path(sys.executable).parent}:{e.get('PATH', '')}"
    r = subprocess.run(cmd, capture_output=True, text=True, env=e, timeout=600)
    if check and r.returncode != 0:
        raise AssertionError(f"snakemake failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r
