"""dinov3_channels: the note's method (one process, one pass over the data, count/mean/std/max_abs
per channel) vs the probe's accumulator (moments + magnitude histogram + top-k, mergeable) on the
same forwards.

    PYTHONPATH=src python benchmarks/bench_dinov3_channels.py [--arch vitb16|vitl16] [--batches 4] [--batch 4]

Design note 004's script runs one forward per batch with every layer's output and accumulates,
per (layer, representation, role), count, mean, std and max|x| on the device; it never shards.
The probe accumulates more (histograms, top-k with image/token ids, non-finite counts) and writes
mergeable partials, so the ratio here is the price of that, not a speed-up.  Each method runs the
model forward itself: the comparison is end to end per pass.  Means are checked equal.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from benchlib import compare, machine, report  # noqa: E402

ARCHS = {
    "vitb16": dict(num_hidden_layers=12, hidden_size=768, intermediate_size=3072, num_attention_heads=12),
    "vitl16": dict(num_hidden_layers=24, hidden_size=1024, intermediate_size=4096, num_attention_heads=16),
    "small": dict(num_hidden_layers=6, hidden_size=192, intermediate_size=768, num_attention_heads=3),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", choices=list(ARCHS), default="vitb16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    import numpy as np
    import torch
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    from layerscope.models.dinov3 import final_norms
    from layerscope.probes.dinov3_channels import ChannelAccumulator

    torch.set_num_threads(1)
    dev = torch.device(args.device)
    dt = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    cfg = DINOv3ViTConfig(**ARCHS[args.arch], num_register_tokens=4, patch_size=16, image_size=args.size)
    with torch.device(dev):
        model = DINOv3ViTModel(cfg).to(dt).eval()
    cls_norm, patch_norm = final_norms(model)
    C, R, L = cfg.hidden_size, cfg.num_register_tokens, cfg.num_hidden_layers
    data = [torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(i)).to(dev, dt)
            for i in range(args.batches)]

    def note_method():
        ln = torch.nn.LayerNorm(C, elementwise_affine=False, eps=cfg.layer_norm_eps).to(dev)
        acc: dict = {}
        with torch.inference_mode():
            for x in data:
                hs = model(pixel_values=x, output_hidden_states=True).hidden_states
                for i in range(L):
                    out = hs[i + 1]
                    reps = {"pre": out, "per_layer_ln": ln(out.float()).to(out.dtype),
                            "global_ln": torch.cat([cls_norm(out[:, :1]), patch_norm(out[:, 1:])], 1)}
                    for rep, y in reps.items():
                        for role, t in (("cls", y[:, 0]), ("patch", y[:, 1 + R:].reshape(-1, C))):
                            t = t.double()
                            n, s, q, m = acc.get((i, rep, role), (0, 0.0, 0.0, None))
                            mx = t.abs().amax(0)
                            acc[(i, rep, role)] = (n + t.shape[0], s + t.sum(0), q + (t * t).sum(0), mx if m is None else torch.maximum(m, mx))
        return {k: (s / n).cpu().numpy() for k, (n, s, q, m) in acc.items()}

    def probe_way():
        a = ChannelAccumulator(list(range(L)), C, R, 8, cls_norm, patch_norm, cfg.layer_norm_eps)
        with torch.inference_mode():
            for j, x in enumerate(data):
                hs = model(pixel_values=x, output_hidden_states=True).hidden_states
                a.update(hs, np.arange(j * args.batch, (j + 1) * args.batch, dtype=np.int64))
        return a

    res = compare(note_method, probe_way, args.reps, args.device)
    from layerscope.probes.dinov3_channels import hook_name

    acc = res["probe_out"]
    diff = max(float(np.abs(res["note_out"][(i, rep, role)] - np.asarray(acc.stats[(hook_name(i, rep), role)][0].mean)).max())
               for i in range(L) for rep in ("pre", "per_layer_ln") for role in ("cls", "patch"))
    n_img = args.batch * args.batches
    print(f"== DINOv3 {args.arch} ({L} layers x {C}), {args.size} px, {n_img} images in {args.batches} batches, {args.dtype}; "
          f"machine: {machine(args.device)}")
    print(f"{'method':<60}{'s (median)':>12}{'peak MB':>10}{'images/s':>10}")
    print(f"{'note: one pass, count/mean/std/max_abs':<60}{res['note_s']:>12.3f}{res['note_peak_mb']:>10.0f}{n_img / res['note_s']:>10.1f}")
    print(f"{'probe: one pass, mergeable moments + histogram + top-k':<60}{res['probe_s']:>12.3f}{res['probe_peak_mb']:>10.0f}{n_img / res['probe_s']:>10.1f}")
    print(f"max |mean difference| (pre, per_layer_ln): {diff:.2e}")
    report("dinov3_channels", f"{args.arch} {args.size} px, {n_img} images", res, args.device, items=n_img, item="images", max_mean_diff=diff)


if __name__ == "__main__":
    main()
