"""Config validation and the shard plan (pure Python; no torch)."""

from __future__ import annotations

import copy
import subprocess
import sys

from pathlib import Path

import pytest
import yaml

from layerscope.plan import ConfigError, Plan, load_config, parse_shard_label, shard_label, validate_config

REPO = Path(__file__).resolve().parents[1]
README, DOCS = str(REPO / "README.md"), str(REPO / "docs")


@pytest.fixture
def cfg(repo):
    c = load_config(repo / "config.yaml")
    validate_config(c)
    return c


def test_default_config_plans(cfg):
    plan = Plan(cfg)
    assert plan.shard_paths("dinov3_channels") == [
        "results/default/dinov3_channels/shards/dinov3_tiny/slice-0of2.h5",
        "results/default/dinov3_channels/shards/dinov3_tiny/slice-1of2.h5",
    ]
    spec = plan.spec("dinov3_channels", "dinov3_tiny", "slice-1of2")
    assert spec.axes == {"slice": "1of2"} and spec.model_cfg["kind"] == "tiny"
    assert spec.slice_bounds(12) == (6, 12) and spec.slice_bounds(13) == (6, 13)


def test_planner_does_not_import_torch(repo):
    code = "import sys, layerscope.plan as p; p.plan_from_file(sys.argv[1]); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code, str(repo / "config.yaml")], capture_output=True, text=True, cwd=repo)
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.parametrize("edit, field", [
    (lambda c: c["probes"]["dinov3_channels"].__setitem__("slices", 0), "probes.dinov3_channels.slices"),
    (lambda c: c["probes"]["dinov3_channels"].__setitem__("batch_size", "8"), "probes.dinov3_channels.batch_size"),
    (lambda c: c["probes"]["dinov3_channels"].__setitem__("bogus", 1), "probes.dinov3_channels"),
    (lambda c: c["models"]["dinov3_tiny"].__setitem__("dtype", "fp8"), "models.dinov3_tiny.dtype"),
    (lambda c: c["models"]["dinov3_tiny"].pop("source"), "models.dinov3_tiny"),
])
def test_schema_errors_name_the_field(cfg, edit, field):
    c = copy.deepcopy(cfg)
    edit(c)
    with pytest.raises(ConfigError) as e:
        validate_config(c)
    msg = str(e.value)
    assert "\n" not in msg and f"config field {field}" in msg


@pytest.mark.parametrize("edit, needle", [
    (lambda c: c["probes"]["dinov3_channels"].__setitem__("models", ["nope"]), "probes.dinov3_channels.models[0]: unknown model 'nope'"),
    (lambda c: c["probes"]["dinov3_channels"].__setitem__("dataset", "nope"), "probes.dinov3_channels.dataset: unknown dataset 'nope'"),
    (lambda c: c["models"]["dinov3_tiny"].__setitem__("source", "/no/such/dir"), "models.dinov3_tiny.source: path '/no/such/dir' does not exist"),
    (lambda c: c["models"]["dinov3_tiny"].__setitem__("lora", "missing_adapter"), "models.dinov3_tiny.lora: path 'missing_adapter' does not exist"),
    (lambda c: c["models"]["dinov3_tiny"].__setitem__("family", "sd3"), "is family 'sd3', this probe takes dinov3"),
    (lambda c: c["models"]["dinov3_tiny"].__setitem__("source", README),
     f"models.dinov3_tiny.source: '{README}' is a file; expected a model or pipeline folder saved with save_pretrained"),
    (lambda c: c["models"]["dinov3_tiny"].__setitem__("source", DOCS),
     f"models.dinov3_tiny.source: '{DOCS}' has no config.json, model_index.json or transformer/config.json"),
    (lambda c: c["models"]["dinov3_tiny"].__setitem__("lora", DOCS),
     f"models.dinov3_tiny.lora: '{DOCS}' has no adapter_config.json; expected a peft adapter folder"),
])
def test_semantic_errors_name_the_field(cfg, edit, needle):
    c = copy.deepcopy(cfg)
    edit(c)
    validate_config(c)
    with pytest.raises(ConfigError) as e:
        Plan(c)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_config_hash_ignores_axis_lists_but_not_settings(cfg):
    h = Plan(cfg).config_hash("dinov3_channels", "dinov3_tiny")
    c = copy.deepcopy(cfg)
    c["probes"]["dinov3_channels"]["slices"] = 5
    c["probes"]["dinov3_channels"]["resources"] = {"gpus": 2}
    assert Plan(c).config_hash("dinov3_channels", "dinov3_tiny") == h
    c["probes"]["dinov3_channels"]["image_size"] = 32
    assert Plan(c).config_hash("dinov3_channels", "dinov3_tiny") != h


