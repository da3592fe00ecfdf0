"""Shared fixtures. Torch uses one thread: CI has 2 cores and oversubscription is a 100x trap."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterable

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


def documented_hooks(family: str) -> set[str]:
    """The canonical templates of ``family``'s table in docs/hooks.md (parsed, not imported)."""
    text = (REPO / "docs" / "hooks.md").read_text()
    m = re.search(rf"^## {re.escape(family)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert m, f"docs/hooks.md has no table for {family}"
    return set(re.findall(r"^\| `([^`]+)` \|", m.group(1), re.M))


def assert_hooks_documented(family: str, written: "Iterable[str]") -> None:
    """Every hook a probe wrote (shard groups, table column) is a row of docs/hooks.md's family table."""
    pats = []
    for t in documented_hooks(family):
        out, pos = "", 0
        for f in re.finditer(r"\{(\w+)\}", t):
            out += re.escape(t[pos:f.start()]) + (r"\d+" if f.group(1) in ("i", "j") else r"[A-Za-z0-9_.]+?")
            pos = f.end()
        pats.append(re.compile(out + re.escape(t[pos:]) + "$"))
    written = set(written)
    assert written, "no hooks written"
    missing = sorted(h for h in written if not any(p.match(h) for p in pats))
    assert not missing, f"hooks written but not in docs/hooks.md ({family}): {missing}"


def shard_hooks(shards: "Iterable") -> set[str]:
    """Hook names of the ``stats/`` groups of shards (the path part naming a ``hook_``)."""
    out = set()
    for sh in shards:
        for g in sh.groups:
            if g.startswith("stats/"):
                out.update(p for p in g.split("/")[1:2] + g.split("/")[2:] if "hook_" in p)
    return out
