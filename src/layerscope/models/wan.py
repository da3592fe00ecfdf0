"""Wan2.1 family: loading, Self-Forcing-style block-causal inference with a KV cache, and capture of
pre-softmax self-attention logits.

Why this module exists
----------------------
Deep Forcing's Figure 4 (attention sinks in autoregressive video diffusion) needs the self-attention
logits of a Wan transformer *during block-causal generation*: the video is produced in chunks of
``num_frame_per_block`` latent frames; each chunk is denoised in a few steps while attending to the
clean keys/values of every earlier chunk (a per-layer KV cache), then one more pass at timestep 0 on the
clean chunk writes its keys/values into the cache. diffusers ships the bidirectional
:class:`~diffusers.WanTransformer3DModel` only, so the causality lives here, in an attention
*processor* installed on every block's ``attn1`` (diffusers' seam for changing how attention is
computed); the model's ``forward`` is untouched.

Pieces (one module each, diffusers-style; this module is the family: tiny builder, loader, text)
------
* :class:`CausalWanAttnProcessor` (``wan_attention``) - the stock Wan self-attention (projections, RMS q/k norms, RoPE,
  SDPA, output projection) with two causal modes sharing one :class:`CausalState`:

  - ``cache``: the call sees one chunk; its post-RoPE keys/values are written into the layer's
    :class:`KVCache` at the chunk's token range and the queries attend to the cache up to the chunk's
    end (Self-Forcing writes the noisy chunk during denoising and overwrites it with the clean pass);
  - ``mask``: the call sees the whole video so far; a block-causal boolean mask (a token attends to
    every token of its own and earlier chunks) reproduces the same computation without a cache. This is
    the reference the cache is tested against, and the "full recompute" of the benchmark.

  RoPE positions in ``cache`` mode start at the chunk's first frame (:func:`rope_for_frames`), which is
  what the full sequence gives those tokens.
* Capture: for chosen layers and passes the processor recomputes ``QK^T/sqrt(d)`` from the very ``q``
  and ``k`` handed to SDPA (after q/k norms and RoPE), in query chunks, and hands each chunk to sinks:
  :class:`FrameReducer` (per head x query frame x key frame: summed logits and summed softmax mass, on
  the device) and :class:`FullLogitsSink` (only when asked: writes the chunk into an array-like, e.g. a
  chunked gzip float16 HDF5 dataset). A layer's full ``[B, heads, Q, K]`` is never held at once.
* :func:`generate` (``wan_sampler``) - the block-wise autoregressive loop (cache or recompute), Self-Forcing's shifted
  timesteps [1000, 750, 500, 250] and flow-matching x0 prediction.
* Checkpoints (``wan_checkpoint``): :func:`convert_original_to_diffusers` maps original Wan / Self-Forcing key names
  (``blocks.N.self_attn.q.weight``...) to diffusers names; :func:`convert_diffusers_to_original` is its
  inverse (used for the round-trip test and to write Self-Forcing-style checkpoints of tiny models).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from layerscope.models import ModelLoadError, config_field, loading, lora, source_of
from layerscope.hooks import HookPoint

# Canonical hooks (docs/hooks.md): B videos, H heads, Q query tokens of the pass, K key tokens (cache
# up to the chunk's end), C latent channels, F latent frames.
HOOKS: dict[str, HookPoint] = {
    "blocks.{i}.attn.hook_attn_scores": HookPoint("blocks.{i}.attn1", "[B, H, Q, K]",
                                                  "pre-softmax self-attention scores QK^T/sqrt(d) (after q/k norms and RoPE)",
                                                  ("wan_logits",)),
    "hook_latents": HookPoint("", "[B, C, F, h, w]", "clean latents the sampler generates", ("wan_logits",)),
}

__all__ = [
    "TINY_ARCHS", "build_tiny", "load", "WanBundle", "encode_prompt", "prompt_clean", "load_text_encoder", "convert_original_to_diffusers",
    "convert_diffusers_to_original", "load_self_forcing_checkpoint", "CausalState", "KVCache",
    "CausalWanAttnProcessor", "install_causal_processors", "restore_processors", "rope_for_frames",
    "FrameReducer", "FullLogitsSink", "CaptureRequest", "GenerationConfig", "generate", "self_forcing_sigmas",
    "attention_logits_chunks",
]

# Per-model weight settings this loader reads (models.<name>.<key>); another family's key is refused.
WEIGHT_KEYS = ("lora", "checkpoint", "use_ema", "text_encoder", "text_encoder_revision")
# The block-indexed network's config: its key inside a tiny arch, its file(s) in a saved folder.
BLOCKS_CONFIG = {"tiny_key": None, "files": ("transformer/config.json", "config.json")}

# ---------------------------------------------------------------------------------------------
# tiny architectures (see docs/background/models-and-science.md) and loading
# ---------------------------------------------------------------------------------------------

TINY_ARCHS: dict[str, dict[str, Any]] = {
    # Real Wan2.1-1.3B: 30 layers, 12 heads x 128, text_dim 4096, 16 latent channels.
    "default": dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                    text_dim=32, freq_dim=32, ffn_dim=64, num_layers=4, rope_max_seq_len=32),
}

# Tiny UMT5 text encoder matching text_dim=32 (real Wan: UMT5-XXL, d_model 4096, 512 tokens).
_TINY_TEXT = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                  relative_attention_max_distance=16, dropout_rate=0.0)
_TINY_WORDS = ("a an the of in on with and through over under at cat dog eagle bird sky sea beach car city "
               "soaring walking flying running cloudy sunny cinematic lighting majestic slow camera video "
               "person man woman forest mountain river street night day").split()


def _tiny_tokenizer():
    import string

    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + w, -1.0) for w in _TINY_WORDS]
    vocab += [(c, -2.0) for c in string.ascii_letters + string.digits + ",.!?'-"]
    vocab += [("\u2581", -3.0)]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def build_tiny(arch: str, seed: int, out_dir: Path) -> None:
    """Build a tiny Wan 'pipeline folder' offline: ``transformer/``, ``text_encoder/`` (UMT5), ``tokenizer/``.

    The layout is the one of the hub's ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``, so :func:`load` reads a tiny
    build and a real checkpoint the same way.  Weights come from a fixed seed."""
    from diffusers import WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    if arch not in TINY_ARCHS:
        raise ModelLoadError(f"wan has no tiny architecture {arch!r}; known: {', '.join(TINY_ARCHS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = TINY_ARCHS[arch]
    torch.manual_seed(seed)
    WanTransformer3DModel(**cfg).save_pretrained(out_dir / "transformer")
    tok = _tiny_tokenizer()
    tok.save_pretrained(out_dir / "tokenizer")
    torch.manual_seed(seed + 1)
    tcfg = UMT5Config(vocab_size=len(tok), **{**_TINY_TEXT, "d_model": cfg["text_dim"]})
    UMT5EncoderModel(tcfg).save_pretrained(out_dir / "text_encoder")


@dataclass
class WanBundle:
    """What the probe needs from a Wan checkpoint: the transformer and, loaded only when a prompt is
    encoded (:func:`encode_prompt`), UMT5 + tokenizer. ``text_source`` is where they come from
    (the pipeline folder's ``text_encoder/`` + ``tokenizer/``, or the model's ``text_encoder:``)."""

    transformer: Any
    text_encoder: Any | None
    tokenizer: Any | None
    source: str
    checkpoint: str | None = None
    text_source: str | None = None
    text_field: str = "models.*.source"
    text_dtype: Any = None
    checkpoint_key: str | None = None


def load(model_cfg: Mapping[str, Any], device: torch.device, dtype: torch.dtype) -> WanBundle:
    """Load a Wan pipeline folder (tiny build, local path or cached hub id) through ``from_pretrained``.

    ``model_cfg['checkpoint']`` (optional) names a Self-Forcing-style ``.pt`` / ``.safetensors`` whose
    ``generator_ema`` / ``generator`` state dict uses original Wan key names (``use_ema``: true, false,
    or null = EMA when the file has it, else the raw generator; the log says which); it replaces the
    transformer's weights after conversion.  Without it this is the base model (the design note's
    ``--no_checkpoint``).  ``model_cfg['lora']``: a peft adapter folder injected into the transformer.

    The UMT5-XXL text encoder (~5.7 B parameters, 23 GB in fp32) is NOT loaded here: only
    :func:`encode_prompt` loads it, in the model's dtype, and frees it after encoding, so a probe with
    ``text: random`` never holds it and a real prompt holds it only while encoding. It comes from
    ``model_cfg['text_encoder']`` when set (a local folder or ``hub:<id>``, a pipeline folder with
    ``text_encoder/`` + ``tokenizer/`` or a bare UMT5 folder with its tokenizer), else the pipeline's own."""
    from diffusers import WanTransformer3DModel

    src = source_of(model_cfg)
    is_dir = Path(src).is_dir()
    if is_dir and not (Path(src) / "transformer").is_dir():
        raise ModelLoadError(f"{src}: not a Wan pipeline folder (no transformer/ subfolder) ({config_field(model_cfg)})")
    with loading("the Wan transformer", src, config_field(model_cfg)):
        transformer = WanTransformer3DModel.from_pretrained(src, subfolder="transformer", torch_dtype=dtype)
    ckpt = model_cfg.get("checkpoint")
    used = None
    if ckpt:
        use_ema = model_cfg.get("use_ema")
        from layerscope.hub import local_file

        ckpt = local_file(str(ckpt), config_field(model_cfg, "checkpoint"))
        used = load_self_forcing_checkpoint(transformer, ckpt, use_ema=None if use_ema is None else bool(use_ema),
                                            field=config_field(model_cfg, "checkpoint"))
        transformer.to(dtype)
    if model_cfg.get("lora"):
        lora.apply_adapter(transformer, str(model_cfg["lora"]), config_field(model_cfg, "lora"))
    transformer.to(device).eval()  # dtype came from from_pretrained (keeps its fp32 modules)
    te = model_cfg.get("text_encoder")
    if te:
        te = str(te)
        if te.startswith("hub:"):
            from layerscope.hub import local_snapshot

            text_source = local_snapshot(te[4:], model_cfg.get("text_encoder_revision"), config_field(model_cfg, "text_encoder"))
        else:
            text_source = te
        text_field = config_field(model_cfg, "text_encoder")
    else:
        text_source, text_field = src, config_field(model_cfg)
    return WanBundle(transformer, None, None, src, str(ckpt) if ckpt else None, text_source, text_field, dtype, used)


