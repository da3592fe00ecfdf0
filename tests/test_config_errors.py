"""Every bad config or input file fails before the first job, with ONE line naming the field, and
`layerscope check-config` and `snakemake -n` give the same line.

Each case edits the default study (config.yaml) and may write input files into the working
directory; the expected message is written out in full. Every case gets a dry run through
Snakemake's API in this process (the same parse a `snakemake -n` does, ~0.1 s each), and a sample
of one case per kind gets a real `snakemake -n` command, whose stderr must carry the same line
(each costs 2-3 s of start-up).
"""

from __future__ import annotations

import copy
import dataclasses
import io
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import redirect_stderr
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from conftest import REPO, run_snakemake
from layerscope.cli import main as cli_main

BASE = yaml.safe_load((REPO / "config.yaml").read_text())


def _set(path: str, value: Any) -> Callable[[dict], None]:
    def edit(c: dict) -> None:
        *head, last = path.split(".")
        node = c
        for k in head:
            node = node[k]
        node[last] = value

    return edit


def _drop(path: str) -> Callable[[dict], None]:
    def edit(c: dict) -> None:
        *head, last = path.split(".")
        node = c
        for k in head:
            node = node[k]
        del node[last]

    return edit


def _rename_model(old: str, new: str) -> Callable[[dict], None]:
    def edit(c: dict) -> None:
        c["models"][new] = c["models"].pop(old)
        for p in c["probes"].values():
            p["models"] = [new if m == old else m for m in p["models"]]

    return edit


def _add_dataset(name: str, ds: dict, probe: str = "dinov3_channels") -> Callable[[dict], None]:
    def edit(c: dict) -> None:
        c["datasets"][name] = ds
        c["probes"][probe]["dataset"] = name

    return edit


def _all(*edits: Callable[[dict], None]) -> Callable[[dict], None]:
    def edit(c: dict) -> None:
        for e in edits:
            e(c)

    return edit


@dataclasses.dataclass
class Case:
    id: str
    edit: Callable[[dict], None]
    message: str
    files: dict[str, str] = dataclasses.field(default_factory=dict)


