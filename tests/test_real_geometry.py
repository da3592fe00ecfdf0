"""Real checkpoints without a hub: config.real.yaml planned against a faked hub cache, and models at
the real architectures' widths, heads and token geometry (depth cut, random weights) saved in the
real on-disk formats and run through their probes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from layerscope import real_geometry as rg
from layerscope.h5io import ShardWriter
from layerscope.merge import load_shards
from layerscope.probes.base import ShardSpec


def _fake_cache(cache: Path, skip: tuple[str, ...] = ()) -> None:
    for hub_id, (_, files) in rg.HUB.items():
        if hub_id not in skip:
            rg.write_hub_snapshot(cache, hub_id, files)
    if "gdhe17/Self-Forcing" not in skip:
        rg.write_hub_snapshot(cache, "gdhe17/Self-Forcing", {"checkpoints/self_forcing_dmd.pt": b"x"})


def _check_config(repo: Path, workdir: Path, cache: Path, data: bool = True) -> subprocess.CompletedProcess:
    if data:
        (workdir / "data" / "train_images").mkdir(parents=True, exist_ok=True)
        (workdir / "data" / "captions.tsv").write_text("a.png\ta cat\n")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(repo / "src")}
    return subprocess.run([sys.executable, "-m", "layerscope", "check-config", str(repo / "config.real.yaml")],
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=120)


def test_real_config_plans_all_five_probes_from_the_cache(repo, tmp_path):
    cache = tmp_path / "hub"
    _fake_cache(cache)
    r = _check_config(repo, tmp_path / "wd", cache)
    assert r.returncode == 0, r.stderr
    lines = dict(line.split(": ", 1) for line in r.stdout.splitlines() if not line.startswith(" ") and ": " in line)
    # SDXL-base's UNet has 11 attn2 groups (note: down 1-2 x2, mid, up 0-1 x3): + all + none, x 2 prompts x 2 seeds
    assert lines["sdxl_ablation"].startswith(f"{(11 + 2) * 2 * 2} shards")
    assert lines["wan_logits"].startswith(f"{2 * 3 * 1 * 2} shards")  # layer groups x steps x seeds x 2 models
    assert lines["dinov3_channels"].startswith(f"{32 * 2} shards")
    assert lines["sd3_textgrad"].startswith(f"{5 * 3 * 4 * 2} shards")
    assert lines["sd3_recon_train"].startswith("2 shards")
    # the memory estimate uses the config.json geometry and the checkpoint dtype
    est = [line for line in r.stdout.splitlines() if line.startswith("  wan_logits / wan_base")]
    assert est and "GB peak per shard in bf16" in est[0], r.stdout


def test_missing_models_are_all_named_in_one_line(repo, tmp_path):
    cache = tmp_path / "hub"
    _fake_cache(cache, skip=("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "openai/clip-vit-large-patch14", "gdhe17/Self-Forcing"))
    r = _check_config(repo, tmp_path / "wd", cache)
    assert r.returncode == 2
    err = r.stderr.strip()
    assert "\n" not in err and "Traceback" not in err
    for field in ("models.wan_base.source", "models.wan_self_forcing.source", "models.clip_l14.source",
                  "models.wan_self_forcing.checkpoint"):
        assert field in err, field
    assert "models.sdxl_base.source" not in err and "4 hub model(s)" in err
    assert "layerscope fetch" in err


def test_missing_dataset_folder_has_no_hub_hint(repo, tmp_path):
    cache = tmp_path / "hub"
    _fake_cache(cache)
    wd = tmp_path / "wd"
    r = _check_config(repo, wd, cache)
    assert r.returncode == 0
    (wd / "data" / "train_images").rmdir()
    r = _check_config(repo, wd, cache, data=False)
    assert r.returncode == 2 and "datasets.train_images.path" in r.stderr and "hub:" not in r.stderr, r.stderr


def test_fetch_downloads_only_what_loaders_read(repo, monkeypatch, tmp_path):
    from layerscope import hub
    from layerscope.plan import load_config, validate_config

    calls = []
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: calls.append((repo_id, kw)))
    cfg = load_config(repo / "config.real.yaml")
    cfg["models"]["wan_base"]["revision"] = "abc123"
    validate_config(cfg)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    hub.fetch_models(cfg, log=lambda *_: None)
    by = {(r, kw["revision"]): kw for r, kw in calls}
    assert len(calls) == len(by)  # each repository once
    sd3 = by[("stabilityai/stable-diffusion-3-medium-diffusers", None)]["allow_patterns"]
    assert "text_encoder_3/*.safetensors" in sd3  # sd3_medium has t5: true (union over the three uses)
    wan = by[("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "abc123")]["allow_patterns"]
    assert "transformer/*.safetensors" in wan and "text_encoder/*.safetensors" in wan
    assert by[("gdhe17/Self-Forcing", None)]["allow_patterns"] == ["checkpoints/self_forcing_dmd.pt"]
    assert "*.bin" in by[("stabilityai/stable-diffusion-xl-base-1.0", None)]["ignore_patterns"]
    assert all(kw["cache_dir"] == str(tmp_path) for _, kw in calls)


# ---------------------------------------------------------------- models at real geometry


def _run(probe, spec: ShardSpec, out: Path) -> Path:
    prov = {"probe": spec.probe, "model": spec.model, "axes": spec.axes, "config_hash": "h", "data_digest": "d",
            "spec": spec.to_json_dict()}
    with ShardWriter(out, prov) as w:
        probe.run_shard(spec, w)
    return out


def test_dinov3_vitl16_geometry_hub_folder_and_official_pth(tmp_path, photos_index, monkeypatch):
    """ViT-L/16 widths (1024, 16 heads, 4 registers, patch 16) cut to 1 block: as a cached hub
    folder and as an official .pth, through the probe; 224 px gives 14 x 14 = 196 patch tokens."""
    from layerscope.models import dinov3
    from layerscope.probes.dinov3_channels import DinoV3Channels

    folder = rg.build_dinov3(rg.DINOV3_VITL16, 1, tmp_path / "vitl")
    cache = tmp_path / "hub"
    rg.write_hub_snapshot(cache, "facebook/dinov3-vitl16-pretrain-lvd1689m",
                          {"config.json": folder / "config.json", "model.safetensors": folder / "model.safetensors"})
    from safetensors.torch import load_file

    sd = dinov3.convert_hf_to_official(load_file(str(folder / "model.safetensors")), 1024)
    assert sd["blocks.0.attn.qkv.weight"].shape == (3072, 1024)
    torch.save(sd, tmp_path / "dinov3_vitl16_pretrain.pth")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    pcfg = {"dataset": "photos", "batch_size": 2, "image_size": 224, "topk": 4, "layers": "all", "max_images": 2}
    tables = {}
    for name, extra in (("hub", {}), ("pth", {"checkpoint": str(tmp_path / "dinov3_vitl16_pretrain.pth")})):
        mcfg = {"family": "dinov3", "kind": "hub", "hub_id": "facebook/dinov3-vitl16-pretrain-lvd1689m", "dtype": "auto", **extra}
        spec = ShardSpec(probe="dinov3_channels", model=name, axes={"slice": "0of1"}, probe_cfg=pcfg, model_cfg=mcfg,
                         datasets={"photos": {"kind": "skimage", "index": str(photos_index)}}, config_hash="h", device="cpu")
        sh = _run(DinoV3Channels(), spec, tmp_path / name / "slice-0of1.h5")
        tables[name] = DinoV3Channels().merge(load_shards([sh], "dinov3_channels", name))["channels"]
    t = tables["hub"]
    assert set(t["channel"]) == set(range(1024)) and len(t) == 1 * 3 * 2 * 1024  # layers x reps x roles x channels
    assert set(t[t["role"] == "patch"]["count"]) == {2 * 196}  # 224 px / patch 16 = 14 x 14 tokens per image
    assert set(t[t["role"] == "cls"]["count"]) == {2}
    for col in ("mean", "std", "max_abs"):
        np.testing.assert_array_equal(tables["hub"][col].to_numpy(), tables["pth"][col].to_numpy())


def test_wan_1_3b_geometry_with_self_forcing_pt(tmp_path):
    """Wan2.1-T2V-1.3B widths (12 heads x 128, ffn 8960, text_dim 4096) cut to 1 block, a bf16
    Self-Forcing .pt with generator_ema holding the folder's own weights: the logits equal the folder's."""
    from layerscope.models import wan
    from layerscope.probes.wan_logits import WanLogits

    folder = rg.build_wan_transformer(1, tmp_path / "wan")
    from safetensors.torch import load_file

    sd = load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    orig = {"model." + k: v for k, v in wan.convert_diffusers_to_original(sd).items()}
    torch.save({"generator_ema": orig, "generator": {k: torch.zeros_like(v) for k, v in orig.items()}},
               tmp_path / "self_forcing_dmd.pt")
    pcfg = {"prompt": "x", "text": "random", "max_sequence_length": 8, "num_frames": 6, "num_frame_per_block": 3,
            "latent_size": [8, 12], "steps": [0], "chunks": [-1], "layer_groups": [[0]], "seeds": [42],
            "query_chunk": 32, "first_k": 1, "save_logits": False}
    tabs = {}
    for name, extra in (("base", {}), ("sf", {"checkpoint": str(tmp_path / "self_forcing_dmd.pt"), "use_ema": None})):
        mcfg = {"family": "wan", "kind": "path", "path": str(folder), "dtype": "auto", **extra}
        spec = ShardSpec(probe="wan_logits", model=name, axes={"layers": "0", "step": "0", "seed": "42"}, probe_cfg=pcfg,
                         model_cfg=mcfg, datasets={}, config_hash="h", device="cpu")
        sh = _run(WanLogits(), spec, tmp_path / name / "layers-0__step-0__seed-42.h5")
        tabs[name] = WanLogits().merge(load_shards([sh], "wan_logits", name))
    for key, t in tabs["base"].items():
        num = t.select_dtypes("number").columns
        np.testing.assert_array_equal(t[num].to_numpy(), tabs["sf"][key][num].to_numpy(), err_msg=key)
    frames = tabs["base"][next(iter(tabs["base"]))]
    assert len(frames) > 0


def test_memory_estimate_parameter_counts(tmp_path):
    """Parameter counts for the estimate: exact from safetensors headers (vs torch's numel), and the
    config.json formulas within 1% of the real architectures' counts (ViT-L/16 303 M, Wan 1.3B 1.42 B)."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    from layerscope import estimate

    folder = rg.build_dinov3(rg.DINOV3_VITL16, 1, tmp_path / "d")
    n = sum(p.numel() for p in DINOv3ViTModel.from_pretrained(folder).parameters())
    assert estimate.safetensors_params(folder / "model.safetensors") == n
    with torch.device("meta"):
        full = sum(p.numel() for p in DINOv3ViTModel(DINOv3ViTConfig(**rg.DINOV3_VITL16)).parameters())
        hplus = sum(p.numel() for p in DINOv3ViTModel(DINOv3ViTConfig(**rg.DINOV3_VITH16PLUS)).parameters())
    assert abs(estimate._dinov3_params(rg.DINOV3_VITL16) / full - 1) < 0.01
    assert abs(estimate._dinov3_params(rg.DINOV3_VITH16PLUS) / hplus - 1) < 0.01
    assert 300e6 < full < 306e6 and 835e6 < hplus < 845e6  # the notes' 303 M and 841 M
    from diffusers import WanTransformer3DModel

    c = dict(rg.WAN_1_3B_TRANSFORMER, patch_size=(1, 2, 2))
    with torch.device("meta"):
        wan_n = sum(p.numel() for p in WanTransformer3DModel(**c).parameters())
    assert abs(estimate._wan_params(rg.WAN_1_3B_TRANSFORMER) / wan_n - 1) < 0.01
    assert 1.40e9 < wan_n < 1.44e9


def test_fetch_failure_is_one_line_naming_the_fields(repo, monkeypatch, tmp_path, capsys):
    import huggingface_hub

    from layerscope.cli import main

    def gated(repo_id, **kw):
        raise RuntimeError(f"Access to model {repo_id} is restricted.\nYou must have access to it: gated repo")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    assert main(["fetch", str(repo / "config.real.yaml")]) == 4
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "models.dinov3_vitl16.source" in err and "huggingface-cli login" in err, err


def test_check_config_after_the_study_built_its_models_estimates_batch_size_auto(repo, tmp_path):
    """The default config's sd3_textgrad has ``batch_size: auto``: once the study has built its tiny
    models, check-config's memory estimate must size that batch from memory_budget_mb (it crashed
    with int('auto')) - the batch the formula allows, recomputed here from the tiny geometry."""
    import shutil
    import subprocess
    import sys

    import yaml

    from layerscope.models.sd3 import TINY_ARCHS, build_tiny

    shutil.copy(repo / "config.yaml", tmp_path / "config.yaml")
    build_tiny("default", 0, tmp_path / "results" / "default" / "models" / "sd3_tiny")
    exe = Path(sys.executable).with_name("layerscope")
    r = subprocess.run([str(exe), "check-config", "config.yaml"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    line = next(x for x in r.stdout.splitlines() if x.startswith("  sd3_textgrad / sd3_tiny:"))
    pcfg = yaml.safe_load((repo / "config.yaml").read_text())["probes"]["sd3_textgrad"]
    assert pcfg["batch_size"] == "auto"
    t = TINY_ARCHS["default"]["transformer"]
    n_tokens = (t["sample_size"] * 8 // 16) ** 2 + 77 + int(pcfg["max_sequence_length"])
    per_sample = 24 * t["num_layers"] * n_tokens * t["num_attention_heads"] * t["attention_head_dim"] * 4  # fp32 on CPU
    want = int(float(pcfg.get("memory_budget_mb", 4096)) * 2**20 // per_sample)
    assert f"batch_size auto: up to {want} sample(s) per batch within memory_budget_mb" in line, line
    assert "  dinov3_channels / dinov3_tiny: peak memory unknown (model files not on this machine" in r.stdout


def test_sd3_medium_geometry_textgrad_shard_equals_isolated_autograd(tmp_path):
    """SD3-medium's real widths (1536-wide MMDiT, 24 heads, joint dim 4096 fed by CLIP-L 768 + CLIP-G 1280
    zero-padded, pooled 2048, 16-channel VAE) at 2 blocks, through the study's shard path: the stored
    scores equal an independent autograd of y = sum(out^2) w.r.t. each block's text input, recomputed
    here with the note's timestep convention written out (sigma = t / 1000, model fed t)."""
    import torch
    from PIL import Image

    from layerscope.data import build_index, load_image, read_index
    from layerscope.h5io import Shard, ShardWriter
    from layerscope.models import sd3
    from layerscope.probes import sd3_textgrad as P
    from layerscope.probes.base import ShardSpec
    from layerscope.real_geometry import SD3_MEDIUM_TRANSFORMER, build_sd3

    folder = build_sd3(2, tmp_path / "sd3-medium-2blocks")
    rng = np.random.default_rng(0)
    lines = []
    for i, cap in enumerate(["a red square on a white table", "a blue sky"]):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / f"im{i}.png")
        lines.append(f"im{i}.png\t{cap}")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    idx = build_index("pairs", {"kind": "list", "path": str(tmp_path / "list.txt")}, tmp_path / "index.tsv")
    size, msl = 128, 8
    axes = {"timestep": "500", "seed": "0", "slice": "0of1"}
    spec = ShardSpec(probe="sd3_textgrad", model="sd3m", axes=axes,
                     probe_cfg={"models": ["sd3m"], "dataset": "pairs", "max_sequence_length": msl, "topk": 3, "batch_size": 2,
                                "ignore_padding": True, "image_size": size},
                     model_cfg={"family": "sd3", "kind": "path", "path": str(folder), "dtype": "fp32", "name": "sd3m", "t5": False},
                     datasets={"pairs": {"kind": "list", "path": str(tmp_path / "list.txt"), "index": str(idx)}},
                     config_hash="h", device="cpu")
    out = tmp_path / "shard.h5"
    with ShardWriter(out, {"probe": "sd3_textgrad", "model": "sd3m", "axes": axes, "config_hash": "h", "data_digest": "{}",
                           "spec": spec.to_json_dict()}) as w:
        P.SD3TextGrad().run_shard(spec, w)
    smp = P.SD3TextGrad().merge([Shard(out)])["samples"]
    assert len(smp) == 2 * 2 and set(smp["status"]) == {"ok"}

    pipe = sd3.load({"kind": "path", "path": str(folder), "t5": False}, torch.device("cpu"), torch.float32)
    tr = pipe.transformer
    assert tr.config.num_attention_heads * tr.config.attention_head_dim == 1536 == SD3_MEDIUM_TRANSFORMER["caption_projection_dim"]
    assert tr.transformer_blocks[1].context_pre_only and pipe.text_encoder_3 is None
    for rec in read_index(idx):
        with torch.no_grad():
            pe, _, pooled, _ = pipe.encode_prompt(prompt=[rec.caption], prompt_2=None, prompt_3=None, device=torch.device("cpu"),
                                                  do_classifier_free_guidance=False, max_sequence_length=msl)
            assert pe.shape == (1, 77 + msl, 4096) and pooled.shape == (1, 2048)
            pix = pipe.image_processor.preprocess([load_image(rec.path, size)], height=size, width=size)
            z0 = (pipe.vae.encode(pix).latent_dist.mode() - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
            assert z0.shape == (1, 16, size // 8, size // 8)
            sigma = 500 / 1000
            xt = (1 - sigma) * z0 + sigma * P.noise_for(0, rec.image_id, z0.shape[1:])[None]
        mask = sd3.text_token_mask(pipe, [rec.caption], msl)[0].numpy()
        for block in (0, 1):
            box = {}

            def hook(mod, args, kwargs):
                box["h"] = kwargs["encoder_hidden_states"].detach().requires_grad_(True)
                return args, {**kwargs, "encoder_hidden_states": box["h"]}

            handle = tr.transformer_blocks[block].register_forward_pre_hook(hook, with_kwargs=True)
            try:
                y = tr(hidden_states=xt, timestep=torch.tensor([500.0]), encoder_hidden_states=pe, pooled_projections=pooled,
                       return_dict=False)[0].double().pow(2).sum()
                g = torch.autograd.grad(y, box["h"])[0]
            finally:
                handle.remove()
            v = g.norm(dim=-1)[0].numpy()[mask]
            row = smp[(smp.image_id == rec.image_id) & (smp.block == block)].iloc[0]
            assert row.n_tokens == mask.sum() < len(mask)
            assert row.strength == pytest.approx(v.mean(), rel=1e-4)
            assert row.topk_mass == pytest.approx(np.sort(v)[-3:].sum() / v.sum(), rel=1e-4)
