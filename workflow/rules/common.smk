# Config parsing and input functions. The plan (config -> shards) lives in the layerscope package
# (pure Python, no torch), so the CLI, the tests and Snakemake agree on every shard's identity.
import inspect
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "src"))

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from layerscope.plan import ConfigError, Plan, format_validation_error

try:
    validate(config, "../schemas/config.schema.yaml")
except WorkflowError as e:
    _ve = e.__context__  # the jsonschema ValidationError Snakemake wrapped
    raise WorkflowError(format_validation_error(_ve) if hasattr(_ve, "absolute_path") else str(e)) from None

try:
    PLAN = Plan(config, workdir=os.getcwd())
except ConfigError as e:
    raise WorkflowError(str(e)) from None

ENV = "../../envs/layerscope.yaml"
# Rules call the `layerscope` CLI. It is on PATH when the environment is active (conda, or an
# activated venv); otherwise use the one beside the interpreter running Snakemake, so
# `.venv/bin/snakemake` works without activation (jobs inherit PATH, SLURM jobs too).
import shutil


envvars:
    "PATH",


if not shutil.which("layerscope"):
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
SAFE = r"[A-Za-z0-9.+=-]+(_[A-Za-z0-9.+=-]+)*"


wildcard_constraints:
    model=SAFE,
    shard=r"[A-Za-z0-9.+=_-]+",
    dataset=SAFE,


def scaled(base):
    """A resource that grows with the attempt: a retried job gets 2x, 3x ... of it.

    Snakemake inspects a resource callable's signature for every job it plans; the signature is
    set once here (PEP 362 `__signature__`) so a 10,000-shard dry run does not rebuild it each time.
    """

    def by_attempt(wildcards, attempt):
        return base * attempt

    by_attempt.__signature__ = BY_ATTEMPT
    return by_attempt


BY_ATTEMPT = inspect.signature(lambda wildcards, attempt: None)


def probe_resources(probe, default_gpus):
    """Resources of a probe's shard jobs; GPU requests go through the SLURM plugin's `gpu`/`gpu_model`.

    Memory and runtime scale with the attempt: a shard that ran out of memory or time is retried
    (profile `retries`) with twice as much of both, then three times, and so on."""
    res = dict(config["probes"][probe].get("resources") or {})
    res.setdefault("gpus", default_gpus)
    out = {"mem_mb": scaled(res.get("mem_mb", 8000)), "runtime": scaled(res.get("runtime", 60))}
    if res["gpus"]:
        out["gpu"] = res["gpus"]
        if res.get("gpu_model"):
            out["gpu_model"] = res["gpu_model"]
    return out


def caption(probe, figure):
    """Report caption file for a figure (a per-figure .rst, else the probe's)."""
    base = Path(workflow.basedir) / "workflow" / "report"
    for f in (base / probe / f"{figure}.rst", base / f"{probe}.rst"):
        if f.is_file():
            return str(f)
    return str(base / "default.rst")


def shard_dir(probe, model):
    """The folder of one (probe, model)'s shards, created if absent so it can be an input."""
    d = f"results/{probe}/shards/{model}"
    os.makedirs(d, exist_ok=True)
    return d


def extra_outputs(probe, impl):
    """A probe's declared extra shard outputs (checkpoints, images), directories marked."""
    out = {}
    for name, tmpl in impl.extra_outputs(config["probes"][probe]).items():
        out[name] = directory(tmpl[:-1]) if tmpl.endswith("/") else tmpl
    return out


def dataset_fingerprint(name):
    """Listing + size + mtime of a dataset's images (a param of dataset_index: a changed or added
    image reruns the index and the shards that read it)."""
    from layerscope.data import content_fingerprint  # here, not at the top: the Snakefile stays light

    return content_fingerprint(name, PLAN.dataset(name))


def all_tables():
    return [t for p in PLAN.probes for m in PLAN.models_of(p) for t in PLAN.table_paths(p, m)]


def print_nonfinite_summary():
    """Console lines for tables that counted non-finite activations (end of every run)."""
    from layerscope.merge import nonfinite_summary

    for line in nonfinite_summary(all_tables()):
        print(line, file=sys.stderr)
