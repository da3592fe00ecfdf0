"""Settings: the config schema is the one declaration of every key the study reads.

``validate_config`` checks a config against ``schemas/config.schema.yaml`` (probe schemas ``$ref``'d
from it), fills every default the schema declares - at all levels, inside ``$ref`` too, which
Snakemake's ``validate`` does not - and reports the first problem as ONE line naming the field::

    config field models.sd3_tiny.dtyp: unknown key; did you mean 'dtype'?

``settings_from_schema`` turns a (defaulted) config section into frozen dataclasses generated from
the schema (lists become tuples), so a probe reads typed, immutable settings and keeps no defaults of
its own. Pure Python (yaml, jsonschema): the Snakefile imports this at parse time.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import re
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import yaml

from layerscope.errors import ConfigError

__all__ = [
    "SCHEMA_DIR", "SCHEMA", "NAME_RE", "validate_config", "format_validation_error", "probe_schema",
    "settings_from_schema", "settings_class", "check_names",
]

SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"
SCHEMA = SCHEMA_DIR / "config.schema.yaml"
# Model, dataset and probe names and tiny arch names: they become folder names and reach shell lines.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
NAME_RULE = "use letters, digits, '_' and '-', starting with a letter or digit"


@lru_cache(maxsize=None)
def _load_yaml(path: str) -> Any:
    return yaml.safe_load(Path(path).read_text())


def _validator_class() -> Any:
    """Draft 2020-12 with two refinements: defaults are filled in ``properties`` (all levels), and an
    'integer' is an int, never a float such as 500.0 (it would become the shard label '500.0')."""
    from jsonschema import Draft202012Validator, validators

    props = Draft202012Validator.VALIDATORS["properties"]

    def set_defaults(validator: Any, properties: Mapping[str, Any], instance: Any, schema: Any) -> Any:
        if isinstance(instance, dict):
            for prop, sub in properties.items():
                if "default" in sub and prop not in instance:
                    instance[prop] = copy.deepcopy(sub["default"])
        yield from props(validator, properties, instance, schema)

    checker = Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _c, x: isinstance(x, int) and not isinstance(x, bool))
    return validators.extend(Draft202012Validator, {"properties": set_defaults}, type_checker=checker)


def _registry(schema_path: Path) -> Any:
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    def retrieve(uri: str) -> Resource:
        # without '$schema': a $ref'd file that names its dialect would otherwise be validated by
        # the stock validator class, which fills no defaults
        contents = {k: v for k, v in _load_yaml(url2pathname(urlparse(uri).path)).items() if k != "$schema"}
        return Resource(contents=contents, specification=DRAFT202012)

    return Registry(retrieve=retrieve)


def _root_schema(schema_path: Path) -> dict[str, Any]:
    schema = copy.deepcopy(_load_yaml(str(schema_path)))
    schema["$id"] = schema_path.as_uri()
    return schema


def _dotted(path: Any) -> str:
    return ".".join(str(p) for p in path)


def format_validation_error(err: Any) -> str:
    """One line naming the field: 'config field probes.dinov3_channels.slices: 0 is less than the minimum of 1'.

    An unknown key names the key itself and the closest known one ('did you mean')."""
    path = _dotted(err.absolute_path)
    if err.validator == "additionalProperties" and err.validator_value is False and isinstance(err.instance, dict):
        known = list(err.schema.get("properties", {}))
        extra = sorted(k for k in err.instance if k not in known)
        if extra:
            key = extra[0]
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(known)}"
            return f"config field {path + '.' if path else ''}{key}: unknown key{hint}"
    if err.validator == "uniqueItems":
        seen: list[Any] = []
        for v in err.instance:
            if any(_same(v, s) for s in seen):
                return f"config field {path}: value {json.dumps(v)} is repeated (axis values are a set)"
            seen.append(v)
    return f"config field {path or '<top level>'}: {err.message}"


def _same(a: Any, b: Any) -> bool:
    return a == b and not (isinstance(a, bool) ^ isinstance(b, bool))


def check_names(config: Mapping[str, Any]) -> None:
    """Names become folder names and reach shell lines: one conservative pattern for all of them."""
    for section, what in (("models", "model"), ("datasets", "dataset"), ("probes", "probe")):
        block = config.get(section)
        if not isinstance(block, dict):
            continue
        for name in block:
            if not isinstance(name, str) or not NAME_RE.match(name):
                raise ConfigError(f"config field {section}: {what} name {json.dumps(str(name))} is not allowed ({NAME_RULE})")


def validate_config(config: dict[str, Any], schema_path: str | Path = SCHEMA) -> dict[str, Any]:
    """Validate ``config`` in place against the schema, filling every default; raise ConfigError
    with one line naming the first bad field. Returns the config."""
    from jsonschema.exceptions import best_match

    if not isinstance(config, dict):
        raise ConfigError("config field <top level>: the config must be a mapping")
    check_names(config)
    schema_path = Path(schema_path).resolve()
    V = _validator_class()
    errors = list(V(_root_schema(schema_path), registry=_registry(schema_path)).iter_errors(config))
    if errors:
        # the deepest, earliest field first: the message a person acts on
        first = min(errors, key=lambda e: (list(map(str, e.absolute_path)), -len(e.absolute_path)))
        err = best_match([e for e in errors if list(e.absolute_path) == list(first.absolute_path)] or errors)
        raise ConfigError(format_validation_error(err))
    return config


# ---------------------------------------------------------------- typed settings
def probe_schema(probe: str) -> dict[str, Any]:
    return _load_yaml(str(SCHEMA_DIR / "probes" / f"{probe}.schema.yaml"))


_PY_TYPES = {"integer": int, "number": float, "boolean": bool, "string": str, "array": tuple, "null": type(None)}


def _freeze(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    return value


def _field_type(sub: Mapping[str, Any]) -> Any:
    t = sub.get("type")
    if isinstance(t, str):
        return _PY_TYPES.get(t, Any)
    return Any


@lru_cache(maxsize=None)
def _class_for(schema_json: str, name: str) -> type:
    schema = json.loads(schema_json)
    fields = []
    for key, sub in schema.get("properties", {}).items():
        default = _freeze(sub.get("default"))
        f = dataclasses.field(default_factory=lambda d=default: d) if isinstance(default, MappingProxyType) else dataclasses.field(default=default)
        fields.append((key, _field_type(sub), f))
    cls = dataclasses.make_dataclass(name, fields, frozen=True)
    cls.__doc__ = schema.get("description", f"Settings generated from the schema ({name}).")
    return cls


def settings_class(schema: Mapping[str, Any], name: str) -> type:
    """A frozen dataclass with one field per schema property (default: the schema's default)."""
    return _class_for(json.dumps(schema, sort_keys=True), name)


def settings_from_schema(schema: Mapping[str, Any], values: Mapping[str, Any], name: str) -> Any:
    """Typed, immutable settings: keys the schema does not declare are refused, missing ones take
    the schema's default, lists become tuples."""
    cls = settings_class(schema, name)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"config field {name}.{unknown[0]}: unknown key")
    # a shard job meets a spec written earlier or by hand: the same types and ranges as the plan,
    # one line naming the field (required keys aside: a spec carries no axis lists)
    loose = {k: v for k, v in schema.items() if k not in ("required", "$schema", "$id")}
    loose["properties"] = {k: v for k, v in schema.get("properties", {}).items() if "$ref" not in v}
    loose["additionalProperties"] = True
    values = copy.deepcopy(dict(values))
    errors = list(_validator_class()(loose).iter_errors(values))
    if errors:
        from jsonschema.exceptions import best_match

        err = best_match(errors)
        msg = format_validation_error(err).removeprefix("config field ")
        raise ConfigError(f"config field {name}.{msg}")
    return cls(**{k: _freeze(v) for k, v in values.items()})


