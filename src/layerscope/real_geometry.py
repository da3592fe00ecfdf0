"""The real checkpoints' architectures, as their config.json files give them, and builders of
depth-cut copies with random weights saved in the real on-disk layouts.

Why: no model hub is reachable from CI, yet the path from a user's real files to a probe must be
tested at the real widths, heads, patch/token geometry and attention layout (a bug that only shows
at 1536 channels or 1560 tokens per frame does not show on a 64-wide toy). ``depth`` cuts the number
of blocks to stay within seconds and a few GB; everything else is the public config's value.
Also used by ``benchmarks/bench_real_geometry.py`` at full depth.

Pure data at import (no torch); the builders import torch / transformers / diffusers lazily.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# hub id -> (family, component configs). Values from the public config.json files.
DINOV3_VITL16 = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                     hidden_act="gelu", use_gated_mlp=False, patch_size=16, num_register_tokens=4, rope_theta=100.0,
                     query_bias=True, key_bias=False, value_bias=True, proj_bias=True, mlp_bias=True,
                     layerscale_value=1.0, pos_embed_rescale=2.0, layer_norm_eps=1e-5, image_size=224)
DINOV3_VITH16PLUS = dict(DINOV3_VITL16, hidden_size=1280, num_hidden_layers=32, num_attention_heads=20,
                         intermediate_size=5120, hidden_act="silu", use_gated_mlp=True)
DINOV3_VIT7B16 = dict(DINOV3_VITL16, hidden_size=4096, num_hidden_layers=40, num_attention_heads=32,
                      intermediate_size=8192, hidden_act="silu", use_gated_mlp=True, query_bias=False, value_bias=False)

SD3_MEDIUM_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                              attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                              caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192)

# SD3's text encoders (CLIP-L/14 and OpenCLIP bigG/14 text towers) and its 16-channel VAE
SD3_CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, projection_dim=768,
                  hidden_act="quick_gelu")
SD3_CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32, projection_dim=1280,
                  hidden_act="gelu")
SD3_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
               down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=32,
               sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)

SDXL_BASE_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                      block_out_channels=[320, 640, 1280],
                      down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                      up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                      mid_block_type="UNetMidBlock2DCrossAttn", transformer_layers_per_block=[1, 2, 10],
                      attention_head_dim=[5, 10, 20], cross_attention_dim=2048, use_linear_projection=True,
                      addition_embed_type="text_time", addition_time_embed_dim=256,
                      projection_class_embeddings_input_dim=2816)

WAN_1_3B_TRANSFORMER = dict(patch_size=[1, 2, 2], num_attention_heads=12, attention_head_dim=128, in_channels=16,
                            out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
                            cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)

CLIP_L14 = {"model_type": "clip", "projection_dim": 768,
            "text_config": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
            "vision_config": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                              "intermediate_size": 4096, "patch_size": 14, "image_size": 224}}

HUB = {
    "facebook/dinov3-vitl16-pretrain-lvd1689m": ("dinov3", {"config.json": {"model_type": "dinov3_vit", "torch_dtype": "float32", **DINOV3_VITL16}}),
    "facebook/dinov3-vith16plus-pretrain-lvd1689m": ("dinov3", {"config.json": {"model_type": "dinov3_vit", "torch_dtype": "float32", **DINOV3_VITH16PLUS}}),
    "facebook/dinov3-vit7b16-pretrain-lvd1689m": ("dinov3", {"config.json": {"model_type": "dinov3_vit", "torch_dtype": "bfloat16", **DINOV3_VIT7B16}}),
    "stabilityai/stable-diffusion-3-medium-diffusers": ("sd3", {
        "model_index.json": {"_class_name": "StableDiffusion3Pipeline"},
        "transformer/config.json": {"_class_name": "SD3Transformer2DModel", "torch_dtype": "float16", **SD3_MEDIUM_TRANSFORMER}}),
    "stabilityai/stable-diffusion-xl-base-1.0": ("sdxl", {
        "model_index.json": {"_class_name": "StableDiffusionXLPipeline"},
        "unet/config.json": {"_class_name": "UNet2DConditionModel", **SDXL_BASE_UNET}}),
    "openai/clip-vit-large-patch14": ("clip", {"config.json": CLIP_L14}),
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers": ("wan", {
        "model_index.json": {"_class_name": "WanPipeline"},
        "transformer/config.json": {"_class_name": "WanTransformer3DModel", "torch_dtype": "float32", **WAN_1_3B_TRANSFORMER}}),
}


def write_hub_snapshot(cache: str | Path, hub_id: str, files: dict[str, Any], commit: str = "0" * 40) -> Path:
    """Write files into the hub cache layout ``models--org--name/snapshots/<commit>/`` + ``refs/main``
    (what ``snapshot_download`` leaves; dicts are written as JSON, bytes as is, Paths copied)."""
    import shutil

    repo = Path(cache) / ("models--" + hub_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    for rel, content in files.items():
        f = snap / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, dict):
            f.write_text(json.dumps(content))
        elif isinstance(content, bytes):
            f.write_bytes(content)
        elif isinstance(content, Path):
            if content.is_dir():
                shutil.copytree(content, f, dirs_exist_ok=True)
            else:
                shutil.copy(content, f)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snap


def build_dinov3(cfg: dict[str, Any], depth: int | None, out: str | Path, seed: int = 0) -> Path:
    """A DINOv3 at ``cfg``'s widths with ``depth`` blocks, random weights, saved as a transformers folder."""
    import torch
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(seed)
    c = dict(cfg, num_hidden_layers=depth or cfg["num_hidden_layers"])
    DINOv3ViTModel(DINOv3ViTConfig(**c)).eval().save_pretrained(out)
    return Path(out)


