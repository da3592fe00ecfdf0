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

Pieces
------
* :class:`CausalWanAttnProcessor` - the stock Wan self-attention (projections, RMS q/k norms, RoPE,
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
* :func:`generate` - the block-wise autoregressive loop (cache or recompute), Self-Forcing's shifted
  timesteps [1000, 750, 500, 250] and flow-matching x0 prediction.
* Checkpoints: :func:`convert_original_to_diffusers` maps original Wan / Self-Forcing key names
  (``blocks.N.self_attn.q.weight``...) to diffusers names; :func:`convert_diffusers_to_original` is its
  inverse (used for the round-trip test and to write Self-Forcing-style checkpoints of tiny models).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from layerscope.models import ModelLoadError, config_field, loading, source_of

__all__ = [
    "TINY_ARCHS", "build_tiny", "load", "WanBundle", "encode_prompt", "prompt_clean", "load_text_encoder", "convert_original_to_diffusers",
    "convert_diffusers_to_original", "load_self_forcing_checkpoint", "CausalState", "KVCache",
    "CausalWanAttnProcessor", "install_causal_processors", "restore_processors", "rope_for_frames",
    "FrameReducer", "FullLogitsSink", "CaptureRequest", "GenerationConfig", "generate", "self_forcing_sigmas",
    "attention_logits_chunks",
]

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
        _apply_lora(transformer, str(model_cfg["lora"]), config_field(model_cfg, "lora"))
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


def _apply_lora(model: torch.nn.Module, lora_dir: str, field: str = "models.*.lora") -> None:
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    d = Path(lora_dir)
    cfg_file, w_file = d / "adapter_config.json", d / "adapter_model.safetensors"
    if not cfg_file.is_file() or not w_file.is_file():
        raise ModelLoadError(f"lora {d}: expected adapter_config.json and adapter_model.safetensors")
    with loading("the LoRA adapter", d, field):
        cfg = json.loads(cfg_file.read_text())
        keep = {k: v for k, v in cfg.items() if k in LoraConfig.__dataclass_fields__}
        inject_adapter_in_model(LoraConfig(**keep), model)
        res = set_peft_model_state_dict(model, load_file(str(w_file)))
    if getattr(res, "unexpected_keys", None):
        raise ModelLoadError(f"lora {d}: weights do not match the model ({res.unexpected_keys[:3]} ...)")


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


# ---------------------------------------------------------------------------------------------
# original Wan / Self-Forcing key names <-> diffusers names
# ---------------------------------------------------------------------------------------------

# (original, diffusers) key templates, {i} a block index and {p} weight|bias; both directions of
# the conversion are built from this one list, so they cannot drift apart. Keys are matched with
# any wrapper prefix removed.
_ATTN = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0", "norm_q": "norm_q", "norm_k": "norm_k",
         "k_img": "add_k_proj", "v_img": "add_v_proj", "norm_k_img": "norm_added_k"}
_KEYS: list[tuple[str, str]] = [
    ("patch_embedding.{p}", "patch_embedding.{p}"),
    ("text_embedding.0.{p}", "condition_embedder.text_embedder.linear_1.{p}"),
    ("text_embedding.2.{p}", "condition_embedder.text_embedder.linear_2.{p}"),
    ("time_embedding.0.{p}", "condition_embedder.time_embedder.linear_1.{p}"),
    ("time_embedding.2.{p}", "condition_embedder.time_embedder.linear_2.{p}"),
    ("time_projection.1.{p}", "condition_embedder.time_proj.{p}"),
    ("head.head.{p}", "proj_out.{p}"),
    ("head.modulation", "scale_shift_table"),
    ("blocks.{i}.modulation", "blocks.{i}.scale_shift_table"),
    # original norm3 is the (affine) norm before cross-attention: diffusers calls it norm2
    ("blocks.{i}.norm3.{p}", "blocks.{i}.norm2.{p}"),
    ("blocks.{i}.ffn.0.{p}", "blocks.{i}.ffn.net.0.proj.{p}"),
    ("blocks.{i}.ffn.2.{p}", "blocks.{i}.ffn.net.2.{p}"),
    ("img_emb.proj.0.{p}", "condition_embedder.image_embedder.norm1.{p}"),
    ("img_emb.proj.1.{p}", "condition_embedder.image_embedder.ff.net.0.proj.{p}"),
    ("img_emb.proj.3.{p}", "condition_embedder.image_embedder.ff.net.2.{p}"),
    ("img_emb.proj.4.{p}", "condition_embedder.image_embedder.norm2.{p}"),
] + [(f"blocks.{{i}}.{orig}.{name}.{{p}}", f"blocks.{{i}}.{new}.{tgt}.{{p}}")
     for orig, new in (("self_attn", "attn1"), ("cross_attn", "attn2")) for name, tgt in _ATTN.items()]
