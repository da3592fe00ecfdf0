"""Flow-matching fine-tuning of an SD3 pipeline with the sd3_light loss (design note 001).

One run = one (model, gamma, target layer, seed): the text encoders and the VAE are frozen and
evaluated once (captions -> prompt embeddings + text-token mask, images -> latents), then the
MMDiT (all its weights, or a peft LoRA on its attention projections) takes ``steps`` AdamW steps
on ``denoise + gamma * text_recon``.  Every step's losses are kept; the result is saved as a
checkpoint that loads like any other model of the study:

* ``mode: full`` - a whole ``StableDiffusion3Pipeline`` directory (``save_pretrained``), to be
  referenced as ``source: <dir>``;
* ``mode: lora`` - a peft adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``)
  for the transformer, to be referenced as ``source: <base>`` + ``lora: <dir>``.

Both are written atomically (a temporary directory beside the target, renamed into place) and carry
``layerscope_checkpoint.json`` describing how they were made.

Flow matching as the existing SD3 training draws it (``timestep_sampling: logit_normal``, the
default): a continuous ``sigma = sigmoid(logit_mean + logit_std * N(0, 1))``, then the shift
``sigma' = shift * sigma / (1 + (shift - 1) * sigma)`` (``shift``: the config's, else the pipeline
scheduler's), the model receives ``t = sigma' * num_train_timesteps``; ``x_t = (1 - sigma') x0 +
sigma' eps``, target ``eps - x0``.  ``timestep_sampling: discrete`` is diffusers' training-script
convention instead: an index i into the shifted discrete schedule drawn with density ``weighting``
(uniform, logit_normal or mode; ``compute_density_for_timestep_sampling``), ``sigma = sigmas[i]``,
``t = timesteps[i]``.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
import torch

from layerscope.models import ModelLoadError
from layerscope.models.sd3_light import LightSD3Pipeline, ReconConfigError, compute_losses, final_hook_name, target_hook_name
from layerscope.models.sd3_light_settings import TIMESTEP_SAMPLINGS, WEIGHTINGS  # noqa: F401  (re-exported)
from layerscope.training_config import (  # noqa: F401  (settings of a run; re-exported)
    DEFAULT_LORA_TARGETS, MIXED_PRECISION, OPTIMIZERS, FineTuneConfig, config_from_probe, manifest_of)
from layerscope.training_io import (  # noqa: F401  (resume state and checkpoints; re-exported)
    CHECKPOINT_MANIFEST, RESUME_FILE, _rng_state, _set_rng_state, _trainable_state, load_resume_state, save_checkpoint,
    save_resume_state)

if TYPE_CHECKING:
    from diffusers import StableDiffusion3Pipeline

__all__ = ["FineTuneConfig", "TrainResult", "load_pipeline", "encode_dataset", "fine_tune",
           "save_checkpoint", "sample_timesteps", "CHECKPOINT_MANIFEST", "DEFAULT_LORA_TARGETS", "TIMESTEP_SAMPLINGS",
           "WEIGHTINGS"]


def sample_timesteps(cfg: FineTuneConfig, batch_size: int, generator: torch.Generator, sigmas: torch.Tensor,
                     timesteps: torch.Tensor, shift: float, num_train_timesteps: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma [B], model timestep [B]) of one training batch, drawn on the CPU from ``generator``.

    ``logit_normal``: ``sigma = sigmoid(logit_mean + logit_std * z)``, z ~ N(0, 1), then
    ``sigma = shift * sigma / (1 + (shift - 1) * sigma)`` and ``t = sigma * num_train_timesteps``
    (the existing SD3 training and sd-scripts' ``shift`` sampling; continuous sigma).
    ``discrete``: ``i = floor(u * n)`` with u from ``weighting``'s density, ``sigma = sigmas[i]``,
    ``t = timesteps[i]`` (diffusers' SD3 training scripts; ``sigmas``/``timesteps`` are the shifted
    training schedule)."""
    if cfg.timestep_sampling == "logit_normal":
        z = torch.randn(batch_size, generator=generator)
        s = torch.sigmoid(cfg.logit_mean + cfg.logit_std * z)
        s = shift * s / (1.0 + (shift - 1.0) * s)
        return s, s * num_train_timesteps
    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = compute_density_for_timestep_sampling(cfg.weighting or "uniform", batch_size, logit_mean=cfg.logit_mean,
                                              logit_std=cfg.logit_std, mode_scale=cfg.mode_scale, generator=generator)
    n = len(sigmas)
    ti = (u * n).long().clamp(0, n - 1)
    return sigmas[ti], timesteps[ti]


