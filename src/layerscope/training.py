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

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
import torch

from layerscope.models import ModelLoadError
from layerscope.models.sd3_light import LightSD3Pipeline, LossSettings, ReconConfigError, compute_losses, final_hook_name, target_hook_name
from layerscope.models.sd3_light_settings import TIMESTEP_SAMPLINGS, WEIGHTINGS, check_renamed, check_timestep_settings

if TYPE_CHECKING:
    from diffusers import StableDiffusion3Pipeline

__all__ = ["FineTuneConfig", "TrainResult", "load_pipeline", "encode_dataset", "fine_tune",
           "save_checkpoint", "sample_timesteps", "CHECKPOINT_MANIFEST", "DEFAULT_LORA_TARGETS", "TIMESTEP_SAMPLINGS",
           "WEIGHTINGS"]

CHECKPOINT_MANIFEST = "layerscope_checkpoint.json"
# SD3 joint-attention projections: image stream (to_q/k/v, to_out.0) and text stream (add_*_proj, to_add_out)
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
MIXED_PRECISION = ("no", "bf16")
OPTIMIZERS = ("adamw", "adamw8bit")
RESUME_FILE = "state.pt"


@dataclass(frozen=True)
class FineTuneConfig:
    """Settings of one fine-tuning run (probe config keys of the same names)."""

    gamma: float = 0.0
    target_layer: int = 0
    seed: int = 0
    steps: int = 20
    batch_size: int = 2
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0: no clipping
    mode: str = "full"  # full | lora
    lora_rank: int = 4
    lora_alpha: float = 4.0
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    timestep_sampling: str = "logit_normal"  # logit_normal (continuous sigma, then shift) | discrete
    shift: float | None = None  # None: the pipeline scheduler's shift
    weighting: str | None = None  # discrete only: index density uniform (None) | logit_normal | mode
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    loss_type: str | None = None  # None: pseudo_huber when pseudo_huber_c is set, else mse
    pseudo_huber_c: float | None = None
    masked_mean: bool = False
    ignore_padding: bool = False
    image_size: int = 0  # 0: transformer.sample_size * vae_scale_factor
    max_sequence_length: int = 77  # T5 part of the joint text sequence
    max_images: int = 0  # 0: all
    # execution settings (issue 16: training at real size; issue 14: resume) - see the probe schema
    checkpoint_every: int = 0  # steps between resumable checkpoints; 0: none
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"  # no | bf16 (autocast; master weights and optimizer state stay fp32)
    optimizer: str = "adamw"  # adamw | adamw8bit (bitsandbytes)

    def __post_init__(self) -> None:
        if self.mode not in ("full", "lora"):
            raise ReconConfigError(f"mode: {self.mode!r} is not one of full, lora")
        check_timestep_settings(self.timestep_sampling, self.weighting, self.shift)
        self.loss_settings  # validates loss_type / pseudo_huber_c / masked_mean / ignore_padding
        if self.mixed_precision not in MIXED_PRECISION:
            raise ReconConfigError(f"mixed_precision: {self.mixed_precision!r} is not one of {', '.join(MIXED_PRECISION)}")
        if self.optimizer not in OPTIMIZERS:
            raise ReconConfigError(f"optimizer: {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if int(self.checkpoint_every) < 0:
            raise ReconConfigError(f"checkpoint_every: must be >= 0, got {self.checkpoint_every!r}")
        for key in ("steps", "batch_size", "max_sequence_length", "lora_rank"):
            if int(getattr(self, key)) < 1:
                raise ReconConfigError(f"{key}: must be >= 1, got {getattr(self, key)!r}")

    @property
    def model_config(self) -> dict[str, Any]:
        return {"text_recon_gamma": float(self.gamma), "text_recon_target_layer": int(self.target_layer)}

    @property
    def loss_config(self) -> dict[str, Any]:
        """The loss keys as the sd3_light pipeline's ``config`` takes them."""
        out: dict[str, Any] = {"masked_mean": self.masked_mean, "ignore_padding": self.ignore_padding}
        if self.loss_type is not None:
            out["loss_type"] = self.loss_type
        if self.pseudo_huber_c is not None:
            out["pseudo_huber_c"] = float(self.pseudo_huber_c)
        return out

    @property
    def loss_settings(self) -> LossSettings:
        return LossSettings.from_config(self.loss_config)


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
    pipe = family_module("sd3").load(model_cfg, device, dtype)
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


def _rng_state() -> dict[str, Any]:
    import random

    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(st: Mapping[str, Any]) -> None:
    import random

    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if st.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _trainable_state(tr: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights that train (all of the MMDiT in full mode, the LoRA factors in lora mode)."""
    return {n: p.detach().clone() for n, p in tr.named_parameters() if p.requires_grad}


def save_resume_state(resume_dir: Path, state: Mapping[str, Any]) -> None:
    """Write ``resume_dir/state.pt`` atomically (temporary file, fsync, rename): a kill while
    writing leaves the previous resumable state intact."""
    resume_dir.mkdir(parents=True, exist_ok=True)
    tmp = resume_dir / f".{RESUME_FILE}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(dict(state), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, resume_dir / RESUME_FILE)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_resume_state(resume_dir: Path | None, cfg: FineTuneConfig, fingerprint: str) -> dict[str, Any] | None:
    """The last resumable state of this very run, or None (no state, or one written by a run with
    other settings or data: that one is ignored with a warning, and training starts over)."""
    import logging

    if resume_dir is None or not (resume_dir / RESUME_FILE).is_file():
        return None
    try:
        st = torch.load(resume_dir / RESUME_FILE, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: start over, say so
        logging.getLogger("layerscope").warning("ignoring unreadable resume state %s (%s); training from step 0",
                                                resume_dir / RESUME_FILE, e)
        return None
    if st.get("fingerprint") != fingerprint or st.get("train") != asdict(cfg):
        logging.getLogger("layerscope").warning("ignoring resume state %s: written by a run with other settings or data; "
                                                "training from step 0", resume_dir / RESUME_FILE)
        return None
    return st


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


def _replace_dir(tmp: Path, out: Path) -> None:
    if out.exists():
        old = out.with_name(f".old-{os.getpid()}-{out.name}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


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


def save_checkpoint(pipe: "StableDiffusion3Pipeline", peft_model: Any, out_dir: str | Path, manifest: Mapping[str, Any],
                    base_dir: str | Path | None = None) -> Path:
    """Write the trained model to ``out_dir`` atomically (temporary directory, then rename).

    lora: the peft adapter directory (a few MB).  full with a ``base_dir``: a pipeline folder whose
    ``transformer/`` holds the trained weights and whose other components (text encoders, VAE,
    tokenizers, scheduler) are relative symbolic links to the base's folders - it loads as any SD3
    pipeline (``source: <checkpoint>``) yet stores only the transformer (kind ``transformer+links``).
    full without one: the whole pipeline (``save_pretrained``, kind ``pipeline``)."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".partial-{os.getpid()}-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if peft_model is None and base_dir is not None:
            base = Path(os.path.abspath(base_dir))
            tmp.mkdir()
            pipe.transformer.save_pretrained(tmp / "transformer")
            index = json.loads((base / "model_index.json").read_text())
            for comp, val in index.items():
                if comp.startswith("_") or comp == "transformer" or not isinstance(val, list) or val[0] is None:
                    continue
                if (base / comp).exists():
                    os.symlink(os.path.relpath(base / comp, os.path.abspath(out)), tmp / comp, target_is_directory=True)
            shutil.copyfile(base / "model_index.json", tmp / "model_index.json")
            kind = "transformer+links"
        elif peft_model is None:
            pipe.save_pretrained(tmp)
            kind = "pipeline"
        else:
            peft_model.save_pretrained(str(tmp))
            kind = "lora"
        (tmp / CHECKPOINT_MANIFEST).write_text(json.dumps({**manifest, "kind": kind}, indent=1, sort_keys=True, default=str))
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def config_from_probe(settings: Any, gamma: float, target_layer: int, seed: int) -> FineTuneConfig:
    """FineTuneConfig from the probe's typed settings (``spec.settings``: every value, default
    included, comes from the schema); ``None`` keeps the field unset. The renamed ``huber_c`` is
    refused here too (the schema declares it only to name its replacement)."""
    values = {f.name: getattr(settings, f.name) for f in fields(settings)}
    check_renamed({k: v for k, v in values.items() if v is not None})
    names = {f for f in FineTuneConfig.__dataclass_fields__} - {"gamma", "target_layer", "seed"}
    kw = {k: values[k] for k in names if values.get(k) is not None}
    if "lora_targets" in kw:
        kw["lora_targets"] = tuple(kw["lora_targets"])
    return FineTuneConfig(gamma=float(gamma), target_layer=int(target_layer), seed=int(seed), **kw)


def manifest_of(cfg: FineTuneConfig, base: Mapping[str, Any]) -> dict[str, Any]:
    return {"base_model": {k: base.get(k) for k in ("family", "kind", "path", "hub_id", "lora")}, "train": asdict(cfg)}