_GROUPS = {"i": r"(\d+)", "p": r"(weight|bias)"}


def _table(to_diffusers: bool) -> list[tuple[re.Pattern[str], str]]:
    """(regex, replacement) per key template pair, in one direction."""
    table = []
    for orig, diff in _KEYS:
        src, dst = (orig, diff) if to_diffusers else (diff, orig)
        parts = re.split(r"\{(\w)\}", src)  # literal, name, literal, name, ..., literal
        names = parts[1::2]
        pattern = "".join(re.escape(x) if j % 2 == 0 else _GROUPS[x] for j, x in enumerate(parts))
        repl = re.sub(r"\{(\w)\}", lambda m: "\\" + str(names.index(m.group(1)) + 1), dst)
        table.append((re.compile(f"^{pattern}$"), repl))
    return table


_O2D, _D2O = _table(True), _table(False)

# wrappers around the original model's keys: Self-Forcing's WanDiffusionWrapper ('model.'), ComfyUI
# ('model.diffusion_model.'), FSDP and torch.compile.
_WRAPPERS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def _strip_wrappers(key: str) -> str:
    for w in _WRAPPERS:
        key = key.replace(w, "")
    for prefix in ("model.diffusion_model.", "model."):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _rename(sd: Mapping[str, torch.Tensor], table: list[tuple[re.Pattern[str], str]], what: str,
            pre: Callable[[str], str] = lambda k: k) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in sd.items():
        k = pre(key)
        for pat, tmpl in table:
            if pat.match(k):
                out[pat.sub(tmpl, k)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ModelLoadError(f"{what}: {len(unknown)} keys have no mapping, e.g. {unknown[:3]}")
    return out


def convert_original_to_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original Wan2.1 (and Self-Forcing ``generator``) transformer keys -> diffusers
    ``WanTransformer3DModel`` keys.  The same mapping as diffusers' ``convert_wan_transformer_to_diffusers``
    (norm2/norm3 swap, ``ffn.0`` -> ``ffn.net.0.proj``, ``self_attn.o`` -> ``attn1.to_out.0``...), written as
    anchored patterns so an unexpected key is an error instead of a silent pass-through."""
    return _rename(sd, _O2D, "original Wan state dict", pre=_strip_wrappers)


def convert_diffusers_to_original(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`convert_original_to_diffusers` (without wrapper prefixes)."""
    return _rename(sd, _D2O, "diffusers Wan state dict")


def load_self_forcing_checkpoint(transformer: torch.nn.Module, path: str | Path, use_ema: bool | None = True,
                                 field: str = "models.<name>.checkpoint") -> str | None:
    """Load ``generator_ema`` (or ``generator``) of a Self-Forcing-style checkpoint into a diffusers transformer.

    Accepts a ``.pt`` dict of state dicts, a bare original-key state dict, or a ``.safetensors`` file.
    ``use_ema``: True / False ask for that state dict (its absence is an error: an explicit request is
    never silently substituted); None takes ``generator_ema`` when present, else ``generator``.
    The log says which was used; the key is returned (None for a bare state dict).
    Every transformer parameter must be covered (strict load): a partial checkpoint is an error."""
    import logging

    p = Path(path)
    if not p.is_file():
        raise ModelLoadError(f"checkpoint {p} does not exist ({field})")
    with loading("the Self-Forcing checkpoint", p, field):
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Mapping[str, Any] = load_file(str(p))
        else:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
    used = None
    if isinstance(sd, Mapping) and any(k in sd for k in ("generator", "generator_ema")):
        if use_ema is None:
            used = "generator_ema" if "generator_ema" in sd else "generator"
        else:
            used = "generator_ema" if use_ema else "generator"
            if used not in sd:
                raise ModelLoadError(f"checkpoint {p}: no '{used}' state dict (has {sorted(k for k in sd if isinstance(sd[k], Mapping))}); "
                                     f"set {field.rsplit('.', 1)[0]}.use_ema accordingly (null: whichever is there)")
        sd = sd[used]
    logging.getLogger("layerscope.wan").info("Self-Forcing checkpoint %s: loaded %s", p,
                                             used or "a bare state dict")
    conv = convert_original_to_diffusers({k: v for k, v in sd.items() if not k.endswith("freqs")})
    res = transformer.load_state_dict(conv, strict=False)
    if res.missing_keys or res.unexpected_keys:
        raise ModelLoadError(f"checkpoint {p}: does not match the transformer (missing {res.missing_keys[:3]}, "
                             f"unexpected {res.unexpected_keys[:3]}) ({field})")
    return used


# ---------------------------------------------------------------------------------------------
# block-causal attention processor with KV cache and logit capture
# ---------------------------------------------------------------------------------------------


@dataclass
class KVCache:
    """One layer's post-RoPE keys and values for the whole video, [B, tokens, heads, head_dim]."""

    k: torch.Tensor
    v: torch.Tensor


@dataclass
class CaptureRequest:
    """Which attention calls to capture: ``layers`` (0-based blocks) for every pass whose
    (chunk, step) is in ``passes`` (step: int denoising index or 'clean').  ``sinks_for(layer, geometry)``
    returns the sinks that receive the query-chunked logits of one call."""

    layers: frozenset[int]
    passes: frozenset[tuple[int, int | str]]
    sinks_for: Callable[[int, dict[str, Any]], list[Any]]
    query_chunk: int = 1024


@dataclass
class CausalState:
    """Shared by every block's processor; set by :func:`generate` before each transformer call."""

    mode: str = "cache"  # 'cache' | 'mask'
    block_frames: int = 3  # latent frames per chunk
    frame_seq_length: int = 0  # tokens per latent frame (post patchify)
    start_frame: int = 0  # first frame of the current call's *chunk* (queries in cache mode)
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None  # RoPE override for cache mode (offset positions)
    caches: dict[int, KVCache] = field(default_factory=dict)
    capture: CaptureRequest | None = None
    current: tuple[int, int | str] | None = None  # (chunk, step) of the running pass
    mask: torch.Tensor | None = None  # block-causal mask for 'mask' mode, [Lq, Lk] bool
    extra: dict[str, Any] = field(default_factory=dict)  # timestep value of the pass etc.


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # identical to diffusers' WanAttnProcessor.apply_rotary_emb
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def rope_for_frames(rope: torch.nn.Module, start_frame: int, num_frames: int, pph: int, ppw: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Wan RoPE (cos, sin) for latent frames ``[start_frame, start_frame + num_frames)`` of a (pph x ppw)
    patch grid: the rows the full video's RoPE would give these tokens (Self-Forcing's causal_rope_apply)."""
    end = start_frame + num_frames
    if end > rope.max_seq_len or max(pph, ppw) > rope.max_seq_len:
        raise ValueError(f"RoPE table has {rope.max_seq_len} positions; frames up to {end} and a {pph}x{ppw} grid need more "
                         f"(rope_max_seq_len of the transformer)")
    split = [rope.t_dim, rope.h_dim, rope.w_dim]
    out = []
    for table in (rope.freqs_cos, rope.freqs_sin):
        ft, fh, fw = table.split(split, dim=1)
        parts = [ft[start_frame:end].view(num_frames, 1, 1, -1).expand(num_frames, pph, ppw, -1),
                 fh[:pph].view(1, pph, 1, -1).expand(num_frames, pph, ppw, -1),
                 fw[:ppw].view(1, 1, ppw, -1).expand(num_frames, pph, ppw, -1)]
        out.append(torch.cat(parts, dim=-1).reshape(1, num_frames * pph * ppw, 1, -1))
    return out[0], out[1]


def block_causal_mask(num_frames: int, block_frames: int, frame_seq_length: int, device: torch.device) -> torch.Tensor:
    """[L, L] bool, True where query token i may attend key token j: chunk(j) <= chunk(i)."""
    chunk = torch.arange(num_frames, device=device).repeat_interleave(frame_seq_length) // block_frames
    return chunk[None, :] <= chunk[:, None]


def attention_logits_chunks(q: torch.Tensor, k: torch.Tensor, query_chunk: int) -> Iterable[tuple[int, torch.Tensor]]:
    """Yield (query offset, logits) with logits = q k^T / sqrt(d) in float32, [B, H, qc, K].

    q: [B, Q, H, D], k: [B, K, H, D] (diffusers' layout); the scale is SDPA's default 1/sqrt(D), the one
    the Wan processor uses."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    kt = k.float().permute(0, 2, 3, 1)  # [B, H, D, K]
    qh = q.float().transpose(1, 2)  # [B, H, Q, D]
    for i in range(0, qh.shape[2], query_chunk):
        yield i, torch.matmul(qh[:, :, i:i + query_chunk], kt) * scale


class FrameReducer:
    """Per (head, query frame, key frame) sums of logits and of softmax mass, accumulated on the device.

    For every query token the softmax is taken over ALL its keys; the probabilities are then summed per key
    frame.  Sums are over batch and query tokens (and, for logits, key tokens), so shards of different seeds
    add exactly; means are ``logit_sum / (query_tokens * key_tokens_per_frame)`` and
    ``mass_sum / query_tokens``."""

    def __init__(self, heads: int, n_query_frames: int, n_key_frames: int, frame_seq_length: int, device: torch.device):
        self.fsl = frame_seq_length
        self.nqf, self.nkf = n_query_frames, n_key_frames
        self.logit_sum = torch.zeros(heads, n_query_frames, n_key_frames, dtype=torch.float64, device=device)
        self.mass_sum = torch.zeros_like(self.logit_sum)
        self.logit_max = torch.full_like(self.logit_sum, -math.inf)
        self.query_tokens = torch.zeros(n_query_frames, dtype=torch.int64, device=device)
        self.nonfinite = torch.zeros(heads, dtype=torch.int64, device=device)

    def __call__(self, q_offset: int, logits: torch.Tensor) -> None:
        b, h, qc, kk = logits.shape
        if kk != self.nkf * self.fsl:
            raise ValueError(f"key length {kk} is not {self.nkf} frames x {self.fsl} tokens")
        qf = (q_offset + torch.arange(qc, device=logits.device)) // self.fsl
        per_frame = logits.view(b, h, qc, self.nkf, self.fsl)
        lsum = per_frame.sum(-1).sum(0)  # [H, qc, KF]
        lmax = per_frame.amax(-1).amax(0)
        mass = torch.softmax(logits, dim=-1).view(b, h, qc, self.nkf, self.fsl).sum(-1).sum(0)
        self.logit_sum.index_add_(1, qf, lsum.double())
        self.mass_sum.index_add_(1, qf, mass.double())
        self.logit_max.scatter_reduce_(1, qf.view(1, qc, 1).expand(h, qc, self.nkf), lmax.double(), reduce="amax")
        self.query_tokens.index_add_(0, qf, torch.full_like(qf, b))
        self.nonfinite += (~torch.isfinite(logits)).sum(dim=(0, 2, 3))

    def arrays(self) -> dict[str, Any]:
        return {"logit_sum": self.logit_sum.cpu().numpy(), "mass_sum": self.mass_sum.cpu().numpy(),
                "logit_max": self.logit_max.cpu().numpy(), "query_tokens": self.query_tokens.cpu().numpy(),
                "key_tokens_per_frame": self.fsl, "nonfinite": self.nonfinite.cpu().numpy()}


class FullLogitsSink:
    """Write each query chunk of logits into ``target[:, :, q0:q1, :]`` (a numpy array, an h5py dataset...)."""

    def __init__(self, target: Any, dtype: Any = None):
        self.target = target
        self.dtype = dtype

    def __call__(self, q_offset: int, logits: torch.Tensor) -> None:
        arr = logits.detach().cpu().numpy()
        if self.dtype is not None:
            arr = arr.astype(self.dtype)
        self.target[:, :, q_offset:q_offset + arr.shape[2], :] = arr


class CausalWanAttnProcessor:
    """Wan self-attention (``attn1``) with block-causal KV-cache / mask modes and logit capture.

    The math up to SDPA is diffusers' ``WanAttnProcessor`` line for line (fused or separate projections,
    ``norm_q``/``norm_k`` across heads, interleaved RoPE), so with the cache of earlier chunks the output equals
    the stock processor's on the same tokens.  Only for self-attention (no image-conditioning keys)."""

    def __init__(self, layer: int, state: CausalState):
        self.layer = layer
        self.state = state

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if encoder_hidden_states is not None or attn.add_k_proj is not None:
            raise ValueError("CausalWanAttnProcessor is for self-attention (attn1) only")
        from diffusers.models.transformers.transformer_wan import _get_qkv_projections

        st = self.state
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        rot = st.rotary if st.mode == "cache" and st.rotary is not None else rotary_emb
        if rot is not None:
            query, key = _apply_rotary(query, *rot), _apply_rotary(key, *rot)

        fsl = st.frame_seq_length
        if st.mode == "cache":
            cache = st.caches[self.layer]
            s = st.start_frame * fsl
            e = s + query.shape[1]
            cache.k[:, s:e] = key
            cache.v[:, s:e] = value
            keys, values, mask = cache.k[:, :e], cache.v[:, :e], None
            q_frames = (st.start_frame, e // fsl)  # global frame indices of the queries
            cap_q = query
        elif st.mode == "mask":
            keys, values, mask = key, value, st.mask
            # capture the current chunk's queries; every key of frames < chunk end is visible to them
            e = (st.start_frame + st.block_frames) * fsl
            q_frames = (st.start_frame, st.start_frame + st.block_frames)
            cap_q = query[:, st.start_frame * fsl:e]
        else:
            raise ValueError(f"unknown causal mode {st.mode!r}")

        cap = st.capture
        if cap is not None and self.layer in cap.layers and st.current in cap.passes:
            self._capture(cap, cap_q, keys[:, :e], q_frames, attn.heads)

        from diffusers.models.attention_dispatch import dispatch_attention_fn

        out = dispatch_attention_fn(query, keys, values, attn_mask=mask, dropout_p=0.0, is_causal=False)
        out = out.flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)

    def _capture(self, cap: CaptureRequest, q: torch.Tensor, k: torch.Tensor, q_frames: tuple[int, int], heads: int) -> None:
        st = self.state
        nq = q_frames[1] - q_frames[0]
        # geometry inferred from the shapes, as the design note does, and checked against the patch grid
        fsl = q.shape[1] // nq
        if fsl * nq != q.shape[1] or k.shape[1] % fsl or fsl != st.frame_seq_length:
            raise RuntimeError(f"layer {self.layer}: cannot infer frame geometry from Q={q.shape[1]}, K={k.shape[1]}, "
                               f"{nq} query frames (expected {st.frame_seq_length} tokens per frame)")
        nk = k.shape[1] // fsl
        chunk, step = st.current  # type: ignore[misc]
        geometry = {
            "layer": self.layer, "chunk": chunk, "step": step, "timestep": st.extra.get("timestep"),
            "frame_seq_length": fsl, "num_query_frames": nq, "num_key_frames": nk,
            "query_frames": list(range(q_frames[0], q_frames[1])), "key_frames": list(range(nk)),
            "q_len": int(q.shape[1]), "k_len": int(k.shape[1]), "heads": heads, "head_dim": int(q.shape[-1]),
            "batch": int(q.shape[0]), "scale": 1.0 / math.sqrt(q.shape[-1]), "is_logits": True,
            "block_frames": st.block_frames, "mode": st.mode,
        }
        sinks = cap.sinks_for(self.layer, geometry)
        for off, logits in attention_logits_chunks(q, k, cap.query_chunk):
            for sink in sinks:
                sink(off, logits)


def install_causal_processors(transformer: Any, state: CausalState) -> dict[str, Any]:
    """Set a :class:`CausalWanAttnProcessor` on every block's ``attn1``; returns the old processors."""
    old = {}
    for i, block in enumerate(transformer.blocks):
        old[f"blocks.{i}.attn1"] = block.attn1.processor
        block.attn1.set_processor(CausalWanAttnProcessor(i, state))
    return old


def restore_processors(transformer: Any, old: Mapping[str, Any]) -> None:
    for i, block in enumerate(transformer.blocks):
        block.attn1.set_processor(old[f"blocks.{i}.attn1"])


# ---------------------------------------------------------------------------------------------
# Self-Forcing-style block-wise generation
# ---------------------------------------------------------------------------------------------


def self_forcing_sigmas(denoising_steps: Sequence[int], shift: float, num_train_timesteps: int = 1000) -> list[float]:
    """Self-Forcing's ``warp_denoising_step``: the raw steps index its shifted 1000-step flow-matching table
    (sigmas linspace(1, 0, 1001)[:-1], then shift*s/(1+(shift-1)*s)); 1000 -> 1.0, 750 -> 0.9375 at shift 5.
    The model is called with timestep = sigma * 1000."""
    out = []
    for t in denoising_steps:
        if not 0 < int(t) <= num_train_timesteps:
            raise ValueError(f"denoising step {t} outside (0, {num_train_timesteps}] (probes.wan_logits.denoising_steps)")
        s = int(t) / num_train_timesteps
        out.append(shift * s / (1 + (shift - 1) * s))
    return out


@dataclass
class GenerationConfig:
    num_frames: int = 21
    block_frames: int = 3
    denoising_steps: tuple[int, ...] = (1000, 750, 500, 250)
    shift: float = 5.0
    context_noise: int = 0  # timestep of the pass that writes clean K/V (Self-Forcing: 0)
    num_train_timesteps: int = 1000


def _call(transformer: Any, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    return transformer(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]


@torch.no_grad()
def generate(transformer: Any, text: torch.Tensor, noise: torch.Tensor, cfg: GenerationConfig, mode: str = "cache",
             capture: CaptureRequest | None = None, step_noise: torch.Generator | None = None,
             step_noise_seed: int = 0) -> torch.Tensor:
    """Block-wise autoregressive generation; returns clean latents [B, C, F, H, W].

    ``mode='cache'``: each pass sees one chunk, earlier chunks come from the KV cache written by the
    clean-context pass.  ``mode='mask'`` (reference / full recompute): each pass runs the clean latents of all
    earlier chunks (at the context timestep, per token) plus the current chunk under a block-causal mask; the
    clean-context pass is only run when it is to be captured, since nothing reads its output.  Noise between
    denoising steps is drawn from a CPU generator seeded with ``step_noise_seed`` in the same order in both
    modes, so they produce the same video."""
    b, c, f, h, w = noise.shape
    p_t, p_h, p_w = transformer.config.patch_size
    if p_t != 1:
        raise ValueError("block-causal Wan needs temporal patch size 1")
    if f != cfg.num_frames or f % cfg.block_frames:
        raise ValueError(f"num_frames {f} must equal the config's {cfg.num_frames} and be a multiple of "
                         f"num_frame_per_block {cfg.block_frames} (probes.wan_logits.num_frames)")
    if h % p_h or w % p_w:
        raise ValueError(f"latent size {h}x{w} is not divisible by the patch size {p_h}x{p_w} (probes.wan_logits.latent_size)")
    pph, ppw = h // p_h, w // p_w
    fsl = pph * ppw
    n_chunks = f // cfg.block_frames
    sigmas = self_forcing_sigmas(cfg.denoising_steps, cfg.shift, cfg.num_train_timesteps)
    device, dtype = noise.device, noise.dtype
    gen = step_noise or torch.Generator("cpu").manual_seed(step_noise_seed)
    heads = transformer.config.num_attention_heads
    hd = transformer.config.attention_head_dim

    state = CausalState(mode=mode, block_frames=cfg.block_frames, frame_seq_length=fsl, capture=capture)
    if mode == "cache":
        for i in range(len(transformer.blocks)):
            z = torch.zeros(b, f * fsl, heads, hd, device=device, dtype=dtype)
            state.caches[i] = KVCache(z, z.clone())
    old = install_causal_processors(transformer, state)
    out = torch.zeros_like(noise)
    try:
        for ci in range(n_chunks):
            f0, f1 = ci * cfg.block_frames, (ci + 1) * cfg.block_frames
            state.start_frame = f0
            if mode == "cache":
                state.rotary = rope_for_frames(transformer.rope, f0, cfg.block_frames, pph, ppw)
            else:
                state.mask = block_causal_mask(f1, cfg.block_frames, fsl, device)

            def run(x_chunk: torch.Tensor, t_value: float, step: int | str) -> torch.Tensor:
                state.current = (ci, step)
                state.extra["timestep"] = float(t_value)
                if mode == "cache":
                    t = torch.full((b,), t_value, device=device, dtype=torch.float32)
                    return _call(transformer, x_chunk, t, text)
                x = torch.cat([out[:, :, :f0], x_chunk], dim=2)
                t = torch.full((b, f1 * fsl), float(cfg.context_noise), device=device, dtype=torch.float32)
                t[:, f0 * fsl:] = t_value
                return _call(transformer, x, t, text)[:, :, f0:]

            x = noise[:, :, f0:f1]
            for si, sigma in enumerate(sigmas):
                flow = run(x, sigma * cfg.num_train_timesteps, si)
                x0 = (x.double() - sigma * flow.double()).to(dtype)  # flow prediction -> x0 (Self-Forcing)
                if si + 1 < len(sigmas):
                    eps = torch.randn(x0.shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
                    s_next = sigmas[si + 1]
                    x = ((1 - s_next) * x0.double() + s_next * eps.double()).to(dtype)
                else:
                    x = x0
            out[:, :, f0:f1] = x
            if mode == "cache" or (capture is not None and (ci, "clean") in capture.passes):
                run(x, float(cfg.context_noise), "clean")
    finally:
        restore_processors(transformer, old)
    return out