def test_shard_labels_round_trip():
    axes = {"timestep": "500", "seed": "0", "slice": "1of3"}
    lab = shard_label(axes)
    assert lab == "timestep-500__seed-0__slice-1of3"
    assert parse_shard_label(lab, ("timestep", "seed", "slice")) == axes
    with pytest.raises(ValueError):
        parse_shard_label(lab, ("seed", "timestep", "slice"))


def test_hub_source_needs_no_path(cfg, tmp_path, monkeypatch):
    c = copy.deepcopy(cfg)
    c["models"]["dinov3_tiny"]["source"] = "hub:facebook/dinov3-vits16-pretrain-lvd1689m"
    # the planner checks the local hub cache (no network): fake the model's snapshot there
    snap = tmp_path / "models--facebook--dinov3-vits16-pretrain-lvd1689m"
    (snap / "snapshots" / "abc").mkdir(parents=True)
    (snap / "snapshots" / "abc" / "config.json").write_text("{}")
    (snap / "refs").mkdir()
    (snap / "refs" / "main").write_text("abc")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    plan = Plan(c)
    assert plan.model("dinov3_tiny")["hub_id"] == "facebook/dinov3-vits16-pretrain-lvd1689m"
    assert plan.shard_inputs("dinov3_channels", "dinov3_tiny") == []  # data come in per shard
    assert plan.data_inputs("dinov3_channels", "dinov3_tiny", "slice-1of2") == ["results/default/data/photos/max-0/1of2/index.tsv"]


def test_real_config_validates(repo):
    c = load_config(repo / "config.real.yaml")
    validate_config(c)  # paths on the cluster do not exist here; the schema must hold


# ---------------------------------------------------------------- settings: the schema is the one declaration
def _schema_keys():
    """(file, dotted key, property schema) of every property in every schema file."""
    from layerscope.settings import SCHEMA_DIR

    def walk(node, path):
        for k, sub in (node.get("properties") or {}).items():
            yield f"{path}{k}", sub
            yield from walk(sub, f"{path}{k}.")
        for d, sub in (node.get("$defs") or {}).items():
            yield from walk(sub, f"$defs.{d}.")

    for f in sorted(SCHEMA_DIR.rglob("*.yaml")):
        for key, sub in walk(yaml.safe_load(f.read_text()), ""):
            yield f.name, key, sub


def test_every_schema_key_has_a_description():
    missing = [f"{f}:{k}" for f, k, sub in _schema_keys() if not str(sub.get("description", "")).strip()]
    assert missing == []


def test_readme_reference_is_generated_from_the_schema(repo):
    """The README's reference block is exactly what the schema generates, and names every key."""
    from layerscope.settings import README_END, README_START, reference_markdown

    text = (repo / "README.md").read_text()
    block = text[text.index(README_START) + len(README_START): text.index(README_END)].strip()
    assert block == reference_markdown(), "README is stale: run python -m layerscope.settings README.md"
    documented = {ln.split("`")[1].rsplit(".", 1)[-1] for ln in block.splitlines() if ln.startswith("| `")}
    undocumented = sorted({k.rsplit(".", 1)[-1] for _, k, _ in _schema_keys()} - documented)
    assert undocumented == []


