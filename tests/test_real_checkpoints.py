"""Checkpoint formats people hold: the official DINOv3 .pth, a head checkpoint carrying its LoRA,
Self-Forcing generator_ema / generator, Wan's text encoder from elsewhere, weight keys a family
does not read. Every format is checked against the equivalent folder (equal statistics), the
references built from formulas written here."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from layerscope.errors import ConfigError, ModelLoadError
from layerscope.h5io import ShardWriter
from layerscope.merge import load_shards
from layerscope.models import dinov3
from layerscope.probes.base import ShardSpec
from layerscope.probes.dinov3_channels import DinoV3Channels

SIZE = 64


def _stats(tmp: Path, index: Path, name: str, **mcfg) -> dict:
    pcfg = {"dataset": "photos", "batch_size": 4, "image_size": SIZE, "topk": 4, "layers": "all", "max_images": 4}
    model_cfg = {"family": "dinov3", "kind": "path", "dtype": "fp32", **mcfg}
    spec = ShardSpec(probe="dinov3_channels", model=name, axes={"slice": "0of1"}, probe_cfg=pcfg, model_cfg=model_cfg,
                     datasets={"photos": {"kind": "skimage", "index": str(index)}}, config_hash="h", device="cpu")
    out = tmp / name / "slice-0of1.h5"
    prov = {"probe": spec.probe, "model": name, "axes": spec.axes, "config_hash": "h", "data_digest": "d",
            "spec": spec.to_json_dict()}
    with ShardWriter(out, prov) as w:
        DinoV3Channels().run_shard(spec, w)
    return DinoV3Channels().merge(load_shards([out], "dinov3_channels", name))


def _equal(a: dict, b: dict, exact: bool = True) -> None:
    ta, tb = a["channels"], b["channels"]
    for col in ("count", "mean", "std", "max_abs"):
        if exact:
            np.testing.assert_array_equal(ta[col].to_numpy(), tb[col].to_numpy(), err_msg=col)
        else:
            np.testing.assert_allclose(ta[col].to_numpy(), tb[col].to_numpy(), rtol=1e-5, atol=1e-5, err_msg=col)


# Key names of the official dinov3 repository (dinov3/models/vision_transformer.py and its layers), written
# out here for a 1-block model, independent of the converter under test.
OFFICIAL_KEYS_1BLOCK = {
    "cls_token", "storage_tokens", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
    "norm.bias", "blocks.0.norm1.weight", "blocks.0.norm1.bias", "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias",
    "blocks.0.attn.qkv.bias_mask", "blocks.0.attn.proj.weight", "blocks.0.attn.proj.bias", "blocks.0.ls1.gamma",
    "blocks.0.norm2.weight", "blocks.0.norm2.bias", "blocks.0.ls2.gamma",
}


@pytest.fixture(scope="module")
def official(tmp_path_factory, dinov3_dir) -> dict:
    """The tiny model written in the official format, with a non-zero key bias (masked in the original)."""
    from transformers import DINOv3ViTModel

    model = DINOv3ViTModel.from_pretrained(dinov3_dir).eval()
    sd = dinov3.convert_hf_to_official(model.state_dict(), model.config.hidden_size)
    D = model.config.hidden_size
    for k in [k for k in sd if k.endswith("attn.qkv.bias")]:
        sd[k] = sd[k].clone()
        sd[k][D:2 * D] = 7.0  # the original masks the key bias with bias_mask: it must not count
    sd["rope_embed.periods"] = torch.ones(4)  # a buffer the model recomputes: dropped
    root = tmp_path_factory.mktemp("official")
    torch.save(sd, root / "dinov3_tiny_pretrain.pth")
    return {"sd": sd, "path": root / "dinov3_tiny_pretrain.pth", "hidden": D, "model": model}


def test_official_names_and_shapes(official):
    sd = official["sd"]
    one = {k.replace("blocks.0.", "blocks.0.") for k in sd if not k.startswith("blocks.") or k.startswith("blocks.0.")}
    assert one - {"rope_embed.periods"} == OFFICIAL_KEYS_1BLOCK | {"blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc1.bias",
                                                                   "blocks.0.mlp.fc2.weight", "blocks.0.mlp.fc2.bias"}
    D = official["hidden"]
    assert sd["blocks.0.attn.qkv.weight"].shape == (3 * D, D)
    assert sd["mask_token"].shape == (1, D)  # the original keeps it 2-D
    # rows of the fused qkv are q, k, v in that order (the original splits the output in thirds)
    m = official["model"]
    torch.testing.assert_close(sd["blocks.1.attn.qkv.weight"][D:2 * D], m.model.layer[1].attention.k_proj.weight, rtol=0, atol=0)


def test_official_pth_gives_equal_statistics_to_the_folder(tmp_path, dinov3_dir, photos_index, official):
    ref = _stats(tmp_path, photos_index, "folder", path=str(dinov3_dir))
    got = _stats(tmp_path, photos_index, "pth", path=str(dinov3_dir), checkpoint=str(official["path"]))
    _equal(ref, got)
    # and back: official -> transformers -> official is the identity on every weight
    conv = dinov3.convert_official_to_hf(official["sd"], official["hidden"])
    back = dinov3.convert_hf_to_official(conv, official["hidden"])
    for k, v in back.items():
        if k.endswith("qkv.bias"):
            D = official["hidden"]
            torch.testing.assert_close(v[:D], official["sd"][k][:D], rtol=0, atol=0)
            torch.testing.assert_close(v[2 * D:], official["sd"][k][2 * D:], rtol=0, atol=0)
        else:
            torch.testing.assert_close(v, official["sd"][k], rtol=0, atol=0)


def test_official_pth_of_gated_mlp(tmp_path):
    """ViT-H+/16 and 7B use a SwiGLU MLP: w1 (gate), w2 (up), w3 (down) in the original."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    cfg = DINOv3ViTConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=48, num_attention_heads=2,
                          num_register_tokens=4, patch_size=16, image_size=32, use_gated_mlp=True, hidden_act="silu")
    torch.manual_seed(0)
    a = DINOv3ViTModel(cfg).eval()
    sd = dinov3.convert_hf_to_official(a.state_dict(), 32)
    assert {"blocks.0.mlp.w1.weight", "blocks.0.mlp.w2.weight", "blocks.0.mlp.w3.weight"} <= set(sd)
    torch.manual_seed(1)
    b = DINOv3ViTModel(cfg).eval()
    b.save_pretrained(tmp_path / "cfg")
    torch.save({"model": sd}, tmp_path / "h.pth")  # a training checkpoint wrapper is unwrapped
    dinov3.load_official_checkpoint(b, tmp_path / "h.pth", "models.m.checkpoint")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(a(pixel_values=x).last_hidden_state, b(pixel_values=x).last_hidden_state, rtol=0, atol=0)