# ---------------------------------------------------------------- the README's reference
README_START = "<!-- config-reference: generated from src/layerscope/schemas by `python -m layerscope.settings README.md` -->"
README_END = "<!-- /config-reference -->"


def _type_text(sub: Mapping[str, Any]) -> str:
    if "$ref" in sub and "type" not in sub:
        return "object"
    if "const" in sub:
        return json.dumps(sub["const"])
    if "enum" in sub:
        return " \\| ".join(json.dumps(v) if not isinstance(v, str) else v for v in sub["enum"])
    if "oneOf" in sub:
        return " or ".join(_type_text(s) for s in sub["oneOf"])
    t = sub.get("type", "any")
    t = " \\| ".join(t) if isinstance(t, list) else t
    if t == "array" and isinstance(sub.get("items"), dict):
        t = f"list of {_type_text(sub['items'])}"
    return t


def _resolve(ref: str, base: Path) -> tuple[Mapping[str, Any], Path]:
    file, _, frag = ref.partition("#")
    path = (base / file).resolve() if file else base / "__self__"
    doc = _load_yaml(str(path)) if file else None
    return doc, path


def _rows(schema: Mapping[str, Any], prefix: str, file: Path) -> list[tuple[str, str, str, str]]:
    rows = []
    for key, sub in schema.get("properties", {}).items():
        path = f"{prefix}{key}"
        default = json.dumps(sub["default"]) if "default" in sub else ("required" if key in schema.get("required", []) else "")
        desc = str(sub.get("description", "")).replace("|", "\\|").replace("\n", " ").strip()
        rows.append((path, _type_text(sub), default, desc))
        ref = sub.get("$ref", "")
        if ref and "#" not in ref:  # a probe's own schema file
            target_file = (file.parent / ref).resolve()
            rows += _rows(_load_yaml(str(target_file)), path + ".", target_file)
        elif sub.get("properties"):
            rows += _rows(sub, path + ".", file)
        elif isinstance(sub.get("additionalProperties"), dict) and "$ref" in sub["additionalProperties"]:
            name = sub["additionalProperties"]["$ref"].rsplit("/", 1)[-1]
            rows += _rows(_load_yaml(str(SCHEMA))["$defs"][name], f"{path}.<name>.", file)
    return rows


def reference_markdown() -> str:
    """Every key of the config schema as one Markdown table (path, type, default, description):
    the README's configuration reference, so the docs cannot drift from the schema."""
    root = _load_yaml(str(SCHEMA))
    rows = _rows(root, "", SCHEMA)
    rows += _rows(root["$defs"]["resources"], "probes.<probe>.resources.", SCHEMA)
    lines = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    lines += [f"| `{p}` | {t} | {f'`{d}`' if d and d != 'required' else d} | {desc} |" for p, t, d, desc in rows]
    return "\n".join(lines)


def update_readme(readme: str | Path) -> bool:
    """Rewrite the generated block of the README; True when it changed."""
    path = Path(readme)
    text = path.read_text()
    a, b = text.index(README_START), text.index(README_END)
    new = text[: a + len(README_START)] + "\n\n" + reference_markdown() + "\n\n" + text[b:]
    if new != text:
        path.write_text(new)
    return new != text


if __name__ == "__main__":
    import sys

    print("updated" if update_readme(sys.argv[1] if len(sys.argv) > 1 else "README.md") else "up to date")
