"""The settings of one ``sd3_recon_train`` run, validated once: built from the probe's typed settings
(:func:`config_from_probe`; every value comes from the schema, a test checks the dataclass defaults
against it) and recorded in each checkpoint's manifest (:func:`manifest_of`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from layerscope.models.sd3_light import LossSettings, ReconConfigError
from layerscope.models.sd3_light_settings import check_renamed, check_timestep_settings

# SD3 joint-attention projections: image stream (to_q/k/v, to_out.0) and text stream (add_*_proj, to_add_out)
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
MIXED_PRECISION = ("no", "bf16")
OPTIMIZERS = ("adamw", "adamw8bit")


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
