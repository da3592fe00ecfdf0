# Config parsing and input functions. The plan (config -> shards) lives in the layerscope package
# (pure Python, no torch), so the CLI, the tests and Snakemake agree on every shard's identity.
import inspect
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "src"))

from snakemake.exceptions import WorkflowError

from layerscope.errors import LayerscopeError
from layerscope.plan import Plan
from layerscope.settings import validate_config

# The package's validator, not snakemake.utils.validate: it fills defaults inside the $ref'd probe
# schemas too, and its one-line messages are the ones `layerscope check-config` prints.
try:
    validate_config(config)
    PLAN = Plan(config, workdir=os.getcwd())
except LayerscopeError as e:
    raise WorkflowError(str(e)) from None
# every result path comes from the study's layout: results/<study>/... (layerscope.layout)
LAYOUT = PLAN.layout


class Untracked:
    """A param value Snakemake passes to the command but does not track: its params rerun trigger
    records only builtin values (str, int, list, ...) and skips any other object. Shard jobs get
    their execution knobs (device, batch sizes the numbers do not depend on) this way, so changing
    them reruns nothing. (A global read in the shell command would not do: Snakemake evaluates a
    loop-defined rule's shell expression again at run time, with the loop variable's last value.)"""

    def __init__(self, text):
        self.text = text

    def __str__(self):
        return self.text


ENV = "../../envs/layerscope.yaml"
# Rules call the `layerscope` CLI. It is on PATH when the environment is active (conda, or an
# activated venv); otherwise use the one beside the interpreter running Snakemake, so
# `.venv/bin/snakemake` works without activation (jobs inherit PATH, SLURM jobs too).
import shutil


envvars:
    "PATH",


if not shutil.which("layerscope"):
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
# Last resort, last on PATH: a launcher running this checkout's src/ with whatever python the job
# has (a --sdm conda environment holds the dependencies, not the package).
_LAUNCHER = str(Path(workflow.basedir) / "workflow" / "scripts" / "bin")
if _LAUNCHER not in os.environ["PATH"].split(os.pathsep):
    os.environ["PATH"] = f"{os.environ['PATH']}{os.pathsep}{_LAUNCHER}"
SAFE = r"[A-Za-z0-9][A-Za-z0-9_-]*"  # layerscope.settings.NAME_RE


wildcard_constraints:
    model=SAFE,
    shard=r"[A-Za-z0-9.+=_-]+",
    dataset=SAFE,
    max_images=r"\d+",
    slice=r"\d+of\d+",


def scaled(base, marker=None):
    """A resource that grows with the attempt: a retried job gets 2x, 3x ... of it.

    Except after a user error: `layerscope run-shard` leaves a marker (`marker(wildcards)`, see
    layerscope.cli.user_error_marker) when it fails with a bad-input exit code
    (layerscope.errors.USER_ERROR_CODES), and then the retry keeps the base amount - more memory
    or time cannot fix a bad config, so the retry costs no more than the failed attempt.

    Snakemake inspects a resource callable's signature for every job it plans; the signature is
    set once here (PEP 362 `__signature__`) so a 10,000-shard dry run does not rebuild it each time.
    """

    def by_attempt(wildcards, attempt):
        if attempt > 1 and marker is not None and os.path.exists(marker(wildcards) or ""):
            return base
        return base * attempt

    by_attempt.__signature__ = BY_ATTEMPT
    return by_attempt


BY_ATTEMPT = inspect.signature(lambda wildcards, attempt: None)


def probe_resources(probe, default_gpus):
    """Resources of a probe's shard jobs; GPU requests go through the SLURM plugin's `gpu`/`gpu_model`.

    Memory and runtime scale with the attempt: a shard that ran out of memory or time is retried
    (profile `retries`) with twice as much of both, then three times, and so on."""
    from layerscope.cli import user_error_marker

    res = dict(config["probes"][probe].get("resources") or {})
    res.setdefault("gpus", default_gpus)
    marker = lambda w: user_error_marker(PLAN.shard_path(probe, w.model, w.shard))
    out = {"mem_mb": scaled(res.get("mem_mb", 8000), marker), "runtime": scaled(res.get("runtime", 60), marker)}
    if res["gpus"]:
        out["gpu"] = res["gpus"]
        if res.get("gpu_model"):
            out["gpu_model"] = res["gpu_model"]
    # every other key goes to the executor as is (SLURM plugin: slurm_partition, slurm_account, qos,
    # constraint, cpus_per_task, slurm_extra, nodes, tasks, mem_mb_per_cpu, clusters, ...)
    for key, value in res.items():
        if key not in ("gpus", "gpu_model", "mem_mb", "runtime") and value is not None:
            out[key] = value
    bad = forbidden_slurm_extra(str(res.get("slurm_extra") or ""))
    if bad:
        raise WorkflowError(
            f"config field probes.{probe}.resources.slurm_extra: {bad[0]} is set by the SLURM plugin itself "
            f"and refused there; use the resource {bad[1]} instead"
        )
    return out


