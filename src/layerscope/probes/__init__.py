"""Probe registry. Each entry is 'module:Class'; modules are imported on demand (and are light:
heavy imports live inside the probe's methods)."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from layerscope.probes.base import Probe

PROBES: dict[str, str] = {
    "dinov3_channels": "layerscope.probes.dinov3_channels:DinoV3Channels",
    "sdxl_ablation": "layerscope.probes.sdxl_ablation:SdxlAblation",
    "wan_logits": "layerscope.probes.wan_logits:WanLogits",
    "sd3_recon_train": "layerscope.probes.sd3_recon_train:SD3ReconTrain",
    "sd3_textgrad": "layerscope.probes.sd3_textgrad:SD3TextGrad",
}


def get_probe(name: str) -> "Probe":
    try:
        target = PROBES[name]
    except KeyError:
        raise KeyError(f"unknown probe {name!r}; known: {', '.join(sorted(PROBES))}") from None
    mod, _, cls = target.partition(":")
    return getattr(import_module(mod), cls)()
