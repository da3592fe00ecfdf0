"""LoRA for every family, on peft: one loader, one set of checks, one set of errors.

Four formats reach the study and they all end the same way (adapter weights injected by peft, every
key landed, the adapter merged into the base weights so the probes see plain modules):

* an adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``/``.bin``, as
  ``PeftModel.save_pretrained`` writes it) - :func:`apply_adapter`, for SD3, Wan and DINOv3;
* a payload (a LoRA config dict + its state dict, as the DINOv3 head checkpoints carry it) -
  :func:`apply_payload`; the family converts module names first;
* SD3 LoRA *files* (kohya / diffusers layouts) go through diffusers' own converter in
  :mod:`layerscope.models.sd3` (the library that already knows those layouts), and SDXL folders through
  ``load_lora_weights``; both are checked with :func:`check_adapter_dir` / the SD3 module's count;
* the training adapter (``sd3_recon_train`` ``mode: lora``) is written with :func:`save_adapter`, so what
  training writes is exactly what :func:`apply_adapter` reads.

Every failure is a :class:`~layerscope.errors.ModelLoadError` naming the config field and the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from layerscope.models import ModelLoadError, loading

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "check_adapter_dir", "parse_target", "apply_adapter", "apply_payload",
           "save_adapter", "build_random_adapter"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def check_adapter_dir(adapter_dir: str | Path, field: str) -> tuple[Path, Path]:
    """(config file, weights file) of a peft adapter folder, or one line naming what is missing."""
    d = Path(adapter_dir)
    cfg_file = d / ADAPTER_CONFIG
    if not cfg_file.is_file():
        raise ModelLoadError(f"{field}: {d} has no {ADAPTER_CONFIG} (expected a peft adapter directory)")
    weights = next((d / f for f in ADAPTER_WEIGHTS if (d / f).is_file()), None)
    if weights is None:
        raise ModelLoadError(f"{field}: {d} has no {ADAPTER_WEIGHTS[0]}")
    return cfg_file, weights


def parse_target(target: str | Sequence[str] | None, aliases: Mapping[str, Sequence[str]] | None = None,
                 field: str = "models.*.lora_target") -> list[str] | None:
    """Target modules from config: None, a comma-separated string or a list; ``aliases`` (a family's
    shorthands, e.g. SD3's 'text' for its text-stream projections) expand in place, duplicates dropped."""
    if target is None:
        return None
    items = [t.strip() for t in target.split(",")] if isinstance(target, str) else [str(t).strip() for t in target]
    out: list[str] = []
    for t in items:
        if not t:
            continue
        for m in (aliases or {}).get(t, [t]):
            if m not in out:
                out.append(m)
    if not out:
        raise ModelLoadError(f"{field}: no target modules given")
    return out


def _target_of(key: str) -> str:
    """'transformer_blocks.0.attn.add_q_proj.lora_A.weight' -> 'transformer_blocks.0.attn.add_q_proj'."""
    return key.split(".lora_")[0]


def _matches(module_path: str, targets: Sequence[str]) -> bool:
    return any(module_path == t or module_path.endswith("." + t) for t in targets)


def _inject_and_merge(module: torch.nn.Module, config: Any, state: Mapping[str, torch.Tensor], what: str, field: str) -> None:
    """peft injects ``config`` into ``module``, loads ``state`` (keys relative to ``module``), checks
    that every key landed and merges the adapter into the base weights (dtype kept)."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.tuners_utils import BaseTunerLayer

    config.inference_mode = True
    dtype = next(module.parameters()).dtype
    try:
        inject_adapter_in_model(config, module)
        res = set_peft_model_state_dict(module, dict(state))
    except (ValueError, RuntimeError, KeyError) as e:
        raise ModelLoadError(f"{field}: cannot apply LoRA {what}: {str(e).splitlines()[0]}") from None
    unexpected = list(getattr(res, "unexpected_keys", []) or [])
    missing_lora = [k for k in (getattr(res, "missing_keys", []) or []) if "lora_" in k]
    if unexpected or missing_lora:
        raise ModelLoadError(f"{field}: LoRA {what} does not fit this model: unexpected {unexpected[:3]}, "
                             f"missing {missing_lora[:3]}")
    for m in module.modules():
        if isinstance(m, BaseTunerLayer):
            m.merge()
    module.to(dtype)


def apply_adapter(module: torch.nn.Module, adapter_dir: str | Path, field: str = "models.*.lora",
                  target: str | Sequence[str] | None = None, aliases: Mapping[str, Sequence[str]] | None = None,
                  strip_prefixes: Sequence[str] = ("base_model.model.",)) -> list[str]:
    """Inject a peft adapter folder into ``module`` and merge it; returns the adapted module paths.

    Target modules are the exact modules the weights name (nothing is injected without weights);
    ``target`` (a model's ``lora_target``) may restrict them to a subset, every listed module must
    then have weights. Keys saved by ``PeftModel.save_pretrained`` ('base_model.model.' prefix) and by
    ``get_peft_model_state_dict`` (no prefix) both load; a key that does not land is an error, never a
    silent partial load."""
    from peft import LoraConfig
    from safetensors.torch import load_file

    cfg_file, weights = check_adapter_dir(adapter_dir, field)
    try:
        config = LoraConfig.from_pretrained(str(Path(adapter_dir)))
    except (ValueError, TypeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{field}: {cfg_file}: not a LoRA config ({e})") from None
    with loading("the LoRA weights", weights, field):
        state = load_file(str(weights)) if weights.suffix == ".safetensors" else torch.load(weights, map_location="cpu")
    for prefix in strip_prefixes:
        state = {k.removeprefix(prefix): v for k, v in state.items()}
    adapted = sorted({_target_of(k) for k in state})
    override = parse_target(target, aliases, field.rsplit(".", 1)[0] + ".lora_target")
    if override is not None:
        missing = [t for t in override if not any(_matches(a, [t]) for a in adapted)]
        if missing:
            raise ModelLoadError(f"{field.rsplit('.', 1)[0]}.lora_target: modules {missing} have no weights in {weights}")
        state = {k: v for k, v in state.items() if _matches(_target_of(k), override)}
        adapted = sorted({_target_of(k) for k in state})
    config.target_modules = set(adapted)
    _inject_and_merge(module, config, state, f"adapter {Path(adapter_dir)}", field)
    return adapted


def apply_payload(module: torch.nn.Module, config: Mapping[str, Any], state: Mapping[str, torch.Tensor],
                  path: str | Path, field: str) -> None:
    """A LoRA carried inside another checkpoint (config dict + state dict, module names already the
    model's): injected and merged like an adapter folder, with the same checks."""
    from peft import LoraConfig

    cfg = {k: v for k, v in dict(config).items() if k in LoraConfig.__dataclass_fields__}
    for k in ("base_model_name_or_path", "revision"):
        cfg.pop(k, None)
    try:
        lcfg = LoraConfig(**cfg)
    except (ValueError, TypeError) as e:
        raise ModelLoadError(f"{field}: {path}: not a LoRA config ({e})") from None
    with loading("the LoRA payload", path, field):
        _inject_and_merge(module, lcfg, state, f"payload {path}", field)


def save_adapter(module: torch.nn.Module, config: Any, out_dir: str | Path) -> None:
    """Write a peft adapter folder from a module with injected LoRA layers: what :func:`apply_adapter` reads."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(module).items()}
    save_file(state, str(out_dir / ADAPTER_WEIGHTS[0]))
    config.save_pretrained(str(out_dir))


def build_random_adapter(module: torch.nn.Module, out_dir: str | Path, targets: Sequence[str], seed: int = 0,
                         rank: int = 4, alpha: float = 8.0) -> None:
    """A random (non-zero) adapter for ``module``'s shapes, so a default study can put a LoRA'd model
    on its models axis. ``module`` is modified (LoRA layers injected); pass a throwaway instance."""
    from peft import LoraConfig, inject_adapter_in_model

    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False)
    torch.manual_seed(seed)
    inject_adapter_in_model(cfg, module)
    save_adapter(module, cfg, out_dir)
