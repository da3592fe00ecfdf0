"""Stable Diffusion 3 through diffusers' ``StableDiffusion3Pipeline``.

The probe needs the whole pipeline, not just the MMDiT: the VAE encodes images to latents and the
pipeline's own ``encode_prompt`` builds the joint text sequence the transformer sees::

    prompt_embeds = [ CLIP-L ++ CLIP-G hidden states (77 positions, zero-padded in channels to
                      joint_attention_dim) ; T5 hidden states (max_sequence_length positions) ]

so position ``p < 77`` is CLIP token ``p`` of both CLIP tokenizers and position ``77 + q`` is T5
token ``q``.  Without a T5 encoder, diffusers fills the T5 part with zeros.

Three sources load the same way, through ``StableDiffusion3Pipeline.from_pretrained``: a built-in
tiny pipeline (``build_tiny``; random weights, tokenizers built offline from an in-memory
byte-level vocabulary), a hub id, or any directory written by ``save_pretrained`` (for instance an
SD3 checkpoint trained elsewhere in the study).  A peft LoRA adapter directory
(``adapter_config.json`` + ``adapter_model.safetensors``) is applied to the transformer.
"""

from __future__ import annotations

import json
import shutil
import string
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from layerscope.models import ModelLoadError, config_field, loading, lora, source_of
from layerscope.hooks import HookPoint

# Canonical hooks (docs/hooks.md): B samples, L text tokens (77 CLIP + max_sequence_length T5), Dj the
# joint attention width (the text stream's hidden size).
HOOKS: dict[str, HookPoint] = {
    "blocks.{i}.hook_text_grad": HookPoint("transformer_blocks.{i}", "[B, L, Dj]",
                                           "dy/d(text stream entering block i), y = sum(transformer output^2)",
                                           ("sd3_textgrad",)),
    "blocks.{i}.hook_text_out": HookPoint("transformer_blocks.{i}", "[B, L, Dj]", "text stream leaving block i",
                                          ("sd3_recon_train",)),
    "hook_text_embed": HookPoint("context_embedder", "[B, L, Dj]", "text stream entering block 0 (context embedder output)",
                                 ("sd3_recon_train",)),
}

__all__ = [
    "TINY_ARCHS", "tiny_pipeline", "build_tiny", "build_tiny_lora", "load", "apply_lora", "parse_lora_target", "save_lora_adapter",
    "text_token_mask", "CLIP_SEQ_LEN", "apply_checkpoint", "read_state_dict", "is_lora_state_dict",
]

CLIP_SEQ_LEN = 77  # CLIP tokenizers' model_max_length in SD3 (and in the tiny build)

# Tiny architectures: a real SD3 layout (two CLIP encoders with projections, optional T5, VAE,
# MMDiT whose last block is context_pre_only) at toy width.  ``pooled_projection_dim`` is the sum
# of the CLIP projection dims; CLIP hidden sizes (16 + 8) are zero-padded to joint_attention_dim
# (32), as SD3 pads 768 + 1280 to 4096.
_TRANSFORMER = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=8,
                    num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16)

# Per-model weight settings this loader reads (models.<name>.<key>); another family's key is refused.
WEIGHT_KEYS = ("lora", "checkpoint", "lora_target", "t5")
# The block-indexed network's config: its key inside a tiny arch, its file(s) in a saved folder.
BLOCKS_CONFIG = {"tiny_key": "transformer", "files": ("transformer/config.json",)}

TINY_ARCHS: dict[str, dict[str, Any]] = {
    "default": {"transformer": _TRANSFORMER, "t5": True},
    "no_t5": {"transformer": _TRANSFORMER, "t5": False},
}


