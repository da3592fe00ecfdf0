"""Where every result of a study lies: the one owner of result paths.

Every path below is relative to the study's working directory and starts with
``results/<study>/``, so two studies (the tiny default and a real one, or two real ones) run
in one checkout never share a file, and one study's report shows only its own figures::

    results/<study>/
        models/<model>/                                tiny models built from configs
        data/<dataset>/max-<N>/<i>of<n>/index.tsv      one data slice (and, for skimage, its images)
        <probe>/specs/<model>.json                     what a (probe, model)'s shards share
        <probe>/shards/<model>/<axis>-<v>__....h5      one shard
        <probe>/tables/<model>/<table>.csv             merged tables
        <probe>/images/<model>/<shard>.png             images a merge exports (sdxl_ablation)
        <probe>/figures/<figure>.png                   figures (the report's entries)
        <probe>/figures/<figure>.pdf                   their vector copies (declared outputs too)
        <probe>/checkpoints/<model>/<shard>/           trained checkpoints (sd3_recon_train)
        logs/..., benchmarks/...                       one log and one benchmark TSV per job
        report.html

Methods take names or Snakemake wildcards alike: ``layout.shard(p, "{model}", "{shard}")`` is the
rule's output pattern, ``layout.shard(p, "sd3_tiny", "seed-0")`` one file. Pure Python, no torch
(the Snakefile imports it at parse time).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Mapping

RESULTS = "results"
DEFAULT_STUDY = "default"
FIGURE_SUFFIX = ".png"  # the figure the report shows
VECTOR_SUFFIX = ".pdf"  # its vector copy, written beside it (layerscope.plots.save_figure)

__all__ = ["RESULTS", "DEFAULT_STUDY", "FIGURE_SUFFIX", "VECTOR_SUFFIX", "Layout", "user_error_marker", "shard_label", "parse_shard_label", "parse_slice",
           "images_dir_of_shard", "slice_images_dir", "pair_dirs"]


@dataclass(frozen=True)
class Layout:
    """Result paths of one study (``study:`` in the config)."""

    study: str = DEFAULT_STUDY

    @property
    def root(self) -> str:
        return f"{RESULTS}/{self.study}"

    # ---- inputs the study builds ----
    def model_dir(self, model: str) -> str:
        return f"{self.root}/models/{model}"

    def data_slice_dir(self, dataset: str, max_images: int | str, slice_label: str) -> str:
        """One data slice (``IofN``) of a dataset cut to its first ``max_images`` items (0: all)."""
        return f"{self.root}/data/{dataset}/max-{max_images}/{slice_label}"

    def data_slice_index(self, dataset: str, max_images: int | str, slice_label: str) -> str:
        return f"{self.data_slice_dir(dataset, max_images, slice_label)}/index.tsv"

    # ---- per probe ----
    def probe_dir(self, probe: str) -> str:
        return f"{self.root}/{probe}"

    def spec(self, probe: str, model: str) -> str:
        return f"{self.root}/{probe}/specs/{model}.json"

    def shard_dir(self, probe: str, model: str) -> str:
        return f"{self.root}/{probe}/shards/{model}"

    def shard(self, probe: str, model: str, shard: str) -> str:
        return f"{self.shard_dir(probe, model)}/{shard}.h5"

    def shard_sidecar(self, probe: str, model: str, shard: str, suffix: str) -> str:
        """A file written beside a shard (e.g. ``.logits.h5``)."""
        return f"{self.shard_dir(probe, model)}/{shard}{suffix}"

    def images_dir(self, probe: str, model: str) -> str:
        """Images a merge exports (sdxl_ablation: one PNG per generated image); a declared output
        folder of the merge rule of probes with ``exports_images``."""
        return f"{self.root}/{probe}/images/{model}"

    def table_dir(self, probe: str, model: str) -> str:
        return f"{self.root}/{probe}/tables/{model}"

    def table(self, probe: str, model: str, table: str) -> str:
        return f"{self.table_dir(probe, model)}/{table}.csv"

    def figure_dir(self, probe: str) -> str:
        return f"{self.root}/{probe}/figures"

    def figure(self, probe: str, figure: str, suffix: str = FIGURE_SUFFIX) -> str:
        return f"{self.figure_dir(probe)}/{figure}{suffix}"

    def figure_vector(self, probe: str, figure: str) -> str:
        """The vector copy (PDF) a paper can scale, beside :meth:`figure`'s PNG."""
        return self.figure(probe, figure, VECTOR_SUFFIX)

    def figure_files(self, probe: str, figure: str) -> list[str]:
        """Every file one figure is made of: the PNG, then its vector copy."""
        return [self.figure(probe, figure), self.figure_vector(probe, figure)]

    def checkpoints(self, probe: str) -> str:
        """Root of a training probe's checkpoints: ``<root>/<model>/<shard>/``."""
        return f"{self.root}/{probe}/checkpoints"

    # ---- logs, benchmarks, report ----
    def log(self, *parts: str) -> str:
        """``logs/<parts...>.log``, e.g. ``log(probe, "shards", model, shard)``."""
        return f"{self.root}/logs/{'/'.join(parts)}.log"

    def benchmark(self, *parts: str) -> str:
        """``benchmarks/<parts...>.tsv``: Snakemake's wall time and max RSS of one job."""
        return f"{self.root}/benchmarks/{'/'.join(parts)}.tsv"

    def shard_benchmark(self, probe: str, model: str, shard: str) -> str:
        return self.benchmark(probe, "shards", model, shard)

    def report(self) -> str:
        return f"{self.root}/report.html"

    def user_error_dir(self) -> str:
        return f"{self.root}/logs/user-errors"

    def is_produced(self, path: str) -> bool:
        """A relative path under this study's ``results/<study>/``: made by one of its rules (e.g. a
        fine-tuned checkpoint used as a model), so it need not exist when the plan is made. Another
        study's path must exist: no rule of this study makes it."""
        p = PurePosixPath(path)
        return not p.is_absolute() and p.parts[:2] == (RESULTS, self.study)


