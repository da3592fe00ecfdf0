"""A real single-node SLURM for the tests (tests/slurm/cluster.sh), and helpers to drive it.

`slurm_cluster` (session scope) starts munged, MariaDB, slurmdbd, slurmctld and slurmd once,
installing the Debian packages first if needed, and stops every daemon it started at the end.
It skips, with the reason, where that cannot work: not root, no apt/packages, a real SLURM
already configured in /etc/slurm, or LAYERSCOPE_SKIP_SLURM=1. A cluster that was already
running (started by hand with `tests/slurm/cluster.sh start`) is used and left running.
"""

from __future__ import annotations

import csv
import io
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SH = REPO / "tests" / "slurm" / "cluster.sh"
PROFILE = REPO / "profiles" / "slurm"
# The plugin polls sacct this long after a submission or a finished job (then 10 s more per
# quiet check). A job here takes ~4-6 s (the in-job Snakemake start), so 6 s catches most at the
# first check; the profile's own value (suited to real clusters) is overridden only in tests.
STATUS_CHECK_SECONDS = 6
SACCT_FIELDS = ("JobID", "JobName", "Comment", "State", "ExitCode", "ReqTRES", "AllocTRES", "Timelimit")


@dataclass
class SlurmCluster:
    started_here: bool

    def sacct(self, run_id: str) -> list[dict[str, str]]:
        """Allocations (no steps) of one Snakemake run: the plugin names every job after the run ID."""
        out = subprocess.run(
            ["sacct", "-X", "-n", "-P", "--name", run_id, "-S", "now-1days", "-o", ",".join(SACCT_FIELDS)],
            capture_output=True, text=True, check=True,
        ).stdout
        return [dict(zip(SACCT_FIELDS, row)) for row in csv.reader(io.StringIO(out), delimiter="|") if row]

    def scontrol_job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job -o ID` as key=value pairs (what SLURM actually granted the job)."""
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=True).stdout
        return dict(tok.split("=", 1) for tok in out.split() if "=" in tok)

    def squeue(self) -> list[dict[str, str]]:
        out = subprocess.run(["squeue", "-h", "-o", "%i|%T|%k"], capture_output=True, text=True, check=True).stdout
        return [dict(zip(("JobID", "State", "Comment"), line.split("|", 2))) for line in out.splitlines() if line]


@pytest.fixture(scope="session")
def slurm_cluster() -> SlurmCluster:
    if os.environ.get("LAYERSCOPE_SKIP_SLURM") == "1":
        pytest.skip("LAYERSCOPE_SKIP_SLURM=1")
    if os.geteuid() != 0:
        pytest.skip("a local SLURM needs root (to install packages and run slurmd)")
    r = subprocess.run(["bash", str(CLUSTER_SH), "start"], capture_output=True, text=True, timeout=600)
    if r.returncode == 3:
        pytest.skip(r.stderr.strip().splitlines()[-1].removeprefix("SKIP: "))
    if r.returncode != 0:
        pytest.fail(f"tests/slurm/cluster.sh start failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    cluster = SlurmCluster(started_here=r.stdout.strip().endswith("started"))
    try:
        yield cluster
    finally:
        if cluster.started_here:
            subprocess.run(["bash", str(CLUSTER_SH), "stop"], capture_output=True, text=True, timeout=120)


def slurm_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for Snakemake and its SLURM jobs (sbatch --export=ALL carries it into them)."""
    env = {**os.environ, **(extra or {})}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_slurm(workdir: Path, *args: str, snakefile: Path | None = None, env: dict[str, str] | None = None,
              timeout: int = 300) -> subprocess.CompletedProcess:
    """`snakemake --profile profiles/slurm ARGS` in WORKDIR (the cwd, as users run it); never raises on failure."""
    exe = Path(sys.executable).with_name("snakemake")
    cmd = [str(exe), "--profile", str(PROFILE),
           "--slurm-init-seconds-before-status-checks", str(STATUS_CHECK_SECONDS)]
    if snakefile is not None:
        cmd += ["-s", str(snakefile)]
    cmd += list(args)
    return subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, env=slurm_env(env), timeout=timeout)


def run_id(result: subprocess.CompletedProcess) -> str:
    """The plugin's run ID (every SLURM job of the run carries it as its job name)."""
    m = re.search(r"SLURM run ID: (\S+)", result.stdout + result.stderr)
    assert m, f"no SLURM run ID in the output:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    return m.group(1)


def output_of(result: subprocess.CompletedProcess, n: int = 4000) -> str:
    return f"--- stdout ---\n{result.stdout[-n:]}\n--- stderr ---\n{result.stderr[-n:]}"
