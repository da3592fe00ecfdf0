"""DINOv3 ViT through transformers' ``DINOv3ViTModel``.

Token layout of every hidden state: CLS at 0, then ``num_register_tokens`` storage tokens, then the
patch tokens in raster order.  ``output_hidden_states=True`` returns the embedding output followed by
each block's (pre-norm) output; ``model.norm(hidden_states[-1]) == last_hidden_state``.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch
from transformers import DINOv3ViTConfig, DINOv3ViTModel

from layerscope.models import ModelLoadError, config_field, loading, source_of
from layerscope.hooks import HookPoint

# Canonical hooks (docs/hooks.md): B images, T = 1 + registers + patches tokens, D hidden size.
HOOKS: dict[str, HookPoint] = {
    "blocks.{i}.hook_resid_post": HookPoint("model.layer.{i}", "[B, T, D]", "output of block i (the residual stream, pre-norm)",
                                            ("dinov3_channels",)),
    "blocks.{i}.ln_layer.hook_normalized": HookPoint("model.layer.{i}", "[B, T, D]", "block i output through a fresh LayerNorm without affine",
                                                     ("dinov3_channels",)),
    "blocks.{i}.ln_final.hook_normalized": HookPoint("model.layer.{i}", "[B, T, D]", "block i output through the model's final norm (CLS: cls_norm when untied)",
                                                     ("dinov3_channels",)),
}

# Per-model weight settings this loader reads (models.<name>.<key>); another family's key is refused.
WEIGHT_KEYS = ("lora", "checkpoint", "lora_payload")

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
    """Load a DINOv3 backbone in one of the formats people hold, then apply an adapter.

    * ``source`` alone: a transformers folder (or cached hub id) through ``from_pretrained``;
    * ``checkpoint``: an official ``.pth`` state dict (the dinov3 repository's / torch.hub's key
      names, e.g. ``dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth``); ``source`` then only supplies
      the architecture (config.json) and the weights are converted on load (:func:`convert_official_to_hf`);
    * ``lora``: a peft adapter folder; ``lora_payload``: a head checkpoint that carries its LoRA as
      ``{"state_dict", "meta", "peft": {"config", "state_dict"}}`` (the note's ``--head-weights``).
    Adapters are merged: the statistics need the adapted weights only."""
    src = source_of(model_cfg)
    ckpt = model_cfg.get("checkpoint")
    if ckpt:
        with loading("the DINOv3 config", src, config_field(model_cfg)):
            config = DINOv3ViTConfig.from_pretrained(src)
        try:  # skip the random init of weights the strict load below overwrites (minutes for the 7B)
            from transformers.initialization import no_init_weights
        except ImportError:  # pragma: no cover - other transformers versions
            from contextlib import nullcontext as no_init_weights
        with no_init_weights():
            model = DINOv3ViTModel(config)
        from layerscope.hub import local_file

        load_official_checkpoint(model, local_file(str(ckpt), config_field(model_cfg, "checkpoint")),
                                 config_field(model_cfg, "checkpoint"))
        model = model.to(dtype)
    else:
        with loading("DINOv3 weights", src, config_field(model_cfg)):
            model = DINOv3ViTModel.from_pretrained(src, dtype=dtype)
    if model_cfg.get("lora"):
        from layerscope.models import lora

        lora.apply_adapter(model, str(model_cfg["lora"]), config_field(model_cfg, "lora"))
    if model_cfg.get("lora_payload"):
        from layerscope.hub import local_file

        field = config_field(model_cfg, "lora_payload")
        model = apply_lora_payload(model, local_file(str(model_cfg["lora_payload"]), field), field)
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------
# the official checkpoint format (facebookresearch/dinov3) <-> transformers' DINOv3ViTModel
# ---------------------------------------------------------------------------------------------
# The same renaming as transformers' convert_dinov3_vit_to_hf.py, written for transformers 5's
# module names: the fused ``attn.qkv`` is split in three (its key bias is masked to zero in the
# original - ``bias_mask`` - and absent here), ``ls{1,2}.gamma`` -> ``layer_scale{1,2}.lambda1``,
# ``mlp.fc1/fc2`` (or SwiGLU ``w1/w2/w3``) -> ``up/down`` (``gate/up/down``). Buffers the model
# recomputes (``rope_embed.periods``, ``bias_mask``) and training-only modules are dropped.
_O2H: list[tuple[str, str]] = [
    (r"cls_token", "embeddings.cls_token"),
    (r"mask_token", "embeddings.mask_token"),
    (r"storage_tokens", "embeddings.register_tokens"),
    (r"patch_embed\.proj\.(weight|bias)", r"embeddings.patch_embeddings.\1"),
    (r"blocks\.(\d+)\.norm([12])\.(weight|bias)", r"model.layer.\1.norm\2.\3"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"model.layer.\1.attention.o_proj.\2"),
    (r"blocks\.(\d+)\.ls([12])\.gamma", r"model.layer.\1.layer_scale\2.lambda1"),
    (r"blocks\.(\d+)\.mlp\.fc1\.(weight|bias)", r"model.layer.\1.mlp.up_proj.\2"),
    (r"blocks\.(\d+)\.mlp\.fc2\.(weight|bias)", r"model.layer.\1.mlp.down_proj.\2"),
    (r"blocks\.(\d+)\.mlp\.w1\.(weight|bias)", r"model.layer.\1.mlp.gate_proj.\2"),
    (r"blocks\.(\d+)\.mlp\.w2\.(weight|bias)", r"model.layer.\1.mlp.up_proj.\2"),
    (r"blocks\.(\d+)\.mlp\.w3\.(weight|bias)", r"model.layer.\1.mlp.down_proj.\2"),
    (r"norm\.(weight|bias)", r"norm.\1"),
]
_DROP = re.compile(r"^(rope_embed\.periods|blocks\.\d+\.attn\.qkv\.bias_mask|local_cls_norm\.(weight|bias)|head\..*)$")
_QKV = re.compile(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$")
# prefixes that wrappers and training code put in front of the backbone's keys
_PREFIXES = ("module.", "_orig_mod.", "backbone.", "model.backbone.", "encoder.")


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def convert_official_to_hf(sd: Mapping[str, torch.Tensor], hidden_size: int) -> dict[str, torch.Tensor]:
    """Official dinov3 state dict -> transformers ``DINOv3ViTModel`` state dict. An unknown key is an
    error (never a silent pass-through); so is an untied CLS norm, which the transformers model lacks."""
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, val in sd.items():
        k = _strip(key)
        if _DROP.match(k):
            continue
        m = _QKV.match(k)
        if m:
            i, p = m.groups()
            q, kk, v = torch.split(val, hidden_size, dim=0)
            base = f"model.layer.{i}.attention."
            out[base + f"q_proj.{p}"], out[base + f"v_proj.{p}"] = q, v
            if p == "weight":
                out[base + "k_proj.weight"] = kk
            continue
        for pat, repl in _O2H:
            if re.fullmatch(pat, k):
                out[re.sub(f"^{pat}$", repl, k)] = val
                break
        else:
            unknown.append(key)
    if unknown:
        raise ModelLoadError(f"official DINOv3 state dict: {len(unknown)} keys have no mapping, e.g. {unknown[:3]}")
    if "embeddings.mask_token" in out and out["embeddings.mask_token"].dim() == 2:
        out["embeddings.mask_token"] = out["embeddings.mask_token"].unsqueeze(0)  # (1, D) -> (1, 1, D)
    return out


def convert_hf_to_official(sd: Mapping[str, torch.Tensor], hidden_size: int) -> dict[str, torch.Tensor]:
    """Inverse of :func:`convert_official_to_hf` (key bias zero, ``bias_mask`` 1/0/1 as the original's
    masked-bias layer has it); writes official-format checkpoints of tiny models for tests."""
    inv: list[tuple[re.Pattern[str], Any]] = []
    out: dict[str, torch.Tensor] = {}
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, val in sd.items():
        if key.startswith("layer."):  # the on-disk safetensors names drop the 'model.' of the module tree
            key = "model." + key
        m = re.fullmatch(r"model\.layer\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)", key)
        if m:
            layers.setdefault(m.group(1), {})[f"{m.group(2)}.{m.group(3)}"] = val
            continue
        if key.startswith("rope_embeddings."):
            continue
        name = _hf_to_official_name(key, sd)
        if name is None:
            raise ModelLoadError(f"transformers DINOv3 state dict: key {key!r} has no official name")
        out[name] = val
    for i, parts in layers.items():
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([parts["q.weight"], parts["k.weight"], parts["v.weight"]], 0)
        if "q.bias" in parts:
            zeros = torch.zeros_like(parts["q.bias"])
            out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([parts["q.bias"], parts.get("k.bias", zeros), parts["v.bias"]], 0)
            mask = torch.ones(3 * hidden_size, dtype=parts["q.bias"].dtype)
            mask[hidden_size:2 * hidden_size] = 0.0
            out[f"blocks.{i}.attn.qkv.bias_mask"] = mask
    if "mask_token" in out:
        out["mask_token"] = out["mask_token"].reshape(1, -1)
    return out


def _hf_to_official_name(key: str, sd: Mapping[str, torch.Tensor]) -> str | None:
    gated = any(".mlp.gate_proj." in k for k in sd)
    if key.startswith("layer."):
        key = "model." + key
    fixed = {"embeddings.cls_token": "cls_token", "embeddings.mask_token": "mask_token",
             "embeddings.register_tokens": "storage_tokens"}
    if key in fixed:
        return fixed[key]
    rules = [
        (r"embeddings\.patch_embeddings\.(weight|bias)", r"patch_embed.proj.\1"),
        (r"model\.layer\.(\d+)\.norm([12])\.(weight|bias)", r"blocks.\1.norm\2.\3"),
        (r"model\.layer\.(\d+)\.attention\.o_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
        (r"model\.layer\.(\d+)\.layer_scale([12])\.lambda1", r"blocks.\1.ls\2.gamma"),
        (r"model\.layer\.(\d+)\.mlp\.gate_proj\.(weight|bias)", r"blocks.\1.mlp.w1.\2"),
        (r"model\.layer\.(\d+)\.mlp\.up_proj\.(weight|bias)", r"blocks.\1.mlp.w2.\2" if gated else r"blocks.\1.mlp.fc1.\2"),
        (r"model\.layer\.(\d+)\.mlp\.down_proj\.(weight|bias)", r"blocks.\1.mlp.w3.\2" if gated else r"blocks.\1.mlp.fc2.\2"),
        (r"norm\.(weight|bias)", r"norm.\1"),
    ]
    for pat, repl in rules:
        if re.fullmatch(pat, key):
            return re.sub(f"^{pat}$", repl, key)
    return None


def _torch_load(path: Path, field: str) -> Any:
    if not path.is_file():
        raise ModelLoadError(f"{field}: {path} does not exist or is not a file")
    with loading("the checkpoint", path, field):
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(str(path), map_location="cpu", weights_only=True)


def load_official_checkpoint(model: DINOv3ViTModel, path: str | Path, field: str) -> None:
    """Load an official-format ``.pth`` into a transformers model (strict: every weight covered).
    A ``{"model": ...}`` / ``{"teacher": ...}`` training checkpoint is unwrapped."""
    p = Path(path)
    sd = _torch_load(p, field)
    for wrap in ("model", "teacher", "state_dict"):
        if isinstance(sd, Mapping) and isinstance(sd.get(wrap), Mapping) and not any(k.endswith("cls_token") for k in sd):
            sd = sd[wrap]
    if not isinstance(sd, Mapping):
        raise ModelLoadError(f"{field}: {p} holds a {type(sd).__name__}, not a state dict")
    conv = convert_official_to_hf(sd, model.config.hidden_size)
    res = model.load_state_dict(conv, strict=False)
    missing = [k for k in res.missing_keys if not k.startswith("rope_embeddings.")]
    if missing or res.unexpected_keys:
        raise ModelLoadError(f"{field}: {p} does not match the architecture of models source "
                             f"(missing {missing[:3]}, unexpected {res.unexpected_keys[:3]})")


# ---------------------------------------------------------------------------------------------
# a head checkpoint carrying its backbone LoRA: {"state_dict", "meta", "peft": {"config", "state_dict"}}
# ---------------------------------------------------------------------------------------------
_LORA_KEY = re.compile(r"^(?P<mod>.+)\.(?P<ab>lora_[AB]|lora_embedding_[AB]|lora_magnitude_vector)(?:\.(?P<adapter>(?!weight$|bias$)[^.]+))?(?P<rest>\.weight|\.bias)?$")
_PARAM = r"\.(weight|bias)"
# module names (LoRA targets) follow the parameter mapping: the same rules without the weight/bias part
_MODULE_O2H = [(o[: -len(_PARAM)], re.sub(r"\.\\\d+$", "", h)) for o, h in _O2H if o.endswith(_PARAM)]
_TARGET_O2H = {"qkv": ["q_proj", "k_proj", "v_proj"], "proj": ["o_proj"], "fc1": ["up_proj"], "fc2": ["down_proj"],
               "w1": ["gate_proj"], "w2": ["up_proj"], "w3": ["down_proj"]}


def _lora_to_hf(sd: Mapping[str, torch.Tensor], hidden_size: int) -> dict[str, torch.Tensor]:
    """LoRA weights keyed by the official module names -> keyed by transformers' module names.
    A LoRA on the fused ``qkv`` (B: 3D x r, A: r x D) is exactly three LoRAs sharing A, with B split
    in thirds: (B_q A, B_k A, B_v A) are the rows of B A."""
    out: dict[str, torch.Tensor] = {}
    for key, val in sd.items():
        k = _strip(key)
        for p in ("base_model.model.", "base_model."):
            if k.startswith(p):
                k = k[len(p):]
        m = _LORA_KEY.match(k)
        if not m:
            raise ModelLoadError(f"LoRA payload key {key!r} is not a LoRA weight")
        mod, ab, rest = m.group("mod"), m.group("ab"), m.group("rest") or ""
        mod = _strip(mod)
        q = re.fullmatch(r"blocks\.(\d+)\.attn\.qkv", mod)
        if q:
            base = f"model.layer.{q.group(1)}.attention."
            parts = torch.split(val, hidden_size, 0) if ab == "lora_B" else (val, val, val)
            for name, part in zip(("q_proj", "k_proj", "v_proj"), parts):
                out[f"{base}{name}.{ab}{rest}"] = part.clone()
            continue
        for pat, repl in _MODULE_O2H:
            if re.fullmatch(pat, mod):
                mod = re.sub(f"^{pat}$", repl, mod)
                break
        out[f"{mod}.{ab}{rest}"] = val
    return out


def apply_lora_payload(model: DINOv3ViTModel, path: str | Path, field: str) -> DINOv3ViTModel:
    """Restore the backbone LoRA a head checkpoint carries (peft config + adapter weights) and merge it.

    The payload's ``peft.config`` is a ``LoraConfig`` as a dict; its weights may use the official
    module names (a head trained on the torch.hub backbone: ``blocks.N.attn.qkv``) or transformers'
    (``model.layer.N.attention.q_proj``). Either way peft itself injects and merges the adapter."""
    from layerscope.models import lora

    p = Path(path)
    payload = _torch_load(p, field)
    peft_part = payload.get("peft") if isinstance(payload, Mapping) else None
    if not isinstance(peft_part, Mapping) or not isinstance(peft_part.get("config"), Mapping) \
            or not isinstance(peft_part.get("state_dict"), Mapping):
        raise ModelLoadError(f"{field}: {p} has no LoRA payload (expected a dict with peft: {{config, state_dict}})")
    cfg = dict(peft_part["config"])
    targets = cfg.get("target_modules")
    if isinstance(targets, (list, tuple, set)):
        cfg["target_modules"] = sorted({t2 for t in targets for t2 in _TARGET_O2H.get(str(t).split(".")[-1], [str(t)])})
    lora.apply_payload(model, cfg, _lora_to_hf(peft_part["state_dict"], model.config.hidden_size), p, field)
    return model


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
