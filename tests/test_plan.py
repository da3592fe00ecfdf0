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
        "results/dinov3_channels/shards/dinov3_tiny/slice-0of2.h5",
        "results/dinov3_channels/shards/dinov3_tiny/slice-1of2.h5",
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
    assert plan.shard_inputs("dinov3_channels", "dinov3_tiny") == ["results/data/photos/index.tsv"]


def test_real_config_validates(repo):
    c = load_config(repo / "config.real.yaml")
    validate_config(c)  # paths on the cluster do not exist here; the schema must hold
