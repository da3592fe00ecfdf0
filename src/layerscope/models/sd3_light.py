"""sd3_light: the SD3 MMDiT with an optional text-feature reconstruction loss (design note 001).

The plain objective supervises only the predicted velocity.  With ``text_recon_gamma > 0`` the
text tokens that leave the MMDiT's text stream are additionally pulled towards the text tokens of a
chosen *target layer*::

    loss = denoise + gamma * text_recon

* ``denoise`` - the existing pipeline's loss: MSE between predicted and target velocity, or
  pseudo-Huber ``sqrt(d^2 + c^2) - c`` when ``pseudo_huber_c`` is set, times an optional element mask
  and averaged over all elements (``mean(l * w)``); exactly the plain loss when the reconstruction is off;
* ``text_recon`` - token-wise MSE between the final text tokens and the target tokens, averaged over
  all tokens as the note's per-token MSE (``ignore_padding`` restricts it to real tokens).

Model config keys (``model_config``): ``text_recon_gamma`` (float >= 0, default 0.0 = off) and
``text_recon_target_layer`` (int, default 0): 0 = the text tokens entering the MMDiT (output of
``context_embedder``), k > 0 = the text tokens output by the k-th block (1-based, i.e.
``transformer_blocks[k-1]``), always detached.

Which tokens are "final": diffusers' last SD3 block is ``context_pre_only`` - it reads the text
stream (image tokens attend to it) but emits no text.  We keep the architecture exactly as
diffusers builds it (so pretrained SD3 checkpoints load and save unchanged) and take the *last
block that emits text*: ``transformer_blocks[L-2]``, whose output is precisely the text the final
block attends to.  With 1-based layer numbers that output is layer L-1, so the valid targets are
``0 .. L-2``: target L-1 would be the final tokens themselves (a loss identically zero).

Capture uses forward hooks on the diffusers ``SD3Transformer2DModel`` (no copy of its forward);
with the reconstruction off no hook is installed at all, so the forward costs exactly the plain
forward.  Hook names in shards and docs follow TransformerLens style:
``hook_text_embed`` and ``blocks.N.hook_text_out``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from layerscope.models.sd3_light_settings import LOSS_TYPES, LossSettings, ReconConfigError

if TYPE_CHECKING:
    from diffusers import SD3Transformer2DModel

__all__ = [
    "ReconConfigError", "TextReconConfig", "TextTokenCapture", "LightSD3Pipeline", "LossTerms",
    "valid_target_layers", "final_text_block", "target_hook_name", "final_hook_name",
    "denoise_loss", "text_recon_loss", "compute_losses", "LOSS_TYPES", "LossSettings",
]


def valid_target_layers(num_layers: int) -> range:
    """Targets an L-block MMDiT accepts: 0 (context_embedder output) .. L-2 (see module docstring)."""
    if num_layers < 2:
        raise ReconConfigError(f"text reconstruction needs an MMDiT with at least 2 blocks (this one has {num_layers})")
    return range(0, num_layers - 1)


def final_text_block(num_layers: int) -> int:
    """0-based index of the last block that emits text tokens (the final block is context_pre_only)."""
    valid_target_layers(num_layers)
    return num_layers - 2


def target_hook_name(target_layer: int) -> str:
    return "hook_text_embed" if target_layer == 0 else f"blocks.{target_layer - 1}.hook_text_out"


def final_hook_name(num_layers: int) -> str:
    return f"blocks.{final_text_block(num_layers)}.hook_text_out"


@dataclass(frozen=True)
class TextReconConfig:
    """The two model-config keys of note 001, validated."""

    gamma: float = 0.0
    target_layer: int = 0

    @property
    def enabled(self) -> bool:
        return self.gamma > 0.0

    @classmethod
    def from_model_config(cls, model_config: Mapping[str, Any], num_layers: int | None = None) -> "TextReconConfig":
        """Read ``text_recon_gamma`` / ``text_recon_target_layer``; check the layer against the
        model's depth when it is known (``num_layers``)."""
        g = model_config.get("text_recon_gamma", 0.0)
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(float(g)) or float(g) < 0:
            raise ReconConfigError(f"text_recon_gamma: expected a finite number >= 0, got {g!r}")
        k = model_config.get("text_recon_target_layer", 0)
        if isinstance(k, bool) or not isinstance(k, int):
            raise ReconConfigError(f"text_recon_target_layer: expected an integer, got {k!r}")
        if k < 0:
            raise ReconConfigError(f"text_recon_target_layer: {k} is negative; valid: 0 (context_embedder output) or a block number >= 1")
        if num_layers is not None:
            valid = valid_target_layers(num_layers)
            if k not in valid:
                raise ReconConfigError(
                    f"text_recon_target_layer: {k} is out of range for an MMDiT of {num_layers} blocks; valid: "
                    f"{valid.start}..{valid.stop - 1} (0 = context_embedder output, k = output of block k, "
                    f"{num_layers - 1} = the final text tokens themselves is excluded)")
        return cls(float(g), int(k))


