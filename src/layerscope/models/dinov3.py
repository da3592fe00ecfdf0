"""DINOv3 ViT through transformers' ``DINOv3ViTModel``.

Token layout of every hidden state: CLS at 0, then ``num_register_tokens`` storage tokens, then the
patch tokens in raster order.  ``output_hidden_states=True`` returns the embedding output followed by
each block's (pre-norm) output; ``model.norm(hidden_states[-1]) == last_hidden_state``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Mapping

import torch
from transformers import DINOv3ViTConfig, DINOv3ViTModel

from layerscope.models import ModelLoadError, config_field, loading, source_of

# Tiny architectures for offline studies and tests (real ones load by hub id or path).
TINY_ARCHS: dict[str, dict[str, Any]] = {
    "default": dict(num_hidden_layers=4, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                    num_register_tokens=4, patch_size=16, image_size=64),
    # ViT-B/16 geometry, for benchmarks only (random weights, ~86 M parameters)
    "vitb16": dict(num_hidden_layers=12, hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                   num_register_tokens=4, patch_size=16, image_size=224),
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def tiny_model(arch: str = "default", seed: int = 0) -> DINOv3ViTModel:
    """Build a tiny DINOv3 with a fixed seed (random weights, eval mode)."""
    torch.manual_seed(seed)
    model = DINOv3ViTModel(DINOv3ViTConfig(**TINY_ARCHS[arch])).eval()
    # A fresh LayerNorm is the identity affine, which would make the model's own final norm equal a
    # plain LayerNorm; give every norm a trained-looking affine so the representations differ.
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.LayerNorm) and mod.elementwise_affine:
                mod.weight.normal_(1.0, 0.3)
                mod.bias.normal_(0.0, 0.2)
    return model


def build_tiny(arch: str, seed: int, out_dir: Path) -> None:
    """Save a tiny model with ``save_pretrained`` (atomically) so it loads like a real checkpoint."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".partial-{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tiny_model(arch, seed).save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)


def load(model_cfg: Mapping[str, Any], device: torch.device, dtype: torch.dtype) -> DINOv3ViTModel:
    """Load through ``from_pretrained``; apply a peft LoRA adapter (its adapter_config.json says
    which modules and ranks) and merge it, since statistics need the adapted weights only."""
    src = source_of(model_cfg)
    with loading("DINOv3 weights", src, config_field(model_cfg)):
        model = DINOv3ViTModel.from_pretrained(src, dtype=dtype)
    if model_cfg.get("lora"):
        from peft import PeftModel

        lora = Path(model_cfg["lora"])
        if not (lora / "adapter_config.json").is_file():
            raise ModelLoadError(f"{config_field(model_cfg, 'lora')}: {lora} has no adapter_config.json (expected a peft adapter directory)")
        with loading("the LoRA adapter", lora, config_field(model_cfg, "lora")):
            model = PeftModel.from_pretrained(model, str(lora)).merge_and_unload()
    return model.to(device).eval()


def preprocess(images: list, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """PIL images (already square-cropped) -> normalised [B, 3, H, W] pixel values."""
    import numpy as np

    arr = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).to(device=device, dtype=dtype)


def final_norms(model: DINOv3ViTModel) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(norm for CLS, norm for the other tokens). DINOv3 can untie them (``cls_norm``); when the
    model has no separate CLS norm, both are ``model.norm``."""
    cls_norm = getattr(model, "cls_norm", None)
    return (cls_norm if cls_norm is not None else model.norm), model.norm
