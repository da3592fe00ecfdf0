"""Family "sdxl": Stable Diffusion UNet pipelines (SDXL, and SD 1.x/2.x, which share the UNet naming).

Two halves:

* Pure Python, importable at plan time (no torch): the built-in tiny architectures as plain
  config dicts (:data:`TINY_ARCHS`) and :func:`cross_attention_groups_from_config`, which derives
  the cross-attention (``attn2``) groups ``down_blocks.N.attentions.M`` / ``mid_block.attentions.M``
  / ``up_blocks.N.attentions.M`` from a UNet ``config.json`` the way ``UNet2DConditionModel``
  builds its blocks.  The planner needs the group axis before any model is loaded.
* torch/diffusers (imported inside functions): :func:`build_tiny`, :func:`load` and
  :func:`cross_attention_groups`, which reads the groups off a loaded UNet.

The tiny SDXL pipeline is a real ``StableDiffusionXLPipeline``: two tiny CLIP text encoders with
in-memory byte-level tokenizers (no vocab download), a tiny ``AutoencoderKL`` and a tiny UNet with
``addition_embed_type="text_time"``; it is saved with ``save_pretrained`` and loaded back through
``from_pretrained`` exactly like a hub checkpoint.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from layerscope.errors import ConfigError
from layerscope.hooks import HookPoint

# Canonical hooks (docs/hooks.md): the UNet has no single block stack, so a hook is named by its attn2
# group (``down_blocks.N.attentions.M``, ``mid_block.attentions.M``, ...) and the transformer block j
# inside it. B images (x2 with classifier-free guidance), S spatial tokens of the level, C its width.
HOOKS: dict[str, HookPoint] = {
    "{group}.transformer_blocks.{j}.attn2.hook_out": HookPoint("{group}.transformer_blocks.{j}.attn2", "[B, S, C]",
                                                               "cross-attention output (moments over tokens per channel)",
                                                               ("sdxl_ablation",)),
}

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline

__all__ = [
    "TINY_ARCHS", "CROSS_ATTN_DOWN", "CROSS_ATTN_MID", "CROSS_ATTN_UP", "GroupConfigError",
    "cross_attention_groups_from_config", "unet_config_for", "group_sort_key", "build_tiny", "load", "cross_attention_groups",
    "tiny_clip_tokenizer",
]

# Block types whose modules hold Transformer2DModel 'attentions' with attn2 cross-attention.
CROSS_ATTN_DOWN = frozenset({"CrossAttnDownBlock2D"})
CROSS_ATTN_MID = frozenset({"UNetMidBlock2DCrossAttn"})
CROSS_ATTN_UP = frozenset({"CrossAttnUpBlock2D"})
PLAIN_DOWN = frozenset({"DownBlock2D"})
PLAIN_MID = frozenset({"UNetMidBlock2D", None})
PLAIN_UP = frozenset({"UpBlock2D"})

# Tiny architectures: plain dicts so the planner can read them without torch.
_TEXT_1 = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
               max_position_embeddings=77, projection_dim=16)
_TEXT_2 = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
               max_position_embeddings=77, projection_dim=16)

# Per-model weight settings this loader reads (models.<name>.<key>); another family's key is refused.
WEIGHT_KEYS = ("lora",)
# The block-indexed network's config: its key inside a tiny arch, its file(s) in a saved folder.
BLOCKS_CONFIG = {"tiny_key": "unet", "files": ("unet/config.json", "config.json")}

TINY_ARCHS: dict[str, dict[str, Any]] = {
    # SDXL layout in miniature: plain first down block, cross-attention below it, in the middle
    # and in the first up block (4 attn2 groups; real SDXL has 11).
    "default": {
        "pipeline": "StableDiffusionXLPipeline",
        "sample_size": 32,  # pixels; latents are 16x16 (VAE with two blocks)
        "text_encoder": _TEXT_1,
        "text_encoder_2": _TEXT_2,
        "unet": dict(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=[8, 16], norm_num_groups=4,
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
            mid_block_type="UNetMidBlock2DCrossAttn",
            up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
            attention_head_dim=[2, 4], transformer_layers_per_block=[1, 1],
            cross_attention_dim=_TEXT_1["hidden_size"] + _TEXT_2["hidden_size"],
            use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=4,
            projection_class_embeddings_input_dim=6 * 4 + _TEXT_2["projection_dim"],
        ),
        "vae": dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8, 8],
                    down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                    norm_num_groups=4, layers_per_block=1, sample_size=32),
    },
}
# Same pipeline, two attention blocks per level: 6 attn2 groups (2 down, mid, 3 up), the smallest
# layout at which batched ablation is benchmarked against the note's one-run-per-group loop.
TINY_ARCHS["wide"] = {**TINY_ARCHS["default"], "unet": {**TINY_ARCHS["default"]["unet"], "layers_per_block": 2}}


class GroupConfigError(ConfigError):
    """A UNet config whose cross-attention groups cannot be derived without loading the model."""


def _per_block(value: Any, n: int, key: str) -> list[Any]:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise GroupConfigError(f"UNet config {key} has {len(value)} entries for {n} blocks")
        return list(value)
    return [value] * n


def _has_transformer_layers(t: Any) -> bool:
    """transformer_layers_per_block entries are ints, or per-layer tuples (SDXL refiner style)."""
    if isinstance(t, (list, tuple)):
        return all(int(x) > 0 for x in t) and len(t) > 0
    return int(t) > 0


def cross_attention_groups_from_config(unet_config: Mapping[str, Any]) -> list[str]:
    """The attn2 groups a ``UNet2DConditionModel`` with this config has, in forward order.

    Mirrors ``UNet2DConditionModel.__init__``: down block *i* has ``layers_per_block[i]``
    attentions, the cross-attention mid block one, and up block *i* ``reversed(layers_per_block)[i] + 1``.
    Unknown block types raise rather than guess (the run checks the loaded model against this list).
    """
    down = list(unet_config.get("down_block_types") or [])
    up = list(unet_config.get("up_block_types") or [])
    if not down or len(down) != len(up):
        raise GroupConfigError("UNet config needs down_block_types and up_block_types of equal length")
    n = len(down)
    lpb = _per_block(unet_config.get("layers_per_block", 2), n, "layers_per_block")
    tlpb = _per_block(unet_config.get("transformer_layers_per_block", 1), n, "transformer_layers_per_block")
    rtlpb = unet_config.get("reverse_transformer_layers_per_block") or list(reversed(tlpb))
    mid = unet_config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    groups: list[str] = []
    for i, t in enumerate(down):
        if t in CROSS_ATTN_DOWN:
            if _has_transformer_layers(tlpb[i]):
                groups += [f"down_blocks.{i}.attentions.{j}" for j in range(int(lpb[i]))]
        elif t not in PLAIN_DOWN:
            raise GroupConfigError(f"unsupported down block type {t!r}; list the probe's groups explicitly")
    if mid in CROSS_ATTN_MID:
        if _has_transformer_layers(tlpb[-1]):
            groups.append("mid_block.attentions.0")
    elif mid not in PLAIN_MID:
        raise GroupConfigError(f"unsupported mid block type {mid!r}; list the probe's groups explicitly")
    rlpb = list(reversed(lpb))
    for i, t in enumerate(up):
        if t in CROSS_ATTN_UP:
            if _has_transformer_layers(rtlpb[i]):
                groups += [f"up_blocks.{i}.attentions.{j}" for j in range(int(rlpb[i]) + 1)]
        elif t not in PLAIN_UP:
            raise GroupConfigError(f"unsupported up block type {t!r}; list the probe's groups explicitly")
    return groups


def unet_config_for(model_cfg: Mapping[str, Any], workdir: str | Path = ".") -> dict[str, Any]:
    """The UNet config of a resolved model config, without torch: the tiny arch definition, a
    local ``<path>/unet/config.json``, or a hub checkpoint's config already in the local HF cache."""
    kind = model_cfg.get("kind")
    if kind == "tiny":
        arch = str(model_cfg.get("arch", "default"))
        if arch not in TINY_ARCHS:
            raise GroupConfigError(f"family sdxl has no tiny architecture {arch!r}; known: {', '.join(TINY_ARCHS)}")
        return dict(TINY_ARCHS[arch]["unet"])
    if kind == "path":
        p = Path(str(model_cfg["path"]))
        p = p if p.is_absolute() else Path(workdir) / p
        cfg = p / "unet" / "config.json"
        if not cfg.is_file():
            cfg = p / "config.json"  # a bare UNet directory
        if not cfg.is_file():
            raise GroupConfigError(f"no UNet config at {p}/unet/config.json")
        return json.loads(cfg.read_text())
    if kind == "hub":
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(str(model_cfg["hub_id"]), "unet/config.json")
        if isinstance(hit, str):
            return json.loads(Path(hit).read_text())
        raise GroupConfigError(f"hub model {model_cfg['hub_id']} is not in the local cache; list the probe's groups explicitly")
    raise GroupConfigError(f"model config has unknown source kind {kind!r}")


