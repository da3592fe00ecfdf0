"""The cluster path for real: Snakemake + snakemake-executor-plugin-slurm against a live SLURM
(slurmctld, slurmd, slurmdbd on MariaDB; tests/slurm/cluster.sh) with the repo's profiles/slurm.

The small workflow in tests/slurm/Snakefile (two "GPU" shards and a merge) proves the machinery:
every job is its own SLURM job with its GPU request, retries ask for more memory, a failed or
scancel'ed job is reported with its SLURM state and leaves no output, and the documented reruns
submit exactly the missing jobs. The end-to-end test runs the real default study (reduced) under
SLURM and compares every merged table with a local run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest_slurm import (  # noqa: F401  (slurm_cluster: the fixture)
    REPO, STATUS_CHECK_SECONDS, output_of, run_id, run_slurm, slurm_cluster, slurm_env)

sys.path.insert(0, str(REPO / "workflow" / "scripts"))
import check_report  # noqa: E402

MINI = REPO / "tests" / "slurm" / "Snakefile"
SHARD_COMMENT = "rule_gpu_shard_wildcards_{}"
MERGE_COMMENT = "rule_merge"


def by_comment(rows: list[dict[str, str]]) -> dict[str, list[dict[str, str]]]:
    out: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        out.setdefault(r["Comment"], []).append(r)
    return out


def tres(field: str) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in field.split(",") if "=" in kv)


def shard_lines(wd: Path) -> dict[str, dict[str, str]]:
    """merged.txt: per shard, what the job saw (SLURM job ID, CUDA_VISIBLE_DEVICES)."""
    out = {}
    for line in (wd / "results/merged.txt").read_text().splitlines():
        if line.startswith("shard="):
            kv = dict(x.split("=", 1) for x in line.split())
            out[kv["shard"]] = kv
    return out


@pytest.mark.slurm
def test_each_job_is_a_slurm_job_with_gpu_request_and_retry_doubles_memory_and_time(slurm_cluster, tmp_path):
    once = tmp_path / "once"
    once.mkdir()
    wd = tmp_path / "wd"
    wd.mkdir()
    r = run_slurm(wd, snakefile=MINI, env={"LAYERSCOPE_TEST_FAIL_ONCE": str(once)})
    assert r.returncode == 0, output_of(r)
    jobs = by_comment(slurm_cluster.sacct(run_id(r)))
    assert set(jobs) == {SHARD_COMMENT.format("a"), SHARD_COMMENT.format("b"), MERGE_COMMENT}, jobs
    seen = shard_lines(wd)
    for s in "ab":
        attempts = sorted(jobs[SHARD_COMMENT.format(s)], key=lambda j: int(j["JobID"]))
        # the profile's retries: 1 resubmits the failed first attempt with attempt=2: twice the
        # memory and twice the time limit
        assert [j["State"] for j in attempts] == ["FAILED", "COMPLETED"], attempts
        assert [tres(j["ReqTRES"])["mem"] for j in attempts] == ["2000M", "4000M"]
        assert [j["Timelimit"] for j in attempts] == ["00:30:00", "01:00:00"]
        for j in attempts:
            assert tres(j["ReqTRES"])["gres/gpu"] == "1" and tres(j["AllocTRES"])["gres/gpu"] == "1", j
        # the output was written inside that very SLURM job, which saw its GPU
        assert seen[s]["slurm_job"] == attempts[-1]["JobID"]
        assert seen[s]["gpus"] in {"0", "1"}
    (merge,) = jobs[MERGE_COMMENT]
    assert merge["State"] == "COMPLETED" and "gres/gpu" not in tres(merge["ReqTRES"])
    assert tres(merge["ReqTRES"])["mem"] == "2000M"
    # SLURM's own logs: in the profile's folder, kept for the failed attempts only
    logs = sorted(p.relative_to(wd).as_posix() for p in (wd / "results/logs/slurm").rglob("*.log"))
    failed_ids = [jobs[SHARD_COMMENT.format(s)][0]["JobID"] for s in "ab"]
    assert logs == sorted(f"results/logs/slurm/rule_gpu_shard/{s}/{i}.log" for s, i in zip("ab", failed_ids))


def start_slurm(workdir: Path, *args: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("snakemake")
    cmd = [str(exe), "--profile", str(REPO / "profiles/slurm"), "-s", str(MINI),
           "--slurm-init-seconds-before-status-checks", str(STATUS_CHECK_SECONDS), *args]
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=workdir, stdout=f, stderr=subprocess.STDOUT, env=slurm_env(env))


@pytest.mark.slurm
def test_failed_and_cancelled_shards_are_reported_and_reruns_submit_only_them(slurm_cluster, tmp_path):
    """Shard a fails (exit 1), shard b is scancel'ed while its command runs; both had written part
    of their output. Then the README's reruns: one shard alone, then the rest of the study."""
    log = tmp_path / "run.log"
    partial = tmp_path / "results/shards/b.txt"
    proc = start_slurm(tmp_path, "--retries", "0", env={"LAYERSCOPE_TEST_FAIL": "a", "LAYERSCOPE_TEST_HOLD": "b"},
                       log=log)
    try:
        held = None
        deadline = time.monotonic() + 120
        while held is None and time.monotonic() < deadline:  # b is running its shell command
            running = [j for j in slurm_cluster.squeue()
                       if j["Comment"] == SHARD_COMMENT.format("b") and j["State"] == "RUNNING"]
            if running and partial.exists():
                held = running[0]["JobID"]
            else:
                time.sleep(0.3)
        assert held is not None, log.read_text()[-3000:]
        subprocess.run(["scancel", held], check=True)
        rc = proc.wait(timeout=180)
    finally:
        if proc.poll() is None:  # never leave a Snakemake (or its jobs) behind
            proc.terminate()  # Snakemake cancels its SLURM jobs on SIGTERM
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    out = log.read_text()
    assert rc != 0, out[-3000:]
    jobs = by_comment(slurm_cluster.sacct(run_id(subprocess.CompletedProcess([], rc, out, ""))))
    (failed,) = jobs[SHARD_COMMENT.format("a")]
    (cancelled,) = jobs[SHARD_COMMENT.format("b")]
    assert failed["State"] == "FAILED" and failed["ExitCode"] == "1:0", failed
    assert cancelled["JobID"] == held and cancelled["State"].startswith("CANCELLED"), cancelled
    assert f"SLURM-job '{failed['JobID']}' failed, SLURM status is: 'FAILED'" in out
    assert f"SLURM-job '{held}' failed, SLURM status is: 'CANCELLED'" in out
    assert MERGE_COMMENT not in jobs
    for s in "ab":  # the partial outputs were removed
        assert not (tmp_path / f"results/shards/{s}.txt").exists()
    assert not (tmp_path / "results/merged.txt").exists()
    assert "injected failure in shard a" in (tmp_path / "results/logs/shards/a.log").read_text()

    # rerun one shard: exactly that job, through SLURM
    r = run_slurm(tmp_path, "results/shards/a.txt", snakefile=MINI)
    assert r.returncode == 0, output_of(r)
    jobs = slurm_cluster.sacct(run_id(r))
    assert [(j["Comment"], j["State"]) for j in jobs] == [(SHARD_COMMENT.format("a"), "COMPLETED")]
    assert not (tmp_path / "results/merged.txt").exists()
    a_mtime = (tmp_path / "results/shards/a.txt").stat().st_mtime_ns
    # then the study again: only the missing shard and what depends on it
    r = run_slurm(tmp_path, snakefile=MINI)
    assert r.returncode == 0, output_of(r)
    jobs = slurm_cluster.sacct(run_id(r))
    assert sorted((j["Comment"], j["State"]) for j in jobs) == sorted([
        (MERGE_COMMENT, "COMPLETED"), (SHARD_COMMENT.format("b"), "COMPLETED")])
    assert (tmp_path / "results/shards/a.txt").stat().st_mtime_ns == a_mtime
    assert set(shard_lines(tmp_path)) == {"a", "b"}


