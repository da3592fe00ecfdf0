"""Family facts read without torch: which families exist, what each declares, a model's depth.

Pure Python (json and ast only): the planner runs at Snakefile parse time and the probes check
layer indices against the depth before any model loads, so neither may pay for importing torch
or touching weights. The family modules under :mod:`layerscope.models` import torch; their
module-level declarations are therefore read from source, not imported:

* a family is any ``layerscope/models/<name>.py`` defining top-level ``load`` and ``build_tiny``
  (adding the file is the registration: no list elsewhere names it);
* ``HOOKS`` (canonical name -> ``HookPoint(module, shape, what, probes)``): the probes a family
  serves are those its hook table names;
* ``TINY_ARCHS``, ``WEIGHT_KEYS`` (the per-model weight settings its loader reads),
  ``BLOCKS_CONFIG`` (where the config of the block-indexed network lives) and ``HUB_FILES``
  (what ``fetch`` downloads) - see docs/adding-a-model-family.md.
"""

from __future__ import annotations

import ast
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

__all__ = ["family_names", "family_manifest", "check_family", "families_serving", "tiny_archs", "weight_keys", "arch_config", "model_depth"]

MODELS_DIR = Path(__file__).resolve().parent / "models"
_HOOKPOINT_FIELDS = ("module", "shape", "what", "probes")


def _static_eval(node: ast.AST, env: Mapping[str, Any]) -> Any:
    """Evaluate the literal subset the family modules use for TINY_ARCHS: literals, dict(...) calls,
    names bound earlier, subscripts and + of those. Anything else is unknown (raises ValueError)."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args:
        return {kw.arg: _static_eval(kw.value, env) for kw in node.keywords if kw.arg}
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "HookPoint":
        point = dict(zip(_HOOKPOINT_FIELDS, (_static_eval(a, env) for a in node.args)))
        point.update({kw.arg: _static_eval(kw.value, env) for kw in node.keywords if kw.arg})
        return point  # a HookPoint's fields as a dict
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


def _is_family(tree: ast.Module) -> bool:
    defs = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    return {"load", "build_tiny"} <= defs


@lru_cache(maxsize=None)
def _parsed(family: str) -> ast.Module | None:
    if not family.isidentifier() or family.startswith("_"):
        return None
    try:
        return ast.parse((MODELS_DIR / f"{family}.py").read_text())
    except (OSError, SyntaxError):
        return None


@lru_cache(maxsize=None)
def family_names() -> tuple[str, ...]:
    """Every model family of the package, sorted: the modules under ``layerscope/models/`` that
    define ``load`` and ``build_tiny`` (helper modules such as ``wan_sampler`` define neither)."""
    names = []
    for f in sorted(MODELS_DIR.glob("*.py")):
        tree = _parsed(f.stem)
        if tree is not None and _is_family(tree):
            names.append(f.stem)
    return tuple(names)


@lru_cache(maxsize=None)
def family_manifest(family: str) -> dict[str, Any]:
    """The module-level literal declarations of a family's module (``TINY_ARCHS``, ``HOOKS`` with
    each ``HookPoint`` as a dict, ``WEIGHT_KEYS``, ...), read from source: names whose value is
    not a plain literal are absent. ``{}`` for a name that is no family module."""
    tree = _parsed(family)
    if tree is None or not _is_family(tree):
        return {}
    env: dict[str, Any] = {}
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
    return env


def check_family(name: str, family: str) -> None:
    """ConfigError naming ``models.<name>.family`` (with the closest family) unless it is one."""
    import difflib

    from layerscope.errors import ConfigError

    known = family_names()
    if family not in known:
        close = difflib.get_close_matches(family, known, n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"config field models.{name}.family: unknown model family '{family}'{hint} "
                          f"(families: {', '.join(known)}; a family is a module in layerscope/models)")


def tiny_archs(family: str) -> dict[str, Any]:
    """A family's ``TINY_ARCHS`` (name -> config dict), ``{}`` when it has none."""
    archs = family_manifest(family).get("TINY_ARCHS")
    return archs if isinstance(archs, dict) else {}


def weight_keys(family: str) -> tuple[str, ...]:
    """The per-model weight settings (``lora``, ``checkpoint``, ...) the family's loader reads: a
    model setting only these read and this family does not is a config error, never ignored."""
    return tuple(family_manifest(family).get("WEIGHT_KEYS", ()))


def families_serving(probe: str) -> tuple[str, ...]:
    """The families whose hook table names ``probe``: the families the probe accepts."""
    out = []
    for fam in family_names():
        hooks = family_manifest(fam).get("HOOKS")
        if isinstance(hooks, dict) and any(probe in tuple(p.get("probes", ())) for p in hooks.values() if isinstance(p, dict)):
            out.append(fam)
    return tuple(out)


def _blocks_config(family: str) -> tuple[str | None, tuple[str, ...]]:
    """(key of the block-indexed network's config inside a tiny arch, files holding it in a saved
    folder), from the family's ``BLOCKS_CONFIG``; default: the tiny arch itself and config.json."""
    bc = family_manifest(family).get("BLOCKS_CONFIG")
    bc = bc if isinstance(bc, dict) else {}
    return bc.get("tiny_key"), tuple(bc.get("files", ("config.json",)))


def arch_config(model_cfg: Mapping[str, Any], workdir: str | os.PathLike = ".") -> dict[str, Any] | None:
    """The config (a dict) of the network a probe indexes by block, read from the tiny-arch table,
    a local folder's config.json, or a hub checkpoint's config in the local HF cache; None when it
    cannot be read without weights or network (then the shard job checks)."""
    family = str(model_cfg.get("family"))
    key, files = _blocks_config(family)
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