# ---------------------------------------------------------------------------------------- tiny
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character map (the byte-level alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _clip_vocab() -> dict[str, int]:
    """A character-level CLIP vocabulary: every byte-level character, alone and word-final."""
    chars = sorted(set(_bytes_to_unicode().values()))
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in chars:
            vocab.setdefault(c + suffix, len(vocab))
    return vocab


def _t5_pieces() -> list[tuple[str, float]]:
    """A small unigram vocabulary for T5 (pad 0, eos 1, unk 2, as T5 has)."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(c, -2.0) for c in string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation]
    pieces += [("\u2581" + c, -1.5) for c in string.ascii_lowercase]
    return pieces


def tiny_pipeline(arch: str = "default", seed: int = 0, num_layers: int | None = None) -> Any:
    """Build a tiny ``StableDiffusion3Pipeline`` in memory with a fixed seed (random weights).

    Reusable by other parts of the study (e.g. training helpers) that need a small real SD3.
    ``num_layers`` overrides the transformer depth (benchmarks use 24 blocks).
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

    if arch not in TINY_ARCHS:
        raise ModelLoadError(f"sd3 has no tiny architecture {arch!r}; known: {', '.join(TINY_ARCHS)}")
    spec = TINY_ARCHS[arch]
    tcfg = dict(spec["transformer"])
    if num_layers is not None:
        tcfg["num_layers"] = int(num_layers)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**tcfg)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
                        up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[8, 8, 16], layers_per_block=1,
                        latent_channels=tcfg["in_channels"], norm_num_groups=4, sample_size=32,
                        scaling_factor=1.5305, shift_factor=0.0609)  # SD3's latent scale and shift
    vocab = _clip_vocab()
    clip = dict(vocab_size=len(vocab), num_attention_heads=2, num_hidden_layers=2, max_position_embeddings=CLIP_SEQ_LEN,
                bos_token_id=0, eos_token_id=1, pad_token_id=1)
    te1 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=16, intermediate_size=32, projection_dim=8, **clip))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=8, intermediate_size=16, projection_dim=8, **clip))
    tok1 = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_SEQ_LEN)
    tok2 = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_SEQ_LEN, pad_token="!")  # SD3's CLIP-G pads with '!'
    te3 = tok3 = None
    if spec["t5"]:
        pieces = _t5_pieces()
        tok3 = T5Tokenizer(vocab=pieces, extra_ids=0)
        te3 = T5EncoderModel(T5Config(vocab_size=len(pieces), d_model=tcfg["joint_attention_dim"], d_ff=48, d_kv=8,
                                      num_heads=4, num_layers=2, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    # Fresh norms are identity affines; give them trained-looking ones so every block's text stream
    # actually matters (adaLN modulations of a fresh SD3 are already random linear maps).
    with torch.no_grad():
        for mod in (te1, te2, te3):
            for m in mod.modules() if mod is not None else ():
                if isinstance(m, torch.nn.LayerNorm) and m.elementwise_affine:
                    m.weight.normal_(1.0, 0.2)
                    m.bias.normal_(0.0, 0.1)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return StableDiffusion3Pipeline(transformer=transformer.eval(), scheduler=scheduler, vae=vae.eval(),
                                    text_encoder=te1.eval(), tokenizer=tok1, text_encoder_2=te2.eval(), tokenizer_2=tok2,
                                    text_encoder_3=te3.eval() if te3 is not None else None, tokenizer_3=tok3)


def build_tiny(arch: str, seed: int, out_dir: Path, num_layers: int | None = None) -> None:
    """Save a tiny pipeline with ``save_pretrained`` (atomically), so it loads like a real checkpoint."""
    save_pipeline(tiny_pipeline(arch, seed, num_layers), out_dir)


def save_pipeline(pipe: Any, out_dir: str | Path) -> None:
    """``save_pretrained`` atomically (a partial folder renamed into place), recording absent
    components (no T5) in model_index.json so ``from_pretrained`` loads the same pipeline back."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".partial-{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    if pipe.text_encoder_3 is None:  # diffusers skips None components; record them so from_pretrained agrees
        idx = json.loads((tmp / "model_index.json").read_text())
        idx["text_encoder_3"] = [None, None]
        idx["tokenizer_3"] = [None, None]
        (tmp / "model_index.json").write_text(json.dumps(idx, indent=2, sort_keys=True))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)


# ---------------------------------------------------------------------------------------- load
def _quiet() -> None:
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()


def load(model_cfg: Mapping[str, Any], device: torch.device, dtype: torch.dtype) -> Any:
    """Load a ``StableDiffusion3Pipeline`` from a tiny build, hub id or ``save_pretrained`` directory.

    ``model_cfg['t5']`` (default true) uses the T5 encoder when the checkpoint has one; false drops
    it (the T5 part of the text sequence becomes zeros, as diffusers does without T5).  A
    ``model_cfg['lora']`` adapter is applied to the transformer (see :func:`apply_lora`).  Every
    parameter is frozen: the probe differentiates with respect to activations only.
    """
    from diffusers import StableDiffusion3Pipeline

    _quiet()
    src = source_of(model_cfg)
    kw: dict[str, Any] = {}
    index = Path(src) / "model_index.json"
    if Path(src).is_dir():
        if not index.is_file():
            raise ModelLoadError(f"{src} is not a saved diffusers pipeline (no model_index.json); "
                                 f"models.{model_cfg.get('name', '?')}.source must be a StableDiffusion3Pipeline directory")
        idx = json.loads(index.read_text())
        if idx.get("_class_name") not in ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline"):
            raise ModelLoadError(f"{index}: pipeline class {idx.get('_class_name')!r}, expected StableDiffusion3Pipeline")
        no_t5 = idx.get("text_encoder_3") in (None, [None, None])
    else:
        no_t5 = False
    if no_t5 or model_cfg.get("t5") is False:
        kw.update(text_encoder_3=None, tokenizer_3=None)
    with loading("an SD3 pipeline", src, config_field(model_cfg)):
        pipe = StableDiffusion3Pipeline.from_pretrained(src, dtype=dtype, **kw)
    if model_cfg.get("checkpoint"):
        apply_checkpoint(pipe, model_cfg["checkpoint"], config_field(model_cfg, "checkpoint"))
    if model_cfg.get("lora"):
        apply_lora(pipe.transformer, model_cfg["lora"], model_cfg.get("lora_target"), config_field(model_cfg, "lora"))
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        mod = getattr(pipe, name, None)
        if mod is not None:
            mod.requires_grad_(False)
            mod.eval()
    return pipe


# ---------------------------------------------------------------------------------------- checkpoint files
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
_LORA_MARKERS = ("lora_A", "lora_B", "lora_down", "lora_up", "lora.down", "lora.up", "lora_unet_", "lora_linear_layer")


def read_state_dict(path: str | Path, field: str) -> dict[str, torch.Tensor]:
    """Tensors of a weights file: safetensors, or a torch pickle (``weights_only``), unwrapping a
    ``{"state_dict": ...}`` (or ``{"model": ...}``) wrapper as training scripts save them."""
    path = Path(path)
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise ModelLoadError(f"{field}: {path} is not a weights file (expected one of {', '.join(CHECKPOINT_SUFFIXES)})")
    with loading("the weights file", path, field):
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, Mapping) and key in sd and isinstance(sd[key], Mapping):
            sd = sd[key]
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ModelLoadError(f"{field}: {path} holds no state dict of tensors")
    return dict(sd)


def is_lora_state_dict(keys: Sequence[str]) -> bool:
    return any(m in k for k in keys for m in _LORA_MARKERS)


def apply_checkpoint(pipe: Any, path: str | Path, field: str = "models.*.checkpoint") -> str:
    """Load what the note script's ``--load-ckpt`` loads into the pipeline's transformer; returns
    ``'transformer'`` or ``'lora'``.

    * A fine-tuned **transformer state dict** (.safetensors / .pt / .bin; diffusers key names,
      optionally under ``transformer.`` or inside a ``{"state_dict": ...}`` wrapper) replaces every
      weight; the keys must match exactly (missing or unexpected keys are an error, never a partial load).
    * A **LoRA file** (keys with ``lora_A``/``lora_B``, ``lora_down``/``lora_up``, ...) in any format
      ``StableDiffusion3Pipeline.load_lora_weights`` reads (diffusers, peft, kohya), with its alpha
      from the file's diffusers metadata or alpha keys, is loaded by diffusers and fused into the
      weights (then the LoRA layers are removed), so the probe runs the plain module tree.
    """
    path = Path(path)
    sd = read_state_dict(path, field)
    if is_lora_state_dict(list(sd)):
        _apply_lora_file(pipe, path, sd, field)
        return "lora"
    tr = pipe.transformer
    prefixes = ("transformer.", "model.diffusion_model.", "base_model.model.", "module.")
    for pre in prefixes:
        if all(k.startswith(pre) for k in sd):
            sd = {k[len(pre):]: v for k, v in sd.items()}
    own = tr.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        raise ModelLoadError(f"{field}: {path} is not a state dict of this SD3 transformer ({len(missing)} missing keys, "
                             f"e.g. {missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]})")
    bad = [k for k in own if tuple(own[k].shape) != tuple(sd[k].shape)]
    if bad:
        raise ModelLoadError(f"{field}: {path}: shape of {bad[0]} is {tuple(sd[bad[0]].shape)}, "
                             f"the transformer has {tuple(own[bad[0]].shape)}")
    tr.load_state_dict(sd, strict=True)
    return "transformer"


def _apply_lora_file(pipe: Any, path: Path, sd: Mapping[str, torch.Tensor], field: str) -> None:
    """LoRA file -> diffusers' loader (keeps the file's alpha metadata) -> fused weights."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    metadata = None
    with loading("the LoRA file", path, field):
        if path.suffix == ".safetensors":
            sd, metadata = pipe.lora_state_dict(str(path.parent), weight_name=path.name, return_lora_metadata=True)
        keys = list(sd)
        if any(k.startswith(("text_encoder", "lora_te")) for k in keys):
            raise ModelLoadError(f"{field}: {path} has text-encoder LoRA weights; only the transformer's are supported")
        if not any(k.startswith(("transformer.", "lora_unet_", "lora_transformer_")) for k in keys):
            # peft's get_peft_model_state_dict / PeftModel.save_pretrained layout: no component prefix
            sd = {"transformer." + k.removeprefix("base_model.model."): v for k, v in sd.items()}
        n_before = sum(isinstance(m, BaseTunerLayer) for m in pipe.transformer.modules())
        pipe.load_lora_into_transformer(sd, transformer=pipe.transformer, adapter_name="checkpoint", metadata=metadata,
                                        _pipeline=pipe)
    targets = {k.split(".lora")[0] for k in sd if any(m in k for m in ("lora_A", "lora_down", "lora.down"))}
    n_after = sum(isinstance(m, BaseTunerLayer) for m in pipe.transformer.modules())
    if n_after - n_before != len(targets):
        raise ModelLoadError(f"{field}: {path}: {len(targets)} LoRA-adapted modules in the file, {n_after - n_before} "
                             f"found in this transformer (wrong model or key layout)")
    pipe.fuse_lora(components=["transformer"])
    pipe.unload_lora_weights()


# ---------------------------------------------------------------------------------------- LoRA
# Shorthands for SD3's attention projections (JointAttnProcessor2_0): image stream and text stream.
LORA_ALIASES: dict[str, list[str]] = {
    "image": ["to_q", "to_k", "to_v", "to_out.0"],
    "text": ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"],
}
LORA_ALIASES["attn"] = LORA_ALIASES["image"] + LORA_ALIASES["text"]


def parse_lora_target(target: str | Sequence[str] | None) -> list[str] | None:
    """Target modules from config (see :func:`layerscope.models.lora.parse_target`) with SD3's aliases."""
    return lora.parse_target(target, LORA_ALIASES)


def apply_lora(transformer: torch.nn.Module, adapter_dir: str | Path, target: str | Sequence[str] | None = None,
               field: str = "models.*.lora") -> list[str]:
    """Inject and merge a peft adapter folder into the MMDiT (:func:`layerscope.models.lora.apply_adapter`);
    ``target`` (model config ``lora_target``) may restrict it to a subset, SD3 aliases allowed."""
    return lora.apply_adapter(transformer, adapter_dir, field, target, LORA_ALIASES,
                              strip_prefixes=("base_model.model.", "transformer."))


save_lora_adapter = lora.save_adapter


def build_tiny_lora(out_dir: str | Path, arch: str = "default", seed: int = 0,
                    targets: Sequence[str] = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"),
                    rank: int = 4, alpha: float = 8.0) -> None:
    """A random (non-zero) peft LoRA adapter for a tiny SD3 transformer, so a default study can put
    a LoRA'd model on its models axis.  Only the shapes of ``arch`` matter, not the base weights."""
    from diffusers import SD3Transformer2DModel

    lora.build_random_adapter(SD3Transformer2DModel(**TINY_ARCHS[arch]["transformer"]), out_dir, targets, seed, rank, alpha)


# ---------------------------------------------------------------------------------------- text
def text_token_mask(pipe: Any, prompts: list[str], max_sequence_length: int) -> torch.Tensor:
    """Which positions of SD3's joint text sequence hold real tokens: bool [B, 77 + max_sequence_length].

    * CLIP part (positions 0..76): both CLIP tokenizers tokenise the same prompt into the same 77
      positions (their hidden states are concatenated along channels), so a position is content
      when either tokenizer's attention mask is 1 there: BOS, the prompt's tokens and the first
      EOS.  Later positions are padding (CLIP-L pads with EOS, CLIP-G with '!').
    * T5 part (positions 77..): the T5 tokenizer's attention mask (the prompt's tokens and '</s>').
      Without a T5 encoder every T5 position is padding (diffusers feeds zeros there).

    Tokenised exactly as ``encode_prompt`` does (padding to max length, truncation).
    """
    clip_masks = []
    for tok in (pipe.tokenizer, pipe.tokenizer_2):
        enc = tok(prompts, padding="max_length", max_length=pipe.tokenizer_max_length, truncation=True, return_tensors="pt")
        clip_masks.append(enc.attention_mask.bool())
    clip = clip_masks[0] | clip_masks[1]
    if pipe.text_encoder_3 is None or pipe.tokenizer_3 is None:
        t5 = torch.zeros(len(prompts), max_sequence_length, dtype=torch.bool)
    else:
        enc = pipe.tokenizer_3(prompts, padding="max_length", max_length=max_sequence_length, truncation=True,
                               add_special_tokens=True, return_tensors="pt")
        t5 = enc.attention_mask.bool()
    return torch.cat([clip, t5], dim=1)
