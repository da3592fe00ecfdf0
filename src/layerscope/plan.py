"""The study plan: config -> shards, their specs, inputs and paths.

Pure Python (yaml and jsonschema only): the Snakefile imports this at parse time, and every SLURM
job re-reads the Snakefile, so nothing here may import torch or touch model files.

The shard identity is its path (:mod:`layerscope.layout` owns every result path)::

    results/<study>/<probe>/shards/<model>/<axis>-<label>__<axis>-<label>....h5

so ``snakemake --forcerun results/default/dinov3_channels/shards/dinov3_tiny/slice-1of2.h5`` reruns
exactly that shard, and the merge can check a shard's recorded axes against its file name.

What a shard depends on, and nothing else: its (probe, model) spec file holds that model, its
data's slice template, the *used* aux models and the settings that change its numbers. Execution
knobs - threads, resources, ``runtime`` (device), the order of lists, the other models of the
probe's ``models:`` list, and each probe's ``exec_keys`` (batch sizes the probe guarantees its
numbers do not depend on) - reach the shard job through its command line, not the spec, so
changing them reruns nothing. Data reach a shard through its own slice file (one rule per slice,
rerun when that slice's items change).
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

from layerscope.layout import parse_shard_label, shard_label  # noqa: F401  (re-exported)
from layerscope.layout import DEFAULT_STUDY, RESULTS, Layout  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]

__all__ = ["ConfigError", "Plan", "load_config", "validate_config", "shard_label", "parse_shard_label", "canonical_hash",
           "arch_config"]


from layerscope.errors import ConfigError, DataError  # noqa: E402  (re-exported)
from layerscope.settings import SCHEMA, NAME_RE, NAME_RULE, format_validation_error, validate_config  # noqa: E402,F401


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


from layerscope.model_configs import _static_eval, arch_config, check_family, model_depth, tiny_archs  # noqa: E402,F401  (re-exported)


class Plan:
    """Resolved, checked study plan for one config (validated and defaulted beforehand)."""

    def __init__(self, config: Mapping[str, Any], workdir: str | os.PathLike = "."):
        self.config = config
        self.workdir = Path(workdir)
        self.runtime = dict(config.get("runtime", {}))
        self.study = str(config.get("study") or DEFAULT_STUDY)
        self.layout = Layout(self.study)
        self._models: dict[str, dict[str, Any]] = {}
        self._probes: dict[str, Probe] = {}
        self._base: dict[tuple[str, str], dict[str, Any]] = {}
        self._shards: dict[str, list[tuple[str, str]]] = {}
        self._datasets: dict[str, dict[str, Any]] = {}
        self._dataset_json: dict[str, str] = {}
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
        produced = self.layout.is_produced(str(p))  # made by another rule of the study
        if not produced and not rel.exists():
            hint = " (a hub id needs the 'hub:' prefix)" if hub_hint else ""
            raise ConfigError(f"config field {field}: path '{value}' does not exist{hint}")
        return str(p)

    def _resolve_model(self, name: str, mcfg: Mapping[str, Any]) -> dict[str, Any]:
        if not NAME_RE.match(name):
            raise ConfigError(f"config field models: model name {json.dumps(name)} is not allowed ({NAME_RULE})")
        out = dict(mcfg)
        check_family(name, str(mcfg["family"]))
        src = str(mcfg["source"])
        if src.startswith("tiny:"):
            arch = src[5:] or "default"
            known = tiny_archs(str(mcfg.get("family")))
            if not NAME_RE.match(arch) or (known and arch not in known):
                raise ConfigError(f"config field models.{name}.source: {json.dumps(src)} names no tiny architecture of family "
                                  f"{mcfg.get('family')} (known: {', '.join('tiny:' + a for a in known)})")
            out.update(kind="tiny", arch=arch, path=self.layout.model_dir(name))
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

    def _check_dataset_files(self, name: str, ds: Mapping[str, Any]) -> None:
        """List and caption files are parsed now (format only; images are checked when indexing),
        so a malformed line fails the dry run naming its line number."""
        from layerscope.data import parse_captions_file, parse_list_file

        _, rel = self._on_disk(str(ds["path"]))
        if ds.get("kind") == "folder" and rel.exists() and not rel.is_dir():
            raise ConfigError(f"config field datasets.{name}.path: '{ds['path']}' is a file; a 'folder' dataset needs a folder")
        if ds.get("kind") == "list" and rel.is_file():
            parse_list_file(rel, f"datasets.{name}.path")
        if ds.get("kind") == "list" and rel.is_dir():
            raise ConfigError(f"config field datasets.{name}.path: '{ds['path']}' is a folder; a 'list' dataset needs a file of 'path<TAB>caption' lines")
        if ds.get("captions"):
            _, cap = self._on_disk(self._check_path(f"datasets.{name}.captions", str(ds["captions"])))
            if cap.is_file():
                parse_captions_file(cap, f"datasets.{name}.captions")

    def model(self, name: str) -> dict[str, Any]:
        return self._models[name]

    def dataset(self, name: str) -> dict[str, Any]:
        """A dataset's config, its files checked once (every data slice job of a dry run asks)."""
        if name not in self._datasets:
            ds = self.config.get("datasets", {})
            if name not in ds:
                raise KeyError(name)
            out = dict(ds[name])
            if out.get("kind") in ("folder", "list") and not out.get("path"):
                raise ConfigError(f"config field datasets.{name}.path: a '{out.get('kind')}' dataset needs a path")
            if out.get("path"):
                out["path"] = self._check_path(f"datasets.{name}.path", str(out["path"]))
                self._check_dataset_files(name, out)
            self._datasets[name] = out
        return dict(self._datasets[name])

    def dataset_json(self, name: str) -> str:
        if name not in self._dataset_json:
            self._dataset_json[name] = json.dumps(self.dataset(name), sort_keys=True)
        return self._dataset_json[name]

    def probe_cfg(self, probe: str) -> dict[str, Any]:
        """A probe's settings with the study's defaults for paths filled in (``checkpoint_root``
        null -> the study's ``<probe>/checkpoints``)."""
        out = dict(self.config["probes"][probe])
        if "checkpoint_root" in out and not out["checkpoint_root"]:
            out["checkpoint_root"] = self.layout.checkpoints(probe)
        return out

    def aux_models_used(self, probe: str, pcfg: Mapping[str, Any] | None = None) -> list[str]:
        """The aux models a probe's settings actually use: listed in ``aux_models`` *and* named by
        one of its ``*_model`` settings (the CLIP scorer only when ``clip_model`` is set), so an
        unused aux model changes neither the spec nor the hash."""
        pcfg = self.config["probes"][probe] if pcfg is None else pcfg
        named = {str(v) for k, v in pcfg.items() if k.endswith("_model") and v}
        return [m for m in pcfg.get("aux_models", []) if m in named and m in self._models]

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
        hashed_cfg = self._spec_cfg(pname, probe)
        # other models a probe uses (e.g. a CLIP scorer) travel with the spec
        extra = {m: self._models[m] for m in self.aux_models_used(pname, pcfg)}
        for dname, d in datasets.items():
            max_images = int(pcfg.get("max_images", 0) or 0)
            d["slice_index"] = self.layout.data_slice_index(dname, max_images, "{slice}")
            d["index"] = self.layout.data_slice_index(dname, max_images, "0of1")
        shards: list[tuple[str, str]] = []
        for i, m in enumerate(models):
            if m not in self._models:
                raise ConfigError(f"config field probes.{pname}.models[{i}]: unknown model '{m}'")
            mcfg = self._models[m]
            if probe.families and mcfg["family"] not in probe.families:
                raise ConfigError(
                    f"config field probes.{pname}.models[{i}]: model '{m}' is family '{mcfg['family']}', "
                    f"this probe takes {', '.join(probe.families)}")
            probe.check_model(pcfg, m, i, mcfg, arch_config(mcfg, self.workdir))
            values = probe.axis_values(pcfg, m, mcfg)
            for axis in probe.axes:
                if not values.get(axis):
                    raise ConfigError(f"config field probes.{pname}.{probe.axis_keys.get(axis, axis + 's')}: no values for shard axis '{axis}'")
                seen: set[str] = set()
                for v in values[axis]:
                    if not LABEL_RE.match(v):
                        raise ConfigError(f"config field probes.{pname}.{probe.axis_keys.get(axis, axis + 's')}: value '{v}' is not filename-safe")
                    if v in seen:  # axes are sets: a repeat would count the same data twice
                        raise ConfigError(f"config field probes.{pname}.{probe.axis_keys.get(axis, axis + 's')}: value '{v}' is repeated (axis values are a set)")
                    seen.add(v)
            hashed = {"probe": pname, "model": m, "model_cfg": mcfg, "probe_cfg": hashed_cfg,
                      "datasets": datasets, "models": extra, "study": self.study}
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

    def _spec_cfg(self, probe: str, impl: Probe) -> dict[str, Any]:
        """The settings that change a (probe, model)'s numbers: everything but the axis lists
        (a shard's own values come from its label), the model lists, execution knobs and the
        probe's ``exec_keys``."""
        drop = set(impl.axis_keys.values()) | set(impl.exec_keys) | {"models", "aux_models", "enabled", "resources", "threads"}
        return {k: v for k, v in self.probe_cfg(probe).items() if k not in drop}

    def exec_settings(self, probe: str) -> dict[str, Any]:
        """Execution knobs of a probe's shard jobs (``run-shard --exec``): the device and the
        probe's ``exec_keys``. Outside the spec and the hash: changing them reruns nothing."""
        pcfg = self.config["probes"][probe]
        out: dict[str, Any] = {"device": str(self.runtime.get("device", "auto"))}
        out["probe_cfg"] = {k: pcfg[k] for k in self._probes[probe].exec_keys if k in pcfg}
        return out

    def exec_json(self, probe: str) -> str:
        return json.dumps(self.exec_settings(probe), sort_keys=True, separators=(",", ":"))

    def shard_path(self, probe: str, model: str, shard: str) -> str:
        return self.layout.shard(probe, model, shard)

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
        base = self._base[(probe, model)]
        return {
            "probe": probe, "model": model, "axes": {},
            "probe_cfg": self._spec_cfg(probe, self._probes[probe]),
            "model_cfg": self._models[model], "datasets": base["datasets"], "models": base["models"],
            "config_hash": base["config_hash"],
        }

    def base_spec_json(self, probe: str, model: str) -> str:
        return json.dumps(self.base_spec(probe, model), sort_keys=True, separators=(",", ":"))

    def spec(self, probe: str, model: str, shard: str) -> ShardSpec:
        d = self.base_spec(probe, model)
        d["axes"] = parse_shard_label(shard, self._probes[probe].axes)
        ex = self.exec_settings(probe)
        d["probe_cfg"] = {**d["probe_cfg"], **ex["probe_cfg"]}
        d["device"], d["threads"] = ex["device"], self.threads(probe)
        return ShardSpec.from_json_dict(d)

    def spec_json(self, probe: str, model: str, shard: str) -> str:
        return json.dumps(self.spec(probe, model, shard).to_json_dict(), sort_keys=True, separators=(",", ":"))

    def data_inputs(self, probe: str, model: str, shard: str) -> list[str]:
        """The data slice files one shard reads (probes without a slice axis read slice 0of1)."""
        base = self._base[(probe, model)]
        label = next((part[6:] for part in shard.split("__") if part.startswith("slice-")), "0of1")
        return [str(d["slice_index"]).format(slice=label) for d in base["datasets"].values()]

    def model_inputs(self, name: str) -> list[str]:
        m = self._models[name]
        out = [m["path"]] if m["kind"] in ("tiny", "path") else []
        out += [m[k] for k in ("lora", "checkpoint", "lora_payload") if m.get(k) and not str(m[k]).startswith("hub:")]
        return out

    def shard_inputs(self, probe: str, model: str) -> list[str]:
        """What a (probe, model)'s spec is made from on disk: the model's files and those of the
        aux models it uses (data come in per shard: :meth:`data_inputs`)."""
        base = self._base[(probe, model)]
        out = self.model_inputs(model)
        for extra in base["models"]:
            out += self.model_inputs(extra)
        return out

    def table_paths(self, probe: str, model: str) -> list[str]:
        return [self.layout.table(probe, model, t) for t in self._probes[probe].tables]

    def figure_names(self, probe: str) -> dict[str, str | None]:
        """Every figure of a probe -> the model it shows alone (None: all); the rule declares them."""
        return self._probes[probe].figure_names(self.models_of(probe), self.probe_cfg(probe))

    def figure_paths(self, probe: str) -> list[str]:
        """Every file the probe's figure rule writes: each figure's PNG and its vector copy."""
        return [p for f in self.figure_names(probe) for p in self.layout.figure_files(probe, f)]

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
    """Load, validate (filling defaults) and plan a config file: what ``check-config`` and the
    Snakefile both run, so they report the same line for a bad config."""
    cfg = load_config(path)
    validate_config(cfg)
    return Plan(cfg, workdir)
