"""The one small interface every probe implements.

A probe declares its shard axes and the tables and figures it produces (so Snakemake can plan
without importing torch), and provides three steps:

* ``run_shard(spec, writer)`` - the GPU work for one shard; writes partial statistics.
* ``merge(shards)`` - combine validated shards of one (probe, model) into tidy tables.
* ``plot(tables, fig_dir)`` - seaborn figures from the tables of every model.

Probe modules import torch, diffusers and friends *inside* these methods only: the planner and
the Snakefile import the module to read its declarations, and every SLURM job re-reads the
Snakefile.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Sequence

from layerscope.layout import parse_slice  # noqa: E402,F401  (re-exported)

if TYPE_CHECKING:
    import pandas as pd

    from layerscope.h5io import Shard, ShardWriter

LABEL_RE = re.compile(r"^[A-Za-z0-9.+=-]+(_[A-Za-z0-9.+=-]+)*$")  # filename-safe, no '__', no '/'


@dataclass(frozen=True)
class ShardSpec:
    """Everything one shard job needs; built by :mod:`layerscope.plan`, passed as JSON."""

    probe: str
    model: str
    axes: dict[str, str]  # axis -> label, in the probe's axis order (the model axis excluded)
    probe_cfg: dict[str, Any]
    model_cfg: dict[str, Any]  # resolved: family, source kind, 'path' or 'hub_id', lora, dtype, ...
    datasets: dict[str, dict[str, Any]] = field(default_factory=dict)  # referenced datasets, with 'index'
    models: dict[str, dict[str, Any]] = field(default_factory=dict)  # other resolved models a probe may use
    config_hash: str = ""
    threads: int = 1
    device: str = "auto"

    def family(self) -> Any:
        """The model's family module (``layerscope.models.<family>``): probes load and call family
        helpers through it, so a second family serving the probe needs no edit of the probe."""
        from layerscope.models import family_module

        return family_module(str(self.model_cfg["family"]))

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "probe": self.probe,
            "model": self.model,
            "axes": self.axes,
            "probe_cfg": self.probe_cfg,
            "model_cfg": self.model_cfg,
            "datasets": self.datasets,
            "models": self.models,
            "config_hash": self.config_hash,
            "threads": self.threads,
            "device": self.device,
        }

    @classmethod
    def from_json_dict(cls, d: Mapping[str, Any]) -> "ShardSpec":
        return cls(**{k: d[k] for k in ("probe", "model", "axes", "probe_cfg", "model_cfg")},
                   datasets=d.get("datasets", {}), models=d.get("models", {}), config_hash=d.get("config_hash", ""),
                   threads=int(d.get("threads", 1)), device=d.get("device", "auto"))

    @property
    def settings(self) -> Any:
        """This shard's probe settings as one typed, frozen object generated from the probe's schema."""
        from layerscope.probes import get_probe

        return get_probe(self.probe).settings(self.probe_cfg)

    def slice_bounds(self, n_items: int) -> tuple[int, int]:
        """[start, stop) of a contiguous share of ``n_items`` (axis label 'IofN'); the study's
        data slices are chosen by item key instead (see :meth:`records`)."""
        i, n = parse_slice(self.axes.get("slice", "0of1"))
        return (i * n_items) // n, ((i + 1) * n_items) // n

    def data_index(self) -> str:
        """The index file of this shard's data: its slice's (the planner puts the path template
        ``slice_index`` with ``{slice}`` in the spec), else the dataset's whole index."""
        ds = next(iter(self.datasets.values()))
        if ds.get("slice_index"):
            return str(ds["slice_index"]).format(slice=self.axes.get("slice", "0of1"))
        return str(ds["index"])

    def records(self) -> list:
        """This shard's share of its dataset. From the planner's spec: its slice's index, already
        cut to ``max_images`` and chosen by item key (layerscope.data.slice_items), so adding an
        item touches only the slice it lands in. From a hand-made spec with only a whole index:
        that index cut to ``max_images``, then the items whose key (their path) falls in this
        slice - the same partition rule, so slices of any count cover the data exactly once."""
        from layerscope.data import item_key, read_index, slice_of

        ds = next(iter(self.datasets.values()))
        recs = read_index(self.data_index())
        if ds.get("slice_index"):
            return recs
        max_images = int(getattr(self.settings, "max_images", 0) or 0)  # probes without the key take all
        if max_images:
            recs = recs[:max_images]
        i, n = parse_slice(self.axes.get("slice", "0of1"))
        return [r for r in recs if slice_of(item_key(r.path), n) == i]