F = "config field "
CASES = [
    # --- unknown keys: the field named, and the close known key
    Case("typo-dtyp", _all(_drop("models.sd3_tiny.dtype"), _set("models.sd3_tiny.dtyp", "fp16")),
         F + "models.sd3_tiny.dtyp: unknown key; did you mean 'dtype'?"),
    Case("typo-gpu_modle", _set("probes.wan_logits.resources.gpu_modle", "h100"),
         F + "probes.wan_logits.resources.gpu_modle: unknown key; did you mean 'gpu_model'?"),
    Case("typo-top-level", lambda c: c.__setitem__("runtim", {}),
         F + "runtim: unknown key; did you mean 'runtime'?"),
    Case("typo-probe-name", lambda c: c["probes"].__setitem__("dinov3_channel", c["probes"].pop("dinov3_channels")),
         F + "probes.dinov3_channel: unknown key; did you mean 'dinov3_channels'?"),
    Case("typo-dataset-key", _set("datasets.photos.pth", "x"),
         F + "datasets.photos.pth: unknown key; did you mean 'path'?"),
    Case("typo-probe-setting", _set("probes.sd3_textgrad.time_steps", [1]),
         F + "probes.sd3_textgrad.time_steps: unknown key; did you mean 'timesteps'?"),
    # --- axes are sets
    Case("repeat-layers", _set("probes.dinov3_channels.layers", [0, 0]),
         F + "probes.dinov3_channels.layers: value 0 is repeated (axis values are a set)"),
    Case("repeat-targets-numeric", _set("probes.sd3_recon_train.targets", [0, 0.0]),
         F + "probes.sd3_recon_train.targets: value 0.0 is repeated (axis values are a set)"),
    Case("repeat-seeds", _set("probes.sd3_textgrad.seeds", [42, 42]),
         F + "probes.sd3_textgrad.seeds: value 42 is repeated (axis values are a set)"),
    Case("repeat-layer-groups", _set("probes.wan_logits.layer_groups", [[0, 1], [0, 1]]),
         F + "probes.wan_logits.layer_groups: value [0, 1] is repeated (axis values are a set)"),
    Case("repeat-prompts", _set("probes.sdxl_ablation.prompts", ["a cat", "a cat"]),
         F + 'probes.sdxl_ablation.prompts: value "a cat" is repeated (axis values are a set)'),
    Case("repeat-gammas", _set("probes.sd3_recon_train.gammas", [0.5, 0.5]),
         F + "probes.sd3_recon_train.gammas: value 0.5 is repeated (axis values are a set)"),
    Case("repeat-timesteps", _set("probes.sd3_textgrad.timesteps", [250, 250]),
         F + "probes.sd3_textgrad.timesteps: value 250 is repeated (axis values are a set)"),
    Case("repeat-models", _set("probes.dinov3_channels.models", ["dinov3_tiny", "dinov3_tiny"]),
         F + 'probes.dinov3_channels.models: value "dinov3_tiny" is repeated (axis values are a set)'),
    Case("repeat-wan-steps", _set("probes.wan_logits.steps", [0, "clean", 0]),
         F + "probes.wan_logits.steps: value 0 is repeated (axis values are a set)"),
    # --- semantic checks against the model, before any job
    Case("wan-layer-beyond-depth", _set("probes.wan_logits.layer_groups", [[0, 9]]),
         F + "probes.wan_logits.layer_groups: layer 9 is beyond model 'wan_tiny' (4 blocks: 0..3)"),
    Case("dinov3-layer-beyond-depth", _set("probes.dinov3_channels.layers", [1, 4]),
         F + "probes.dinov3_channels.layers: layer 4 is beyond model 'dinov3_tiny' (4 blocks: 0..3)"),
    Case("sd3-layer-beyond-depth", _set("probes.sd3_textgrad.layers", [7]),
         F + "probes.sd3_textgrad.layers: layer 7 is beyond model 'sd3_tiny' (4 blocks: 0..3)"),
    Case("recon-target-beyond-depth", _set("probes.sd3_recon_train.targets", [3]),
         F + "probes.sd3_recon_train.targets: target 3 is beyond model 'sd3_tiny' (4 blocks: targets 0..2)"),
    Case("sdxl-unknown-group", _set("probes.sdxl_ablation.groups", ["down_blocks.0.attentions.0"]),
         F + "probes.sdxl_ablation.groups: model 'sdxl_tiny' has no cross-attention group 'down_blocks.0.attentions.0' "
         "(it has down_blocks.1.attentions.0, mid_block.attentions.0, up_blocks.0.attentions.0, up_blocks.0.attentions.1)"),
    Case("float-timestep", _set("probes.sd3_textgrad.timesteps", [250.0]),
         F + "probes.sd3_textgrad.timesteps.0: 250.0 is not of type 'integer'"),
    Case("timestep-out-of-range", _set("probes.sd3_textgrad.timesteps", [1000]),
         F + "probes.sd3_textgrad.timesteps.0: 1000 is greater than the maximum of 999"),
    Case("wan-frames-not-multiple", _set("probes.wan_logits.num_frames", 20),
         F + "probes.wan_logits.num_frames: 20 is not a multiple of num_frame_per_block 3"),
    Case("wan-latent-vs-patch", _set("probes.wan_logits.latent_size", [7, 8]),
         F + "probes.wan_logits.latent_size: [7, 8] is not divisible by model 'wan_tiny''s patch size 2x2"),
    Case("wan-step-beyond-schedule", _set("probes.wan_logits.steps", [4]),
         F + "probes.wan_logits.steps: step 4 outside 0..3 (denoising_steps has 4)"),
    Case("unknown-tiny-arch", _set("models.dinov3_tiny.source", "tiny:huge"),
         F + 'models.dinov3_tiny.source: "tiny:huge" names no tiny architecture of family dinov3 (known: tiny:default, tiny:vitb16)'),
    Case("unknown-family", _set("models.dinov3_tiny.family", "dinov2"),
         F + "models.dinov3_tiny.family: unknown model family 'dinov2'; did you mean 'dinov3'? "
             "(families: clip, dinov3, sd3, sdxl, wan; a family is a module in layerscope/models)"),
    Case("family-mismatch", _set("probes.dinov3_channels.models", ["sd3_tiny"]),
         F + "probes.dinov3_channels.models[0]: model 'sd3_tiny' is family 'sd3', this probe takes dinov3"),
    # --- datasets and their files
    Case("folder-without-path", _add_dataset("imgs", {"kind": "folder"}),
         F + "datasets.imgs: 'path' is a required property"),
    Case("list-file-missing", _add_dataset("lst", {"kind": "list", "path": "nope.tsv"}),
         F + "datasets.lst.path: path 'nope.tsv' does not exist"),
    Case("list-line-without-tab", _add_dataset("lst", {"kind": "list", "path": "list.tsv"}),
         "datasets.lst.path: list.tsv line 3: expected 'path<TAB>caption'",
         files={"list.tsv": "# images\na.png\ta cat\nb.png a dog\n"}),
    Case("list-line-empty-caption", _add_dataset("lst", {"kind": "list", "path": "list.tsv"}),
         "datasets.lst.path: list.tsv line 2: expected 'path<TAB>caption'",
         files={"list.tsv": "a.png\ta cat\nb.png\t\n"}),
    Case("captions-line-malformed", _add_dataset("imgs", {"kind": "folder", "path": "imgs", "captions": "caps.tsv"}),
         "datasets.imgs.captions: caps.tsv line 1: expected 'filename<TAB>caption'",
         files={"imgs/a.png": "", "caps.tsv": "a.png\ta\tcat\n"}),
    Case("folder-path-is-file", _add_dataset("imgs", {"kind": "folder", "path": "caps.tsv"}),
         F + "datasets.imgs.path: 'caps.tsv' is a file; a 'folder' dataset needs a folder",
         files={"caps.tsv": "a.png\tcat\n"}),
    Case("unknown-dataset", _set("probes.dinov3_channels.dataset", "pictures"),
         F + "probes.dinov3_channels.dataset: unknown dataset 'pictures'"),
    # --- names safe by construction; nothing reaches a shell unquoted
    Case("shell-injection-in-source", _set("models.dinov3_tiny.source", "tiny:default$(touch x)"),
         F + 'models.dinov3_tiny.source: "tiny:default$(touch x)" names no tiny architecture of family dinov3 '
         "(known: tiny:default, tiny:vitb16)"),
    Case("model-named-dotdot", _rename_model("dinov3_tiny", ".."),
         F + "models: model name \"..\" is not allowed (use letters, digits, '_' and '-', starting with a letter or digit)"),
    Case("model-name-with-space", _rename_model("dinov3_tiny", "x y"),
         F + "models: model name \"x y\" is not allowed (use letters, digits, '_' and '-', starting with a letter or digit)"),
    Case("dataset-name-with-slash", lambda c: (c["datasets"].__setitem__("a/b", c["datasets"].pop("photos")),
                                               [p.__setitem__("dataset", "a/b") for p in c["probes"].values() if "dataset" in p]),
         F + "datasets: dataset name \"a/b\" is not allowed (use letters, digits, '_' and '-', starting with a letter or digit)"),
    Case("study-name", lambda c: c.__setitem__("study", "../x"),
         F + "study: '../x' does not match '^[A-Za-z0-9][A-Za-z0-9_-]*$'"),
    Case("partition-injection", _set("probes.dinov3_channels.resources.slurm_partition", "gpu;rm -rf ~"),
         F + "probes.dinov3_channels.resources.slurm_partition: 'gpu;rm -rf ~' does not match '^[A-Za-z0-9][A-Za-z0-9_.,-]*$'"),
    # --- plain range and enum checks still name the field
    Case("device-enum", _set("runtime.device", "gpu"),
         F + "runtime.device: 'gpu' is not one of ['auto', 'cpu', 'cuda']"),
    Case("mem-zero", _set("probes.dinov3_channels.resources.mem_mb", 0),
         F + "probes.dinov3_channels.resources.mem_mb: 0 is less than the minimum of 1"),
    Case("clip-not-aux", _set("probes.sdxl_ablation.aux_models", []),
         F + "probes.sdxl_ablation.aux_models: must list the clip_model 'clip_tiny' (aux models travel with each shard's spec)"),
]


