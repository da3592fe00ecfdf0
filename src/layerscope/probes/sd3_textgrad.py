"""SD3 text-gradient sensitivity (design note 000, ``compute_sd3_text_grad_sensitivity.py``).

How much does each text token, as it enters each MMDiT block, move the denoiser's output?  For an
image/caption pair, a timestep and a noise seed:

1. ``z0 = (vae.encode(image).mode() - shift_factor) * scaling_factor`` (the posterior mean: the
   seed only drives the noise), text through the pipeline's own ``encode_prompt``;
2. ``x_t = (1 - sigma) z0 + sigma eps``; by default in the note's convention (``sigma = t / 1000``,
   no shift, the model is fed ``t``, 0 = clean), or with ``timestep_convention: schedule_index`` from
   the shifted training table of a fresh ``FlowMatchEulerDiscreteScheduler`` (index 0 = noisiest);
3. ``y = sum(transformer(x_t, t, text)^2)`` and, in ONE backward pass, ``dy/dh_i`` for the text
   hidden states ``h_i`` entering every selected block ``transformer_blocks.i`` (forward
   pre-hooks with ``with_kwargs=True`` capture ``encoder_hidden_states``; one
   ``torch.autograd.grad(y, [h_i ...])`` returns them all).  Many (pair, timestep, seed) samples
   share that forward and backward (:func:`compute_samples`): y is a sum over samples, which do
   not interact, so every sample keeps its own gradient;
4. token score ``s = ||dy/dh_i[token]||_2``; per (sample, block): mean strength, top-k mass
   (share of the k largest scores in the total) and the entropy of ``s / sum(s)`` (natural log,
   also divided by ``log n``); and the note's curves, which pool each pair's token scores over
   its timesteps x seeds before the metrics (table ``pooled``, computed in the merge).

Shards: one per (model, timestep, seed, data slice) holding every selected block, with one row
per sample so merges show the spread over seeds and samples.  Nothing is dropped silently:
non-finite token scores are excluded from the metrics and counted per row; rows with no usable
token (``empty``), an all-zero score vector (``zero_mass``) or no gradient (``no_grad``) keep NaN
metrics and a status.  ``layerscope textgrad`` (:func:`run_pair`) is the note's single-pair mode.
See docs/probes/sd3_textgrad.md.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Sequence

import numpy as np

from layerscope.probes.base import GroupLayout, Probe, ShardSpec

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from layerscope.h5io import Shard, ShardWriter

STATUS = ("ok", "empty", "zero_mass", "no_grad")  # row status codes 0..3
OK, EMPTY, ZERO_MASS, NO_GRAD = range(4)
METRICS = ("strength", "topk_mass", "entropy", "entropy_norm")
POOLED_COLS = ["timestep_index", "block", "hook", "pairs", "samples_per_pair", "nonfinite"] + [
    f"{m}{suffix}" for m in ("strength", "topk_mass", "entropy") for suffix in ("_n", "", "_ci_low", "_ci_high")]
FIGURES = {"strength": "grad_strength_curve", "topk_mass": "grad_topk_mass_curve", "entropy": "grad_entropy_curve"}


def hook_name(block: int) -> str:
    return f"transformer_blocks.{block}.hook_text_grad"


# ------------------------------------------------------------------------------------ metrics
def token_metrics(scores: np.ndarray, mask: np.ndarray | None, topk: int) -> dict[str, np.ndarray]:
    """Per-row metrics of token scores [N, L] over the positions where ``mask`` is True.

    Non-finite scores are excluded and counted (``nonfinite``); ``n_tokens`` counts the finite
    scores used.  Rows: ``status`` 0 ok; 1 empty (no finite score left: every metric NaN);
    2 zero_mass (all scores 0: strength 0, the distribution metrics NaN).  Entropy uses the natural
    log with 0 log 0 = 0; ``entropy_norm = entropy / log(n)`` (0 when n = 1).  Top-k mass is the
    sum of the min(k, n) largest scores over the sum of all.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"scores must be [N, L], got shape {s.shape}")
    m = np.ones_like(s, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    n_rows = s.shape[0]
    out = {k: np.full(n_rows, np.nan) for k in METRICS}
    out["n_tokens"] = np.zeros(n_rows, np.int64)
    out["nonfinite"] = np.zeros(n_rows, np.int64)
    out["status"] = np.zeros(n_rows, np.int8)
    for r in range(n_rows):
        row = s[r][m[r]]
        fin = np.isfinite(row)
        out["nonfinite"][r] = int((~fin).sum())
        v = row[fin]
        n = v.size
        out["n_tokens"][r] = n
        if n == 0:
            out["status"][r] = EMPTY
            continue
        out["strength"][r] = v.mean()
        total = v.sum()
        if total <= 0:
            out["status"][r] = ZERO_MASS
            continue
        out["topk_mass"][r] = np.sort(v)[::-1][: min(topk, n)].sum() / total
        p = v / total
        nz = p[p > 0]
        h = float(-(nz * np.log(nz)).sum())
        out["entropy"][r] = h
        out["entropy_norm"][r] = h / np.log(n) if n > 1 else 0.0
    return out


def no_grad_rows(n_rows: int) -> dict[str, np.ndarray]:
    """Rows for a block whose text input has no gradient (force_txt_grad off): NaN metrics, status no_grad."""
    out = {k: np.full(n_rows, np.nan) for k in METRICS}
    out.update(n_tokens=np.zeros(n_rows, np.int64), nonfinite=np.zeros(n_rows, np.int64),
               status=np.full(n_rows, NO_GRAD, np.int8))
    return out


# ------------------------------------------------------------------------------------ gradients
def text_input_grads(transformer: "torch.nn.Module", blocks: Sequence[int], call_kwargs: Mapping[str, Any],
                     force_txt_grad: bool = True, backward: bool = True) -> tuple["torch.Tensor", dict[int, "torch.Tensor | None"]]:
    """Output of one transformer forward and dy/d(text input of every block in ``blocks``), y = sum(out^2).

    One forward, one backward: a forward pre-hook (``with_kwargs=True``: SD3 calls its blocks with
    keyword arguments only) keeps each selected block's ``encoder_hidden_states``; a single
    ``torch.autograd.grad`` call then differentiates with respect to all of them.  With frozen
    parameters no text state requires grad, so with ``force_txt_grad`` the first hooked input that
    does not is made a leaf that does (every later block then depends on it; detaching a later
    input would cut the path to the earlier ones).  Without forcing, blocks whose input does not
    require grad get None.  ``backward=False`` builds the graph and stops (for measuring it).
    """
    import torch

    captured: dict[int, torch.Tensor] = {}
    handles = []

    def make_hook(i: int) -> Callable:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            h = kwargs["encoder_hidden_states"]
            if force_txt_grad and not h.requires_grad:
                h = h.detach().requires_grad_(True)
                captured[i] = h
                return args, {**kwargs, "encoder_hidden_states": h}
            captured[i] = h
            return None

        return hook

    for i in blocks:
        handles.append(transformer.transformer_blocks[i].register_forward_pre_hook(make_hook(i), with_kwargs=True))
    try:
        with torch.enable_grad():
            out = transformer(**call_kwargs, return_dict=False)[0]
            y = out.float().pow(2).sum()
            want = [i for i in blocks if captured[i].requires_grad]
            grads: dict[int, torch.Tensor | None] = {i: None for i in blocks}
            if want and y.requires_grad and backward:
                got = torch.autograd.grad(y, [captured[i] for i in want], allow_unused=True)
                grads.update(dict(zip(want, got)))
    finally:
        for h in handles:
            h.remove()
    return out.detach(), grads


def text_input_grads_per_block(transformer: "torch.nn.Module", blocks: Sequence[int],
                               call_kwargs: Mapping[str, Any]) -> dict[int, "torch.Tensor"]:
    """A baseline for the one-pass method: one forward and one backward per block, each
    differentiating with respect to that block's text input alone (made a leaf there, so the
    backward stops at block i: the cheapest per-block loop; used by the benchmark)."""
    out = {}
    for i in blocks:
        out[i] = text_input_grads(transformer, [i], call_kwargs, force_txt_grad=True)[1][i]
    return out


def noise_for(seed: int, image_id: int, shape: Sequence[int]) -> "torch.Tensor":
    """Gaussian noise for one (seed, image), float32 on the CPU: the same whatever the slicing,
    batching or device."""
    import torch

    state = np.random.SeedSequence([int(seed), int(image_id)]).generate_state(2, dtype=np.uint32)
    g = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    return torch.randn(tuple(shape), generator=g, dtype=torch.float32)


# ------------------------------------------------------------------------------------ timesteps
CONVENTIONS = ("note", "schedule_index")


def resolve_timestep(value: int, convention: str, scheduler: Any, field: str = "probes.sd3_textgrad.timesteps") -> tuple[float, float]:
    """(sigma, model timestep) of a configured timestep ``value``.

    ``note`` (default; design note 000's script): ``value`` is an integer timestep of the
    ``num_train_timesteps``-step training grid, ``sigma = value / num_train_timesteps`` with no
    shift, and the model is fed ``value`` itself; 0 is clean, 1000 pure noise.
    ``schedule_index``: ``value`` indexes the (shifted) training table of a fresh
    ``FlowMatchEulerDiscreteScheduler``: ``sigma = sigmas[value]``, ``t = timesteps[value]``; 0 is the
    noisiest.  For SD3 (shift 3) schedule index 250 is the note's 900 and 750 the note's 500.
    """
    from layerscope.errors import ConfigError

    v = int(value)
    total = int(scheduler.config.num_train_timesteps)
    if convention == "note":
        if not 0 <= v <= total:
            raise ConfigError(f"config field {field}: timestep {v} outside 0..{total} "
                              f"(timestep_convention note: sigma = t / {total}, 0 is clean)")
        return v / total, float(v)
    if convention == "schedule_index":
        if not 0 <= v < len(scheduler.sigmas):
            raise ConfigError(f"config field {field}: index {v} outside 0..{len(scheduler.sigmas) - 1} "
                              f"(timestep_convention schedule_index: indices into the {total}-step shifted training "
                              f"schedule; 0 is the noisiest)")
        return float(scheduler.sigmas[v]), float(scheduler.timesteps[v])
    raise ConfigError(f"config field probes.sd3_textgrad.timestep_convention: {convention!r}, expected one of {CONVENTIONS}")


# ------------------------------------------------------------------------------------ batching
@dataclass(frozen=True)
class Sample:
    """One (pair, timestep, seed): the unit the note's script runs one forward + backward for."""

    record: Any  # layerscope.data.Record: image_id, path, caption
    timestep: int  # as configured
    sigma: float
    t_model: float
    seed: int


ENCODE_CHUNK = 8  # pairs per text/VAE encoding call (no_grad; a 1024 px VAE encode of 8 images fits a GPU)


@dataclass
class Settings:
    blocks: list[int]
    msl: int
    size: int
    force: bool
    batch_size: int | str  # an int, or "auto" (from memory_budget_mb)
    memory_budget_mb: float
    seq_len: int


_GRAPH_BYTES: dict[tuple, tuple[int, int]] = {}


def saved_bytes(transformer: "torch.nn.Module", blocks: Sequence[int], call_kwargs: Mapping[str, Any]) -> int:
    """Bytes of the distinct storages autograd saves for the backward of one ``text_input_grads`` call.

    Measured with ``torch.autograd.graph.saved_tensors_hooks`` during the forward alone (works on
    every device, unlike the CUDA allocator statistics); storages are counted once each, so frozen
    weights saved by several ops count once.  Used at batch 1 and 2 to split the cost into a fixed
    and a per-sample part.
    """
    import torch

    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        text_input_grads(transformer, blocks, call_kwargs, backward=False)
    return int(sum(seen.values()))


def graph_bytes(transformer: "torch.nn.Module", blocks: Sequence[int], make_kwargs: Callable[[int], Mapping[str, Any]],
                key: Any = None) -> tuple[int, int]:
    """(per-sample, fixed) bytes of the autograd graph from batches of 1 and 2 samples
    (``make_kwargs(n)``); cached under ``key`` (transformer, blocks, input shapes): one measurement per process."""
    key = (id(transformer), tuple(blocks), key)
    if key not in _GRAPH_BYTES:
        b1, b2 = saved_bytes(transformer, blocks, make_kwargs(1)), saved_bytes(transformer, blocks, make_kwargs(2))
        _GRAPH_BYTES[key] = (b2 - b1, 2 * b1 - b2)
    return _GRAPH_BYTES[key]


def batch_size_for_budget(per_sample: int, fixed: int, budget_bytes: float, n: int, headroom: float = 2.0) -> int:
    """Largest batch whose autograd graph fits the budget: ``fixed + b * headroom * per_sample <= budget``,
    clamped to 1..n.  ``headroom`` 2 covers the backward's gradient buffers (about one more copy of
    the saved activations at their widest)."""
    if per_sample <= 0:
        return max(1, n)
    b = int((budget_bytes - fixed) // (headroom * per_sample))
    return max(1, min(n, b))


def compute_samples(pipe: Any, samples: Sequence[Sample], st: Settings, log: Any = None) -> dict[str, Any]:
    """Token scores of every sample in batches: ONE forward and ONE backward per batch for all blocks.

    A batch may mix pairs, timesteps and seeds (each sample has its own latent noise, sigma and
    model timestep); the objective ``y = sum_samples sum(out^2)`` is a sum of per-sample terms and
    samples do not interact in the transformer, so ``dy/dh`` of a sample's rows is that sample's own
    gradient (tested equal to batch 1).  Text and image of a pair are encoded once for all its
    (timestep, seed) samples.  Returns ``scores`` {block: [N, L] float64 or None (no gradient)},
    ``mask`` [N, L] bool, ``objective`` [N] and the batch size used.
    """
    import torch

    from layerscope.data import load_image
    from layerscope.models.sd3 import text_token_mask

    tr = pipe.transformer
    device, tdt = tr.device, tr.dtype  # (module .dtype walks the parameters: read once)
    vae_dtype = pipe.vae.dtype
    vae_shift = float(getattr(pipe.vae.config, "shift_factor", 0.0) or 0.0)
    vae_scale = float(pipe.vae.config.scaling_factor)
    cache: dict[int, tuple] = {}
    pairs = list(dict.fromkeys(s.record for s in samples))  # pairs in first-seen order
    for start in range(0, len(pairs), ENCODE_CHUNK):  # text and image of a pair: encoded once, pairs batched
        chunk = pairs[start:start + ENCODE_CHUNK]
        caps = [r.caption for r in chunk]
        with torch.no_grad():
            pe, _, pooled, _ = pipe.encode_prompt(prompt=caps, prompt_2=None, prompt_3=None, device=device,
                                                  do_classifier_free_guidance=False, max_sequence_length=st.msl)
            pix = pipe.image_processor.preprocess([load_image(r.path, st.size) for r in chunk], height=st.size, width=st.size)
            lat = pipe.vae.encode(pix.to(device=device, dtype=vae_dtype)).latent_dist.mode()
            z0 = (lat.float() - vae_shift) * vae_scale
        if pe.shape[1] != st.seq_len:
            from layerscope.errors import ConfigError

            raise ConfigError(f"text sequence of {pe.shape[1]} tokens, expected {st.seq_len} "
                              f"(77 CLIP + probes.sd3_textgrad.max_sequence_length)")
        mask = text_token_mask(pipe, caps, st.msl)
        for j, rec in enumerate(chunk):
            cache[rec.image_id] = (pe[j], pooled[j], z0[j], mask[j])

    def kwargs_of(batch: Sequence[Sample]) -> dict[str, Any]:
        z0 = torch.stack([cache[s.record.image_id][2] for s in batch])
        eps = torch.stack([noise_for(s.seed, s.record.image_id, z0.shape[1:]) for s in batch]).to(device)
        sig = torch.tensor([s.sigma for s in batch], dtype=torch.float32, device=device).view(-1, 1, 1, 1)
        xt = ((1.0 - sig) * z0 + sig * eps).to(tdt)
        return dict(hidden_states=xt, timestep=torch.tensor([s.t_model for s in batch], device=device),
                    encoder_hidden_states=torch.stack([cache[s.record.image_id][0] for s in batch]).to(tdt),
                    pooled_projections=torch.stack([cache[s.record.image_id][1] for s in batch]).to(tdt))

    n = len(samples)
    bs = st.batch_size
    if bs == "auto":
        if n >= 2:
            z_shape = tuple(cache[samples[0].record.image_id][2].shape)
            per, fixed = graph_bytes(tr, st.blocks, lambda k: kwargs_of(samples[:k]), key=(tdt, z_shape, st.seq_len))
            bs = batch_size_for_budget(per, fixed, st.memory_budget_mb * 2**20, n)
            if log is not None:
                log.info("batch size %d from memory_budget_mb %s (autograd graph: %.1f MB per sample + %.1f MB fixed)",
                         bs, st.memory_budget_mb, per / 2**20, fixed / 2**20)
        else:
            bs = 1
    bs = int(bs)
    scores: dict[int, list[np.ndarray] | None] = {b: [] for b in st.blocks}
    objective = []
    from layerscope.progress import current as progress

    prog = progress(n, "samples")
    for start in range(0, n, bs):
        batch = samples[start:start + bs]
        out, grads = text_input_grads(tr, st.blocks, kwargs_of(batch), force_txt_grad=st.force)
        objective.append(out.float().pow(2).flatten(1).sum(1).cpu().numpy().astype(np.float64))
        for b in st.blocks:
            g = grads[b]
            if g is None:
                scores[b] = None
            elif scores[b] is not None:
                scores[b].append(g.float().norm(dim=-1).cpu().numpy().astype(np.float64))
        prog.update(len(batch))
    mask = np.stack([cache[s.record.image_id][3].numpy() for s in samples]) if n else np.zeros((0, st.seq_len), bool)
    return {"scores": {b: (np.concatenate(v) if v else np.zeros((0, st.seq_len))) if v is not None else None
                       for b, v in scores.items()},
            "mask": mask, "objective": np.concatenate(objective) if objective else np.zeros(0), "batch_size": bs}


# ------------------------------------------------------------------------------------ pooled curves
def note_metrics(scores: np.ndarray, topk: int) -> tuple[float, float, float]:
    """The note script's ``compute_metrics`` on one pooled score vector: mean strength, top-k mass
    with ``k = max(1, min(topk, n))`` and entropy ``-sum p log(p + 1e-12)``, ``p = s / sum s``.
    The caller passes finite scores only (non-finite ones are counted, not zeroed as the script does);
    an empty vector or a non-positive sum gives NaN (the script: 0)."""
    s = np.asarray(scores, dtype=np.float64)
    total = s.sum()
    if s.size == 0 or not np.isfinite(total) or total <= 0:
        return (float(s.mean()) if s.size else np.nan), np.nan, np.nan
    k = max(1, min(topk, s.size))
    p = s / total
    return float(s.mean()), float(np.sort(s)[::-1][:k].sum() / total), float(-(p * np.log(p + 1e-12)).sum())


def pool_pair(rows: np.ndarray, mask: np.ndarray | None, topk: int) -> dict[str, Any]:
    """Pool one pair's token scores over its (timestep, seed) rows [R, L] BEFORE the metrics, as the
    note's script does: the per-token mean over the rows, restricted to ``mask``, then
    :func:`note_metrics`.  A token with a non-finite score in any row is excluded and counted."""
    r = np.asarray(rows, dtype=np.float64)
    avg = r.mean(axis=0)
    keep = np.ones(avg.shape, bool) if mask is None else np.asarray(mask, bool)
    v = avg[keep]
    fin = np.isfinite(v)
    strength, topk_mass, entropy = note_metrics(v[fin], topk)
    return {"strength": strength, "topk_mass": topk_mass, "entropy": entropy, "n_tokens": int(fin.sum()),
            "nonfinite": int((~fin).sum()), "samples": int(r.shape[0])}


class SD3TextGrad(Probe):
    name: ClassVar[str] = "sd3_textgrad"
    axes: ClassVar[tuple[str, ...]] = ("timestep", "seed", "slice")
    families: ClassVar[tuple[str, ...]] = ("sd3",)
    # samples do not interact (per-sample noise, per-sample gradients): the batch is a speed knob
    exec_keys: ClassVar[tuple[str, ...]] = ("batch_size", "memory_budget_mb")
    tables: ClassVar[tuple[str, ...]] = ("samples", "blocks", "pooled", "tokens")
    figures: ClassVar[tuple[str, ...]] = tuple(FIGURES.values())
    layer_keys: ClassVar[tuple[str, ...]] = ("layers",)
    layout: ClassVar[tuple[GroupLayout, ...]] = (
        GroupLayout(r"stats/transformer_blocks\.\d+\.hook_text_grad",
                    {**{m: "metric" for m in METRICS}, "image_id": "index", "n_tokens": "count",
                     "nonfinite": "count", "status": "int", "token_scores": "metric?"}, attrs=("block",)),
        GroupLayout(r"inputs", {"image_id": "index", "token_mask": "uint8", "objective": "metric"}),
    )

    def expected_groups(self, shard: "Shard") -> list[str] | None:
        return ["inputs", *(f"stats/{hook_name(int(b))}" for b in shard.json_attr("blocks"))]

    def check_config(self, probe_cfg: Mapping[str, Any], config: Mapping[str, Any]) -> None:
        from layerscope.errors import ConfigError

        for key in ("timesteps", "seeds"):
            vals = list(probe_cfg.get(key, []))
            if len(set(vals)) != len(vals):
                raise ConfigError(f"config field probes.{self.name}.{key}: duplicate values {vals}")
        if probe_cfg.get("pooled_curves", True) and not probe_cfg.get("save_token_scores", True):
            raise ConfigError(f"config field probes.{self.name}.save_token_scores: false, but pooled_curves (the note's "
                              f"curves, pooled per pair over timesteps x seeds) need every token's score; "
                              f"set save_token_scores: true or pooled_curves: false")
        conv = probe_cfg.get("timestep_convention", "note")
        if conv not in CONVENTIONS:
            raise ConfigError(f"config field probes.{self.name}.timestep_convention: {conv!r}, expected one of {CONVENTIONS}")

    # ------------------------------------------------------------------ shard
    def setup(self, model_cfg: Mapping[str, Any], probe_cfg: Mapping[str, Any], device_name: str,
              model: str = "?") -> tuple[Any, Any, Settings]:
        """Load the pipeline and resolve the probe's settings (shared by shards and ``layerscope textgrad``)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        from layerscope.errors import ConfigError
        from layerscope.models import resolve_device, resolve_dtype
        from layerscope.models.sd3 import load

        field = f"probes.{self.name}"
        device = resolve_device(device_name)
        dtype = resolve_dtype(model_cfg.get("dtype", "fp32"), device)
        pipe = load(model_cfg, device, dtype)
        tr = pipe.transformer
        n_layers = len(tr.transformer_blocks)
        blocks = list(range(n_layers)) if probe_cfg.get("layers", "all") == "all" else [int(b) for b in probe_cfg["layers"]]
        bad = [b for b in blocks if not 0 <= b < n_layers]
        if bad:
            raise ConfigError(f"config field {field}.layers: {bad} out of range for a {n_layers}-block transformer (0..{n_layers - 1})")
        sch = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)  # training look-ups only
        vsf = int(pipe.vae_scale_factor)
        size = int(probe_cfg.get("image_size", 0)) or int(tr.config.sample_size) * vsf
        if size % (vsf * int(tr.config.patch_size)):
            raise ConfigError(f"config field {field}.image_size: {size} is not a multiple of {vsf * tr.config.patch_size} "
                              f"(VAE scale {vsf} x patch size {tr.config.patch_size})")
        msl = int(probe_cfg.get("max_sequence_length", 256))
        st = Settings(blocks=blocks, msl=msl, size=size, force=bool(probe_cfg.get("force_txt_grad", True)),
                      batch_size=probe_cfg.get("batch_size", "auto"),
                      memory_budget_mb=float(probe_cfg.get("memory_budget_mb", 4096)),
                      seq_len=pipe.tokenizer_max_length + msl)
        return pipe, sch, st

    def run_shard(self, spec: ShardSpec, writer: "ShardWriter") -> None:
        pipe, sch, st = self.setup(spec.model_cfg, spec.probe_cfg, spec.device, spec.model)
        conv = spec.probe_cfg.get("timestep_convention", "note")
        t_val = int(spec.axes["timestep"])
        sigma, t_model = resolve_timestep(t_val, conv, sch)
        seed = int(spec.axes["seed"])
        samples = [Sample(r, t_val, sigma, t_model, seed) for r in spec.records()]
        res = compute_samples(pipe, samples, st, log=logging.getLogger("layerscope.sd3_textgrad"))
        self.write_results(writer, pipe, sch, st, spec.probe_cfg, spec.model_cfg, spec.model, samples, res,
                           np.arange(len(samples)))

    def write_results(self, writer: "ShardWriter", pipe: Any, sch: Any, st: Settings, probe_cfg: Mapping[str, Any],
                      model_cfg: Mapping[str, Any], model: str, samples: Sequence[Sample], res: Mapping[str, Any],
                      idx: np.ndarray) -> None:
        """Write the rows ``idx`` of ``res`` (all of one (timestep, seed)) as one shard's groups and attributes."""
        import torch

        log = logging.getLogger("layerscope.sd3_textgrad")
        topk = int(probe_cfg.get("topk", 10))
        ignore_padding = bool(probe_cfg.get("ignore_padding", False))  # the note: an opt-in flag
        keep_tokens = bool(probe_cfg.get("save_token_scores", True))
        dtype = pipe.transformer.dtype
        sub = [samples[i] for i in idx]
        s0 = sub[0] if sub else None
        mask = res["mask"][idx]
        y = res["objective"][idx]
        ids = [s.record.image_id for s in sub]
        n, L = len(sub), st.seq_len
        for b in st.blocks:
            sc_all = res["scores"][b]
            if sc_all is None:
                sc = np.full((n, L), np.nan)
                met = no_grad_rows(n)
            else:
                sc = sc_all[idx]
                met = token_metrics(sc, mask if ignore_padding else None, topk)
                n_bad = int(met["nonfinite"].sum()) + int((~np.isfinite(y)).sum())
                if n_bad and dtype == torch.float16:
                    from layerscope.errors import ConfigError

                    raise ConfigError(
                        f"non-finite text gradients in fp16 ({n_bad} values at {hook_name(b)}, timestep {s0.timestep}): "
                        f"set models.{model}.dtype: fp32 (or bf16)")
                if n_bad:
                    log.warning("%s: %d non-finite token scores excluded and counted (column nonfinite)", hook_name(b), n_bad)
            arrays: dict[str, np.ndarray] = {"image_id": np.asarray(ids, np.int64)}
            for k in (*METRICS, "n_tokens", "nonfinite", "status"):
                dt = {"n_tokens": np.int64, "nonfinite": np.int64, "status": np.int8}.get(k, np.float64)
                arrays[k] = np.asarray(met[k]).astype(dt)
            if keep_tokens:
                arrays["token_scores"] = sc.astype(np.float32)
            writer.write(f"stats/{hook_name(b)}", arrays, attrs={"block": b}, compress=True)
        writer.write("inputs", {"image_id": np.asarray(ids, np.int64), "token_mask": mask.astype(np.uint8),
                                "objective": y.astype(np.float64)}, compress=True)
        for k, v in {
            "blocks": st.blocks, "num_layers": len(pipe.transformer.transformer_blocks),
            "timestep_convention": probe_cfg.get("timestep_convention", "note"),
            "timestep_index": int(s0.timestep) if s0 else -1, "timestep": float(s0.t_model) if s0 else np.nan,
            "sigma": float(s0.sigma) if s0 else np.nan, "seed": int(s0.seed) if s0 else -1,
            "n_images": n, "image_ids": ids, "seq_len": L, "clip_len": pipe.tokenizer_max_length,
            "t5_len": st.msl, "has_t5": pipe.text_encoder_3 is not None, "ignore_padding": ignore_padding,
            "force_txt_grad": st.force, "topk": topk, "dtype": str(dtype).removeprefix("torch."), "image_size": st.size,
            "used_lora": bool(model_cfg.get("lora")), "checkpoint": str(model_cfg.get("checkpoint") or ""),
            "scheduler_shift": float(sch.config.shift), "num_train_timesteps": int(sch.config.num_train_timesteps),
            "batch_size": int(res["batch_size"]),
        }.items():
            writer.set_attr(k, v)

    # ------------------------------------------------------------------ merge
    def merge(self, shards: list["Shard"]) -> dict[str, "pd.DataFrame"]:
        import pandas as pd

        from layerscope.h5io import ShardError

        probe_cfg = shards[0].json_attr("spec")["probe_cfg"]
        per_timestep = bool(probe_cfg.get("lines_per_timestep", True))
        pooled_on = bool(probe_cfg.get("pooled_curves", True))
        blocks0 = shards[0].json_attr("blocks")
        frames, tok_rows = [], []
        pool: dict[tuple[int, int], list[tuple[int, np.ndarray, np.ndarray | None]]] = {}  # (block, image) -> rows
        no_tokens = []
        for sh in shards:
            if sh.json_attr("blocks") != blocks0:
                raise ShardError(f"{sh.path}: blocks {sh.json_attr('blocks')} differ from {shards[0].path}'s {blocks0}")
            t_idx, seed = int(sh.attrs["timestep_index"]), int(sh.attrs["seed"])
            conv = str(sh.attrs.get("timestep_convention", "schedule_index"))
            inputs = sh.groups["inputs"]
            clip_len = int(sh.attrs["clip_len"])
            ignore_padding = bool(sh.attrs["ignore_padding"])
            topk = int(sh.attrs["topk"])
            for g in sh.subgroups("stats"):
                d = sh.groups[g]
                block = int(sh.group_attrs[g]["block"])
                hook = g.split("/", 1)[1]
                if pooled_on:
                    if "token_scores" not in d:
                        no_tokens.append(str(sh.path))
                    else:
                        mk = inputs["token_mask"].astype(bool)
                        for r, img in enumerate(d["image_id"]):
                            pool.setdefault((block, int(img)), []).append(
                                (t_idx, d["token_scores"][r], mk[r] if ignore_padding else None))
                df = pd.DataFrame({
                    "timestep_convention": conv, "timestep_index": t_idx, "timestep": float(sh.attrs["timestep"]),
                    "sigma": float(sh.attrs["sigma"]),
                    "seed": seed, "slice": sh.axes["slice"], "image_id": d["image_id"], "block": block, "hook": hook,
                    **{k: d[k] for k in METRICS}, "n_tokens": d["n_tokens"], "nonfinite": d["nonfinite"],
                    "status": [STATUS[int(s)] for s in d["status"]],
                })
                frames.append(df)
                if "token_scores" in d and len(d["token_scores"]):
                    sc = d["token_scores"].astype(np.float64)
                    mk = inputs["token_mask"].astype(bool)
                    for pos in range(sc.shape[1]):
                        col = sc[:, pos]
                        fin = np.isfinite(col)
                        tok_rows.append({"timestep_index": t_idx, "seed": seed, "block": block, "hook": hook, "position": pos,
                                         "segment": "clip" if pos < clip_len else "t5",
                                         "segment_position": pos if pos < clip_len else pos - clip_len,
                                         "count": int(fin.sum()), "nonfinite": int((~fin).sum()), "sum": float(col[fin].sum()),
                                         "content": int(mk[:, pos].sum())})
        if no_tokens:
            bad = sorted(set(no_tokens))
            raise ShardError(f"pooled curves need per-token scores, but {len(bad)} shard(s) were written without them "
                             f"(save_token_scores off), e.g. {bad[0]}; set probes.{self.name}.save_token_scores: true and "
                             f"rerun them (snakemake --forcerun {' '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}), "
                             f"or set pooled_curves: false")
        samples = pd.concat(frames, ignore_index=True).sort_values(
            ["timestep_index", "seed", "block", "image_id"], ignore_index=True)
        dup = samples.duplicated(["timestep_index", "seed", "block", "image_id"])
        if dup.any():
            r = samples[dup].iloc[0]
            raise ShardError(f"sample {r.image_id} appears twice for timestep {r.timestep_index}, seed {r.seed}: overlapping shards")
        samples.insert(0, "line", [f"step {t} (sigma {sg:.2f})" if per_timestep else "all timesteps"
                                   for t, sg in zip(samples["timestep_index"], samples["sigma"])])
        blocks = pd.concat([self._block_table(samples, by_timestep=True), self._block_table(samples, by_timestep=False)],
                           ignore_index=True)
        tok_cols = ["timestep_index", "block", "hook", "position", "segment", "segment_position", "count", "nonfinite",
                    "mean_score", "content_fraction"]
        if tok_rows:
            t = pd.DataFrame(tok_rows).groupby(["timestep_index", "block", "hook", "position", "segment", "segment_position"],
                                                as_index=False)[["count", "nonfinite", "sum", "content"]].sum()
            t["mean_score"] = t["sum"] / t["count"].where(t["count"] > 0)
            t["content_fraction"] = t["content"] / (t["count"] + t["nonfinite"])
            tokens = t[tok_cols]
        else:
            tokens = pd.DataFrame(columns=tok_cols)
        pooled = self._pooled_table(pool, topk) if pooled_on else pd.DataFrame(columns=POOLED_COLS)
        # every table row names its timestep as configured, the convention, sigma and the model timestep
        # ('all' rows pool several timesteps: NaN there)
        conv = str(samples["timestep_convention"].iloc[0])
        per_t = samples.drop_duplicates("timestep_index").set_index("timestep_index")[["timestep", "sigma"]]
        lookup = {str(k): (float(v.timestep), float(v.sigma)) for k, v in per_t.iterrows()}
        for df in (blocks, pooled, tokens):
            keys = df["timestep_index"].astype(str)
            pos = df.columns.get_loc("timestep_index") + 1
            df.insert(pos, "sigma", [lookup.get(k, (np.nan, np.nan))[1] for k in keys])
            df.insert(pos, "timestep", [lookup.get(k, (np.nan, np.nan))[0] for k in keys])
            df.insert(0, "timestep_convention", conv)
        return {"samples": samples, "blocks": blocks, "pooled": pooled, "tokens": tokens}

    @staticmethod
    def _pooled_table(pool: Mapping[tuple[int, int], list], topk: int) -> "pd.DataFrame":
        """The note's three curves: per (block, pair) the token scores pooled over every (timestep,
        seed) row of the pair (``timestep_index`` 'all'; per timestep: over its seeds only), the
        metrics of that pooled vector (:func:`pool_pair`), then the mean over pairs with a 95 % t
        interval.  Exact across shards: the rows are the stored per-token scores."""
        import pandas as pd
        from scipy import stats as sps

        per_pair = []
        for (block, img), rows in pool.items():
            groups: dict[str, list] = {"all": rows}
            for t in sorted({r[0] for r in rows}):
                groups[str(t)] = [r for r in rows if r[0] == t]
            for tkey, rr in groups.items():
                m = rr[0][2]
                per_pair.append({"timestep_index": tkey, "block": block, "image_id": img,
                                 **pool_pair(np.stack([r[1] for r in rr]), m, topk)})
        if not per_pair:
            return pd.DataFrame(columns=POOLED_COLS)
        pp = pd.DataFrame(per_pair)
        out = []
        for (tkey, block), g in pp.groupby(["timestep_index", "block"], sort=True):
            row: dict[str, Any] = {"timestep_index": tkey, "block": block, "hook": hook_name(block), "pairs": len(g),
                                   "samples_per_pair": int(g["samples"].min()), "nonfinite": int(g["nonfinite"].sum())}
            for mname in ("strength", "topk_mass", "entropy"):
                v = g[mname].to_numpy(dtype=np.float64)
                v = v[np.isfinite(v)]
                mean = float(v.mean()) if v.size else np.nan
                half = float(sps.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else np.nan
                row.update({f"{mname}_n": v.size, mname: mean, f"{mname}_ci_low": mean - half, f"{mname}_ci_high": mean + half})
            out.append(row)
        return pd.DataFrame(out)[POOLED_COLS]

    @staticmethod
    def _block_table(samples: "pd.DataFrame", by_timestep: bool) -> "pd.DataFrame":
        """The note's per-block table: counts by status, then mean and std (over seeds and samples)
        of each metric, over the rows where it is finite."""
        import pandas as pd

        keys = ["timestep_index", "block", "hook"] if by_timestep else ["block", "hook"]
        out = []
        for key, g in samples.groupby(keys, sort=True):
            key = key if isinstance(key, tuple) else (key,)
            row: dict[str, Any] = dict(zip(keys, key))
            row["timestep_index"] = str(row["timestep_index"]) if by_timestep else "all"
            row["rows"] = len(g)
            for s in STATUS:
                row[f"n_{s}"] = int((g["status"] == s).sum())
            row["nonfinite"] = int(g["nonfinite"].sum())
            for m in METRICS:
                v = g[m].to_numpy(dtype=np.float64)
                v = v[np.isfinite(v)]
                row[f"{m}_n"] = v.size
                row[f"{m}_mean"] = float(v.mean()) if v.size else np.nan
                row[f"{m}_std"] = float(v.std(ddof=1)) if v.size > 1 else np.nan
            out.append(row)
        return pd.DataFrame(out)

    # ------------------------------------------------------------------ plot
    def plot(self, tables: dict[str, "pd.DataFrame"], fig_dir: Path, caption: str = "") -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import seaborn as sns

        sns.set_theme(style="whitegrid", context="paper")
        fig_dir = Path(fig_dir)
        s = tables["samples"]
        several = s["line"].nunique() > 1
        labels = {"strength": "mean token gradient norm", "topk_mass": "top-k mass", "entropy": "entropy (nats)"}
        for metric, fname in FIGURES.items():
            d = s[np.isfinite(s[metric].astype(float))]
            fig, ax = plt.subplots(figsize=(8, 3.8))
            sns.lineplot(data=d, x="block", y=metric, hue="model", style="line" if several else None, markers=True,
                         dashes=True, errorbar=("ci", 95), n_boot=500, seed=0, ax=ax)
            if metric == "strength":
                ax.set_yscale("log")
            ax.set_xlabel("MMDiT block (transformer_blocks.i)")
            ax.set_ylabel(labels[metric])
            n_seeds = d["seed"].nunique()
            n_img = d["image_id"].nunique()
            ax.set_title(f"{labels[metric]} of dy/d(text input) per block\n"
                         f"95% CI over {n_seeds} seed(s) x {n_img} sample(s) {caption}".strip(), fontsize=9)
            ax.xaxis.get_major_locator().set_params(integer=True)
            from layerscope.plots import mark_nonfinite

            mark_nonfinite(ax, s, "block")
            if ax.get_legend() is not None:
                sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
            fig.tight_layout()
            fig.savefig(fig_dir / f"{fname}.png", dpi=120)
            plt.close(fig)


# ------------------------------------------------------------------------------------ single pair
def run_pair(model: str, prompt: str, image: str | Path, out_dir: str | Path, *, timesteps: Sequence[int] = (500,),
             seeds: Sequence[int] = (0,), checkpoint: str | None = None, lora: str | None = None, dtype: str = "fp32",
             device: str = "auto", probe_cfg: Mapping[str, Any] | None = None) -> dict[str, list[Path]]:
    """The note script's single-pair mode (``--prompt`` / ``--image`` / ``--load-ckpt``) on the probe's code.

    Every (timestep, seed) of the pair runs in batches (one forward and one backward per batch);
    the results are written as the study writes them, one shard per (timestep, seed) under
    ``out_dir/shards/<model>/``, merged into ``out_dir/tables/<model>/*.csv`` (samples, blocks,
    pooled, tokens) and drawn into ``out_dir/figures/``.  ``model`` is a local pipeline folder or
    ``hub:<id>``; ``checkpoint`` a transformer state dict or LoRA file, ``lora`` a peft adapter folder.
    """
    import hashlib
    import json

    from layerscope.data import Record
    from layerscope.errors import ConfigError, DataError, ModelLoadError
    from layerscope.h5io import ShardWriter
    from layerscope.merge import merge_to_tables, plot_from_tables
    from layerscope.plan import shard_label

    out_dir = Path(out_dir)
    if not prompt.strip():
        raise ConfigError("--prompt: empty prompt")
    if not Path(image).is_file():
        raise DataError(f"--image: image file not found: {image}")
    if len(set(timesteps)) != len(timesteps) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--timesteps / --seeds: duplicate values ({list(timesteps)}, {list(seeds)})")
    name = "model"
    if model.startswith("hub:"):
        mcfg: dict[str, Any] = {"kind": "hub", "hub_id": model[4:]}
    else:
        if not Path(model).exists():
            raise ModelLoadError(f"--model: model files not found: {model}")
        mcfg = {"kind": "path", "path": str(model)}
        name = Path(model).name or name
    for key, value, flag in (("checkpoint", checkpoint, "--load-ckpt"), ("lora", lora, "--lora")):
        if value:
            if not Path(value).exists():
                raise ModelLoadError(f"{flag}: file not found: {value}")
            mcfg[key] = str(value)
    mcfg.update(family="sd3", dtype=dtype, name=name)
    pcfg = {"models": [name], "dataset": "pair", "timesteps": list(timesteps), "seeds": list(seeds), "slices": 1,
            "timestep_convention": "note", **dict(probe_cfg or {})}
    probe = SD3TextGrad()
    probe.check_config(pcfg, {})
    pipe, sch, st = probe.setup(mcfg, pcfg, device, name)
    rec = Record(0, str(Path(image).resolve()), prompt)
    conv = pcfg["timestep_convention"]
    samples = [Sample(rec, int(t), *resolve_timestep(int(t), conv, sch), int(s)) for t in timesteps for s in seeds]
    res = compute_samples(pipe, samples, st, log=logging.getLogger("layerscope.sd3_textgrad"))
    digest = hashlib.sha256(json.dumps([mcfg, pcfg, prompt, rec.path], sort_keys=True).encode()).hexdigest()[:16]
    shard_dir = out_dir / "shards" / name
    shard_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for t in timesteps:
        for s in seeds:
            axes = {"timestep": str(t), "seed": str(s), "slice": "0of1"}
            spec = ShardSpec(probe=probe.name, model=name, axes=axes, probe_cfg=pcfg, model_cfg=mcfg, config_hash=digest,
                             device=device)
            prov = {"probe": probe.name, "model": name, "axes": axes, "config_hash": digest,
                    "data_digest": json.dumps({"prompt": prompt, "image": rec.path}), "spec": spec.to_json_dict()}
            idx = np.array([i for i, smp in enumerate(samples) if smp.timestep == int(t) and smp.seed == int(s)])
            path = shard_dir / f"{shard_label(axes)}.h5"
            with ShardWriter(path, prov) as w:
                probe.write_results(w, pipe, sch, st, pcfg, mcfg, name, samples, res, idx)
            paths.append(path)
    tables = merge_to_tables(probe.name, name, paths, out_dir / "tables" / name, expect_hash=digest)
    figures = plot_from_tables(probe.name, [out_dir / "tables" / name], out_dir / "figures",
                               caption=f"(one pair: {prompt[:40]!r})")
    return {"shards": paths, "tables": tables, "figures": figures}
