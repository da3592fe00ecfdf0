"""Cost of one sdxl_ablation shard on the tiny pipeline, by phase, and the hooks' overhead.

    PYTHONPATH=src python benchmarks/bench_sdxl_ablation.py [--device cpu|cuda] [--repeats 5]

Prints a table (median seconds over repeats) and ratios: hooked (one group kept, recorder on)
vs unhooked generation, and the per-shard total vs the fixed import cost every shard job pays.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(fn, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, diffusers, transformers; from diffusers import StableDiffusionXLPipeline; "
                    "from transformers import CLIPModel"], check=True, capture_output=True)
    import_s = time.perf_counter() - t

    import numpy as np
    import torch

    from layerscope.models import clip as clipfam
    from layerscope.models import sdxl as fam
    from layerscope.models import set_threads
    from layerscope.probes.sdxl_ablation import ablate_cross_attention

    set_threads(args.threads)
    dev = torch.device(args.device)
    tmp = Path(tempfile.mkdtemp())
    build_s = timed(lambda: fam.build_tiny("default", 0, tmp / "sdxl"), 1)
    clipfam.build_tiny("default", 0, tmp / "clip")
    mcfg = {"kind": "path", "path": str(tmp / "sdxl")}
    load_s = timed(lambda: fam.load(mcfg, dev, torch.float32), args.repeats)
    pipe = fam.load(mcfg, dev, torch.float32)
    groups = fam.cross_attention_groups(pipe.unet)
    target = list(groups)[0]
    zero = [n for g, ns in groups.items() if g != target for n in ns]

    def gen(hooked: bool):
        g = torch.Generator("cpu").manual_seed(0)
        kw = dict(prompt="a red cube", num_inference_steps=2, guidance_scale=5.0, height=32, width=32, generator=g, output_type="np")
        with torch.no_grad():
            if hooked:
                with ablate_cross_attention(pipe.unet, zero, zero_pooled_text=True, record={}):
                    return pipe(**kw).images
            return pipe(**kw).images

    gen(False), gen(True)  # warm-up
    plain_s = timed(lambda: gen(False), args.repeats)
    hooked_s = timed(lambda: gen(True), args.repeats)
    ccfg = {"kind": "path", "path": str(tmp / "clip")}
    clip_load_s = timed(lambda: clipfam.load(ccfg, dev, torch.float32), args.repeats)
    m, p = clipfam.load(ccfg, dev, torch.float32)
    img = (np.asarray(gen(False)[0]) * 255).round().astype(np.uint8)
    clip_s = timed(lambda: clipfam.image_text_cosine(m, p, [img], ["a red cube"]), args.repeats)

    rows = [("python import torch+diffusers+transformers (fresh process)", import_s),
            ("build tiny SDXL pipeline + save_pretrained (once per study)", build_s),
            ("load pipeline (from_pretrained)", load_s),
            ("generate 32x32, 2 steps, CFG, no hooks", plain_s),
            ("generate, one group kept (hooks + recorder)", hooked_s),
            ("load tiny CLIP scorer", clip_load_s),
            ("CLIP cosine, one image", clip_s)]
    shard = import_s + load_s + hooked_s + clip_load_s + clip_s
    print(f"device={dev} threads={args.threads} repeats={args.repeats} (median seconds)")
    print(f"{'phase':62s} {'s':>8s}")
    for name, s in rows:
        print(f"{name:62s} {s:8.4f}")
    print(f"{'one shard job, estimated (import+load+gen+clip)':62s} {shard:8.4f}")
    print(f"ratio hooked/unhooked generation: {hooked_s / plain_s:.2f}")
    print(f"share of a shard job spent importing: {import_s / shard:.0%}")
    print(f"default study (8 shards) on 1 core, estimated: {8 * shard:.1f} s")


if __name__ == "__main__":
    main()