def test_no_defaults_dict_in_the_package(repo):
    hits = [str(p) for p in (repo / "src").rglob("*.py") if "DEFAULTS" in p.read_text()]
    assert hits == []


def test_every_shard_spec_is_fully_defaulted_from_the_schema(cfg):
    """Defaults reach inside the $ref'd probe schemas: each spec's probe_cfg carries every key that
    has a schema default (axis lists and per-job keys aside, which live in the file name / rule)."""
    from layerscope.settings import probe_schema

    plan = Plan(cfg)
    for pname, probe in plan.probes.items():
        schema = probe_schema(pname)
        # model lists live in the rule (one spec per model; aux models resolved into spec.models)
        dropped = set(probe.axis_keys.values()) | {"resources", "threads", "enabled", "models", "aux_models"}
        want = {k: v["default"] for k, v in schema["properties"].items() if "default" in v and k not in dropped}
        for m, shard in plan.shards(pname)[:1]:
            spec = plan.spec(pname, m, shard)
            for k, default in want.items():
                assert k in spec.probe_cfg, (pname, k)
                if k == "checkpoint_root":  # null: the study's own folder (layout)
                    assert spec.probe_cfg[k] == plan.layout.checkpoints(pname)
                elif k not in cfg["probes"][pname] or cfg["probes"][pname][k] == default:
                    assert spec.probe_cfg[k] == default
            # the typed settings: frozen, tuples for lists, equal to the defaulted config
            s = spec.settings
            for k, v in spec.probe_cfg.items():
                got = getattr(s, k)
                assert got == (tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v), (pname, k)
            with pytest.raises(Exception):
                setattr(s, "models", ())


def test_defaults_fill_a_minimal_wan_config():
    """A probe config with only its required keys gets the schema's defaults (no per-probe dict)."""
    c = {"models": {"w": {"family": "wan", "source": "tiny:default"}}, "probes": {"wan_logits": {"models": ["w"]}}}
    validate_config(c)
    p = c["probes"]["wan_logits"]
    assert p["num_frames"] == 21 and p["latent_size"] == [60, 104] and p["layer_groups"] == [[0, 4]]
    assert p["resources"] == {"mem_mb": 8000, "runtime": 60} and c["models"]["w"]["dtype"] == "auto"
    assert c["study"] == "default" and c["runtime"] == {"device": "auto", "threads": 1}
    with pytest.raises(ConfigError, match=r"layer_groups: layer 4 is beyond model 'w' \(4 blocks: 0..3\)"):
        Plan(c)  # the defaulted value is checked like a written one: the tiny Wan has 4 blocks
    p["layer_groups"] = [[0, 3]]
    assert [s for _, s in Plan(c).shards("wan_logits")] == ["layers-0-3__step-0__seed-42"]


def test_settings_refuse_unknown_keys():
    from layerscope.probes import get_probe

    with pytest.raises(ConfigError, match=r"probes.wan_logits.num_frame: unknown key"):
        get_probe("wan_logits").settings({"num_frame": 3})


def test_tiny_arch_tables_read_without_torch_equal_the_modules():
    """The planner reads TINY_ARCHS from the family modules' source (they import torch); the values
    it gets must be the ones the modules build from."""
    import json as _json
    from importlib import import_module

    from layerscope.plan import tiny_archs

    norm = lambda x: _json.loads(_json.dumps(x, default=list))  # tuples -> lists
    for family in ("dinov3", "sd3", "wan", "sdxl"):
        real = import_module(f"layerscope.models.{family}").TINY_ARCHS
        assert norm(tiny_archs(family)) == norm(real), family