def test_bad_official_checkpoints_name_the_field(tmp_path, dinov3_dir, official):
    from transformers import DINOv3ViTModel

    model = DINOv3ViTModel.from_pretrained(dinov3_dir)
    extra = dict(official["sd"], **{"blocks.0.attn.qkv2.weight": torch.zeros(1)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(ModelLoadError, match=r"no mapping.*qkv2"):
        dinov3.load_official_checkpoint(model, tmp_path / "extra.pth", "models.m.checkpoint")
    missing = {k: v for k, v in official["sd"].items() if k != "blocks.1.ls2.gamma"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(ModelLoadError, match=r"models\.m\.checkpoint.*missing .*layer_scale2"):
        dinov3.load_official_checkpoint(model, tmp_path / "missing.pth", "models.m.checkpoint")
    (tmp_path / "flipped.pth").write_bytes(b"\x00" + official["path"].read_bytes()[1:])
    with pytest.raises(ModelLoadError, match=r"models\.m\.checkpoint") as e:
        dinov3.load_official_checkpoint(model, tmp_path / "flipped.pth", "models.m.checkpoint")
    assert "\n" not in str(e.value)


def test_lora_payload_equals_weights_merged_by_formula(tmp_path, dinov3_dir, photos_index, official):
    """A head checkpoint {state_dict, meta, peft: {config, state_dict}} whose LoRA targets the official
    fused qkv and fc1: the statistics equal those of an official .pth with W + (alpha/r) B A written in."""
    D, r, alpha = official["hidden"], 2, 4
    g = torch.Generator().manual_seed(3)
    lora_sd, merged = {}, {k: v.clone() for k, v in official["sd"].items()}
    for i in range(4):
        for mod, out_dim in ((f"blocks.{i}.attn.qkv", 3 * D), (f"blocks.{i}.mlp.fc1", 128)):
            A = torch.randn(r, D, generator=g) * 0.3
            B = torch.randn(out_dim, r, generator=g) * 0.3
            lora_sd[f"base_model.model.{mod}.lora_A.weight"] = A
            lora_sd[f"base_model.model.{mod}.lora_B.weight"] = B
            merged[f"{mod}.weight"] = merged[f"{mod}.weight"] + (alpha / r) * B @ A
    payload = {"state_dict": {"head.weight": torch.zeros(3, D)}, "meta": {"backbone_name": "dinov3_tiny"},
               "peft": {"config": {"r": r, "lora_alpha": alpha, "target_modules": ["qkv", "fc1"], "lora_dropout": 0.0,
                                   "bias": "none", "peft_type": "LORA"}, "state_dict": lora_sd}}
    torch.save(payload, tmp_path / "head.pt")
    torch.save(merged, tmp_path / "merged.pth")
    base = _stats(tmp_path, photos_index, "base", path=str(dinov3_dir), checkpoint=str(official["path"]))
    ref = _stats(tmp_path, photos_index, "ref", path=str(dinov3_dir), checkpoint=str(tmp_path / "merged.pth"))
    got = _stats(tmp_path, photos_index, "payload", path=str(dinov3_dir), checkpoint=str(official["path"]),
                 lora_payload=str(tmp_path / "head.pt"))
    _equal(ref, got, exact=False)
    assert not np.allclose(base["channels"]["std"], got["channels"]["std"], rtol=1e-3)
    # a head file without the payload is refused with the field named
    torch.save({"state_dict": {}}, tmp_path / "nolora.pt")
    with pytest.raises(ModelLoadError, match=r"models\.m\.lora_payload.*no LoRA payload"):
        dinov3.load({"name": "m", "family": "dinov3", "kind": "path", "path": str(dinov3_dir),
                     "lora_payload": str(tmp_path / "nolora.pt")}, torch.device("cpu"), torch.float32)


def _plan_cfg(cfg: dict, **model) -> dict:
    c = copy.deepcopy(cfg)
    c["models"]["dinov3_tiny"].update(model)
    return c


@pytest.mark.parametrize("key,value,family", [("use_ema", True, "dinov3"), ("text_encoder", "x", "dinov3"),
                                              ("checkpoint", "config.yaml", "sdxl"), ("lora_payload", "config.yaml", "wan")])
def test_weight_key_the_family_does_not_read_is_an_error(repo, key, value, family):
    from layerscope.plan import Plan, load_config, validate_config

    cfg = load_config(repo / "config.yaml")
    name = next(n for n, m in cfg["models"].items() if m["family"] == family)
    cfg["models"][name][key] = value
    validate_config(cfg)
    with pytest.raises(ConfigError, match=rf"models\.{name}\.{key}: family '{family}' does not read {key}"):
        Plan(cfg, workdir=repo)


# ---------------------------------------------------------------- Wan


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory) -> Path:
    from layerscope.models import wan

    out = tmp_path_factory.mktemp("wan") / "pipe"
    wan.build_tiny("default", 0, out)
    return out


def test_wan_text_encoder_only_when_used_and_from_its_own_path(tmp_path, wan_dir, caplog):
    import shutil

    from layerscope.models import wan

    cpu = torch.device("cpu")
    b = wan.load({"name": "w", "kind": "path", "path": str(wan_dir)}, cpu, torch.float32)
    assert b.text_encoder is None  # text: random never loads UMT5
    ref = wan.encode_prompt(b, ["a  cat &amp; a dog "], 16, cpu, torch.float32, free=False)
    assert b.text_encoder is not None
    # same prompt after cleaning: the same embeddings (diffusers' WanPipeline cleans before tokenizing)
    again = wan.encode_prompt(b, ["a cat & a dog"], 16, cpu, torch.float32)
    torch.testing.assert_close(ref, again, rtol=0, atol=0)
    assert b.text_encoder is None  # freed once encoded
    # a pipeline folder without text encoder + text_encoder: pointing at a folder that holds one
    bare = tmp_path / "bare"
    shutil.copytree(wan_dir, bare, ignore=shutil.ignore_patterns("text_encoder", "tokenizer"))
    te = tmp_path / "umt5"
    shutil.copytree(wan_dir / "text_encoder", te)
    for f in (wan_dir / "tokenizer").iterdir():
        shutil.copy(f, te / f.name)
    b2 = wan.load({"name": "w", "kind": "path", "path": str(bare), "text_encoder": str(te)}, cpu, torch.float32)
    torch.testing.assert_close(wan.encode_prompt(b2, ["a cat & a dog"], 16, cpu, torch.float32), ref, rtol=0, atol=0)
    b3 = wan.load({"name": "w", "kind": "path", "path": str(bare)}, cpu, torch.float32)
    with pytest.raises(ModelLoadError, match=r"models\.w\.source.*text_encoder"):
        wan.encode_prompt(b3, ["x"], 16, cpu, torch.float32)
    # bf16 model: the text encoder is loaded in the model's dtype
    b4 = wan.load({"name": "w", "kind": "path", "path": str(wan_dir)}, cpu, torch.bfloat16)
    wan.load_text_encoder(b4, cpu)
    assert next(b4.text_encoder.parameters()).dtype == torch.bfloat16


def test_prompt_cleaning_matches_diffusers():
    from layerscope.models.wan import prompt_clean

    pipeline_wan = pytest.importorskip("diffusers.pipelines.wan.pipeline_wan")
    for p in ["  a   cat\n\tsits ", "fish &amp;amp; chips", "caf\u00e9 &lt;b&gt;", ""]:
        assert prompt_clean(p) == pipeline_wan.prompt_clean(p), p


def test_self_forcing_ema_fallback_is_logged(tmp_path, wan_dir, caplog):
    from diffusers import WanTransformer3DModel

    from layerscope.models import wan

    tr = WanTransformer3DModel.from_pretrained(wan_dir, subfolder="transformer").eval()
    orig = {"model." + k: v for k, v in wan.convert_diffusers_to_original(tr.state_dict()).items()}
    torch.save({"generator": orig}, tmp_path / "gen_only.pt")
    cpu = torch.device("cpu")
    with caplog.at_level(logging.INFO, logger="layerscope.wan"):
        b = wan.load({"name": "w", "kind": "path", "path": str(wan_dir), "checkpoint": str(tmp_path / "gen_only.pt"),
                      "use_ema": None}, cpu, torch.float32)
    assert b.checkpoint_key == "generator"
    assert any("loaded generator" in r.getMessage() for r in caplog.records)
    with pytest.raises(ModelLoadError, match=r"no 'generator_ema'.*models\.w\.use_ema"):
        wan.load({"name": "w", "kind": "path", "path": str(wan_dir), "checkpoint": str(tmp_path / "gen_only.pt"),
                  "use_ema": True}, cpu, torch.float32)
