"""Benchmark: all blocks' text gradients from one backward pass versus one pass per block.

Two per-block loops are timed: A, the best a loop can do (only block i's input a leaf, so the
backward stops at block i), and B, the note's per-layer pattern (full differentiable forward and
``y.backward()`` with ``retain_grad`` on block i's input).

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


def timed_interleaved(fns: list, reps: int) -> tuple[list[list[float]], list[object]]:
    """Time the functions alternately (A B C A B C ...) so a shared machine's load drift hits
    every method alike; returns every repetition's time per function and each one's last result."""
    for fn in fns:
        fn()  # warm-up
    times: list[list[float]] = [[] for _ in fns]
    res: list[object] = [None] * len(fns)
    for _ in range(reps):
        for j, fn in enumerate(fns):
            t0 = time.perf_counter()
            res[j] = fn()
            times[j].append(time.perf_counter() - t0)
    return times, res


def per_block_full_backward(tr: torch.nn.Module, blocks: list[int], kw: dict) -> dict[int, torch.Tensor]:
    """The note's style of per-block loop: per block, a fully differentiable forward (block 0's
    text input made a leaf) and ``y.backward()`` with ``retain_grad`` on that block's text input."""
    out = {}
    for i in blocks:
        box: dict[str, torch.Tensor] = {}

        def leaf(mod, args, kwargs):
            h = kwargs["encoder_hidden_states"].detach().requires_grad_(True)
            box[0] = h
            return args, {**kwargs, "encoder_hidden_states": h}

        def keep(mod, args, kwargs, i=i):
            kwargs["encoder_hidden_states"].retain_grad()
            box[i] = kwargs["encoder_hidden_states"]

        hs = [tr.transformer_blocks[0].register_forward_pre_hook(leaf, with_kwargs=True)]
        if i:
            hs.append(tr.transformer_blocks[i].register_forward_pre_hook(keep, with_kwargs=True))
        try:
            tr(**kw, return_dict=False)[0].float().pow(2).sum().backward()
        finally:
            for h in hs:
                h.remove()
        out[i] = box[i].grad
    return out


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

    def fwd() -> object:
        with torch.no_grad():
            return tr(**kw, return_dict=False)

    (ts_one, ts_loop, ts_full, ts_fwd), ((_, one), loop, full, _) = timed_interleaved(
        [lambda: text_input_grads(tr, blocks, kw), lambda: text_input_grads_per_block(tr, blocks, kw),
         lambda: per_block_full_backward(tr, blocks, kw), fwd], args.reps)
    t_one, t_loop, t_full, t_fwd = (statistics.median(t) for t in (ts_one, ts_loop, ts_full, ts_fwd))
    worst = max(float((one[i] - ref[i]).abs().max() / ref[i].abs().max()) for ref in (loop, full) for i in blocks)

    n_params = sum(p.numel() for p in tr.parameters())
    print(f"SD3 transformer: {args.blocks} blocks, width {tr.inner_dim}, {n_params:,} parameters; "
          f"text {pe.shape[1]} tokens, image {(s // tr.config.patch_size) ** 2} tokens; torch threads {args.threads}; "
          f"median of {args.reps} interleaved repetitions")
    print(f"{'method':<34}{'seconds':>10}{'per block':>12}")
    print(f"{'forward only (no grad)':<34}{t_fwd:>10.4f}{'':>12}")
    print(f"{'one pass (all blocks, 1 backward)':<34}{t_one:>10.4f}{t_one / args.blocks:>12.5f}")
    print(f"{'loop A: pruned per-block passes':<34}{t_loop:>10.4f}{t_loop / args.blocks:>12.5f}")
    print(f"{'loop B: full fwd + backward/block':<34}{t_full:>10.4f}{t_full / args.blocks:>12.5f}")
    goal = 0.8 * args.blocks
    for name, ts in (("A", ts_loop), ("B", ts_full)):
        ratios = [b / a for a, b in zip(ts_one, ts)]
        speedup = statistics.median(ratios)
        print(f"speed-up vs loop {name}: {speedup:.1f}x (median of per-repetition ratios, range {min(ratios):.1f}-"
              f"{max(ratios):.1f}x; fastest runs {min(ts) / min(ts_one):.1f}x); goal >= 0.8 x {args.blocks} = {goal:.1f}x: "
              f"{'met' if speedup >= goal else 'NOT met'}")
    print(f"max relative gradient difference, one pass vs loops: {worst:.2e}")
    print("Loop A makes only block i's text input a leaf: blocks before i run without recording a graph and the\n"
          "backward stops at block i, so its average pass costs less than a full one; 24 x (that share) bounds\n"
          "the speed-up against it.  Loop B is the note's per-layer pattern: a full graph and backward per block.")


if __name__ == "__main__":
    main()