@dataclass
class TrainResult:
    """Per-step records (float64 arrays of length ``steps``) and run facts."""

    denoise: np.ndarray
    recon: np.ndarray  # NaN-free; 0 where gamma == 0 (recon not computed: see recon_computed)
    total: np.ndarray
    sigma: np.ndarray  # mean sigma of the step's batch
    grad_norm: np.ndarray  # before clipping
    n_valid_tokens: np.ndarray  # int64
    skipped: np.ndarray  # bool: non-finite loss or gradient, optimizer step skipped
    recon_computed: bool
    trainable_params: int
    final_hook: str
    target_hook: str
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


def load_pipeline(model_cfg: Mapping[str, Any], device: torch.device, dtype: torch.dtype = torch.float32) -> "StableDiffusion3Pipeline":
    """The model's ``StableDiffusion3Pipeline`` through the sd3 family's ``load`` (the same loader the
    text-gradient probe uses, so a checkpoint trains and probes identically).  A model-level LoRA is
    merged by that loader; its wrapper layers are then replaced by their (merged) base layers, so the
    transformer is a plain diffusers module again: training starts from the adapted weights and a
    saved checkpoint has the plain key layout."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from layerscope.models import family_module

    family = str(model_cfg.get("family", "sd3"))
    if family != "sd3":
        raise ModelLoadError(f"models.{model_cfg.get('name', '?')}.family: sd3_recon_train fine-tunes SD3 pipelines, got {family!r}")
    pipe = family_module(family).load(model_cfg, device, dtype)
    tr = pipe.transformer
    for name, mod in list(tr.named_modules()):
        if isinstance(mod, BaseTunerLayer):
            if not mod.merged:
                raise ModelLoadError(f"LoRA layer {name} was not merged by the loader")
            parent, _, leaf = name.rpartition(".")
            setattr(tr.get_submodule(parent) if parent else tr, leaf, mod.get_base_layer())
    return pipe


def encode_dataset(pipe: "StableDiffusion3Pipeline", images: Sequence[Any], captions: Sequence[str], image_size: int,
                   max_sequence_length: int, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Frozen encoders, once: latents (VAE mean, shifted and scaled as SD3 trains), prompt
    embeddings, pooled embeddings and the text-token mask, on the pipeline's device."""
    dev = pipe.transformer.device
    vae_dtype = pipe.vae.dtype
    lat, pe, pp = [], [], []
    for s in range(0, len(images), batch_size):
        ims = images[s:s + batch_size]
        arr = np.stack([np.asarray(im.convert("RGB").resize((image_size, image_size)), dtype=np.float32) / 127.5 - 1.0 for im in ims])
        x = torch.from_numpy(arr).permute(0, 3, 1, 2).to(dev, vae_dtype)
        z = pipe.vae.encode(x).latent_dist.mean
        shift = pipe.vae.config.shift_factor or 0.0
        lat.append(((z - shift) * pipe.vae.config.scaling_factor).float())
        caps = list(captions[s:s + batch_size])
        e, _, p, _ = pipe.encode_prompt(prompt=caps, prompt_2=caps, prompt_3=caps, device=dev, do_classifier_free_guidance=False,
                                        max_sequence_length=max_sequence_length)
        pe.append(e.float())
        pp.append(p.float())
    from layerscope.models.sd3 import text_token_mask

    mask = text_token_mask(pipe, list(captions), max_sequence_length).to(dev)
    out = {"latents": torch.cat(lat), "prompt_embeds": torch.cat(pe), "pooled": torch.cat(pp), "text_mask": mask}
    if out["prompt_embeds"].shape[1] != mask.shape[1]:
        raise RuntimeError(f"text mask covers {mask.shape[1]} positions but the prompt embeddings have {out['prompt_embeds'].shape[1]}")
    return out


def _trainable(pipe: "StableDiffusion3Pipeline", cfg: FineTuneConfig) -> tuple[torch.nn.Module, Any]:
    """Freeze everything but the MMDiT (full) or its LoRA weights; return (transformer, peft model or None)."""
    for comp in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        if comp is not None:
            comp.requires_grad_(False)
    tr = pipe.transformer
    if cfg.mode == "full":
        tr.requires_grad_(True)
        return tr, None
    from peft import LoraConfig, get_peft_model

    tr.requires_grad_(False)
    names = {n.rsplit(".", 1)[-1] for n, _ in tr.named_modules()} | {n for n, _ in tr.named_modules()}
    missing = [t for t in cfg.lora_targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ReconConfigError(f"lora_targets: no module named {', '.join(missing)} in the SD3 transformer")
    peft_model = get_peft_model(tr, LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, init_lora_weights="gaussian",
                                               target_modules=list(cfg.lora_targets)))
    return tr, peft_model  # LoRA layers are injected into tr in place; peft_model saves the adapter