@dataclass(frozen=True)
class GroupLayout:
    """What every shard group whose path fully matches ``pattern`` (a regex) must hold.

    ``datasets`` maps a dataset name to its *kind* (a trailing ``?`` marks it optional); the merge
    checks kinds before any number is read (see :func:`layerscope.merge.check_layout`):

    ``count``     integer dtype, >= 0              ``index``   integer dtype, >= 0
    ``mean``      float, finite                    ``m2``      float, finite, >= 0
    ``max_abs``   float, finite, >= 0              ``finite``  float, finite
    ``metric``    float; NaN allowed, never +-inf  ``float``   float dtype (losses: NaN/inf are data)
    ``int``       integer dtype                    ``bool``    bool dtype
    ``uint8``     uint8 dtype (images)             ``hist``    integer dtype, >= 0 (sums to sum(count))

    A group with count/mean/m2/max_abs is a :class:`~layerscope.stats.Moments` record and its
    relations are checked too: equal shapes, max_abs >= |mean|, m2 <= count * max_abs**2, and an
    empty channel (count 0) all zero. ``attrs`` are group attributes the merge reads.
    ``min_groups`` groups at least must match (0: the group is optional).
    """

    pattern: str
    datasets: Mapping[str, str]
    attrs: tuple[str, ...] = ()
    min_groups: int = 1


MOMENTS_LAYOUT: dict[str, str] = {"count": "count", "mean": "mean", "m2": "m2", "max_abs": "max_abs", "nonfinite": "count"}


