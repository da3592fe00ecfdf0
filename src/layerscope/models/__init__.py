"""Model families. One module per family (as diffusers does), each providing:

* ``TINY_ARCHS``: names of built-in tiny architectures (configs with fixed seeds) for offline studies;
* ``build_tiny(arch, seed, out_dir)``: build one and ``save_pretrained`` it to ``out_dir``;
* ``load(model_cfg, device, dtype)``: load from ``model_cfg['path']`` or ``model_cfg['hub_id']``
  through the library's ``from_pretrained`` (the same path for a tiny build and a real checkpoint),
  applying ``model_cfg['lora']`` with peft when set.

Family modules import torch at top level; this package's ``__init__`` does not.
"""

from __future__ import annotations

from contextlib import contextmanager
from importlib import import_module
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Iterator, Mapping

if TYPE_CHECKING:
    import torch

FAMILIES: dict[str, str] = {
    "dinov3": "layerscope.models.dinov3",
    "sdxl": "layerscope.models.sdxl",
    "clip": "layerscope.models.clip",
    "wan": "layerscope.models.wan",
    "sd3": "layerscope.models.sd3",
}


from layerscope.errors import ModelLoadError  # noqa: E402  (re-exported)


def family_module(family: str) -> ModuleType:
    try:
        return import_module(FAMILIES[family])
    except KeyError:
        raise ModelLoadError(f"unknown model family {family!r}; known: {', '.join(sorted(FAMILIES))}") from None


def resolve_device(pref: str = "auto") -> "torch.device":
    import torch

    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(pref)


def resolve_dtype(pref: str, device: "torch.device") -> "torch.dtype":
    """auto: bf16 on a GPU that supports it, else fp32 (CPU half precision is slow and lossy)."""
    import torch

    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if pref == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return table[pref]


def source_of(model_cfg: Mapping[str, Any]) -> str:
    """What ``from_pretrained`` receives: a local directory or a hub id."""
    if model_cfg.get("kind") == "hub":
        return str(model_cfg["hub_id"])
    path = Path(str(model_cfg["path"]))
    if not path.exists():
        raise ModelLoadError(f"model files not found: {path} (models.{model_cfg.get('name', '?')}.source)")
    return str(path)


@contextmanager
def loading(what: str, src: str | Path, field: str) -> Iterator[None]:
    """Wrap a ``from_pretrained`` call: whatever a bad checkpoint raises (a truncated safetensors
    file, a broken config.json, weights of the wrong shape, a missing subfolder) becomes one line
    naming the source, the config field and the library's own first line, instead of a traceback
    deep inside transformers or diffusers. The original exception stays chained for debugging."""
    try:
        yield
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - every failure here is a load failure of `src`
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
        raise ModelLoadError(f"cannot load {what} from {src} ({field}): {type(e).__name__}: {first}") from e


def config_field(model_cfg: Mapping[str, Any], key: str = "source") -> str:
    """The config field a model setting came from, for error messages: ``models.<name>.<key>``."""
    return f"models.{model_cfg.get('name', '*')}.{key}"


def set_threads(n: int) -> None:
    """Use exactly the cores Snakemake gave the job: oversubscription made a tiny SD3 step 100x slower."""
    import torch

    n = max(1, int(n))
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:  # already set in this process
        pass


def build_tiny(family: str, arch: str, seed: int, out_dir: str | Path) -> None:
    mod = family_module(family)
    if arch not in mod.TINY_ARCHS:
        raise ModelLoadError(f"family {family} has no tiny architecture {arch!r}; known: {', '.join(mod.TINY_ARCHS)}")
    mod.build_tiny(arch, seed, Path(out_dir))