def test_list_and_caption_files_parse_against_hand_written_rows(tmp_path):
    from layerscope.data import parse_captions_file, parse_list_file
    from layerscope.errors import DataError

    f = tmp_path / "l.tsv"
    f.write_text("# header\n\na.png\ta cat\n  \nsub/b.jpg\ta dog on a beach \n")
    assert parse_list_file(f, "datasets.x.path") == [(3, "a.png", "a cat"), (5, "sub/b.jpg", "a dog on a beach")]
    for bad, line in [("a.png\n", 1), ("ok.png\tfine\n\tno path\n", 2), ("a\tb\tc\n", 1)]:
        f.write_text(bad)
        with pytest.raises(DataError, match=rf"^datasets.x.path: l.tsv line {line}: expected 'path<TAB>caption'$"):
            parse_list_file(f, "datasets.x.path")
    f.write_text("a.png\tone\na.png\ttwo\n")
    with pytest.raises(DataError, match=r"line 2: file name 'a.png' is repeated"):
        parse_captions_file(f, "datasets.x.captions")


# ---------------------------------------------------------------- what a shard depends on, and nothing else
def with_study(c, name):
    """The config as study `name`: its own fine-tuned checkpoints are under results/<name>/ too."""
    c["study"] = name
    for m in c["models"].values():
        m["source"] = m["source"].replace("results/default/", f"results/{name}/")


def _spec_and_hash(c, probe, model):
    validate_config(c)
    plan = Plan(c)
    return plan.base_spec_json(probe, model), plan.config_hash(probe, model), plan.exec_json(probe)


@pytest.mark.parametrize("edit", [
    lambda c: c["runtime"].__setitem__("threads", 7),
    lambda c: c["runtime"].__setitem__("device", "cpu"),
    lambda c: c["probes"]["sd3_textgrad"].__setitem__("models", ["sd3_tiny_recon", "sd3_tiny"]),  # reorder, drop one
    lambda c: c["probes"]["sd3_textgrad"].__setitem__("seeds", [1, 0, 5]),
    lambda c: c["probes"]["sd3_textgrad"].__setitem__("timesteps", [500, 900]),
    lambda c: c["probes"]["sd3_textgrad"].__setitem__("batch_size", 3),  # samples do not interact
    lambda c: c["probes"]["sd3_textgrad"].__setitem__("memory_budget_mb", 17),
    lambda c: c["probes"]["sd3_textgrad"].__setitem__("threads", 2),
    lambda c: c["probes"]["sd3_textgrad"].__setitem__("resources", {"gpus": 4, "qos": "long"}),
])
def test_spec_ignores_execution_knobs(cfg, edit):
    spec, h, _ = _spec_and_hash(copy.deepcopy(cfg), "sd3_textgrad", "sd3_tiny")
    c = copy.deepcopy(cfg)
    edit(c)
    spec2, h2, _ = _spec_and_hash(c, "sd3_textgrad", "sd3_tiny")
    assert (spec2, h2) == (spec, h)


@pytest.mark.parametrize("probe, model, edit", [
    ("sd3_textgrad", "sd3_tiny", lambda c: c["probes"]["sd3_textgrad"].__setitem__("topk", 3)),
    ("sd3_textgrad", "sd3_tiny", lambda c: c["probes"]["sd3_textgrad"].__setitem__("max_images", 5)),
    ("sd3_textgrad", "sd3_tiny", lambda c: c["models"]["sd3_tiny"].__setitem__("seed", 3)),
    ("sd3_recon_train", "sd3_tiny", lambda c: c["probes"]["sd3_recon_train"].__setitem__("batch_size", 2)),  # changes training
    ("sdxl_ablation", "sdxl_tiny", lambda c: c["models"]["clip_tiny"].__setitem__("seed", 1)),  # the scorer it uses
    ("dinov3_channels", "dinov3_tiny", lambda c: with_study(c, "other")),
])
def test_spec_follows_what_changes_numbers(cfg, probe, model, edit):
    spec, h, _ = _spec_and_hash(copy.deepcopy(cfg), probe, model)
    c = copy.deepcopy(cfg)
    edit(c)
    spec2, h2, _ = _spec_and_hash(c, probe, model)
    assert spec2 != spec and h2 != h


