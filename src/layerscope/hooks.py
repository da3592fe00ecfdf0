"""The hook vocabulary: one canonical name per activation, per family, TransformerLens-style.

A probe never invents a name or a module path: it asks for a canonical name
(``hooks.name("sd3", "blocks.{i}.hook_text_grad", i=3)``) and, when it needs the module, resolves it
through :func:`resolve` / :func:`get_module`. Every HDF5 group and every table's ``hook`` column carries
these names, so a table row, a shard path and ``docs/hooks.md`` say the same thing.

Each family module publishes ``HOOKS``: canonical template -> :class:`HookPoint` (module path template,
tensor shape, what it is, which probes read it). Templates use ``{i}`` (block index), ``{group}``
(a configured group label) etc.; a field matches ``[A-Za-z0-9_.]+`` (digits only for ``{i}``/``{j}``).
A family outside the package registers its table with :func:`register` (see
docs/adding-a-model-family.md). This module imports no torch: the family table is imported on first use.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Any, Mapping

__all__ = ["HookPoint", "register", "table", "name", "resolve", "get_module", "markdown_table", "BUILTIN_FAMILIES"]


def _builtin_families() -> tuple[str, ...]:
    from layerscope.model_configs import family_manifest, family_names

    return tuple(f for f in family_names() if family_manifest(f).get("HOOKS"))


# the package's families that publish a hook table (read from their source, no torch)
BUILTIN_FAMILIES = _builtin_families()


@dataclass(frozen=True)
class HookPoint:
    """Where a canonical hook lives: ``module`` (a ``get_submodule`` path template; '' for a value the
    probe computes from its inputs, e.g. generated latents), the tensor ``shape`` (symbolic), ``what``
    it is, and the ``probes`` that read it."""

    module: str
    shape: str
    what: str
    probes: tuple[str, ...] = ()


_REGISTERED: dict[str, dict[str, HookPoint]] = {}


def register(family: str, hooks: Mapping[str, HookPoint]) -> None:
    """Add (or replace) a family's table: the one step a new family needs besides its loader."""
    _REGISTERED[family] = dict(hooks)


def table(family: str) -> dict[str, HookPoint]:
    """canonical template -> HookPoint of ``family`` (registered, else ``layerscope.models.<family>.HOOKS``)."""
    if family in _REGISTERED:
        return _REGISTERED[family]
    try:
        mod = importlib.import_module(f"layerscope.models.{family}")
    except ImportError:
        raise KeyError(f"no hook table for family {family!r}") from None
    hooks = getattr(mod, "HOOKS", None)
    if hooks is None:
        raise KeyError(f"family {family!r} publishes no HOOKS")
    return dict(hooks)


def _pattern(template: str) -> re.Pattern[str]:
    out, pos = "", 0
    for m in re.finditer(r"\{(\w+)\}", template):
        out += re.escape(template[pos:m.start()])
        field = m.group(1)
        out += rf"(?P<{field}>\d+)" if field in ("i", "j") else rf"(?P<{field}>[A-Za-z0-9_.]+?)"
        pos = m.end()
    return re.compile(out + re.escape(template[pos:]) + "$")


def name(family: str, template: str, **fields: Any) -> str:
    """The canonical name ``template`` filled with ``fields``; the template must be in the family's table."""
    if template not in table(family):
        raise KeyError(f"{template!r} is not a {family} hook (known: {', '.join(table(family))})")
    return template.format(**fields)


def resolve(family: str, hook: str) -> tuple[str, HookPoint]:
    """(module path, HookPoint) of a concrete canonical name such as ``blocks.3.hook_resid_post``."""
    for template, point in table(family).items():
        m = _pattern(template).match(hook)
        if m:
            return point.module.format(**m.groupdict()), point
    raise KeyError(f"{hook!r} is not a {family} hook (known: {', '.join(table(family))})")


def get_module(root: Any, family: str, hook: str) -> Any:
    """The ``torch.nn.Module`` behind a canonical name (``root.get_submodule`` of its module path)."""
    path, _ = resolve(family, hook)
    if not path:
        raise KeyError(f"{hook!r} is computed by the probe, not read from a module")
    return root.get_submodule(path)


def markdown_table(family: str) -> str:
    """The family's table as docs/hooks.md shows it (a test compares the two)."""
    rows = ["| canonical name | module path | tensor shape | what | read by |", "|---|---|---|---|---|"]
    for template, p in table(family).items():
        mod = f"`{p.module}`" if p.module else "(computed)"
        rows.append(f"| `{template}` | {mod} | {p.shape} | {p.what} | {', '.join(p.probes)} |")
    return "\n".join(rows)