def build_wan_transformer(depth: int | None, out: str | Path, seed: int = 0) -> Path:
    """Wan2.1-T2V-1.3B's transformer geometry with ``depth`` blocks, saved as ``<out>/transformer`` of a
    pipeline folder (model_index.json beside it; no text encoder: the probe's ``text: random``)."""
    import torch
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    c = dict(WAN_1_3B_TRANSFORMER, num_layers=depth or WAN_1_3B_TRANSFORMER["num_layers"])
    c["patch_size"] = tuple(c["patch_size"])
    WanTransformer3DModel(**c).eval().save_pretrained(Path(out) / "transformer")
    (Path(out) / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    return Path(out)


def build_sd3(depth: int | None, out: str | Path, seed: int = 0, text_depth: int = 1) -> Path:
    """SD3-medium's geometry with ``depth`` MMDiT blocks (the last one ``context_pre_only``, as in the
    real model), both CLIP text towers at their real widths with ``text_depth`` layers, the real
    16-channel VAE and no T5 (``t5: false``: its 4.7 B parameters do not fit a CI machine), random
    weights, saved as a diffusers pipeline folder. The CLIP vocabulary is the tiny build's
    character-level one: vocabulary size is no geometry the probes depend on."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    from layerscope.models.sd3 import CLIP_SEQ_LEN, _clip_vocab, save_pipeline

    torch.manual_seed(seed)
    vocab = _clip_vocab()
    common = dict(vocab_size=len(vocab), max_position_embeddings=CLIP_SEQ_LEN, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    te = [CLIPTextModelWithProjection(CLIPTextConfig(**{**c, "num_hidden_layers": text_depth}, **common)).eval()
          for c in (SD3_CLIP_L, SD3_CLIP_G)]
    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**dict(SD3_MEDIUM_TRANSFORMER, num_layers=depth or SD3_MEDIUM_TRANSFORMER["num_layers"])).eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0), vae=AutoencoderKL(**SD3_VAE).eval(),
        text_encoder=te[0], tokenizer=CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_SEQ_LEN),
        text_encoder_2=te[1], tokenizer_2=CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_SEQ_LEN, pad_token="!"),
        text_encoder_3=None, tokenizer_3=None)
    save_pipeline(pipe, out)
    return Path(out)
