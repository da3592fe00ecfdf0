"""Benchmark: the note's own method versus the probe's batched text gradients, in one run.

Baseline, written from design note 000's script (``compute_sd3_text_grad_sensitivity.py``):
per pair, encode image and prompt once, make the prompt embedding a gradient leaf, then for every
(timestep, seed) one batch-1 forward that records the text states entering the selected blocks
(forward pre-hooks), ``y = 0.5 * sum(pred^2)`` and ONE ``torch.autograd.grad`` for all of them; per
block the token norms are masked, moved to the host and summed per pair; after the pair's loop the
averaged scores give the three metrics.  (The script already does one backward for all layers; a
per-block loop would be a strawman.)  For a numbers check the baseline uses the probe's noise and
latent (posterior mean) instead of the script's generator seeds and posterior sample: the cost is
the same.

Probe: :func:`layerscope.probes.sd3_textgrad.compute_samples`: every (pair, timestep, seed) of the
workload in batches sized from ``memory_budget_mb`` (one forward and one backward per batch), then
the pooled metrics.

Both include the per-pair encoding.  Time: min and median over ``--reps`` interleaved repetitions
after a warm-up; throughput in (pair, timestep, seed) per second.  Memory: on CUDA the allocator's
peak (``max_memory_allocated``) per method; on the CPU the peak bytes autograd saves for one
backward (distinct storages, ``saved_tensors_hooks``), the part that grows with the batch.
Goal: probe >= 3x the note's method on the tiny default (4 blocks, 6 pairs x 2 timesteps x 2 seeds).

    PYTHONPATH=src python benchmarks/bench_sd3_textgrad.py [--threads 1] [--reps 5] [--blocks 4]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from layerscope.data import Record, load_image
from layerscope.models.sd3 import text_token_mask, tiny_pipeline
from layerscope.probes.sd3_textgrad import Sample, Settings, compute_samples, noise_for, pool_pair, resolve_timestep


class SavedPeak:
    """Peak bytes of distinct storages saved for backward within one autograd graph."""

    def __init__(self) -> None:
        self.peak = 0
        self._seen: dict[int, int] = {}

    def graph_done(self) -> None:
        self.peak = max(self.peak, sum(self._seen.values()))
        self._seen = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        self._seen[st.data_ptr()] = max(self._seen.get(st.data_ptr(), 0), st.nbytes())
        return t


def note_method(pipe: Any, recs: list[Record], timesteps: list[int], seeds: list[int], blocks: list[int], msl: int,
                size: int, topk: int, mem: SavedPeak | None = None) -> dict[tuple[int, int], dict]:
    """The script's loop: batch 1, one forward + one backward per (pair, timestep, seed), all blocks."""
    tr = pipe.transformer
    sch_total = 1000
    vae = pipe.vae
    out: dict[tuple[int, int], dict] = {}
    for rec in recs:
        with torch.no_grad():
            pix = pipe.image_processor.preprocess([load_image(rec.path, size)], height=size, width=size)
            z0 = (vae.encode(pix).latent_dist.mode() - vae.config.shift_factor) * vae.config.scaling_factor
            pe, _, pooled, _ = pipe.encode_prompt(prompt=[rec.caption], prompt_2=None, prompt_3=None,
                                                  do_classifier_free_guidance=False, max_sequence_length=msl)
        mask = text_token_mask(pipe, [rec.caption], msl)[0]
        pe = pe.detach().requires_grad_(True)
        pooled = pooled.detach().requires_grad_(True)
        sums: dict[int, torch.Tensor] = {}
        count = 0
        for t in timesteps:
            for s in seeds:
                t_tensor = torch.full((1,), t, dtype=torch.long)
                sig = (t_tensor.float() / sch_total).view(1, 1, 1, 1)
                zt = (1.0 - sig) * z0 + sig * noise_for(s, rec.image_id, z0.shape[1:])[None]
                states: list[torch.Tensor] = []
                hs = [tr.transformer_blocks[b].register_forward_pre_hook(
                    lambda m, a, k: states.append(k["encoder_hidden_states"]), with_kwargs=True) for b in blocks]
                try:
                    ctx = torch.autograd.graph.saved_tensors_hooks(mem.pack, lambda x: x) if mem else _null()
                    with torch.enable_grad(), ctx:
                        pred = tr(hidden_states=zt, timestep=t_tensor, encoder_hidden_states=pe, pooled_projections=pooled,
                                  return_dict=False)[0]
                        y = 0.5 * (pred.float() ** 2).sum()
                        grads = torch.autograd.grad(y, states)
                    if mem:
                        mem.graph_done()
                finally:
                    for h in hs:
                        h.remove()
                for b, g in zip(blocks, grads):
                    sc = g.float().norm(dim=-1)[0][mask].detach().cpu()
                    sums[b] = sc.clone() if b not in sums else sums[b] + sc
                count += 1
        for b in blocks:
            avg = (sums[b] / count).double().numpy()
            out[(rec.image_id, b)] = pool_pair(avg[None], None, topk)
    return out


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None


