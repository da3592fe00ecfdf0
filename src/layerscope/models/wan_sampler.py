"""The few-step Self-Forcing sampler for Wan: block-wise autoregressive generation with shifted
flow-matching timesteps, run through the causal attention of :mod:`layerscope.models.wan_attention`
(kept apart as diffusers keeps its schedulers apart from its models).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from layerscope.models.wan_attention import (CaptureRequest, CausalState, KVCache, block_causal_mask,
                                             install_causal_processors, restore_processors, rope_for_frames)

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