def _prepare(wd: Path, case: Case) -> Path:
    wd.mkdir(parents=True, exist_ok=True)
    for rel, text in case.files.items():
        (wd / rel).parent.mkdir(parents=True, exist_ok=True)
        (wd / rel).write_text(text)
    cfg = copy.deepcopy(BASE)
    case.edit(cfg)
    (wd / "study.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return wd / "study.yaml"


def dry_run_in_process(wd: Path, cfg: Path) -> str:
    """A Snakemake dry run through its API; returns the error text ('' when the plan succeeded)."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.enums import Quietness
    from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings

    cwd = os.getcwd()
    try:
        with SnakemakeApi(OutputSettings(quiet={Quietness.ALL})) as api:
            wf = api.workflow(resource_settings=ResourceSettings(cores=1), config_settings=ConfigSettings(configfiles=[cfg]),
                              snakefile=REPO / "Snakefile", workdir=wd)
            wf.dag().execute_workflow(executor="dryrun")
    except Exception as e:  # noqa: BLE001  (Snakemake wraps what the Snakefile raised)
        return str(e)
    finally:
        os.chdir(cwd)
    return ""


# one real `snakemake -n` per kind of check (its start-up costs seconds, so not for all cases)
CLI_SAMPLE = ["typo-dtyp", "wan-layer-beyond-depth", "list-line-without-tab", "shell-injection-in-source"]


@pytest.fixture(scope="module")
def cli_dry_runs(tmp_path_factory) -> dict[str, tuple[Path, str, int]]:
    """`snakemake -n` of the sampled cases, two at a time: (workdir, its output (Snakemake 9 logs errors to stdout), exit status)."""
    root = tmp_path_factory.mktemp("bad_configs")

    def one(case: Case) -> tuple[str, tuple[Path, str, int]]:
        wd = root / case.id
        cfg = _prepare(wd, case)
        r = run_snakemake(wd, "-n", config=cfg, check=False)
        return case.id, (wd, r.stdout + r.stderr, r.returncode)

    with ThreadPoolExecutor(2) as ex:
        return dict(ex.map(one, [c for c in CASES if c.id in CLI_SAMPLE]))


def test_table_is_large_enough():
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_config_same_line_from_check_config_and_dry_run(case, tmp_path, monkeypatch):
    cfg = _prepare(tmp_path, case)
    monkeypatch.chdir(tmp_path)
    err = io.StringIO()
    with redirect_stderr(err):
        rc = cli_main(["check-config", str(cfg)])
    assert rc != 0
    lines = err.getvalue().strip().splitlines()
    assert lines == [f"layerscope: error: {case.message}"], err.getvalue()

    out = dry_run_in_process(tmp_path, cfg)
    assert case.message in [ln.strip() for ln in out.splitlines()], out[-2000:]
    assert not (tmp_path / "results").exists()
    assert not (tmp_path / "x").exists()  # the injected `touch x` never ran


@pytest.mark.parametrize("case_id", CLI_SAMPLE)
def test_snakemake_cli_prints_the_same_line(case_id, cli_dry_runs):
    case = next(c for c in CASES if c.id == case_id)
    wd, err, rc = cli_dry_runs[case_id]
    assert rc != 0
    assert case.message in [ln.strip() for ln in err.splitlines()], err[-2000:]
    assert not (wd / "results").exists() and not (wd / "x").exists()


def test_a_good_config_passes_the_in_process_dry_run(tmp_path):
    """The in-process dry run can pass (so the failures above are the configs', not the harness's)."""
    cfg = _prepare(tmp_path, Case("good", lambda c: None, ""))
    assert dry_run_in_process(tmp_path, cfg) == ""


def test_default_and_real_configs_validate(repo):
    from layerscope.plan import load_config
    from layerscope.settings import validate_config

    for name in ("config.yaml", "config.real.yaml"):
        validate_config(load_config(repo / name))


def test_shell_quoting_of_tiny_build(tmp_path):
    """Even a value that bypassed the plan reaches the shell quoted: the build fails on the odd
    arch name (one line), and the `touch` inside it never runs."""
    from layerscope.cli import main

    err = io.StringIO()
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with redirect_stderr(err):
            rc = main(["build-model", "--family", "dinov3", "--arch", "default$(touch x)", "--out", "m"])
    finally:
        os.chdir(cwd)
    assert rc == 2 and "--arch: 'default$(touch x)' is not a tiny architecture name" in err.getvalue()
    smk = (REPO / "workflow" / "rules" / "inputs.smk").read_text()
    assert "{params.arch:q}" in smk and "{params.family:q}" in smk and "{params.arch}" not in smk