def user_error_marker(out: str | os.PathLike) -> str | None:
    """Where ``run-shard`` notes that ``out`` failed on bad input: under its own study's
    ``logs/user-errors/`` (None for an output outside ``results/<study>/``). The workflow's
    resource callables read it, so a retry after a user error keeps the base memory and time."""
    rel = os.path.normpath(str(out))
    parts = rel.split(os.sep)
    if os.path.isabs(rel) or len(parts) < 3 or parts[0] != RESULTS:
        return None
    lay = Layout(parts[1])
    return os.path.join(lay.user_error_dir(), *parts[2:]) + ".err"


# ---- shard labels: a shard's identity is its file name <axis>-<label>__<axis>-<label>...
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


def parse_slice(label: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)of(\d+)", label)
    if not m or int(m.group(1)) >= int(m.group(2)):
        raise ValueError(f"bad slice label {label!r}: expected IofN with 0 <= I < N")
    return int(m.group(1)), int(m.group(2))


def images_dir_of_shard(shard_path: str | os.PathLike) -> str:
    """The merge's image folder (``Layout.images_dir``) of the (probe, model) a shard belongs to:
    ``<root>/<probe>/images/<model>`` for ``<root>/<probe>/shards/<model>/<shard>.h5``. A merge is
    given shard paths only; this keeps the relation between the two folders here."""
    p = PurePosixPath(os.fspath(shard_path))
    model_dir = p.parent
    if model_dir.parent.name != "shards":
        raise ValueError(f"{shard_path}: not a shard path (<root>/<probe>/shards/<model>/<shard>.h5)")
    return str(model_dir.parent.parent / "images" / model_dir.name)


def slice_images_dir(index_path: str | os.PathLike) -> str:
    """Where a data slice's own image files lie (built datasets such as ``skimage``): ``images/``
    beside the slice's ``index.tsv`` (``Layout.data_slice_index``)."""
    return str(PurePosixPath(os.fspath(index_path)).parent / "images")


def pair_dirs(out_dir: str | os.PathLike, model: str) -> dict[str, str]:
    """The folders of the single-pair tool (``layerscope textgrad --out DIR``), which runs outside
    a study: ``DIR/shards/<model>``, ``DIR/tables/<model>``, ``DIR/figures``."""
    out = PurePosixPath(os.fspath(out_dir))
    return {"shards": str(out / "shards" / model), "tables": str(out / "tables" / model), "figures": str(out / "figures")}
