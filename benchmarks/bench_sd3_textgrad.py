"""Benchmark: all blocks' text gradients from one backward pass versus one pass per block.

A small-width 24-block SD3 transformer (the tiny SD3 layout with ``num_layers=24``) on the CPU, one
sample with the tiny pipeline's real joint text sequence (77 CLIP + T5 positions).  Both methods run
in this one process with the same inputs; each is timed as the median of several repetitions after
a warm-up, and their gradients are checked equal.  Goal: one pass >= 0.8 x 24 = 19.2 x faster.

    PYTHONPATH=src python benchmarks/bench_sd3_textgrad.py [--threads 1] [--reps 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from layerscope.models.sd3 import tiny_pipeline
from layerscope.probes.sd3_textgrad import text_input_grads, text_input_grads_per_block


def timed(fn, reps: int) -> tuple[float, object]:
    fn()  # warm-up
    times, res = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        res = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--blocks", type=int, default=24)
    ap.add_argument("--max-sequence-length", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    pipe = tiny_pipeline("default", seed=0, num_layers=args.blocks)
    tr = pipe.transformer.requires_grad_(False).eval()
    for m in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        m.requires_grad_(False)
    with torch.no_grad():
        pe, _, pooled, _ = pipe.encode_prompt(prompt=["a ginger tabby cat looking to the side"], prompt_2=None, prompt_3=None,
                                              do_classifier_free_guidance=False, max_sequence_length=args.max_sequence_length)
    g = torch.Generator().manual_seed(0)
    s = tr.config.sample_size
    kw = dict(hidden_states=torch.randn(1, tr.config.in_channels, s, s, generator=g), timestep=torch.tensor([750.0]),
              encoder_hidden_states=pe, pooled_projections=pooled)
    blocks = list(range(args.blocks))

    t_one, (_, one) = timed(lambda: text_input_grads(tr, blocks, kw), args.reps)
    t_loop, loop = timed(lambda: text_input_grads_per_block(tr, blocks, kw), args.reps)
    t_fwd, _ = timed(lambda: tr(**kw, return_dict=False), args.reps)
    worst = max(float((one[i] - loop[i]).abs().max() / loop[i].abs().max()) for i in blocks)

    n_params = sum(p.numel() for p in tr.parameters())
    print(f"SD3 transformer: {args.blocks} blocks, width {tr.inner_dim}, {n_params:,} parameters; "
          f"text {pe.shape[1]} tokens, image {(s // tr.config.patch_size) ** 2} tokens; torch threads {args.threads}; "
          f"median of {args.reps}")
    print(f"{'method':<34}{'seconds':>10}{'per block':>12}")
    print(f"{'forward only':<34}{t_fwd:>10.4f}{'':>12}")
    print(f"{'one pass (all blocks, 1 backward)':<34}{t_one:>10.4f}{t_one / args.blocks:>12.5f}")
    print(f"{'per-block loop (24 fwd+bwd)':<34}{t_loop:>10.4f}{t_loop / args.blocks:>12.5f}")
    speedup = t_loop / t_one
    goal = 0.8 * args.blocks
    print(f"speed-up {speedup:.1f}x (goal >= {goal:.1f}x: {'met' if speedup >= goal else 'NOT met'}); "
          f"max relative gradient difference {worst:.2e}")


if __name__ == "__main__":
    main()
