"""Architecture facts read without torch: a model's block-indexed config and depth.

Pure Python (json and ast only): the planner runs at Snakefile parse time and the probes check
layer indices against the depth before any model loads, so neither may pay for importing torch
or touching weights. The family modules under :mod:`layerscope.models` import torch; their
``TINY_ARCHS`` tables are therefore read from source, not imported.
"""

from __future__ import annotations

import ast
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

__all__ = ["tiny_archs", "arch_config", "model_depth"]


def _static_eval(node: ast.AST, env: Mapping[str, Any]) -> Any:
    """Evaluate the literal subset the family modules use for TINY_ARCHS: literals, dict(...) calls,
    names bound earlier, subscripts and + of those. Anything else is unknown (raises ValueError)."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args:
        return {kw.arg: _static_eval(kw.value, env) for kw in node.keywords if kw.arg}
    if isinstance(node, ast.Dict):  # {**base, key: value}: spreads merge in order, as Python does
        out: dict[Any, Any] = {}
        for k, v in zip(node.keys, node.values):
            if k is None:
                out.update(_static_eval(v, env))
            else:
                out[_static_eval(k, env)] = _static_eval(v, env)
        return out
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_static_eval(e, env) for e in node.elts]
    if isinstance(node, ast.Name):
        if node.id in env:
            return env[node.id]
        raise ValueError(node.id)
    if isinstance(node, ast.Subscript):
        return _static_eval(node.value, env)[_static_eval(node.slice, env)]
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
        a, b = _static_eval(node.left, env), _static_eval(node.right, env)
        return a + b if isinstance(node.op, ast.Add) else a * b
    return ast.literal_eval(node)


@lru_cache(maxsize=None)
def tiny_archs(family: str) -> dict[str, Any]:
    """A family's ``TINY_ARCHS`` read from its module's source (the modules import torch, the
    planner must not): entries that are not plain literals come back partially or not at all."""
    src = Path(__file__).resolve().parent / "models" / f"{family}.py"
    env: dict[str, Any] = {}
    try:
        tree = ast.parse(src.read_text())
    except (OSError, SyntaxError):
        return {}
    for node in tree.body:
        targets = [node.target] if isinstance(node, ast.AnnAssign) else getattr(node, "targets", [])
        value = getattr(node, "value", None)
        if value is None or len(targets) != 1:
            continue
        target = targets[0]
        try:
            if isinstance(target, ast.Name):
                env[target.id] = _static_eval(value, env)
            elif isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name) and target.value.id in env:
                env[target.value.id][_static_eval(target.slice, env)] = _static_eval(value, env)  # NAME[key] = ...
        except (ValueError, KeyError, TypeError, SyntaxError):
            continue
    archs = env.get("TINY_ARCHS")
    return archs if isinstance(archs, dict) else {}


# the config of the network whose blocks the probes index, per family: (tiny-arch key, folder files)
_DENOISER = {
    "dinov3": (None, ("config.json",)),
    "sd3": ("transformer", ("transformer/config.json",)),
    "wan": (None, ("transformer/config.json", "config.json")),
    "sdxl": ("unet", ("unet/config.json", "config.json")),
    "clip": (None, ("config.json",)),
}


def arch_config(model_cfg: Mapping[str, Any], workdir: str | os.PathLike = ".") -> dict[str, Any] | None:
    """The config (a dict) of the network a probe indexes by block, read from the tiny-arch table,
    a local folder's config.json, or a hub checkpoint's config in the local HF cache; None when it
    cannot be read without weights or network (then the shard job checks)."""
    family = str(model_cfg.get("family"))
    key, files = _DENOISER.get(family, (None, ("config.json",)))
    kind = model_cfg.get("kind")
    if kind == "tiny":
        arch = tiny_archs(family).get(str(model_cfg.get("arch")))
        if not isinstance(arch, dict):
            return None
        sub = arch.get(key) if key else arch
        return sub if isinstance(sub, dict) else None
    if kind == "path":
        root = Path(str(model_cfg["path"]))
        root = root if root.is_absolute() else Path(workdir) / root
        for f in files:
            if (root / f).is_file():
                try:
                    return json.loads((root / f).read_text())
                except (OSError, json.JSONDecodeError):
                    return None
        return None
    if kind == "hub":
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return None
        for f in files:
            hit = try_to_load_from_cache(str(model_cfg["hub_id"]), f)
            if isinstance(hit, str):
                try:
                    return json.loads(Path(hit).read_text())
                except (OSError, json.JSONDecodeError):
                    return None
    return None


def model_depth(arch: Mapping[str, Any] | None) -> int | None:
    """Number of blocks the layer indices count (transformers: num_hidden_layers; diffusers: num_layers)."""
    if not arch:
        return None
    for k in ("num_hidden_layers", "num_layers"):
        if isinstance(arch.get(k), int):
            return int(arch[k])
    return None
