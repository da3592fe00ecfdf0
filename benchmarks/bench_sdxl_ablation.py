"""sdxl_ablation: the note's method (one full denoising run per ablated group, one after the other)
vs the probe's batched ablation (every group of a (prompt, seed) plus the controls in one run).

    PYTHONPATH=src python benchmarks/bench_sdxl_ablation.py [--arch wide] [--reps 5] [--device cpu]
    PYTHONPATH=src python benchmarks/bench_sdxl_ablation.py --geometry real --device cuda --dtype bf16

The note's method is written from design note 002: forward hooks on every ``attn2`` that return
``zeros_like(output)`` unless the module's ``is_target_layer`` flag is set; per group the flags
are set and a full pipeline call generates the image; then the hooks are removed and the
all-layers image is generated.  The probe also makes the ``none`` control (every group zeroed),
so the note's loop here makes it too (one more run with every flag off): both produce the same
images, checked.  Geometry ``tiny``: the tiny SDXL pipeline (``--arch wide``: 6 groups, 32 px);
``real``: the SDXL UNet config (11 groups, random weights) at ``--size`` px with small text
encoders and VAE of the right widths.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from benchlib import compare, machine, report  # noqa: E402

SDXL_UNET = dict(down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                 block_out_channels=[320, 640, 1280], layers_per_block=2, transformer_layers_per_block=[1, 2, 10],
                 attention_head_dim=[5, 10, 20], cross_attention_dim=2048, use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, sample_size=128, in_channels=4, out_channels=4)


def real_pipeline(device, dtype):
    """SDXL geometry with random weights: the real UNet; text encoders of SDXL's widths (768 and
    1280, pooled 1280) but 1 layer; a small 8x-downsampling VAE (the UNet dominates the cost)."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from layerscope.models.sdxl import tiny_clip_tokenizer

    tok = tiny_clip_tokenizer()
    tc = lambda h, p: CLIPTextConfig(vocab_size=len(tok), hidden_size=h, intermediate_size=2 * h, num_hidden_layers=1,  # noqa: E731
                                     num_attention_heads=8, projection_dim=p, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**SDXL_UNET)
        te1, te2 = CLIPTextModel(tc(768, 768)), CLIPTextModelWithProjection(tc(1280, 1280))
        vae = AutoencoderKL(block_out_channels=[32, 32, 32, 32], down_block_types=["DownEncoderBlock2D"] * 4,
                            up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, norm_num_groups=8, layers_per_block=1)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tiny_clip_tokenizer(),
                                     unet=unet, scheduler=sched).to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--geometry", choices=["tiny", "real"], default="tiny")
    ap.add_argument("--arch", default="wide", help="tiny architecture (wide: 6 groups, default: 4)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    ap.add_argument("--size", type=int, default=1024, help="pixels, real geometry")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=0, help="probe: images per batched run (0: all)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import numpy as np
    import torch

    from layerscope.models import sdxl as fam
    from layerscope.models import set_threads
    from layerscope.probes.sdxl_ablation import CONTROLS, generate_batched

    set_threads(args.threads)
    dev = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if args.geometry == "tiny":
        tmp = Path(tempfile.mkdtemp())
        fam.build_tiny(args.arch, 0, tmp / "sdxl")
        pipe = fam.load({"kind": "path", "path": str(tmp / "sdxl")}, dev, dtype)
        size = int(fam.TINY_ARCHS[args.arch]["sample_size"])
    else:
        pipe = real_pipeline(dev, dtype)
        size = args.size
    groups = fam.cross_attention_groups(pipe.unet)
    prompt, seed = "a red cube on a wooden table", 0
    call = dict(num_inference_steps=args.steps, guidance_scale=5.0, height=size, width=size, output_type="np")

    # ---- the note's method (design note 002), with the 'none' control added for equal output
    hooks = []

    def forward_hook(module, input, output):  # noqa: A002, ARG001
        if not module.is_target_layer:
            return torch.zeros_like(output)
        return output

    def note_method() -> dict[str, np.ndarray]:
        for names in groups.values():
            for n in names:
                m = pipe.unet.get_submodule(n)
                m.is_target_layer = False
                hooks.append(m.register_forward_hook(forward_hook))
        out = {}
        try:
            for target in list(groups) + ["none"]:
                for g, names in groups.items():
                    for n in names:
                        pipe.unet.get_submodule(n).is_target_layer = g == target
                with torch.no_grad():
                    gen = torch.Generator("cpu").manual_seed(seed)
                    out[target] = np.asarray(pipe(prompt, generator=gen, **call).images[0], dtype=np.float64)
        finally:
            for h in hooks:
                h.remove()
            hooks.clear()
        with torch.no_grad():
            gen = torch.Generator("cpu").manual_seed(seed)
            out["all"] = np.asarray(pipe(prompt, generator=gen, **call).images[0], dtype=np.float64)
        return out

    targets = list(groups) + list(CONTROLS)

    def probe_way() -> dict[str, np.ndarray]:
        return generate_batched(pipe, prompt, seed, targets, groups, {t: False for t in targets}, call, batch_size=args.batch_size)

    res = compare(note_method, probe_way, args.reps, args.device)
    diff = max(float(np.abs(res["note_out"][t] - res["probe_out"][t]).max()) for t in targets)
    n = len(targets)
    print(f"machine: {machine(args.device)}")
    print(f"SDXL ablation, {args.geometry} geometry ({args.arch if args.geometry == 'tiny' else 'SDXL UNet'}), {len(groups)} groups + "
          f"all + none = {n} images, {size} px, {args.steps} steps, CFG, {args.dtype}")
    print(f"{'method':<58}{'s (median)':>12}{'s (min)':>10}{'peak MB':>10}{'images/s':>10}")
    print(f"{'note: one full denoising run per image, one after another':<58}{res['note_s']:>12.4f}{res['note_min_s']:>10.4f}"
          f"{res['note_peak_mb']:>10.0f}{n / res['note_s']:>10.2f}")
    print(f"{'probe: all images in one batched run (per-sample masks)':<58}{res['probe_s']:>12.4f}{res['probe_min_s']:>10.4f}"
          f"{res['probe_peak_mb']:>10.0f}{n / res['probe_s']:>10.2f}")
    print(f"max |image difference| (pixel values in [0, 1]): {diff:.2e}")
    report("sdxl_ablation", f"{len(groups)} groups + 2 controls, {args.geometry} {size} px, {args.steps} steps", res,
           args.device, items=n, item="images", max_image_diff=diff)


if __name__ == "__main__":
    main()
