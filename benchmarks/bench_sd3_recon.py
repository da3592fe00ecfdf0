"""Cost of the sd3_light text reconstruction per training step (forward + loss + backward).

Compares, on the same weights and batch: the plain diffusers forward with F.mse_loss; the sd3_light
path with gamma = 0 (must cost the same: no hooks); and gamma > 0 (two forward hooks plus one
token-wise MSE).  Prints a table of median step times and the ratios to plain.

    PYTHONPATH=src python benchmarks/bench_sd3_recon.py [--layers 4 24] [--device cpu|cuda] [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def build(layers: int, heads: int, head_dim: int, device: str):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    inner = heads * head_dim
    return SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=layers,
                                 attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=64,
                                 caption_projection_dim=inner, pooled_projection_dim=32).to(device).train()


def step_time(fn, repeats: int, device: str) -> float:
    times = []
    for i in range(repeats + 3):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 3:  # warm-up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    from layerscope.models.sd3_light import LightSD3Pipeline, compute_losses

    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 12])
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=93, help="text tokens (77 CLIP + T5 part)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = args.device
    print(f"device={dev} threads={args.threads} batch={args.batch} text_tokens={args.tokens} heads={args.heads}x{args.head_dim}")
    print(f"{'layers':>6} {'plain ms':>9} {'gamma=0 ms':>10} {'gamma>0 ms':>10} {'g0/plain':>8} {'g>0/plain':>9}")
    for L in args.layers:
        tr = build(L, args.heads, args.head_dim, dev)
        g = torch.Generator().manual_seed(1)
        x = dict(hidden_states=torch.randn(args.batch, 4, 16, 16, generator=g).to(dev),
                 timestep=torch.rand(args.batch, generator=g).mul(1000).to(dev),
                 encoder_hidden_states=torch.randn(args.batch, args.tokens, 64, generator=g).to(dev),
                 pooled_projections=torch.randn(args.batch, 32, generator=g).to(dev))
        target = torch.randn(args.batch, 4, 16, 16, generator=g).to(dev)
        tmask = torch.ones(args.batch, args.tokens, dtype=torch.bool, device=dev)

        def plain():
            tr.zero_grad(set_to_none=True)
            F.mse_loss(tr(**x, return_dict=False)[0].float(), target).backward()

        off = LightSD3Pipeline(tr, {"text_recon_gamma": 0.0})

        def g0():
            tr.zero_grad(set_to_none=True)
            compute_losses(off(**x), (target, None), 0.0).total.backward()

        t_plain = step_time(plain, args.repeats, dev)
        t_g0 = step_time(g0, args.repeats, dev)
        on = LightSD3Pipeline(tr, {"text_recon_gamma": 0.5, "text_recon_target_layer": 0})

        def g1():
            tr.zero_grad(set_to_none=True)
            compute_losses(on(**x), (target, None, tmask), 0.5).total.backward()

        t_g1 = step_time(g1, args.repeats, dev)
        on.close()
        print(f"{L:>6} {t_plain * 1e3:>9.2f} {t_g0 * 1e3:>10.2f} {t_g1 * 1e3:>10.2f} {t_g0 / t_plain:>8.3f} {t_g1 / t_plain:>9.3f}")


if __name__ == "__main__":
    main()