def test_unused_aux_model_is_outside_the_spec(cfg):
    c = copy.deepcopy(cfg)
    c["probes"]["sdxl_ablation"]["clip_model"] = None  # listed in aux_models, but no setting uses it
    spec, h, _ = _spec_and_hash(c, "sdxl_ablation", "sdxl_tiny")
    assert "clip_tiny" not in spec
    c["models"]["clip_tiny"]["seed"] = 9
    assert _spec_and_hash(c, "sdxl_ablation", "sdxl_tiny")[:2] == (spec, h)
    assert Plan(c).shard_inputs("sdxl_ablation", "sdxl_tiny") == ["results/default/models/sdxl_tiny"]


def test_exec_settings_reach_the_shard_spec(cfg):
    """What run-shard gets: the spec file plus --exec (device, batch sizes): the shard sees them."""
    import json

    c = copy.deepcopy(cfg)
    c["runtime"]["device"] = "cpu"
    c["probes"]["sd3_textgrad"]["batch_size"] = 3
    validate_config(c)
    plan = Plan(c)
    ex = json.loads(plan.exec_json("sd3_textgrad"))
    assert ex == {"device": "cpu", "probe_cfg": {"batch_size": 3, "memory_budget_mb": 2048}}
    spec = plan.spec("sd3_textgrad", "sd3_tiny", "timestep-900__seed-0__slice-0of1")
    assert spec.device == "cpu" and spec.probe_cfg["batch_size"] == 3 and spec.settings.batch_size == 3


def test_studies_have_disjoint_paths(cfg):
    a, b = copy.deepcopy(cfg), copy.deepcopy(cfg)
    with_study(a, "a")
    with_study(b, "b")
    pa, pb = Plan(a), Plan(b)
    paths = lambda p: (p.shard_paths("dinov3_channels") + p.figure_paths("sd3_textgrad")
                       + p.table_paths("sd3_textgrad", "sd3_tiny") + [p.model("sd3_tiny")["path"]]
                       + p.data_inputs("dinov3_channels", "dinov3_tiny", "slice-0of2")
                       + [p.probe_cfg("sd3_recon_train")["checkpoint_root"]])
    assert all(x.startswith("results/a/") for x in paths(pa)) and all(x.startswith("results/b/") for x in paths(pb))
    assert Plan(cfg).layout.root == "results/default"


def test_no_result_path_outside_layout(repo):
    """Result paths are written in layerscope/layout.py only (no 'results/' literal elsewhere in code)."""
    import re

    files = [*(repo / "src/layerscope").rglob("*.py"), *(repo / "workflow/rules").glob("*.smk"), repo / "Snakefile"]
    bad = []
    for f in files:
        if f.name == "layout.py":
            continue
        for n, line in enumerate(f.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"""["'f]results/|\{RESULTS\}""", code) and '"""' not in line:
                bad.append(f"{f.relative_to(repo)}:{n}: {line.strip()}")
    assert not bad, "\n".join(bad)


def test_only_this_studys_results_may_be_missing_at_plan_time(cfg):
    """A model path under results/<this study>/ is made by a rule (a fine-tuned checkpoint); one under
    another study's folder is made by nothing here, so it must exist."""
    c = copy.deepcopy(cfg)
    c["models"]["sd3_tiny_ft"]["source"] = "results/other/sd3_recon_train/checkpoints/sd3_tiny/gamma-0__target-0__seed-0"
    with pytest.raises(ConfigError, match=r"^config field models.sd3_tiny_ft.source: path 'results/other/.*' does not exist"):
        Plan(c)
    assert Plan(cfg).model("sd3_tiny_ft")["path"].startswith("results/default/sd3_recon_train/checkpoints/")