# ---------------------------------------------------------------- torch side


def tiny_clip_tokenizer(max_length: int = 77):
    """A CLIP BPE tokenizer over single bytes (no merges): offline, saves and reloads like a real one."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    chars = sorted(ByteLevel.alphabet())  # the 256 byte-level symbols CLIP's BPE starts from
    vocab: dict[str, int] = OrderedDict()
    for tok in ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]:
        vocab.setdefault(tok, len(vocab))
    return CLIPTokenizer(vocab=dict(vocab), merges=[], model_max_length=max_length)


def build_tiny(arch: str, seed: int, out_dir: Path) -> None:
    """Build the tiny pipeline from its config with a fixed seed and ``save_pretrained`` it."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if arch not in TINY_ARCHS:
        raise ValueError(f"family sdxl has no tiny architecture {arch!r}; known: {', '.join(TINY_ARCHS)}")
    a = TINY_ARCHS[arch]
    tok = tiny_clip_tokenizer()
    vocab_size = len(tok)

    def text_cfg(d: Mapping[str, Any]) -> CLIPTextConfig:
        return CLIPTextConfig(vocab_size=vocab_size, hidden_act="gelu", bos_token_id=0, eos_token_id=1,
                              pad_token_id=1, **d)

    torch.manual_seed(seed)
    te1 = CLIPTextModel(text_cfg(a["text_encoder"])).eval()
    te2 = CLIPTextModelWithProjection(text_cfg(a["text_encoder_2"])).eval()
    unet = UNet2DConditionModel(**a["unet"]).eval()
    vae = AutoencoderKL(**a["vae"]).eval()
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   num_train_timesteps=1000, timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok,
                                     tokenizer_2=tiny_clip_tokenizer(), unet=unet, scheduler=sched)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out_dir, safe_serialization=True)