def probe_method(pipe: Any, recs: list[Record], timesteps: list[int], seeds: list[int], st: Settings, topk: int,
                 sch: Any) -> tuple[dict[tuple[int, int], dict], int]:
    samples = [Sample(r, t, *resolve_timestep(t, "note", sch), s) for r in recs for t in timesteps for s in seeds]
    res = compute_samples(pipe, samples, st)
    out = {}
    for i, rec in enumerate(recs):
        rows = slice(i * len(timesteps) * len(seeds), (i + 1) * len(timesteps) * len(seeds))
        for b in st.blocks:
            out[(rec.image_id, b)] = pool_pair(res["scores"][b][rows], res["mask"][rows.start], topk)
    return out, int(res["batch_size"])


def probe_per_shard(pipe: Any, recs: list[Record], timesteps: list[int], seeds: list[int], st: Settings, topk: int,
                    sch: Any) -> int:
    """The study's shard shape: one ``compute_samples`` call per (timestep, seed), its pairs batched
    (the pooling then happens in the merge); returns the batch size used."""
    bs = 0
    for t in timesteps:
        for s in seeds:
            res = compute_samples(pipe, [Sample(r, t, *resolve_timestep(t, "note", sch), s) for r in recs], st)
            bs = int(res["batch_size"])
            for b in st.blocks:
                for i in range(len(recs)):
                    pool_pair(res["scores"][b][i:i + 1], res["mask"][i], topk)
    return bs