class Probe:
    """Base class: override the declarations and the three steps."""

    name: ClassVar[str]
    axes: ClassVar[tuple[str, ...]] = ("slice",)  # shard axes after 'model', in path order
    datasets_key: ClassVar[str | None] = "dataset"  # probe config key naming a dataset, if any
    tables: ClassVar[tuple[str, ...]] = ()  # merge outputs: <study root>/<probe>/tables/<model>/<table>.csv (layout.table)
    exports_images: ClassVar[bool] = False  # the merge also writes <study root>/<probe>/images/<model>/ (layout.images_dir)
    # plot outputs: <study root>/<probe>/figures/<figure>.png and .pdf (layout.figure_files); a probe
    # whose figures depend on its settings (one per model and prompt) adds them in figure_names
    figures: ClassVar[tuple[str, ...]] = ()
    gpu: ClassVar[bool] = True
    # The layout every shard must have, checked at merge before any number is read (GroupLayout);
    # shards that agree on ``layout_varies_with`` axes must hold the same set of groups, and
    # ``expected_groups`` (from the shard's own checksummed attributes) names the full set where
    # a probe can know it - so a shard missing whole groups is refused, not merged as less data.
    layout: ClassVar[tuple[GroupLayout, ...]] = ()
    layout_varies_with: ClassVar[tuple[str, ...]] = ()

    def expected_groups(self, shard: "Shard") -> list[str] | None:
        """Every group path this shard must hold, from its attributes; None: not known."""
        return None

    # config keys that list axis values: excluded from the config hash, because adding a seed or a
    # model must not invalidate shards that already exist
    axis_keys: ClassVar[dict[str, str]] = {"slice": "slices", "seed": "seeds", "timestep": "timesteps", "layers": "layer_groups"}
    # settings that cannot change a number (e.g. a batch size the probe's results do not depend on):
    # passed to shard jobs outside the spec and the config hash, so changing them reruns nothing
    exec_keys: ClassVar[tuple[str, ...]] = ()

    # config keys holding 0-based block indices ('all', a list, or a list of lists): checked
    # against the model's depth before any job
    layer_keys: ClassVar[tuple[str, ...]] = ()

    # ---- planning (pure Python: no torch) ----
    @property
    def families(self) -> tuple[str, ...]:
        """The model families this probe accepts: those whose hook table (``HOOKS`` in
        ``layerscope/models/<family>.py``) names it - a new family opts in there, not here."""
        from layerscope.model_configs import families_serving

        return families_serving(self.name)

    def settings(self, probe_cfg: Mapping[str, Any]) -> Any:
        """Typed, immutable settings (a frozen dataclass generated from this probe's schema; lists
        become tuples). The schema is the only declaration of keys and defaults."""
        from layerscope.settings import probe_schema, settings_from_schema

        return settings_from_schema(probe_schema(self.name), probe_cfg, f"probes.{self.name}")

    def check_model(self, probe_cfg: Mapping[str, Any], model: str, index: int, model_cfg: Mapping[str, Any],
                    arch: Mapping[str, Any] | None) -> None:
        """Checks of the settings against one model's architecture (``arch``: its config dict, None
        when unreadable without weights). Default: layer indices within the model's depth."""
        from layerscope.errors import ConfigError
        from layerscope.model_configs import model_depth

        depth = model_depth(arch)
        if depth is None:
            return
        settings = self.settings(probe_cfg)
        for key in self.layer_keys:
            value = getattr(settings, key)
            groups = value if isinstance(value, (list, tuple)) and any(isinstance(v, (list, tuple)) for v in value) else [value]
            for g in groups:
                for layer in ([] if g == "all" else g):
                    if isinstance(layer, int) and not 0 <= layer < depth:
                        raise ConfigError(f"config field probes.{self.name}.{key}: layer {layer} is beyond model '{model}' "
                                          f"({depth} blocks: 0..{depth - 1})")

    def axis_values(self, probe_cfg: Mapping[str, Any], model: str, model_cfg: Mapping[str, Any]) -> dict[str, list[str]]:
        """Labels of every shard axis for one model. Default: read the generic config keys."""
        out: dict[str, list[str]] = {}
        settings = self.settings(probe_cfg)
        for axis in self.axes:
            key = self.axis_keys.get(axis, axis + "s")
            if axis == "slice":
                n = int(getattr(settings, key))
                out[axis] = [f"{i}of{n}" for i in range(n)]
            elif axis == "layers":
                groups = getattr(settings, key)
                out[axis] = [g if isinstance(g, str) else "-".join(str(int(x)) for x in g) for g in groups]
            else:
                out[axis] = [str(v) for v in getattr(settings, key) or ()]
        return out

    def extra_outputs(self, probe_cfg: Mapping[str, Any], layout: Any = None) -> dict[str, str]:
        """Outputs a shard job writes besides its .h5, as Snakemake path templates over the
        wildcards ``{model}`` and ``{shard}``; a trailing '/' marks a directory (e.g. a checkpoint).
        Declared, so Snakemake removes them on failure and knows which job makes them.
        ``layout``: the study's :class:`layerscope.layout.Layout` (paths come from it)."""
        return {}

    def figure_names(self, models: Sequence[str], probe_cfg: Mapping[str, Any]) -> dict[str, str | None]:
        """Every figure the plot step writes for these models and settings -> the model it shows
        alone (None: every model). The figure rule declares exactly these (PNG + PDF, each PNG in
        the report) and the plot step must write exactly these. Default: the static ``figures``."""
        return {f: None for f in self.figures}

    def check_config(self, probe_cfg: Mapping[str, Any], config: Mapping[str, Any]) -> None:
        """Semantic checks beyond the JSON schema; raise ConfigError naming the field."""

    # ---- the three steps ----
    def run_shard(self, spec: ShardSpec, writer: "ShardWriter") -> None:
        raise NotImplementedError

    def merge(self, shards: list["Shard"]) -> dict[str, "pd.DataFrame"]:
        raise NotImplementedError

    def plot(self, tables: dict[str, "pd.DataFrame"], fig_dir: Path, caption: str = "") -> None:
        raise NotImplementedError


def with_model(shards: list, tables: dict[str, "pd.DataFrame"]) -> dict[str, "pd.DataFrame"]:
    """Every table names its model in a first ``model`` column (tidy data: a table read alone, or
    concatenated with other models', says whose rows these are). ``shards`` are one model's."""
    models = {sh.model for sh in shards}
    if len(models) != 1:
        raise ValueError(f"one model's shards expected, got {sorted(models)}")
    model = models.pop()
    for df in tables.values():
        if "model" not in df.columns:
            df.insert(0, "model", model)
    return tables