def test_profile_name_resolves_after_install(tmp_path):
    """`snakemake --profile slurm` from the repo root finds profiles/slurm once the set-up step ran."""
    env = slurm_env({"XDG_CONFIG_HOME": str(tmp_path / "xdg")})
    wd = tmp_path / "wd"
    wd.mkdir()
    exe = Path(sys.executable).with_name("snakemake")
    dry = [str(exe), "--profile", "slurm", "-n", "-d", str(wd), "--configfile", str(REPO / "config.yaml")]
    r = subprocess.run(dry, cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode != 0 and "profile directory given (slurm), but no profile.yaml" in r.stderr, output_of(r)

    r = subprocess.run(["bash", str(REPO / "workflow/scripts/install_profiles.sh")], capture_output=True,
                       text=True, env=env, check=True)
    link = tmp_path / "xdg/snakemake/slurm"
    assert link.is_symlink() and link.resolve() == (REPO / "profiles/slurm").resolve(), r.stdout + r.stderr
    assert (tmp_path / "xdg/snakemake/local").resolve() == (REPO / "profiles/local").resolve()
    r = subprocess.run(dry, cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, output_of(r)
    # with the workflow profile (profiles/default) Snakemake says "Using profiles slurm and workflow specific profile ..."
    assert re.search(r"Using profiles? slurm\b", r.stdout + r.stderr), output_of(r)
    assert "Job stats:" in r.stdout + r.stderr

    # running it again is harmless; an unrelated profile of that name is left alone
    subprocess.run(["bash", str(REPO / "workflow/scripts/install_profiles.sh")], env=env, check=True,
                   capture_output=True)
    assert link.is_symlink()
    link.unlink()
    link.mkdir()
    r = subprocess.run(["bash", str(REPO / "workflow/scripts/install_profiles.sh")], capture_output=True,
                       text=True, env=env, check=True)
    assert link.is_dir() and not link.is_symlink() and "left alone" in r.stderr


# ---- the real study -----------------------------------------------------------------------------

# The probes of config.yaml the end-to-end run keeps (the whole study takes minutes of CPU per
# probe on 2 cores); LAYERSCOPE_SLURM_E2E_PROBES=all (or a comma-separated list) overrides.
E2E_PROBES = ("dinov3_channels", "sdxl_ablation")
# Per-probe reductions of config.yaml for the end-to-end run (keys each probe's schema defines).
REDUCE = {
    "dinov3_channels": {"max_images": 4, "batch_size": 2},
    "sdxl_ablation": {"seeds": [0], "groups": lambda g: g[:1] if isinstance(g, list) else g},
}


def reduced_study(path: Path) -> Path:
    """The default study (config.yaml), smaller: CPU, small resources, fewer images/seeds."""
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    cfg["runtime"] = {**cfg.get("runtime", {}), "device": "cpu", "threads": 1}
    keep = os.environ.get("LAYERSCOPE_SLURM_E2E_PROBES", ",".join(E2E_PROBES))
    if keep != "all":
        cfg["probes"] = {k: v for k, v in cfg["probes"].items() if k in keep.split(",")}
        assert cfg["probes"], f"none of the probes {keep} is in config.yaml"
    used = {m for p in cfg["probes"].values() for m in [*p.get("models", []), *p.get("aux_models", [])]}
    cfg["models"] = {k: v for k, v in cfg["models"].items() if k in used}
    for name, probe in cfg["probes"].items():
        for key, val in REDUCE.get(name, {}).items():
            if key in probe or not callable(val):
                probe[key] = val(probe[key]) if callable(val) else val
        probe["resources"] = {**probe.get("resources", {}), "mem_mb": 2000, "runtime": 10}
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slurm
def test_default_study_under_slurm_matches_local_run(slurm_cluster, tmp_path):
    cfg = reduced_study(tmp_path / "study.yaml")
    local, cluster = tmp_path / "local", tmp_path / "cluster"
    local.mkdir()
    cluster.mkdir()
    exe = Path(sys.executable).with_name("snakemake")
    # the local run shares the 2 cores with the SLURM jobs; the SLURM run mostly waits on sacct
    with open(tmp_path / "local.log", "w") as log:
        proc = subprocess.Popen([str(exe), "-s", str(REPO / "Snakefile"), "--profile", str(REPO / "profiles/local"),
                                 "--configfile", str(cfg)], cwd=local, stdout=log, stderr=subprocess.STDOUT,
                                env=slurm_env())
        try:
            r = run_slurm(cluster, "-s", str(REPO / "Snakefile"), "--configfile", str(cfg), timeout=420)
            rc_local = proc.wait(timeout=420)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert r.returncode == 0, output_of(r)
    assert rc_local == 0, (tmp_path / "local.log").read_text()[-3000:]

    jobs = slurm_cluster.sacct(run_id(r))
    assert all(j["State"] == "COMPLETED" for j in jobs), jobs
    rules = [j["Comment"].removeprefix("rule_").split("_wildcards_")[0] for j in jobs]
    study = yaml.safe_load(cfg.read_text())
    for probe in study["probes"]:
        shards = [j for j, rule in zip(jobs, rules) if rule == f"{probe}_shard"]
        assert shards, f"no SLURM job ran {probe}_shard: {rules}"
        for j in shards:  # each shard rule asks for a GPU (the plugin's `gpu` resource -> --gpus)
            assert tres(j["ReqTRES"]).get("gres/gpu") == "1" and tres(j["AllocTRES"]).get("gres/gpu") == "1", j
        assert rules.count(f"{probe}_merge") == 1 and rules.count(f"{probe}_figures") == 1, rules
    assert all("gres/gpu" not in tres(j["ReqTRES"]) for j, rule in zip(jobs, rules) if not rule.endswith("_shard"))

    tables = sorted(p.relative_to(local) for p in local.glob("results/*/*/tables/*/*.csv"))
    assert {p.parts[2] for p in tables} == set(study["probes"]), tables  # results/<study>/<probe>/tables/...
    assert tables == sorted(p.relative_to(cluster) for p in cluster.glob("results/*/*/tables/*/*.csv"))
    for t in tables:
        pd.testing.assert_frame_equal(pd.read_csv(local / t), pd.read_csv(cluster / t), check_exact=False, rtol=1e-9)
    figures = sorted(p.relative_to(cluster) for p in cluster.glob("results/*/*/figures/*.p[nd][gf]"))  # PNG + PDF
    assert figures and figures == sorted(p.relative_to(local) for p in local.glob("results/*/*/figures/*.p[nd][gf]"))

    # the report of the cluster run (built on the login node) shows every figure in a browser;
    # caption wording is tests/test_report.py's business
    rep = subprocess.run([str(exe), "-s", str(REPO / "Snakefile"), "--configfile", str(cfg), "--report", "report.html"],
                         cwd=cluster, capture_output=True, text=True, env=slurm_env(), timeout=300)
    assert rep.returncode == 0, output_of(rep)
    if check_report.find_browser() is not None:
        summary, problems = check_report.check(cluster / "report.html", workdir=cluster)
        assert [p for p in problems if "caption" not in p] == [], problems
        from layerscope.plan import plan_from_file

        # every figure the plan names (sdxl_ablation: also one grid per model and prompt), as its PNG
        plan = plan_from_file(cfg, cluster)
        declared = sorted(plan.layout.figure(p, f) for p in plan.probes for f in plan.figure_names(p))
        assert sorted(summary["figures"]) == declared


# ---- profiles, resources per probe, the conda environment -----------------------------------------

def test_workflow_profile_needs_no_link_and_keeps_going(tmp_path):
    """`snakemake --workflow-profile slurm` from any directory finds profiles/slurm beside the
    Snakefile with an empty user config dir; profiles/default applies to plain runs; both keep going."""
    env = slurm_env({"XDG_CONFIG_HOME": str(tmp_path / "xdg")})
    exe = Path(sys.executable).with_name("snakemake")
    base = [str(exe), "-s", str(REPO / "Snakefile"), "-n", "-d", str(tmp_path / "wd"), "--configfile", str(REPO / "config.yaml")]
    r = subprocess.run(base + ["--workflow-profile", "slurm"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, output_of(r)
    assert f"Using workflow specific profile {REPO / 'profiles/slurm'}" in r.stdout + r.stderr and "Job stats:" in r.stdout
    r = subprocess.run(base, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and f"workflow specific profile {REPO / 'profiles/default'}" in r.stdout + r.stderr
    for name in ("slurm", "local", "default"):
        prof = yaml.safe_load((REPO / "profiles" / name / "config.yaml").read_text())
        assert prof["keep-going"] is True, name
    # the plugin rejects --qos in slurm_extra: the profile no longer suggests it
    assert "slurm_extra: \"'--qos" not in (REPO / "profiles/slurm/config.yaml").read_text()


def test_conda_env_has_no_relative_paths_and_the_launcher_runs_the_checkout(tmp_path):
    """`--sdm conda` copies envs/layerscope.yaml elsewhere, so it may not refer to files by relative
    path; its pins are requirements.txt's. The package comes from the checkout through
    workflow/scripts/bin/layerscope, which works with a python that has no layerscope installed."""
    env_file = yaml.safe_load((REPO / "envs/layerscope.yaml").read_text())
    pip = next(d["pip"] for d in env_file["dependencies"] if isinstance(d, dict))
    assert not [x for x in pip if x.startswith("-") or ".." in x or "/" in x], pip
    req = {ln.split("==")[0].lower(): ln for ln in (REPO / "requirements.txt").read_text().splitlines() if "==" in ln}
    for x in pip:
        assert req[x.split("==")[0].lower()] == x, x
    # a PATH holding only a bare python (a link to this interpreter) and the launcher's folder
    bare = tmp_path / "bin"
    bare.mkdir()
    (bare / "python").symlink_to(sys.executable)
    e = {"PATH": f"{bare}:{REPO / 'workflow/scripts/bin'}:/usr/bin:/bin", "HOME": str(tmp_path)}
    r = subprocess.run(["bash", "-c", "command -v layerscope && layerscope check-config config.yaml"], cwd=REPO,
                       capture_output=True, text=True, env=e, timeout=120)
    assert r.returncode == 0, output_of(r)
    assert r.stdout.splitlines()[0] == str(REPO / "workflow/scripts/bin/layerscope") and "dinov3_channels" in r.stdout


@pytest.mark.slurm
def test_per_probe_slurm_resources_reach_sbatch(slurm_cluster, tmp_path):
    """probes.<p>.resources: partition, account, qos, constraint, cpus_per_task, slurm_extra, GPUs,
    memory and time are what SLURM granted the shard job (scontrol show job); run with the
    workflow profile and no profile link."""
    # every CPU of the test node (a request beyond it would pend forever with reason PartitionConfig)
    node = subprocess.run(["scontrol", "show", "node", "-o"], capture_output=True, text=True, check=True).stdout
    ncpu = int(dict(t.split("=", 1) for t in node.split() if "=" in t)["CPUTot"])
    cfg = {
        "runtime": {"device": "cpu", "threads": 1},
        "datasets": {"photos": {"kind": "skimage"}},
        "models": {"d": {"family": "dinov3", "source": "tiny:default", "seed": 0}},
        "probes": {"dinov3_channels": {"models": ["d"], "dataset": "photos", "slices": 1, "max_images": 2, "image_size": 32,
                                       "resources": {"gpus": 1, "mem_mb": 1500, "runtime": 7, "slurm_partition": "debug",
                                                     "slurm_account": "root", "qos": "normal", "constraint": "fakegpu",
                                                     "cpus_per_task": ncpu, "slurm_extra": "--nice=7"}}},
    }
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(cfg))
    exe = Path(sys.executable).with_name("snakemake")
    cmd = [str(exe), "-s", str(REPO / "Snakefile"), "--workflow-profile", "slurm", "--configfile", str(tmp_path / "study.yaml"),
           "--slurm-init-seconds-before-status-checks", str(STATUS_CHECK_SECONDS)]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=420,
                       env=slurm_env({"XDG_CONFIG_HOME": str(tmp_path / "xdg")}))
    assert r.returncode == 0, output_of(r)
    jobs = by_comment(slurm_cluster.sacct(run_id(r)))
    (shard,) = jobs["rule_dinov3_channels_shard_wildcards_d_slice-0of1"]
    assert shard["State"] == "COMPLETED", shard
    j = slurm_cluster.scontrol_job(shard["JobID"])
    assert (j["Partition"], j["Account"], j["QOS"], j["Features"], j["Nice"]) == ("debug", "root", "normal", "fakegpu", "7"), j
    assert j["CPUs/Task"] == str(ncpu) and j["TimeLimit"] == "00:07:00" and "gres/gpu=1" in j["TRES"], j
    # memory is not a consumable resource on the test node (CR_Core): scontrol's TRES of a finished job
    # omits it; the request is in sacct's ReqTRES (as in the retry test) and scontrol's MinMemoryNode
    assert tres(shard["ReqTRES"])["mem"] == "1500M" and j["MinMemoryNode"] == "1500M", (shard, j)
    (merge,) = jobs["rule_dinov3_channels_merge_wildcards_d"]
    m = slurm_cluster.scontrol_job(merge["JobID"])
    assert m["Nice"] == "0" and m["Features"] == "(null)" and "gres/gpu" not in m["TRES"], m  # per probe: shards only
    assert (tmp_path / "results/default/benchmarks/dinov3_channels/shards/d/slice-0of1.tsv").is_file()