def load(model_cfg: Mapping[str, Any], device: "torch.device", dtype: "torch.dtype") -> "DiffusionPipeline":
    """Load the whole pipeline through ``from_pretrained`` (model_index.json picks SDXL or SD 1.x/2.x).

    A peft LoRA directory in ``model_cfg['lora']`` is applied to the UNet with diffusers' own
    ``load_lora_weights`` (peft backend).
    """
    from diffusers import DiffusionPipeline

    from layerscope.models import ModelLoadError, config_field, loading, source_of

    src = source_of(model_cfg)
    with loading("a diffusers pipeline", src, config_field(model_cfg)):
        pipe = DiffusionPipeline.from_pretrained(src, dtype=dtype)
    if not hasattr(pipe, "unet"):
        raise ModelLoadError(f"{src}: pipeline {type(pipe).__name__} has no UNet (family sdxl needs a UNet pipeline)")
    if model_cfg.get("lora"):
        from layerscope.models.lora import check_adapter_dir

        check_adapter_dir(model_cfg["lora"], config_field(model_cfg, "lora"))
        with loading("the LoRA adapter", model_cfg["lora"], config_field(model_cfg, "lora")):
            pipe.load_lora_weights(str(model_cfg["lora"]))
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    for m in pipe.components.values():
        if hasattr(m, "eval"):
            m.eval()
    return pipe


def cross_attention_groups(unet: "torch.nn.Module") -> dict[str, list[str]]:
    """attn2 module names of a loaded UNet grouped by their ``...attentions.M`` prefix (the note's
    ``identify_layers``), in module order."""
    from diffusers.models.attention_processor import Attention

    groups: dict[str, list[str]] = OrderedDict()
    for name, module in unet.named_modules():
        parts = name.split(".")
        if parts[-1] != "attn2" or not isinstance(module, Attention):
            continue
        if "attentions" not in parts:
            raise GroupConfigError(f"attn2 module {name} is outside any '...attentions.M' container")
        i = parts.index("attentions")
        groups.setdefault(".".join(parts[: i + 2]), []).append(name)
    return {g: groups[g] for g in sorted(groups, key=group_sort_key)}


_SECTION = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


def group_sort_key(group: str) -> tuple[int, ...]:
    """Forward order: down blocks, mid block, up blocks (``named_modules`` lists up before mid)."""
    parts = group.split(".")
    return (_SECTION.get(parts[0], 3),) + tuple(int(p) for p in parts if p.isdigit())
