"""Ablating SDXL cross-attention on the UNet: forward hooks that zero the ``attn2`` output of chosen
groups (one generation, or a batch where every sample has its own keep-mask), record per-module
moments of what they pass on, and optionally zero the pooled text embedding.

This is the model side of the ``sdxl_ablation`` probe (design note 002), kept with the family as
diffusers keeps attention hooks beside the model: the probe decides *which* groups, this module
*how*. See :mod:`layerscope.probes.sdxl_ablation`.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

if TYPE_CHECKING:
    import torch

__all__ = ["ablate_cross_attention", "ablate_cross_attention_batched", "generate_batched"]


@contextmanager
def _installed(unet: "torch.nn.Module", modules: Mapping[str, Any], zero_hooks: Sequence[tuple[Any, Any]],
               pooled_pre_hook: Any, make_recorder: Any) -> Iterator[None]:
    """Install the ablation's hooks for the duration of the block, always removed after: the zeroing
    forward hooks, the pooled-text pre-hook (or None) and, registered after the zeroing hooks so they
    see what is passed on, one recorder per attn2 module (``make_recorder(name)``, or None)."""
    from diffusers.models.attention_processor import Attention

    handles = []
    try:
        for module, hook in zero_hooks:
            handles.append(module.register_forward_hook(hook))
        if pooled_pre_hook is not None:
            handles.append(unet.register_forward_pre_hook(pooled_pre_hook, with_kwargs=True))
        if make_recorder is not None:
            for name, m in modules.items():
                if name.split(".")[-1] == "attn2" and isinstance(m, Attention):
                    handles.append(m.register_forward_hook(make_recorder(name)))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def ablate_cross_attention(
    unet: "torch.nn.Module",
    zero_modules: Sequence[str],
    *,
    zero_pooled_text: bool = False,
    record: dict[str, Any] | None = None,
) -> Iterator[None]:
    """Zero the output of the named ``attn2`` modules for the duration of the block.

    Forward hooks (as in the note) return ``zeros_like(output)``: the residual stream then
    receives nothing from that cross-attention, bias of ``to_out`` included.  With
    ``zero_pooled_text`` a UNet pre-hook also replaces SDXL's pooled text embedding
    (``added_cond_kwargs['text_embeds']``) by zeros, which is SDXL's own null condition
    (``force_zeros_for_empty_prompt``).  With ``record`` (a dict), every ``attn2`` module's
    output *as passed on* is reduced into ``record[name]`` (a :class:`~layerscope.stats.Moments`
    over [tokens, channels]).  All hooks are removed on exit, also on error.
    """
    from layerscope.stats import Moments

    modules = dict(unet.named_modules())
    missing = [n for n in zero_modules if n not in modules]
    if missing:
        raise KeyError(f"UNet has no module {missing[0]}")

    def zero_hook(module, args, output):  # noqa: ARG001
        if isinstance(output, tuple):
            return tuple(o.new_zeros(o.shape) if hasattr(o, "new_zeros") else o for o in output)
        return output.new_zeros(output.shape)

    def make_recorder(name: str):
        def rec(module, args, output):  # noqa: ARG001
            out = output[0] if isinstance(output, tuple) else output
            flat = out.detach().reshape(-1, out.shape[-1])
            m = Moments.from_tensor(flat)
            record[name] = record[name].merge(m) if name in record else m

        return rec

    def pooled_pre_hook(module, args, kwargs):  # noqa: ARG001
        acd = kwargs.get("added_cond_kwargs")
        if acd and acd.get("text_embeds") is not None:
            kwargs = dict(kwargs)
            kwargs["added_cond_kwargs"] = {**acd, "text_embeds": acd["text_embeds"].new_zeros(acd["text_embeds"].shape)}
            return args, kwargs
        return None

    with _installed(unet, modules, [(modules[n], zero_hook) for n in zero_modules],
                    pooled_pre_hook if zero_pooled_text else None, make_recorder if record is not None else None):
        yield



@contextmanager
def ablate_cross_attention_batched(
    unet: "torch.nn.Module",
    keep: Mapping[str, Sequence[bool]],
    *,
    zero_pooled_text: Sequence[bool] | None = None,
    records: list[dict[str, Any]] | None = None,
) -> Iterator[None]:
    """Per-sample version of :func:`ablate_cross_attention` for a batch of ``n`` images.

    ``keep[name][i]`` says whether sample *i* keeps the output of ``attn2`` module ``name``;
    a dropped output is replaced by exact zeros (``torch.where``, so a non-finite output cannot
    leak through as NaN * 0).  The UNet sees ``k * n`` rows (``k = 2`` under classifier-free
    guidance: the pipeline concatenates ``[uncond..., cond...]``), so row *r* belongs to sample
    ``r % n``.  ``zero_pooled_text[i]`` zeroes sample *i*'s pooled text embedding.  With
    ``records`` (one dict per sample), each ``attn2`` output as passed on is reduced per sample
    over that sample's rows in the order a batch-1 run sees them.  Hooks are removed on exit.
    """
    import torch

    from layerscope.stats import Moments

    modules = dict(unet.named_modules())
    missing = [n for n in keep if n not in modules]
    if missing:
        raise KeyError(f"UNet has no module {missing[0]}")
    sizes = {len(v) for v in keep.values()} | ({len(zero_pooled_text)} if zero_pooled_text is not None else set())
    sizes |= {len(records)} if records is not None else set()
    if len(sizes) != 1:
        raise ValueError(f"per-sample masks of different lengths: {sorted(sizes)}")
    n = sizes.pop()

    def rows_mask(mask: Sequence[bool], rows: int, like: "torch.Tensor") -> "torch.Tensor":
        if rows % n:
            raise RuntimeError(f"attn2 batch of {rows} rows is not a multiple of the {n} ablation samples")
        m = torch.tensor(list(mask), dtype=torch.bool, device=like.device).repeat(rows // n)
        return m.view(rows, *([1] * (like.dim() - 1)))

    def make_zero_hook(mask: Sequence[bool]):
        def hook(module, args, output):  # noqa: ARG001
            out = output[0] if isinstance(output, tuple) else output
            masked = torch.where(rows_mask(mask, out.shape[0], out), out, torch.zeros((), dtype=out.dtype, device=out.device))
            return (masked,) + tuple(output[1:]) if isinstance(output, tuple) else masked

        return hook

    def make_recorder(name: str):
        def rec(module, args, output):  # noqa: ARG001
            out = (output[0] if isinstance(output, tuple) else output).detach()
            k = out.shape[0] // n
            for i in range(n):
                flat = out[i::n][:k].reshape(-1, out.shape[-1])  # rows i, i+n, ...: batch-1 row order
                m = Moments.from_tensor(flat)
                records[i][name] = records[i][name].merge(m) if name in records[i] else m

        return rec

    def pooled_pre_hook(module, args, kwargs):  # noqa: ARG001
        acd = kwargs.get("added_cond_kwargs")
        if acd and acd.get("text_embeds") is not None:
            te = acd["text_embeds"]
            kwargs = dict(kwargs)
            drop = ~rows_mask([not z for z in zero_pooled_text], te.shape[0], te)
            kwargs["added_cond_kwargs"] = {**acd, "text_embeds": torch.where(drop, torch.zeros((), dtype=te.dtype, device=te.device), te)}
            return args, kwargs
        return None

    zero_hooks = [(modules[name], make_zero_hook(list(mask))) for name, mask in keep.items() if not all(mask)]
    with _installed(unet, modules, zero_hooks, pooled_pre_hook if zero_pooled_text is not None and any(zero_pooled_text) else None,
                    make_recorder if records is not None else None):
        yield



def generate_batched(pipe: Any, prompt: str, seed: int, targets: Sequence[str], model_groups: Mapping[str, Sequence[str]],
                     zero_pooled: Mapping[str, bool], call: Mapping[str, Any], *, batch_size: int = 0,
                     records: Mapping[str, dict[str, Any]] | None = None) -> dict[str, "np.ndarray"]:
    """Images of every target (a group name kept alone, ``all`` or ``none``) from batched runs.

    At most ``batch_size`` images (0: all) share one denoising run; each starts from the noise of
    its own CPU generator seeded with ``seed``, so it equals the batch-1 image of that target up to
    float reassociation.  ``call`` holds the pipeline's other keyword arguments (steps, guidance,
    size, ``output_type='np'``).  Returns float images in [0, 1], keyed by target."""
    import numpy as np
    import torch

    chunk = batch_size or len(targets)
    images: dict[str, np.ndarray] = {}
    for lo in range(0, len(targets), chunk):
        part = list(targets[lo: lo + chunk])
        keep = {n: [t == "all" or g == t for t in part] for g, names in model_groups.items() for n in names}
        gens = [torch.Generator("cpu").manual_seed(seed) for _ in part]
        recs = [records[t] for t in part] if records is not None else None
        with torch.no_grad(), ablate_cross_attention_batched(pipe.unet, keep, zero_pooled_text=[zero_pooled[t] for t in part],
                                                             records=recs):
            out = pipe(prompt=prompt, num_images_per_prompt=len(part), generator=gens, **call)
        for t, im in zip(part, out.images):
            images[t] = np.asarray(im, dtype=np.float64)
    return images
