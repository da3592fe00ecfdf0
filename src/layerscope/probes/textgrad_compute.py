"""The GPU side of the SD3 text-gradient probe: dy/d(text input) of every selected MMDiT block in
one backward pass, the timestep conventions, and batching many (pair, timestep, seed) samples into
one forward + backward under a memory budget. See :mod:`layerscope.probes.sd3_textgrad`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from layerscope import hooks

if TYPE_CHECKING:
    import torch


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
        block = hooks.get_module(transformer, "sd3", f"blocks.{i}.hook_text_grad")  # the vocabulary's module
        handles.append(block.register_forward_pre_hook(make_hook(i), with_kwargs=True))
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