class TextTokenCapture:
    """Forward hooks keeping, for one forward, the final text tokens (with their graph) and the
    target tokens (detached: the target carries no gradient).

    Hooks are forward hooks on modules, so they see the block outputs however the block was called
    (keyword arguments, or positionally under gradient checkpointing)."""

    def __init__(self, transformer: "SD3Transformer2DModel", target_layer: int):
        self.num_layers = len(transformer.transformer_blocks)
        TextReconConfig.from_model_config({"text_recon_target_layer": target_layer}, self.num_layers)
        self.transformer = transformer
        self.target_layer = target_layer
        self.final_block = final_text_block(self.num_layers)
        self.final: torch.Tensor | None = None
        self.target: torch.Tensor | None = None
        self._handles: list[Any] = []

    def attach(self) -> "TextTokenCapture":
        if self._handles:
            return self
        tr = self.transformer
        tmod = tr.context_embedder if self.target_layer == 0 else tr.transformer_blocks[self.target_layer - 1]
        self._handles.append(tmod.register_forward_hook(self._on_target))
        self._handles.append(tr.transformer_blocks[self.final_block].register_forward_hook(self._on_final))
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.final = self.target = None

    def __enter__(self) -> "TextTokenCapture":
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def _on_target(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        out = output if self.target_layer == 0 else output[0]  # blocks return (text, image)
        self.target = out.detach()

    def _on_final(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        self.final = output[0]

    def pop(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(final tokens, target tokens) of the last forward; each forward must produce both."""
        if self.final is None or self.target is None:
            missing = [n for n, v in (("final", self.final), ("target", self.target)) if v is None]
            raise RuntimeError(f"text tokens not captured ({', '.join(missing)}): was the block skipped (skip_layers)?")
        out = (self.final, self.target)
        self.final = self.target = None
        return out


@dataclass
class LossTerms:
    """The loss and its parts; ``recon`` is None when the reconstruction is off."""

    total: torch.Tensor
    denoise: torch.Tensor
    recon: torch.Tensor | None
    n_valid_tokens: int


def _is_empty(t: torch.Tensor | None) -> bool:
    return t is None or t.numel() == 0


def denoise_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
                 loss_type: str = "mse", pseudo_huber_c: float | None = None, masked_mean: bool = False) -> torch.Tensor:
    """The plain denoising loss in float32.

    ``mse`` without a mask is ``F.mse_loss(pred.float(), target.float())``, bit for bit.
    ``pseudo_huber`` is the existing pipeline's ``sqrt(d^2 + c^2) - c`` (~d^2/(2c) for |d| << c,
    ~|d| for large residuals); ``pseudo_huber_scaled`` is ``2c (sqrt(d^2 + c^2) - c)`` (~d^2 for small
    residuals, MSE's scale).  ``mask`` (broadcastable to ``pred``; empty = none) weights elements:
    ``mean(l * w)`` over all elements as the existing pipeline does (default), or
    ``sum(l * w) / sum(w)`` with ``masked_mean`` (the loss per supervised element)."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    if loss_type not in LOSS_TYPES:
        raise ReconConfigError(f"loss_type: {loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
    p, t = pred.float(), target.float()
    if loss_type == "mse" and _is_empty(mask):
        return F.mse_loss(p, t)
    d = p - t
    if loss_type == "mse":
        el = d ** 2
    else:
        if pseudo_huber_c is None:
            raise ReconConfigError(f"loss_type: {loss_type} needs pseudo_huber_c (the pseudo-Huber constant c)")
        c = float(pseudo_huber_c)
        el = torch.sqrt(d ** 2 + c * c) - c
        if loss_type == "pseudo_huber_scaled":
            el = 2.0 * c * el
    if _is_empty(mask):
        return el.mean()
    try:
        w = torch.broadcast_to(mask.to(device=el.device, dtype=torch.float32), el.shape)
    except RuntimeError:
        raise ValueError(f"loss mask of shape {tuple(mask.shape)} does not broadcast to the prediction {tuple(el.shape)}") from None
    if not masked_mean:
        return (el * w).mean()
    denom = w.sum()
    if not bool(denom > 0):
        raise ValueError("loss mask selects no element (its sum is 0): nothing to supervise")
    return (el * w).sum() / denom


def text_recon_loss(final: torch.Tensor, target: torch.Tensor, text_mask: torch.Tensor | None = None,
                    ignore_padding: bool = False) -> tuple[torch.Tensor, int]:
    """Token-wise MSE: the mean over tokens of each token's mean squared error over channels.

    By default every token counts, padding included, as in note 001 (its per-token MSE and its
    minimal check); returns (loss, number of tokens averaged).  With ``ignore_padding`` only real
    text tokens (``text_mask`` True; bool [..., tokens]) count; with none the term is 0 (and the
    count says so) rather than NaN.  The target is detached here as well."""
    if final.shape != target.shape:
        raise ValueError(f"final text tokens {tuple(final.shape)} and target tokens {tuple(target.shape)} differ in shape")
    per_token = ((final.float() - target.detach().float()) ** 2).mean(dim=-1)
    if not ignore_padding or _is_empty(text_mask):
        return per_token.mean(), int(per_token.numel())
    if tuple(text_mask.shape) != tuple(per_token.shape):
        raise ValueError(f"text mask of shape {tuple(text_mask.shape)} does not match the text tokens {tuple(per_token.shape)}")
    m = text_mask.to(device=per_token.device, dtype=torch.bool)
    n = int(m.sum())
    if n == 0:
        return per_token.new_zeros(()), 0
    return per_token[m].mean(), n


def compute_losses(outputs: torch.Tensor | Sequence[torch.Tensor], targets: Sequence[torch.Tensor | None],
                   gamma: float = 0.0, settings: LossSettings | None = None) -> LossTerms:
    """``outputs``: the velocity, or (velocity, final tokens, target tokens) when gamma > 0.
    ``targets``: (velocity target, element mask[, text-token mask]); masks may be empty tensors."""
    s = settings if settings is not None else LossSettings()
    target, mask = targets[0], (targets[1] if len(targets) > 1 else None)
    text_mask = targets[2] if len(targets) > 2 else None
    if gamma > 0:
        if isinstance(outputs, torch.Tensor) or len(outputs) != 3:
            raise ValueError("text_recon_gamma > 0 needs outputs (velocity, final text tokens, target tokens)")
        pred, final, tgt_tokens = outputs
    else:
        if not isinstance(outputs, torch.Tensor):
            raise ValueError("text_recon_gamma = 0 takes the plain velocity output, got a tuple (is the capture on?)")
        pred = outputs
    den = denoise_loss(pred, target, mask, s.loss_type, s.pseudo_huber_c, s.masked_mean)
    if gamma <= 0:
        return LossTerms(den, den, None, 0)
    rec, n = text_recon_loss(final, tgt_tokens, text_mask, s.ignore_padding)
    return LossTerms(den + gamma * rec, den, rec, n)


class LightSD3Pipeline:
    """The SD3 MMDiT forward + loss of ``sd3_light``.

    ``model_config`` holds ``text_recon_gamma`` / ``text_recon_target_layer``; ``config`` the loss
    settings of :class:`LossSettings` (``pseudo_huber_c``, ``loss_type``, ``masked_mean``,
    ``ignore_padding``; an empty config is the existing pipeline's plain MSE).  Call
    :meth:`close` (or use it as a context manager) to remove the capture hooks."""

    def __init__(self, transformer: "SD3Transformer2DModel", model_config: Mapping[str, Any] | None = None,
                 config: Mapping[str, Any] | None = None):
        self.transformer = transformer
        self.model_config = dict(model_config or {})
        self.config = dict(config or {})
        self.recon = TextReconConfig.from_model_config(self.model_config, len(transformer.transformer_blocks))
        self._capture = TextTokenCapture(transformer, self.recon.target_layer).attach() if self.recon.enabled else None

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                pooled_projections: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The velocity; with the reconstruction on, (velocity, final text tokens, target tokens)."""
        pred = self.transformer(hidden_states=hidden_states, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                                pooled_projections=pooled_projections, return_dict=False)[0]
        if self._capture is None:
            return pred
        final, target = self._capture.pop()
        return pred, final, target

    __call__ = forward

    def close(self) -> None:
        if self._capture is not None:
            self._capture.remove()
            self._capture = None

    def __enter__(self) -> "LightSD3Pipeline":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def loss_settings(self) -> tuple[float, LossSettings]:
        """(gamma, loss settings) from ``model_config`` and ``config`` (keys as in the existing pipeline)."""
        recon = TextReconConfig.from_model_config(self.model_config)
        return recon.gamma, LossSettings.from_config(self.config)

    def get_loss_fn(self) -> Callable[..., torch.Tensor]:
        """``loss_fn(outputs, (target, mask[, text_mask])) -> loss`` as in the note: denoise + gamma * recon.

        Reads only ``self.config`` and ``self.model_config``, so it works on an instance made with
        ``__new__`` (the note's minimal check)."""
        gamma, settings = self.loss_settings()

        def loss_fn(outputs: Any, targets: Sequence[torch.Tensor | None]) -> torch.Tensor:
            return compute_losses(outputs, targets, gamma, settings).total

        return loss_fn