def load_text_encoder(bundle: WanBundle, device: torch.device) -> None:
    """Load UMT5 + tokenizer into the bundle (in the bundle's dtype) from ``bundle.text_source``."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    root = Path(str(bundle.text_source))
    if root.is_dir() and (root / "text_encoder").is_dir():
        enc_dir, tok_dir = root / "text_encoder", root / "tokenizer"
    else:
        enc_dir, tok_dir = root, root
    if not enc_dir.is_dir():
        raise ModelLoadError(f"{bundle.text_field}: {root} has no text_encoder/ (and is not a UMT5 folder): "
                             f"set the model's text_encoder: or use the probe's text: random")
    with loading("the Wan text encoder and tokenizer", root, bundle.text_field):
        bundle.text_encoder = UMT5EncoderModel.from_pretrained(str(enc_dir), torch_dtype=bundle.text_dtype).to(device).eval()
        bundle.tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))


def free_text_encoder(bundle: WanBundle) -> None:
    """Drop UMT5 once prompts are encoded: generation needs only the transformer."""
    bundle.text_encoder = None
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def basic_clean(text: str) -> str:
    """As diffusers' Wan pipeline: ftfy's fix_text when ftfy is installed, HTML unescaped twice."""
    import html

    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    return html.unescape(html.unescape(text)).strip()


def whitespace_clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def prompt_clean(text: str) -> str:
    """The prompt cleaning of diffusers' ``WanPipeline`` (whitespace_clean(basic_clean(text))): the
    real text encoder must see the same tokens the pipeline would give it."""
    return whitespace_clean(basic_clean(text))


@torch.no_grad()
def encode_prompt(bundle: WanBundle, prompts: Sequence[str], max_sequence_length: int, device: torch.device,
                  dtype: torch.dtype, free: bool = True) -> torch.Tensor:
    """UMT5 prompt embeddings exactly as ``WanPipeline._get_t5_prompt_embeds``: clean the prompts
    (:func:`prompt_clean`), encode with the padding mask, keep each prompt's real tokens, zero-pad to
    ``max_sequence_length``.  Shape (B, L, text_dim). Loads the text encoder if the bundle has none
    and (``free``) drops it afterwards."""
    if bundle.text_encoder is None or bundle.tokenizer is None:
        if bundle.text_source is None:
            raise ModelLoadError(f"{bundle.source}: no text_encoder/ and tokenizer/ to encode prompts")
        load_text_encoder(bundle, device)
    prompts = [prompt_clean(p) for p in prompts]
    tok = bundle.tokenizer(list(prompts), padding="max_length", max_length=max_sequence_length, truncation=True,
                           add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    ids, mask = tok.input_ids.to(device), tok.attention_mask.to(device)
    seq_lens = mask.gt(0).sum(dim=1).long()
    hidden = bundle.text_encoder(ids, mask).last_hidden_state.to(dtype)
    out = torch.zeros_like(hidden)
    for i, n in enumerate(seq_lens.tolist()):
        out[i, :n] = hidden[i, :n]
    if free:
        free_text_encoder(bundle)
    return out


# The causal attention, the checkpoint conversion and the sampler live in their own modules; the
# family module re-exports them so ``from layerscope.models import wan; wan.generate(...)`` reads
# as one family.
from layerscope.models.wan_attention import (  # noqa: E402
    CaptureRequest, CausalState, CausalWanAttnProcessor, FrameReducer, FullLogitsSink, KVCache,
    attention_logits_chunks, block_causal_mask, install_causal_processors, restore_processors, rope_for_frames)
from layerscope.models.wan_checkpoint import (  # noqa: E402
    convert_diffusers_to_original, convert_original_to_diffusers, load_self_forcing_checkpoint)
from layerscope.models.wan_sampler import GenerationConfig, generate, self_forcing_sigmas  # noqa: E402
