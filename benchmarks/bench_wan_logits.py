"""wan_logits benchmark (CPU, 1 thread): prints a table and ratios.

1. KV-cache block-causal generation vs full recompute under a block-causal mask, 7 chunks x 3 frames,
   4 denoising steps (goal: cache >= 3x faster).  Both produce the same video (checked).
2. Capture overhead: generation with frame-level logit capture of every layer at the last chunk vs plain.
3. Peak memory of the frame reduction in query chunks vs materialising a layer's full [B, H, Q, K] logits,
   each in a fresh subprocess (peak RSS minus RSS before the reduction; torch's CPU allocator is invisible to
   tracemalloc, so RSS is the honest measure on CPU).

Run: PYTHONPATH=src python benchmarks/bench_wan_logits.py
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

import torch


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def memory_child(mode: str, query_chunk: int) -> None:
    from layerscope.models import wan

    torch.set_num_threads(1)
    heads, d, fsl, nq, nk = 12, 64, 390, 3, 21  # a 15x26-patch frame: a quarter of Wan's 1560 tokens
    g = torch.Generator().manual_seed(0)
    q = torch.randn((1, nq * fsl, heads, d), generator=g)
    k = torch.randn((1, nk * fsl, heads, d), generator=g)
    base = _rss_mb()
    t = time.perf_counter()
    red = wan.FrameReducer(heads, nq, nk, fsl, torch.device("cpu"))
    qc = query_chunk if mode == "chunked" else q.shape[1]
    for off, lg in wan.attention_logits_chunks(q, k, qc):
        red(off, lg)
    dt = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    full_mb = heads * q.shape[1] * k.shape[1] * 4 / 2**20
    print(json.dumps({"mode": mode, "peak_mb": peak - base, "seconds": dt, "full_logits_mb": full_mb,
                      "mass_checksum": float(red.mass_sum.sum())}))


def bench_generation() -> None:
    from diffusers import WanTransformer3DModel

    from layerscope.models import wan

    torch.set_num_threads(1)
    torch.manual_seed(0)
    arch = dict(wan.TINY_ARCHS["default"], num_attention_heads=4, attention_head_dim=32, ffn_dim=256, text_dim=32)
    tr = WanTransformer3DModel(**arch).eval()
    cfg = wan.GenerationConfig(num_frames=21, block_frames=3)
    text = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(1, 4, 21, 24, 24, generator=torch.Generator().manual_seed(2))  # 144 tokens/frame, 3024 total

    def timed(fn, reps=3):
        best, out = float("inf"), None
        for _ in range(reps):
            t = time.perf_counter()
            out = fn()
            best = min(best, time.perf_counter() - t)
        return best, out

    t_full, b = timed(lambda: wan.generate(tr, text, noise, cfg, "mask"), reps=2)

    def with_capture():
        def sinks_for(layer, geo):
            return [wan.FrameReducer(geo["heads"], geo["num_query_frames"], geo["num_key_frames"], geo["frame_seq_length"], torch.device("cpu"))]
        cap = wan.CaptureRequest(frozenset(range(len(tr.blocks))), frozenset({(6, 0)}), sinks_for, query_chunk=64)
        return wan.generate(tr, text, noise, cfg, "cache", capture=cap)

    # interleave plain and captured runs (the machine is shared: best of 5 each)
    t_cache = t_cap = float("inf")
    for _ in range(5):
        t1, a = timed(lambda: wan.generate(tr, text, noise, cfg, "cache"), reps=1)
        t2, c = timed(with_capture, reps=1)
        t_cache, t_cap = min(t_cache, t1), min(t_cap, t2)
    diff = float((a - b).abs().max())
    print("== generation: 21 latent frames (7 chunks x 3), 24x24 latent (144 tokens/frame), 4 layers, 4 heads x 32, 1 thread")
    print(f"{'variant':<44}{'seconds':>10}")
    print(f"{'KV cache (35 transformer calls)':<44}{t_cache:>10.3f}")
    print(f"{'full recompute, block-causal mask (28 calls)':<44}{t_full:>10.3f}")
    print(f"{'KV cache + capture (all layers, last chunk)':<44}{t_cap:>10.3f}")
    print(f"speed-up of the KV cache over full recompute: {t_full / t_cache:.2f}x (goal >= 3x); max |video diff| = {diff:.2e}")
    print(f"capture overhead over plain inference: {100 * (t_cap / t_cache - 1):+.1f} %; same video: {bool(torch.equal(a, c))}")


def bench_memory() -> None:
    rows = []
    for mode in ("chunked", "materialised"):
        out = subprocess.run([sys.executable, __file__, "--memory-child", mode, "128"], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("== frame reduction of one layer's logits: 12 heads, Q = 3 x 390, K = 21 x 390 tokens (query_chunk 128)")
    print(f"{'variant':<16}{'peak MB':>10}{'seconds':>10}   (full fp32 logits: {rows[0]['full_logits_mb']:.0f} MB)")
    for r in rows:
        print(f"{r['mode']:<16}{r['peak_mb']:>10.1f}{r['seconds']:>10.2f}")
    print(f"materialised / chunked peak memory: {rows[1]['peak_mb'] / max(rows[0]['peak_mb'], 1e-9):.1f}x; "
          f"same result: {abs(rows[0]['mass_checksum'] - rows[1]['mass_checksum']) < 1e-6 * rows[0]['mass_checksum']}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-child":
        memory_child(sys.argv[2], int(sys.argv[3]))
    else:
        bench_generation()
        bench_memory()
