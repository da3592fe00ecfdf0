"""Model families. One module per family (as diffusers does); the file is the registration (the
families are discovered from this folder by :func:`layerscope.model_configs.family_names`, without
importing torch). Each provides:

* ``HOOKS``: its canonical hook table (docs/hooks.md); the probes it names are the probes it serves;
* ``WEIGHT_KEYS`` (and optionally ``BLOCKS_CONFIG``, ``HUB_FILES``): literal declarations the
  planner reads from source;
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

from layerscope.model_configs import family_names, weight_keys  # noqa: E402

# family -> module, discovered (a new family is a new file here, nothing else)
FAMILIES: dict[str, str] = {f: f"{__name__}.{f}" for f in family_names()}


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


def resolve_dtype(pref: str, device: "torch.device", native: str | None = None) -> "torch.dtype":
    """``auto``: on a GPU, the checkpoint's own dtype (``native``, from its config.json
    ``torch_dtype``: bf16 or fp16 weights stay so, which halves memory against fp32), bf16 when that is
    unknown or fp32 and the GPU supports it; fp32 on CPU (half precision there is slow and lossy)."""
    import torch

    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if pref == "auto":
        if device.type != "cuda":
            return torch.float32
        nat = NATIVE_NAMES.get(str(native)) if native else None
        if nat in ("fp16", "bf16"):
            return table[nat]
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return table[pref]


NATIVE_NAMES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "torch.float16": "fp16",
                "torch.bfloat16": "bf16", "torch.float32": "fp32"}


def native_dtype(folder: str | Path) -> str | None:
    """The dtype a saved model declares (``torch_dtype``, transformers 5 ``dtype``) in its config.json,
    looked up in the folder or its ``transformer/`` / ``unet/`` subfolder; None when it says nothing."""
    import json

    for rel in ("config.json", "transformer/config.json", "unet/config.json"):
        f = Path(folder) / rel
        if f.is_file():
            try:
                cfg = json.loads(f.read_text())
            except ValueError:
                return None
            val = cfg.get("torch_dtype") or cfg.get("dtype")
            return str(val) if val else None
    return None


def model_dtype(model_cfg: Mapping[str, Any], device: "torch.device") -> "torch.dtype":
    """The compute dtype of a resolved model config: its ``dtype`` setting, ``auto`` reading the
    checkpoint's own dtype from its local folder or cached snapshot (never the network)."""
    pref = str(model_cfg.get("dtype", "auto"))
    native = None
    if pref == "auto" and device.type == "cuda":
        try:
            native = native_dtype(source_of(model_cfg))
        except ModelLoadError:
            native = None
    return resolve_dtype(pref, device, native)


# Which weight keys each family's loader reads. A key given to a family that does not read it is a
# config error (the "checkpoint: on DINOv3 silently ignored"), never ignored.
# Each family module declares its own ``WEIGHT_KEYS``.
WEIGHT_KEYS: dict[str, tuple[str, ...]] = {f: weight_keys(f) for f in FAMILIES}
ALL_WEIGHT_KEYS = frozenset(k for keys in WEIGHT_KEYS.values() for k in keys)


def check_weight_keys(name: str, model_cfg: Mapping[str, Any]) -> None:
    """Raise ConfigError when a weight key is set (not null) on a family whose loader ignores it."""
    from layerscope.errors import ConfigError

    fam = str(model_cfg.get("family"))
    reads = WEIGHT_KEYS.get(fam, ())
    for key in sorted(ALL_WEIGHT_KEYS - set(reads)):
        if model_cfg.get(key) is not None:
            readers = sorted(f for f, ks in WEIGHT_KEYS.items() if key in ks)
            raise ConfigError(f"config field models.{name}.{key}: family '{fam}' does not read {key} "
                              f"(only {', '.join(readers)} do); remove it")


def source_of(model_cfg: Mapping[str, Any]) -> str:
    """What ``from_pretrained`` receives: a local directory. A hub id resolves to its snapshot in the
    local cache without any network call (offline compute nodes: no retries), at ``revision`` if set."""
    if model_cfg.get("kind") == "hub":
        from layerscope.hub import local_snapshot

        return local_snapshot(str(model_cfg["hub_id"]), model_cfg.get("revision"), config_field(model_cfg))
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