# sbatch options the SLURM plugin sets itself and refuses in slurm_extra -> the resource that sets them
_SLURM_OWN = {
    r"--qos\b": "qos",
    r"--constraint\b|(^|\s)-C\s": "constraint",
    r"--partition\b|(^|\s)-p\s": "slurm_partition",
    r"--account\b|(^|\s)-A\s": "slurm_account",
    r"--cpus-per-task\b|(^|\s)-c\s": "cpus_per_task",
    r"--mem\b|--mem-per-cpu\b": "mem_mb",
    r"--time\b|(^|\s)-t\s": "runtime",
    r"--gpus\b|--gres\b": "gpus",
    r"--nodes\b|(^|\s)-N\s": "nodes",
    r"--ntasks\b|(^|\s)-n\s": "tasks",
    r"--clusters\b": "clusters",
}


def forbidden_slurm_extra(extra):
    """(option, resource) for the first sbatch option in ``extra`` that the plugin rejects, else ()."""
    import re

    for pattern, resource in _SLURM_OWN.items():
        m = re.search(pattern, extra)
        if m:
            return (m.group(0).strip(), resource)
    return ()


def figure_caption():
    """The text the figures carry: the study's name - never the config
    file's name, so `--configfile` of a copy of the config reruns nothing."""
    return f"(study {PLAN.study})"


def caption(probe, figure, model=None):
    """Report caption file for a figure: its own .rst, else for a figure of one model (named
    ``<figure>-<model>-...``) the shared ``<figure>-model.rst``, else the probe's, else the default."""
    base = Path(workflow.basedir) / "workflow" / "report"
    own = [base / probe / f"{figure}.rst"]
    if model is not None:
        own.append(base / probe / f"{figure.split('-', 1)[0]}-model.rst")
    for f in (*own, base / f"{probe}.rst"):
        if f.is_file():
            return str(f)
    return str(base / "default.rst")


def figure_outputs(probe):
    """The figure rule's outputs: for every figure the plan names, its PNG (a report entry with
    its caption, category the probe; where a probe draws figures of one model, subcategory the
    model, else 'all models') and its PDF vector copy (declared, so tracked and cleaned, but not
    in the report: the HTML report shows images, and the PNG already shows the same figure)."""
    names = PLAN.figure_names(probe)
    per_model = any(m is not None for m in names.values())
    out = []
    for f, model in names.items():
        sub = (model or "all models") if per_model else None
        out.append(report(LAYOUT.figure(probe, f), caption=caption(probe, f, model), category=probe, subcategory=sub))
        out.append(LAYOUT.figure_vector(probe, f))
    return out


def shard_dir(probe, model):
    """The folder of one (probe, model)'s shards, created if absent so it can be an input.

    Every model's folder of the probe is created on the first call, together: Snakemake lists a
    folder's parent once and caches it, so a folder made after that listing (the second model's,
    in a dry run of two models' tables) would count as missing (MissingInputException)."""
    if probe not in _SHARD_DIRS_MADE:
        for m in PLAN.models_of(probe):
            os.makedirs(LAYOUT.shard_dir(probe, m), exist_ok=True)
        _SHARD_DIRS_MADE.add(probe)
    d = LAYOUT.shard_dir(probe, model)
    os.makedirs(d, exist_ok=True)
    return d


_SHARD_DIRS_MADE = set()


def extra_outputs(probe, impl):
    """A probe's declared extra shard outputs (checkpoints, images), directories marked."""
    out = {}
    for name, tmpl in impl.extra_outputs(PLAN.probe_cfg(probe), LAYOUT).items():
        out[name] = directory(tmpl[:-1]) if tmpl.endswith("/") else tmpl
    return out


def all_tables():
    return [t for p in PLAN.probes for m in PLAN.models_of(p) for t in PLAN.table_paths(p, m)]


def print_nonfinite_summary():
    """Console lines for tables that counted non-finite activations (end of every run)."""
    from layerscope.merge import nonfinite_summary

    for line in nonfinite_summary(all_tables()):
        print(line, file=sys.stderr)


def slice_fingerprint(dataset, max_images, slice_label):
    """Names, captions, sizes and mtimes of one data slice's items (a param of dataset_slice); all
    slices of a (dataset, max_images, count) from one listing, once per Snakemake process."""
    from layerscope.data import slice_fingerprints  # here: the Snakefile stays light
    from layerscope.probes.base import parse_slice

    i, n = parse_slice(slice_label)
    key = (dataset, max_images, n)
    if key not in _FINGERPRINTS:
        _FINGERPRINTS[key] = slice_fingerprints(dataset, PLAN.dataset(dataset), max_images, n)
    return _FINGERPRINTS[key][i]


_FINGERPRINTS = {}
