"""Measured differences between the design notes' conventions (now the defaults) and the project's
earlier ones (now options), on the default study's tiny models and photographs.

Not a speed goal: it prints the numbers quoted in docs/seed-parity.md.

* note 001 - sd3_recon_train with the default study's settings (40 steps, batch 4, lr 1e-3,
  max_sequence_length 32, gamma 0 and 0.5, target 0, seed 0), trained once under the defaults
  (logit-normal sigma + shift, text MSE over all tokens) and once under the earlier conventions
  (uniform index into the shifted discrete schedule, text MSE over real tokens); and the loss
  formulas on one random batch with a latent mask (mean(l*w) vs sum(l*w)/sum(w), pseudo-Huber
  sqrt(d^2+c^2)-c vs 2c(...)).
* note 004 - dinov3_channels channel std with std_eps 1e-8 (default) vs 0 on the tiny DINOv3.

    PYTHONPATH=src python benchmarks/seed_parity.py [--steps 40]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch


def recon_runs(root: Path, steps: int) -> None:
    from layerscope.data import build_index, load_image, read_index
    from layerscope.models import build_tiny
    from layerscope.training import FineTuneConfig, encode_dataset, fine_tune, load_pipeline

    build_tiny("sd3", "default", 0, root / "sd3_tiny")
    index = build_index("photos", {"kind": "skimage"}, root / "photos" / "index.tsv")
    recs = read_index(index)
    base = dict(steps=steps, batch_size=4, learning_rate=1e-3, max_sequence_length=32)
    conventions = {"default (notes)": {}, "earlier (options)": {"timestep_sampling": "discrete", "ignore_padding": True}}
    print(f"sd3_recon_train, default study settings ({steps} steps, batch 4, lr 1e-3, target 0, seed 0)")
    print(f"{'gamma':>5} {'convention':<18} {'mean sigma':>10} {'denoise first':>13} {'denoise mean':>12} "
          f"{'denoise last5':>13} {'recon mean':>10} {'recon last5':>11} {'tokens/step':>11}")
    out = {}
    for gamma in (0.0, 0.5):
        for name, extra in conventions.items():
            pipe = load_pipeline({"kind": "path", "path": str(root / "sd3_tiny")}, torch.device("cpu"))
            size = int(pipe.transformer.config.sample_size) * int(pipe.vae_scale_factor)
            data = encode_dataset(pipe, [load_image(r.path, size) for r in recs], [r.caption for r in recs], size, 32)
            res, _ = fine_tune(pipe, data, FineTuneConfig(gamma=gamma, target_layer=0, seed=0, **base, **extra))
            out[(gamma, name)] = res
            rec = res.recon if gamma > 0 else np.full_like(res.recon, np.nan)
            print(f"{gamma:>5g} {name:<18} {res.sigma.mean():>10.4f} {res.denoise[0]:>13.5f} {res.denoise.mean():>12.5f} "
                  f"{res.denoise[-5:].mean():>13.5f} {np.mean(rec):>10.5f} {np.mean(rec[-5:]):>11.5f} {res.n_valid_tokens.mean():>11.1f}")
    for gamma in (0.0, 0.5):
        a, b = out[(gamma, "default (notes)")], out[(gamma, "earlier (options)")]
        print(f"gamma {gamma:g}: denoise mean default/earlier = {a.denoise.mean() / b.denoise.mean():.3f}, "
              f"last-5 ratio = {a.denoise[-5:].mean() / b.denoise[-5:].mean():.3f}")


def loss_formulas() -> None:
    from layerscope.models.sd3_light import denoise_loss

    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(4, 4, 16, 16, generator=g), torch.randn(4, 4, 16, 16, generator=g)
    mask = (torch.rand(4, 1, 16, 16, generator=g) > 0.5).float()
    a = float(denoise_loss(pred, target, mask))
    b = float(denoise_loss(pred, target, mask, masked_mean=True))
    print(f"masked loss on a random batch (half the latent masked): mean(l*w) = {a:.4f}, sum(l*w)/sum(w) = {b:.4f} "
          f"({(b - a) / a:+.1%})")
    for c in (0.03, 0.1, 1.0):
        p = float(denoise_loss(pred, target, None, "pseudo_huber", c))
        s = float(denoise_loss(pred, target, None, "pseudo_huber_scaled", c))
        print(f"pseudo-Huber c={c:g}: sqrt(d^2+c^2)-c = {p:.4f}, 2c(sqrt(d^2+c^2)-c) = {s:.4f} (x{s / p:.3g})")


def dinov3_std(root: Path) -> None:
    from layerscope.data import build_index
    from layerscope.h5io import ShardWriter
    from layerscope.merge import load_shards
    from layerscope.models.dinov3 import build_tiny
    from layerscope.probes.base import ShardSpec
    from layerscope.probes.dinov3_channels import DinoV3Channels

    build_tiny("default", 0, root / "dinov3_tiny")
    index = root / "photos" / "index.tsv"
    if not index.exists():
        build_index("photos", {"kind": "skimage"}, index)
    tables = {}
    for eps in (1e-8, 0.0):
        pcfg = {"dataset": "photos", "batch_size": 6, "image_size": 64, "topk": 8, "layers": "all", "max_images": 0, "std_eps": eps}
        spec = ShardSpec(probe="dinov3_channels", model="m", axes={"slice": "0of1"}, probe_cfg=pcfg,
                         model_cfg={"family": "dinov3", "kind": "path", "path": str(root / "dinov3_tiny"), "lora": None, "dtype": "fp32"},
                         datasets={"photos": {"kind": "skimage", "index": str(index)}}, config_hash="h", device="cpu")
        out = root / f"dino-{eps}" / "slice-0of1.h5"
        with ShardWriter(out, {"probe": spec.probe, "model": "m", "axes": spec.axes, "config_hash": "h", "data_digest": "d",
                               "spec": spec.to_json_dict()}) as w:
            DinoV3Channels().run_shard(spec, w)
        tables[eps] = DinoV3Channels().merge(load_shards([out], "dinov3_channels", "m"))["channels"]
    a, b = tables[1e-8]["std"].to_numpy(), tables[0.0]["std"].to_numpy()
    rel = np.abs(a - b) / b
    print(f"dinov3_channels tiny model, {len(a)} (layer, rep, role, channel) rows: std range {b.min():.3g}..{b.max():.3g}; "
          f"|std(1e-8) - std(0)| max {np.abs(a - b).max():.2e}, relative max {rel.max():.2e}, median {np.median(rel):.2e}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        loss_formulas()
        dinov3_std(root)
        recon_runs(root, args.steps)


if __name__ == "__main__":
    main()
