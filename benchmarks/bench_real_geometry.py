"""Real-geometry cost on CPU: time and peak memory of one shard (or one model step) at the public
checkpoints' architectures with random weights (no hub needed).

    python benchmarks/bench_real_geometry.py            # full depth (needs ~20 GB RAM, minutes per case)
    python benchmarks/bench_real_geometry.py --quick    # depth cut to 1-2 blocks (CI-sized)
    python benchmarks/bench_real_geometry.py --case wan --depth 30

Cases (each in its own process, so peak RSS is the case's own):
* dinov3_vitl16: the dinov3_channels probe's run_shard on 4 images at 224 px, model saved as a
  transformers folder; dinov3_vith16plus likewise;
* wan_1_3b: the wan_logits probe's run_shard, text: random, 6 latent frames of 8x12 (24 tokens/frame),
  one layer captured, model saved as a pipeline folder;
* sd3_medium_transformer: one forward + backward to the text input of SD3Transformer2DModel at
  256 px (what sd3_textgrad does per sample, without VAE and text encoders);
* sdxl_unet: one UNet2DConditionModel forward at 256 px with guidance batch 2 (one ablation step).
Prints a table and the ratio of each case's peak to its weights' size.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = ["dinov3_vitl16", "dinov3_vith16plus", "wan_1_3b", "sd3_medium_transformer", "sdxl_unet"]
QUICK_DEPTH = {"dinov3_vitl16": 2, "dinov3_vith16plus": 2, "wan_1_3b": 1, "sd3_medium_transformer": 2, "sdxl_unet": 1}


def _shard(probe, spec, out: Path) -> None:
    from layerscope.h5io import ShardWriter

    prov = {"probe": spec.probe, "model": spec.model, "axes": spec.axes, "config_hash": "h", "data_digest": "d",
            "spec": spec.to_json_dict()}
    with ShardWriter(out, prov) as w:
        probe.run_shard(spec, w)


def run_case(case: str, depth: int | None) -> dict:
    import torch

    torch.set_num_threads(1)
    from layerscope import real_geometry as rg
    from layerscope.probes.base import ShardSpec

    tmp = Path(tempfile.mkdtemp(prefix="bench_rg_"))
    params = 0
    if case.startswith("dinov3"):
        from layerscope.data import build_index
        from layerscope.probes.dinov3_channels import DinoV3Channels

        cfg = rg.DINOV3_VITL16 if case == "dinov3_vitl16" else rg.DINOV3_VITH16PLUS
        folder = rg.build_dinov3(cfg, depth, tmp / "m")
        index = build_index("photos", {"kind": "skimage"}, tmp / "idx" / "index.tsv")
        spec = ShardSpec(probe="dinov3_channels", model="m", axes={"slice": "0of1"},
                         probe_cfg={"dataset": "photos", "batch_size": 4, "image_size": 224, "topk": 8, "layers": "all",
                                    "max_images": 4},
                         model_cfg={"family": "dinov3", "kind": "path", "path": str(folder), "dtype": "fp32"},
                         datasets={"photos": {"kind": "skimage", "index": str(index)}}, config_hash="h", device="cpu")
        t = time.perf_counter()
        _shard(DinoV3Channels(), spec, tmp / "m" / "slice-0of1.h5")
    elif case == "wan_1_3b":
        from layerscope.probes.wan_logits import WanLogits

        folder = rg.build_wan_transformer(depth, tmp / "wan")
        pcfg = {"prompt": "x", "text": "random", "max_sequence_length": 512, "num_frames": 6, "num_frame_per_block": 3,
                "latent_size": [8, 12], "steps": ["0"], "chunks": [-1], "layer_groups": [[0]], "seeds": [42],
                "query_chunk": 1024, "first_k": 3, "save_logits": False}
        spec = ShardSpec(probe="wan_logits", model="m", axes={"layers": "0", "step": "0", "seed": "42"}, probe_cfg=pcfg,
                         model_cfg={"family": "wan", "kind": "path", "path": str(folder), "dtype": "fp32"},
                         datasets={}, config_hash="h", device="cpu")
        t = time.perf_counter()
        _shard(WanLogits(), spec, tmp / "layers-0__step-0__seed-42.h5")
    elif case == "sd3_medium_transformer":
        from diffusers import SD3Transformer2DModel

        c = dict(rg.SD3_MEDIUM_TRANSFORMER, num_layers=depth or rg.SD3_MEDIUM_TRANSFORMER["num_layers"])
        torch.manual_seed(0)
        m = SD3Transformer2DModel(**c).eval().requires_grad_(False)
        params = sum(p.numel() for p in m.parameters())
        t = time.perf_counter()
        x = torch.randn(1, 16, 32, 32)  # 256 px
        txt = torch.randn(1, 77 + 256, 4096, requires_grad=True)
        out = m(hidden_states=x, encoder_hidden_states=txt, pooled_projections=torch.randn(1, 2048),
                timestep=torch.tensor([500.0])).sample
        out.square().mean().backward()
    elif case == "sdxl_unet":
        from diffusers import UNet2DConditionModel

        c = dict(rg.SDXL_BASE_UNET)
        if depth:
            c["transformer_layers_per_block"] = [min(depth, n) for n in c["transformer_layers_per_block"]]
        torch.manual_seed(0)
        m = UNet2DConditionModel(**c).eval()
        params = sum(p.numel() for p in m.parameters())
        t = time.perf_counter()
        with torch.no_grad():
            m(torch.randn(2, 4, 32, 32), torch.tensor([500.0]), encoder_hidden_states=torch.randn(2, 77, 2048),
              added_cond_kwargs={"text_embeds": torch.randn(2, 1280), "time_ids": torch.randn(2, 6)})
    else:
        raise SystemExit(f"unknown case {case}")
    secs = time.perf_counter() - t
    if not params:
        from layerscope.estimate import folder_params

        fam = "dinov3" if case.startswith("dinov3") else "wan"
        comp = ("",) if fam == "dinov3" else ("transformer",)
        params = next(iter(folder_params(next(tmp.iterdir()), fam, comp).values())) or 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # KiB -> GiB
    return {"case": case, "depth": depth or "full", "params_M": params / 1e6, "seconds": secs, "peak_rss_GB": peak,
            "peak_over_fp32_weights": peak / (params * 4 / 1024 ** 3) if params else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="depth cut to 1-2 blocks")
    ap.add_argument("--case", choices=CASES, action="append")
    ap.add_argument("--depth", type=int, default=None)
    ap.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        print(json.dumps(run_case(args.case[0], args.depth)))
        return
    rows = []
    for case in args.case or CASES:
        depth = args.depth if args.depth is not None else (QUICK_DEPTH[case] if args.quick else None)
        cmd = [sys.executable, __file__, "--_child", "--case", case] + (["--depth", str(depth)] if depth else [])
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{case}: failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
            continue
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    print(f"{'case':<24} {'depth':>5} {'params M':>9} {'time s':>8} {'peak RSS GB':>12} {'peak / fp32 weights':>20}")
    for r in rows:
        print(f"{r['case']:<24} {r['depth']!s:>5} {r['params_M']:>9.1f} {r['seconds']:>8.2f} {r['peak_rss_GB']:>12.2f} "
              f"{r['peak_over_fp32_weights']:>20.2f}")


if __name__ == "__main__":
    main()
