"""The study plan: config -> shards, their specs, inputs and paths.

Pure Python (yaml and jsonschema only): the Snakefile imports this at parse time, and every SLURM
job re-reads the Snakefile, so nothing here may import torch or touch model files.

The shard identity is its path::

    results/<probe>/shards/<model>/<axis>-<label>__<axis>-<label>....h5

so ``snakemake --forcerun results/dinov3_channels/shards/dinov3_tiny/slice-1of2.h5`` reruns exactly
that shard, and the merge can check a shard's recorded axes against its file name.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping

import yaml

from layerscope.probes import PROBES, get_probe
from layerscope.probes.base import LABEL_RE, Probe, ShardSpec

REPO_ROOT = Path(__file__).resolve().parents[2]
SCHEMA = REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml"
RESULTS = "results"

__all__ = ["ConfigError", "Plan", "load_config", "validate_config", "shard_label", "parse_shard_label", "canonical_hash"]


from layerscope.errors import ConfigError  # noqa: E402  (re-exported)


def canonical_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        cfg = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{p}: top level must be a mapping")
    return cfg


def format_validation_error(err: Any) -> str:
    """One line naming the field: 'probes.dinov3_channels.slices: 0 is less than the minimum of 1'."""
    path = ".".join(str(p) for p in err.absolute_path) or "<top level>"
    return f"config field {path}: {err.message}"


def validate_config(config: dict[str, Any], schema_path: str | os.PathLike = SCHEMA) -> None:
    """Validate against the JSON schema (filling defaults in place), outside Snakemake."""
    import jsonschema
    from jsonschema import Draft202012Validator, validators
    from referencing import Registry, Resource

    schema_path = Path(schema_path).resolve()
    schema = yaml.safe_load(schema_path.read_text())
    schema["$id"] = schema_path.as_uri()

    def retrieve(uri: str) -> Resource:
        from urllib.parse import urlparse
        from urllib.request import url2pathname

        return Resource.from_contents(yaml.safe_load(Path(url2pathname(urlparse(uri).path)).read_text()))

    registry = Registry(retrieve=retrieve)
    props = Draft202012Validator.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        for prop, sub in properties.items():
            if isinstance(instance, dict) and "default" in sub:
                instance.setdefault(prop, json.loads(json.dumps(sub["default"])))
        yield from props(validator, properties, instance, schema)

    V = validators.extend(Draft202012Validator, {"properties": set_defaults})
    errors = sorted(V(schema, registry=registry).iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        raise ConfigError(format_validation_error(jsonschema.exceptions.best_match(errors)))


def shard_label(axes: Mapping[str, str]) -> str:
    return "__".join(f"{a}-{v}" for a, v in axes.items()) or "all"


def parse_shard_label(label: str, axes: tuple[str, ...]) -> dict[str, str]:
    if label == "all" and not axes:
        return {}
    parts = label.split("__")
    out: dict[str, str] = {}
    for part in parts:
        a, sep, v = part.partition("-")
        if not sep:
            raise ValueError(f"bad shard label {label!r}")
        out[a] = v
    if tuple(out) != tuple(axes):
        raise ValueError(f"shard label {label!r} has axes {tuple(out)}, expected {axes}")
    return out


class Plan:
    """Resolved, checked study plan for one config (validated and defaulted beforehand)."""

    def __init__(self, config: Mapping[str, Any], workdir: str | os.PathLike = "."):
        self.config = config
        self.workdir = Path(workdir)
        self.runtime = dict(config.get("runtime", {}))
        self._models: dict[str, dict[str, Any]] = {}
        self._probes: dict[str, Probe] = {}
        self._base: dict[tuple[str, str], dict[str, Any]] = {}
        self._shards: dict[str, list[tuple[str, str]]] = {}
        for name, mcfg in config.get("models", {}).items():
            self._models[name] = self._resolve_model(name, mcfg)
        from layerscope.hub import check_all_cached

        check_all_cached(config)  # every missing hub model of the enabled probes named at once, before any job
        for pname, pcfg in config.get("probes", {}).items():
            if pname not in PROBES:
                raise ConfigError(f"config field probes.{pname}: unknown probe; known: {', '.join(sorted(PROBES))}")
            if not pcfg.get("enabled", True):
                continue
            probe = get_probe(pname)
            self._probes[pname] = probe
            probe.check_config(pcfg, config)
            self._plan_probe(pname, probe, pcfg)

    # ---- models and datasets ----
    def _on_disk(self, value: str) -> tuple[Path, Path]:
        """A configured path as written (user expanded) and where it lies from the working directory."""
        p = Path(os.path.expanduser(value))
        return p, (p if p.is_absolute() else self.workdir / p)

    def _check_path(self, field: str, value: str, hub_hint: bool = False) -> str:
        p, rel = self._on_disk(value)
        produced = not p.is_absolute() and p.parts[:1] == (RESULTS,)  # made by another rule of the study
        if not produced and not rel.exists():
            hint = " (a hub id needs the 'hub:' prefix)" if hub_hint else ""
            raise ConfigError(f"config field {field}: path '{value}' does not exist{hint}")
        return str(p)

    def _resolve_model(self, name: str, mcfg: Mapping[str, Any]) -> dict[str, Any]:
        if not LABEL_RE.match(name):
            raise ConfigError(f"config field models.{name}: model names may use letters, digits, '.', '+', '=', '-' and single '_'")
        out = dict(mcfg)
        src = str(mcfg["source"])
        if src.startswith("tiny:"):
            out.update(kind="tiny", arch=src[5:] or "default", path=f"{RESULTS}/models/{name}")
        elif src.startswith("hub:"):
            out.update(kind="hub", hub_id=src[4:], path=None)
        else:
            out.update(kind="path", path=self._check_path(f"models.{name}.source", src, hub_hint=True))
            self._check_folder(f"models.{name}.source", out["path"], ("config.json", "model_index.json", "transformer/config.json"),
                               "a model or pipeline folder saved with save_pretrained")
        from layerscope.models import check_weight_keys

        check_weight_keys(name, mcfg)  # a weight key the family does not read is an error, not ignored
        for key in ("lora", "checkpoint", "lora_payload"):  # extra weight files: checked now, shard inputs later
            if key != "lora" and str(mcfg.get(key) or "").startswith("hub:"):
                continue  # a file of a hub repository: checked in the cache with the hub models
            if mcfg.get(key):
                out[key] = self._check_path(f"models.{name}.{key}", str(mcfg[key]))
        if mcfg.get("lora"):
            self._check_folder(f"models.{name}.lora", out["lora"], ("adapter_config.json",), "a peft adapter folder")
        return out

    def _check_folder(self, field: str, value: str, markers: tuple[str, ...], what: str) -> None:
        """A model or adapter folder must carry the file its loader reads first; caught here, a wrong
        path fails the dry run instead of every shard job on the cluster. Folders the study itself
        makes (under results/) do not exist yet and are skipped."""
        _, rel = self._on_disk(value)
        if not rel.exists():
            return
        if not rel.is_dir():
            raise ConfigError(f"config field {field}: '{value}' is a file; expected {what} (a folder)")
        if not any((rel / m).is_file() for m in markers):
            raise ConfigError(f"config field {field}: '{value}' has no {', '.join(markers[:-1])}{' or ' if len(markers) > 1 else ''}{markers[-1]}; expected {what}")

    def model(self, name: str) -> dict[str, Any]:
        return self._models[name]

    def dataset(self, name: str) -> dict[str, Any]:
        ds = self.config.get("datasets", {})
        if name not in ds:
            raise KeyError(name)
        out = dict(ds[name])
        if out.get("path"):
            out["path"] = self._check_path(f"datasets.{name}.path", str(out["path"]))
        out["index"] = f"{RESULTS}/data/{name}/index.tsv"
        return out

    @cached_property
    def tiny_models(self) -> dict[str, dict[str, Any]]:
        """Models built from configs by the study itself (rule build_tiny_model)."""
        used = {m for (_, m) in self._base}
        for base in self._base.values():
            used.update(base["models"])
        return {n: m for n, m in self._models.items() if m["kind"] == "tiny" and n in used}

    @cached_property
    def datasets_used(self) -> dict[str, dict[str, Any]]:
        names = {d for base in self._base.values() for d in base["datasets"]}
        return {n: self.dataset(n) for n in sorted(names)}

    # ---- probes and shards ----
    def _plan_probe(self, pname: str, probe: Probe, pcfg: Mapping[str, Any]) -> None:
        models = list(pcfg.get("models", []))
        if not models:
            raise ConfigError(f"config field probes.{pname}.models: list at least one model")
        datasets: dict[str, dict[str, Any]] = {}
        if probe.datasets_key and pcfg.get(probe.datasets_key):
            dname = pcfg[probe.datasets_key]
            try:
                datasets[dname] = self.dataset(dname)
            except KeyError:
                raise ConfigError(f"config field probes.{pname}.{probe.datasets_key}: unknown dataset '{dname}'") from None
        hashed_cfg = {k: v for k, v in pcfg.items() if k not in set(probe.axis_keys.values()) | {"models", "enabled", "resources", "threads"}}
        # other models a probe refers to (e.g. a CLIP scorer) travel with the spec
        extra = {m: self._models[m] for m in pcfg.get("aux_models", []) if m in self._models}
        shards: list[tuple[str, str]] = []
        for i, m in enumerate(models):
            if m not in self._models:
                raise ConfigError(f"config field probes.{pname}.models[{i}]: unknown model '{m}'")
            mcfg = self._models[m]
            if probe.families and mcfg["family"] not in probe.families:
                raise ConfigError(
                    f"config field probes.{pname}.models[{i}]: model '{m}' is family '{mcfg['family']}', "
                    f"this probe takes {', '.join(probe.families)}")
            values = probe.axis_values(pcfg, m, mcfg)
            for axis in probe.axes:
                if not values.get(axis):
                    raise ConfigError(f"config field probes.{pname}.{probe.axis_keys.get(axis, axis + 's')}: no values for shard axis '{axis}'")
                for v in values[axis]:
                    if not LABEL_RE.match(v):
                        raise ConfigError(f"config field probes.{pname}.{probe.axis_keys.get(axis, axis + 's')}: value '{v}' is not filename-safe")
            hashed = {"probe": pname, "model": m, "model_cfg": mcfg, "probe_cfg": hashed_cfg,
                      "datasets": datasets, "models": extra}
            self._base[(pname, m)] = {"config_hash": canonical_hash(hashed), "datasets": datasets, "models": extra}
            combos: list[dict[str, str]] = [{}]
            for axis in probe.axes:
                combos = [{**c, axis: v} for c in combos for v in values[axis]]
            shards.extend((m, shard_label(c)) for c in combos)
        self._shards[pname] = shards

    @property
    def probes(self) -> dict[str, Probe]:
        return self._probes

    def shards(self, probe: str, model: str | None = None) -> list[tuple[str, str]]:
        return [s for s in self._shards[probe] if model is None or s[0] == model]

    def models_of(self, probe: str) -> list[str]:
        return list(dict.fromkeys(m for m, _ in self._shards[probe]))

    @staticmethod
    def shard_path(probe: str, model: str, shard: str) -> str:
        return f"{RESULTS}/{probe}/shards/{model}/{shard}.h5"

    def shard_paths(self, probe: str, model: str | None = None) -> list[str]:
        return [self.shard_path(probe, m, s) for m, s in self.shards(probe, model)]

    def config_hash(self, probe: str, model: str) -> str:
        return self._base[(probe, model)]["config_hash"]

    def threads(self, probe: str) -> int:
        return int(self.config["probes"][probe].get("threads", self.runtime.get("threads", 1)))

    def base_spec(self, probe: str, model: str) -> dict[str, Any]:
        """Everything a (probe, model)'s shards share: the spec without axes.

        Axis lists (seeds, slices, ...) are left out, so adding a seed or a model leaves the base
        specs - and so the shards - that already exist untouched; a shard's own axis values come
        from its file name."""
        p = self._probes[probe]
        base = self._base[(probe, model)]
        drop = set(p.axis_keys.values()) | {"resources", "threads", "enabled"}
        return {
            "probe": probe, "model": model, "axes": {},
            "probe_cfg": {k: v for k, v in self.config["probes"][probe].items() if k not in drop},
            "model_cfg": self._models[model], "datasets": base["datasets"], "models": base["models"],
            "config_hash": base["config_hash"], "threads": self.threads(probe),
            "device": str(self.runtime.get("device", "auto")),
        }

    def base_spec_json(self, probe: str, model: str) -> str:
        return json.dumps(self.base_spec(probe, model), sort_keys=True, separators=(",", ":"))

    def spec(self, probe: str, model: str, shard: str) -> ShardSpec:
        d = self.base_spec(probe, model)
        d["axes"] = parse_shard_label(shard, self._probes[probe].axes)
        return ShardSpec.from_json_dict(d)

    def spec_json(self, probe: str, model: str, shard: str) -> str:
        return json.dumps(self.spec(probe, model, shard).to_json_dict(), sort_keys=True, separators=(",", ":"))

    @staticmethod
    def spec_path(probe: str, model: str) -> str:
        return f"{RESULTS}/{probe}/specs/{model}.json"

    def model_inputs(self, name: str) -> list[str]:
        m = self._models[name]
        out = [m["path"]] if m["kind"] in ("tiny", "path") else []
        out += [m[k] for k in ("lora", "checkpoint", "lora_payload") if m.get(k) and not str(m[k]).startswith("hub:")]
        return out

    def shard_inputs(self, probe: str, model: str) -> list[str]:
        base = self._base[(probe, model)]
        out = self.model_inputs(model)
        for extra in base["models"]:
            out += self.model_inputs(extra)
        out += [d["index"] for d in base["datasets"].values()]
        return out

    def table_paths(self, probe: str, model: str) -> list[str]:
        return [f"{RESULTS}/{probe}/tables/{model}/{t}.csv" for t in self._probes[probe].tables]

    def figure_paths(self, probe: str) -> list[str]:
        return [f"{RESULTS}/{probe}/figures/{f}.png" for f in self._probes[probe].figures]

    def targets(self) -> list[str]:
        out: list[str] = []
        for p in self._probes:
            out += self.figure_paths(p)
        return out

    def summary(self) -> str:
        lines = []
        for p in self._probes:
            lines.append(f"{p}: {len(self._shards[p])} shards over models {', '.join(self.models_of(p))}")
        return "\n".join(lines)


def plan_from_file(path: str | os.PathLike, workdir: str | os.PathLike = ".") -> Plan:
    cfg = load_config(path)
    validate_config(cfg)
    return Plan(cfg, workdir)
