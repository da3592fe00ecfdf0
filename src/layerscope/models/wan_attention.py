"""Block-causal Wan self-attention: the attention processor (diffusers' seam for changing how
attention is computed), its per-layer KV cache, and the capture of pre-softmax attention logits.

The transformer's ``forward`` is untouched: :func:`install_causal_processors` swaps every block's
``attn1`` processor for :class:`CausalWanAttnProcessor`, which runs the stock Wan self-attention in
``cache`` mode (one chunk, keys/values from the cache) or ``mask`` mode (the whole video under a
block-causal mask, the reference the cache is tested against). See :mod:`layerscope.models.wan`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn.functional as F

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