def make_optimizer(params: list[torch.nn.Parameter], cfg: FineTuneConfig) -> torch.optim.Optimizer:
    """AdamW (fp32 states, 8 bytes per trainable weight) or bitsandbytes' 8-bit AdamW (2 bytes):
    at SD3-medium size (2B weights) the optimizer state alone is 16 GB against 4 GB."""
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb  # type: ignore[import-not-found]
        except ImportError:
            raise ReconConfigError("optimizer: adamw8bit needs the bitsandbytes package (pip install bitsandbytes), "
                                   "which is not importable here; use optimizer: adamw") from None
        return bnb.optim.AdamW8bit(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def fine_tune(pipe: "StableDiffusion3Pipeline", data: Mapping[str, torch.Tensor], cfg: FineTuneConfig,
              on_step: Callable[[int, dict[str, float]], None] | None = None, resume_dir: str | Path | None = None,
              fingerprint: str = "") -> tuple[TrainResult, Any]:
    """Train ``pipe.transformer`` in place; return the per-step record and the peft model (lora) or None.

    With ``cfg.checkpoint_every = N > 0`` and a ``resume_dir``, a resumable state (trainable weights,
    optimizer, every RNG state, the data order and position, the losses so far) is written there
    after every N-th step, and a run that finds one (same settings and ``fingerprint``) continues
    from it: a killed-and-resumed run is bitwise the run that was never killed (on CPU).  The caller
    removes ``resume_dir`` once the final checkpoint is safe."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)  # LoRA init
    tr, peft_model = _trainable(pipe, cfg)
    if cfg.gradient_checkpointing:
        # recompute each block in the backward pass instead of keeping its activations
        tr.enable_gradient_checkpointing()
    tr.train()
    light = LightSD3Pipeline(tr, cfg.model_config, cfg.loss_config)
    n_layers = len(tr.transformer_blocks)
    params = [p for p in tr.parameters() if p.requires_grad]
    opt = make_optimizer(params, cfg)
    shift = float(cfg.shift if cfg.shift is not None else pipe.scheduler.config.get("shift", 1.0))
    # own copy (set_timesteps() mutates); the discrete table carries the same shift
    sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=shift)
    sigmas_all = sched.sigmas.float()
    tsteps_all = sched.timesteps.float()
    n_train_timesteps = int(sched.config.num_train_timesteps)
    loss_settings = cfg.loss_settings
    dev = next(tr.parameters()).device
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.mixed_precision == "bf16")
    lat, pe, pooled, tmask = data["latents"], data["prompt_embeds"], data["pooled"], data["text_mask"]
    n = lat.shape[0]
    if n == 0:
        raise ValueError("no training images")
    gen = torch.Generator().manual_seed(cfg.seed)
    rec = {k: np.zeros(cfg.steps, np.float64) for k in ("denoise", "recon", "total", "sigma", "grad_norm")}
    n_valid = np.zeros(cfg.steps, np.int64)
    skipped = np.zeros(cfg.steps, bool)
    order = torch.randperm(n, generator=gen)
    pos = 0
    first = 0
    rdir = Path(resume_dir) if resume_dir is not None else None
    st = load_resume_state(rdir, cfg, fingerprint) if cfg.checkpoint_every else None
    if st is not None:
        with torch.no_grad():
            named = dict(tr.named_parameters())
            for k, v in st["weights"].items():
                named[k].copy_(v)
        opt.load_state_dict(st["optimizer"])
        gen.set_state(st["generator"])
        _set_rng_state(st["rng"])
        order, pos, first = st["order"], int(st["pos"]), int(st["step"])
        for k in rec:
            rec[k][:first] = st["records"][k][:first]
        n_valid[:first] = st["records"]["n_valid_tokens"][:first]
        skipped[:first] = st["records"]["skipped"][:first]
        t0 -= float(st.get("seconds", 0.0))
        import logging

        logging.getLogger("layerscope").info("resuming training at step %d of %d from %s", first, cfg.steps, rdir)
    from layerscope.progress import current as progress

    prog = progress(cfg.steps, "steps", start=first)
    fault = _fault_step()
    try:
        for step in range(first, cfg.steps):
            idx = []
            while len(idx) < cfg.batch_size:  # epochs of a fresh permutation; batches may wrap across epochs
                if pos == n:
                    order, pos = torch.randperm(n, generator=gen), 0
                idx.append(int(order[pos]))
                pos += 1
            ix = torch.tensor(idx)
            x0 = lat[ix]
            noise = torch.randn(x0.shape, generator=gen).to(dev)
            sig, tstep = sample_timesteps(cfg, cfg.batch_size, gen, sigmas_all, tsteps_all, shift, n_train_timesteps)
            sigma = sig.to(dev).view(-1, 1, 1, 1)
            x_t = (1.0 - sigma) * x0 + sigma * noise
            target = noise - x0
            with autocast:
                out = light(x_t.to(tr.dtype), tstep.to(dev), pe[ix].to(tr.dtype), pooled[ix].to(tr.dtype))
            out = _to_float(out) if cfg.mixed_precision != "no" else out
            terms = compute_losses(out, (target, None, tmask[ix]), cfg.gamma, loss_settings)
            opt.zero_grad(set_to_none=True)
            finite = bool(torch.isfinite(terms.total))
            gnorm = float("nan")
            if finite:
                terms.total.backward()
                gn = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
                gnorm = float(gn)
                finite = math.isfinite(gnorm)
                if finite:
                    opt.step()
            skipped[step] = not finite
            rec["denoise"][step] = float(terms.denoise.detach())
            rec["recon"][step] = float(terms.recon.detach()) if terms.recon is not None else 0.0
            rec["total"][step] = float(terms.total.detach())
            rec["sigma"][step] = float(sigma.mean())
            rec["grad_norm"][step] = gnorm
            n_valid[step] = terms.n_valid_tokens
            prog.update(1)
            if on_step is not None:
                on_step(step, {k: float(v[step]) for k, v in rec.items()})
            done = step + 1
            if rdir is not None and cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
                save_resume_state(rdir, {
                    "fingerprint": fingerprint, "train": asdict(cfg), "step": done, "weights": _trainable_state(tr),
                    "optimizer": opt.state_dict(), "generator": gen.get_state(), "rng": _rng_state(),
                    "order": order.clone(), "pos": pos, "seconds": time.perf_counter() - t0,
                    "records": {**{k: v.copy() for k, v in rec.items()}, "n_valid_tokens": n_valid.copy(), "skipped": skipped.copy()},
                })
            if fault is not None and done == fault:
                import signal

                os.kill(os.getpid(), signal.SIGKILL)  # test hook: a real kill, nothing runs after it
    finally:
        light.close()
        tr.eval()
        if cfg.gradient_checkpointing:
            tr.disable_gradient_checkpointing()
    result = TrainResult(rec["denoise"], rec["recon"], rec["total"], rec["sigma"], rec["grad_norm"], n_valid, skipped,
                         recon_computed=cfg.gamma > 0, trainable_params=sum(p.numel() for p in params),
                         final_hook=final_hook_name(n_layers), target_hook=target_hook_name(cfg.target_layer),
                         seconds=time.perf_counter() - t0,
                         extra={"shift": shift, "timestep_sampling": cfg.timestep_sampling,
                                "loss_convention": loss_settings.describe(), "resumed_at": first})
    return result, peft_model


def _to_float(out: Any) -> Any:
    """The denoiser's outputs back in fp32 after a bf16 autocast forward: losses in full precision."""
    if isinstance(out, torch.Tensor):
        return out.float()
    if isinstance(out, tuple):
        return tuple(_to_float(o) for o in out)
    return out


def _fault_step() -> int | None:
    """Test hook ``LAYERSCOPE_FAULT=kill_after_step:<k>``: SIGKILL the process right after step k
    (and its resumable checkpoint, if one is due), as a cluster preemption would."""
    kind, _, rest = os.environ.get("LAYERSCOPE_FAULT", "").partition(":")
    return int(rest) if kind == "kill_after_step" and rest.strip().isdigit() else None


def base_pipeline_dir(model_cfg: Mapping[str, Any]) -> Path | None:
    """The local folder of the base pipeline (a path source, or a hub id's snapshot in the local
    cache), or None when there is none to link to."""
    if model_cfg.get("kind") == "hub":
        try:
            from huggingface_hub import snapshot_download

            d = Path(snapshot_download(str(model_cfg["hub_id"]), revision=model_cfg.get("revision"), local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached: fall back to a full save
            return None
    else:
        d = Path(str(model_cfg.get("path", "")))
    return d if (d / "model_index.json").is_file() else None


def free_frozen_components(pipe: "StableDiffusion3Pipeline", drop: bool) -> None:
    """Once the dataset is encoded the text encoders and the VAE are never used again in training:
    drop them (``drop``: the checkpoint links the base's copies) or move them to host memory, so
    the accelerator holds only the transformer, its gradients and the optimizer state."""
    import gc

    for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
        comp = getattr(pipe, name, None)
        if comp is None:
            continue
        if drop:
            setattr(pipe, name, None)
        else:
            comp.to("cpu")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
