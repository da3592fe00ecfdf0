"""Settings of the sd3_light loss and of its fine-tuning, without torch.

The planner validates a study's config before any job is submitted and must not import torch
(every SLURM job re-reads the Snakefile), so the checks that ``sd3_recon_train.check_config`` runs
at plan time live here; ``models/sd3_light.py`` and ``training.py`` use the same classes at run time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from layerscope.errors import ConfigError

__all__ = ["ReconConfigError", "LossSettings", "LOSS_TYPES", "TIMESTEP_SAMPLINGS", "WEIGHTINGS", "RENAMED_KEYS",
           "check_renamed", "check_timestep_settings"]

LOSS_TYPES = ("mse", "pseudo_huber", "pseudo_huber_scaled")
TIMESTEP_SAMPLINGS = ("logit_normal", "discrete")
WEIGHTINGS = ("uniform", "logit_normal", "mode")
# keys the project used to read, now refused with the name of their replacement (never silently ignored)
RENAMED_KEYS = {"huber_c": "pseudo_huber_c (the existing pipeline's key; its form is sqrt(d^2+c^2)-c)"}


class ReconConfigError(ConfigError):
    """A bad text-reconstruction or loss setting; the message names the config key."""


def check_renamed(config: Mapping[str, Any]) -> None:
    for old, new in RENAMED_KEYS.items():
        if old in config:
            raise ReconConfigError(f"{old}: renamed to {new}")


def check_timestep_settings(timestep_sampling: Any, weighting: Any, shift: Any) -> None:
    """``timestep_sampling`` one of TIMESTEP_SAMPLINGS; ``weighting`` (an index density) only with
    ``discrete``; ``shift`` None or a number > 0."""
    if timestep_sampling not in TIMESTEP_SAMPLINGS:
        raise ReconConfigError(f"timestep_sampling: {timestep_sampling!r} is not one of {', '.join(TIMESTEP_SAMPLINGS)}")
    if weighting is not None:
        if weighting not in WEIGHTINGS:
            raise ReconConfigError(f"weighting: {weighting!r} is not one of {', '.join(WEIGHTINGS)}")
        if timestep_sampling != "discrete":
            raise ReconConfigError(f"weighting: applies to timestep_sampling: discrete only (this run samples {timestep_sampling}; "
                                   "its sigma density is set by logit_mean / logit_std)")
    if shift is not None and not (isinstance(shift, (int, float)) and not isinstance(shift, bool)
                                  and math.isfinite(float(shift)) and float(shift) > 0):
        raise ReconConfigError(f"shift: expected a number > 0, got {shift!r}")


@dataclass(frozen=True)
class LossSettings:
    """How the loss is computed.  The defaults are the existing pipeline's (note 001: "the original
    denoise loss, with mask and pseudo-Huber support"): ``mean(l * w)`` over all elements, pseudo-Huber
    ``sqrt(d^2 + c^2) - c`` switched on by ``pseudo_huber_c``, and the token-wise text MSE averaged over
    all tokens.  The project's refinements are named options: ``masked_mean`` (``sum(l*w)/sum(w)``),
    ``loss_type: pseudo_huber_scaled`` (``2c(sqrt(d^2+c^2) - c)``, MSE's scale for small residuals) and
    ``ignore_padding`` (text MSE over real tokens only)."""

    loss_type: str = "mse"
    pseudo_huber_c: float | None = None
    masked_mean: bool = False
    ignore_padding: bool = False

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "LossSettings":
        """Read ``loss_type`` / ``pseudo_huber_c`` / ``masked_mean`` / ``ignore_padding``.

        As in the existing pipeline, ``pseudo_huber_c`` alone selects pseudo-Huber; a contradiction
        (``loss_type: mse`` with ``pseudo_huber_c``) or the renamed key ``huber_c`` is an error: a key
        that would be ignored must never be."""
        check_renamed(config)
        c = config.get("pseudo_huber_c")
        if c is not None and (isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(float(c)) or not float(c) > 0):
            raise ReconConfigError(f"pseudo_huber_c: expected a number > 0, got {c!r}")
        loss_type = config.get("loss_type")
        if loss_type is None:
            loss_type = "mse" if c is None else "pseudo_huber"
        if loss_type not in LOSS_TYPES:
            raise ReconConfigError(f"loss_type: {loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
        if loss_type == "mse" and c is not None:
            raise ReconConfigError(f"pseudo_huber_c: set ({c!r}) but loss_type is mse; remove one of them")
        if loss_type != "mse" and c is None:
            raise ReconConfigError(f"loss_type: {loss_type} needs pseudo_huber_c (the pseudo-Huber constant c)")
        flags = {}
        for key in ("masked_mean", "ignore_padding"):
            v = config.get(key, False)
            if not isinstance(v, bool):
                raise ReconConfigError(f"{key}: expected true or false, got {v!r}")
            flags[key] = v
        return cls(loss_type, None if c is None else float(c), **flags)

    def describe(self) -> str:
        """One-line convention recorded with every run, e.g. 'pseudo_huber(c=0.1), mean(l*w), text: all tokens'."""
        kind = self.loss_type if self.pseudo_huber_c is None else f"{self.loss_type}(c={self.pseudo_huber_c:g})"
        red = "sum(l*w)/sum(w)" if self.masked_mean else "mean(l*w)"
        txt = "real tokens" if self.ignore_padding else "all tokens"
        return f"{kind}, {red}, text: {txt}"