def timed_interleaved(fns: list[Callable[[], Any]], reps: int) -> tuple[list[list[float]], list[Any]]:
    """Time the functions alternately (A B A B ...) so load drift on a shared machine hits both alike."""
    res: list[Any] = [fn() for fn in fns]  # warm-up
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for j, fn in enumerate(fns):
            t0 = time.perf_counter()
            res[j] = fn()
            times[j].append(time.perf_counter() - t0)
    return times, res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--blocks", type=int, default=4, help="transformer depth (tiny default 4; real SD3-medium 24)")
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--timesteps", type=int, nargs="+", default=[900, 500])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--max-sequence-length", type=int, default=32)
    ap.add_argument("--memory-budget-mb", type=float, default=2048)
    ap.add_argument("--batch-size", default="auto")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from diffusers import FlowMatchEulerDiscreteScheduler
    from PIL import Image

    pipe = tiny_pipeline("default", seed=0, num_layers=args.blocks)
    for m in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        m.requires_grad_(False).eval()
    sch = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    tr = pipe.transformer
    size = int(tr.config.sample_size) * int(pipe.vae_scale_factor)
    tmp = Path(tempfile.mkdtemp(prefix="bench_textgrad_"))
    rng = np.random.default_rng(0)
    caps = ["a cat", "a ginger tabby cat looking to the side", "a red bus on a street", "two dogs in the snow",
            "a bowl of fruit", "an astronaut riding a horse"]
    recs = []
    for i in range(args.pairs):
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(tmp / f"{i}.png")
        recs.append(Record(i, str(tmp / f"{i}.png"), caps[i % len(caps)]))
    blocks = list(range(args.blocks))
    topk = 10
    bs = int(args.batch_size) if args.batch_size != "auto" else "auto"
    st = Settings(blocks=blocks, msl=args.max_sequence_length, size=size, force=True, batch_size=bs,
                  memory_budget_mb=args.memory_budget_mb, seq_len=77 + args.max_sequence_length)
    n = args.pairs * len(args.timesteps) * len(args.seeds)

    (t_note, t_probe, t_shard), (r_note, (r_probe, used_bs), shard_bs) = timed_interleaved(
        [lambda: note_method(pipe, recs, args.timesteps, args.seeds, blocks, args.max_sequence_length, size, topk),
         lambda: probe_method(pipe, recs, args.timesteps, args.seeds, st, topk, sch),
         lambda: probe_per_shard(pipe, recs, args.timesteps, args.seeds, st, topk, sch)], args.reps)

    # numbers: the note's y has a factor 0.5, so its strength is half the probe's; top-k mass and entropy agree
    worst = {m: 0.0 for m in ("strength", "topk_mass", "entropy")}
    for key, a in r_note.items():
        b = r_probe[key]
        for m in worst:
            ref = 2 * a[m] if m == "strength" else a[m]
            worst[m] = max(worst[m], abs(b[m] - ref) / max(abs(ref), 1e-30))

    # memory
    mem_note = SavedPeak()
    note_method(pipe, recs[:1], args.timesteps[:1], args.seeds[:1], blocks, args.max_sequence_length, size, topk, mem_note)
    samples = [Sample(r, t, *resolve_timestep(t, "note", sch), s) for r in recs for t in args.timesteps for s in args.seeds]
    from layerscope.probes.sd3_textgrad import saved_bytes

    kw_one = samples[:used_bs]
    probe_peak = _probe_graph_bytes(pipe, kw_one, st, saved_bytes)

    print(f"SD3 transformer: {args.blocks} blocks, width {tr.inner_dim}; text {77 + args.max_sequence_length} tokens, "
          f"image {(tr.config.sample_size // tr.config.patch_size) ** 2} tokens; workload {args.pairs} pairs x "
          f"{len(args.timesteps)} timesteps x {len(args.seeds)} seeds = {n} samples; torch threads {args.threads}; "
          f"{args.reps} interleaved repetitions")
    print(f"{'method':<46}{'min s':>9}{'median s':>10}{'samples/s':>11}{'graph MB':>10}")
    for name, ts, peak in (("note: batch 1, 1 backward per (pair, t, seed)", t_note, mem_note.peak),
                           (f"probe: batched (batch {used_bs}), 1 backward per batch", t_probe, probe_peak),
                           (f"probe, study shards (t, seed) x batch {shard_bs}", t_shard, float("nan"))):
        print(f"{name:<46}{min(ts):>9.4f}{statistics.median(ts):>10.4f}{n / statistics.median(ts):>11.1f}{peak / 2**20:>10.2f}")
    for label, tp in (("probe", t_probe), ("study shards", t_shard)):
        ratios = [a / b for a, b in zip(t_note, tp)]
        med = statistics.median(ratios)
        print(f"speed-up {label} vs note: {min(t_note) / min(tp):.2f}x (fastest runs), {med:.2f}x (median of per-repetition "
              f"ratios, range {min(ratios):.2f}-{max(ratios):.2f}x); goal >= 3x: {'met' if med >= 3 else 'NOT met'}")
    print("max relative difference of the pooled metrics, probe vs note (note strength x 2 for its 0.5 y): "
          + ", ".join(f"{m} {v:.1e}" for m, v in worst.items()))
    if torch.cuda.is_available():
        print("(CUDA available: rerun with the pipeline on the GPU for allocator peaks; this script runs on the CPU)")


def _probe_graph_bytes(pipe: Any, samples: list, st: Settings, saved_bytes: Callable) -> int:
    """Saved-for-backward bytes of one probe batch (the largest graph the probe builds)."""
    import layerscope.probes.sd3_textgrad as P

    captured: dict[str, Any] = {}
    real = P.text_input_grads

    def spy(tr: Any, blocks: Any, kw: Any, force_txt_grad: bool = True) -> Any:
        captured.setdefault("kw", kw)
        return real(tr, blocks, kw, force_txt_grad)

    P.text_input_grads = spy
    try:
        compute_samples(pipe, samples, Settings(**{**st.__dict__, "batch_size": len(samples)}))
    finally:
        P.text_input_grads = real
    return saved_bytes(pipe.transformer, st.blocks, captured["kw"])


if __name__ == "__main__":
    main()
