"""Training at real size: what gradient checkpointing, bf16 autocast and the optimizer choice save.

An SD3-medium-geometry MMDiT block stack (width 1536, 24 heads of 64, joint attention over 4096-d
T5 features, 16 latent channels, patch 2) cut to ``--blocks`` blocks (random weights, CPU), one
training step at a ``--latent``^2 latent (512 px: 64) with the 77 + 256 token text sequence:

* activation memory kept for the backward pass, measured exactly as the bytes of every tensor
  autograd saves (``torch.autograd.graph.saved_tensors_hooks``), per block; the full model is
  ``per-block x 24`` (SD3-medium has 24 blocks);
* step time (min of ``--repeat``) with and without checkpointing;
* optimizer state bytes per trainable weight (AdamW fp32: 8; bitsandbytes 8-bit AdamW: 2),
  scaled to SD3-medium's 2.03 B transformer weights.

    python benchmarks/bench_training_memory.py [--blocks 2] [--latent 64] [--repeat 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

SD3_MEDIUM_PARAMS = 2.03e9
SD3_MEDIUM_BLOCKS = 24


def build(blocks: int) -> torch.nn.Module:
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=blocks,
                                 attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                                 caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192)


def step(tr: torch.nn.Module, latent: int, ckpt: bool, bf16: bool) -> tuple[int, float]:
    if ckpt:
        tr.enable_gradient_checkpointing()
    else:
        tr.disable_gradient_checkpointing()
    tr.train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, latent, latent, generator=g)
    txt = torch.randn(1, 77 + 256, 4096, generator=g)
    pooled = torch.randn(1, 2048, generator=g)
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel() * t.element_size()
        return t

    tr.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = tr(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=txt, pooled_projections=pooled,
                 return_dict=False)[0]
    out.float().pow(2).mean().backward()
    return saved[0], time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--latent", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    tr = build(a.blocks)
    n_params = sum(p.numel() for p in tr.parameters())
    rows = []
    for name, ckpt, bf16 in (("fp32", False, False), ("fp32 + checkpointing", True, False),
                             ("bf16 autocast", False, True), ("bf16 + checkpointing", True, True)):
        runs = [step(tr, a.latent, ckpt, bf16) for _ in range(a.repeat)]
        rows.append((name, runs[0][0], min(r[1] for r in runs)))
    # the 1-block difference gives the per-block share (embedders and the final layer excluded)
    print(f"SD3-medium geometry, {a.blocks} blocks ({n_params / 1e6:.0f} M weights), latent {a.latent}x{a.latent}, "
          f"{(a.latent // 2) ** 2} image + 333 text tokens, CPU, {a.threads} thread(s)")
    print(f"{'setting':<24} {'saved act. MB':>14} {'x24 blocks GB':>14} {'step s':>8} {'act. ratio':>10} {'time ratio':>10}")
    base_b, base_t = rows[0][1], rows[0][2]
    for name, b, t in rows:
        print(f"{name:<24} {b / 2**20:>14.1f} {b / a.blocks * SD3_MEDIUM_BLOCKS / 2**30:>14.2f} {t:>8.2f} "
              f"{b / base_b:>10.3f} {t / base_t:>10.2f}")
    print()
    print(f"{'optimizer':<24} {'bytes/weight':>12} {'SD3-medium GB':>14}")
    for name, per in (("adamw (fp32 states)", 8, ), ("adamw8bit", 2)):
        print(f"{name:<24} {per:>12} {per * SD3_MEDIUM_PARAMS / 2**30:>14.1f}")
    print(f"fp32 weights + grads (full fine-tune): {8 * SD3_MEDIUM_PARAMS / 2**30:.1f} GB; "
          f"ratio adamw8bit / adamw states: {2 / 8:.2f}")


if __name__ == "__main__":
    main()
