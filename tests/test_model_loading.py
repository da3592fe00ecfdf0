"""Bad weights get one line naming the source and the config field, for every model family: the
file a tiny build saved is truncated, then loaded through the family's `load` (the shard's path)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from layerscope.cli import main
from layerscope.models import ModelLoadError, build_tiny, family_module

FAMILIES = ["dinov3", "clip", "sdxl", "sd3", "wan"]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for fam in FAMILIES:
        build_tiny(fam, "default", 0, root / fam)
        out[fam] = root / fam
    return out


def _corrupt(src: Path, dst: Path) -> Path:
    """A copy of a saved model whose largest weight file is cut to its first 100 bytes."""
    shutil.copytree(src, dst)
    weights = max(dst.rglob("*.safetensors"), key=lambda p: p.stat().st_size)
    weights.write_bytes(weights.read_bytes()[:100])
    return weights


@pytest.mark.parametrize("family", FAMILIES)
def test_truncated_weights_fail_with_one_line_naming_source_and_field(family, tiny_dirs, tmp_path):
    bad = tmp_path / "bad"
    _corrupt(tiny_dirs[family], bad)
    cfg = {"name": "broken", "family": family, "kind": "path", "path": str(bad)}
    with pytest.raises(ModelLoadError) as e:
        family_module(family).load(cfg, torch.device("cpu"), torch.float32)
    msg = str(e.value)
    assert "\n" not in msg
    assert str(bad) in msg and "models.broken.source" in msg, msg
    # the intact build loads through the same function
    family_module(family).load({**cfg, "path": str(tiny_dirs[family])}, torch.device("cpu"), torch.float32)


def test_shard_with_bad_weights_prints_one_line_and_writes_nothing(tiny_dirs, photos_index, tmp_path, capsys):
    """The shard job's view: `layerscope run-shard` exits 2 with one line, and no shard file."""
    from layerscope.probes.base import ShardSpec

    bad = tmp_path / "bad"
    weights = _corrupt(tiny_dirs["dinov3"], bad)
    spec = ShardSpec(probe="dinov3_channels", model="broken", axes={"slice": "0of1"},
                     probe_cfg={"dataset": "photos", "batch_size": 2, "image_size": 64, "max_images": 2},
                     model_cfg={"name": "broken", "family": "dinov3", "kind": "path", "path": str(bad), "dtype": "fp32"},
                     datasets={"photos": {"kind": "skimage", "index": str(photos_index)}}, config_hash="h", device="cpu")
    out = tmp_path / "shards" / "slice-0of1.h5"
    assert main(["run-shard", "--spec", json.dumps(spec.to_json_dict()), "--out", str(out)]) == ModelLoadError.exit_code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert err[0].startswith(f"layerscope: error: cannot load DINOv3 weights from {bad} (models.broken.source): "), err
    assert weights.exists() and not out.exists() and not list(out.parent.glob("*"))


def test_truncated_lora_adapter_names_the_lora_field(tiny_dirs, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import DINOv3ViTModel

    base = DINOv3ViTModel.from_pretrained(tiny_dirs["dinov3"])
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "adapter")
    cfg = {"name": "tuned", "family": "dinov3", "kind": "path", "path": str(tiny_dirs["dinov3"]),
           "lora": str(tmp_path / "adapter")}
    family_module("dinov3").load(cfg, torch.device("cpu"), torch.float32)  # intact: loads
    w = tmp_path / "adapter" / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:50])
    with pytest.raises(ModelLoadError, match=r"^cannot load the LoRA weights from .*adapter/adapter_model\.safetensors \(models\.tuned\.lora\): "):
        family_module("dinov3").load(cfg, torch.device("cpu"), torch.float32)


# ---------------------------------------------------------------- dtype: auto, and hub ids offline


def test_dtype_auto_is_the_checkpoints_own_on_gpu_and_fp32_on_cpu(tmp_path, monkeypatch):
    import json

    from layerscope.models import model_dtype, native_dtype, resolve_dtype

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    for stored, want in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        d = tmp_path / stored
        (d / "transformer").mkdir(parents=True)
        (d / "transformer" / "config.json").write_text(json.dumps({"torch_dtype": stored}))
        assert native_dtype(d) == stored
        assert model_dtype({"kind": "path", "path": str(d), "dtype": "auto"}, gpu) == want
        assert model_dtype({"kind": "path", "path": str(d), "dtype": "auto"}, cpu) == torch.float32
        assert model_dtype({"kind": "path", "path": str(d), "dtype": "fp32"}, gpu) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", gpu, "float32") == torch.bfloat16  # fp32 checkpoints compute in bf16 on a GPU
    assert resolve_dtype("auto", gpu, None) == torch.bfloat16


def test_schema_default_dtype_is_auto(repo):
    from layerscope.plan import load_config, validate_config

    cfg = load_config(repo / "config.yaml")
    validate_config(cfg)
    assert cfg["models"]["dinov3_tiny"]["dtype"] == "auto"


def test_hub_id_loads_from_the_cache_without_network(tiny_dirs, tmp_path, monkeypatch):
    """A hub id resolves to its cached snapshot (local_files_only): the cached tiny build loads; an
    uncached id fails at once naming the field, with no retries."""
    import time

    from layerscope.real_geometry import write_hub_snapshot

    write_hub_snapshot(tmp_path, "org/dino", {"config.json": tiny_dirs["dinov3"] / "config.json",
                                              "model.safetensors": tiny_dirs["dinov3"] / "model.safetensors"})
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    fam = family_module("dinov3")
    m = fam.load({"name": "d", "family": "dinov3", "kind": "hub", "hub_id": "org/dino"}, torch.device("cpu"), torch.float32)
    assert m.config.hidden_size == 64
    t = time.monotonic()
    with pytest.raises(ModelLoadError, match=r"models\.d\.source: hub model org/missing is not in the local cache"):
        fam.load({"name": "d", "family": "dinov3", "kind": "hub", "hub_id": "org/missing"}, torch.device("cpu"), torch.float32)
    assert time.monotonic() - t < 5
