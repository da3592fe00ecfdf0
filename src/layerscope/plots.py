"""Shared figure helpers: non-finite values are never dropped from a figure without a mark.

Probes exclude NaN/Inf activations from their statistics and count them (``nonfinite``
columns).  A figure drawn from such statistics looks complete unless the excluded values are
shown: :func:`mark_nonfinite` draws a hatched red band over every affected x position (a layer,
block or channel) with the count written on it, and adds a legend note, so a reader sees which
points stand on partial data.  Probes call it on each axes after drawing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from layerscope.layout import FIGURE_SUFFIX, VECTOR_SUFFIX

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes

__all__ = ["mark_nonfinite", "mark_nonfinite_grid", "NONFINITE_LABEL", "save_figure", "figure_files", "FIGURE_SUFFIX", "VECTOR_SUFFIX", "image_grid", "integer_ticks"]

NONFINITE_LABEL = "non-finite values excluded (count)"
HATCH_COLOR = "#d62728"


def nonfinite_by(df: "pd.DataFrame", x: str, count: str = "nonfinite") -> dict[Any, int]:
    """x value -> number of non-finite values counted in the rows at that x (only those > 0)."""
    if df is None or count not in getattr(df, "columns", ()) or x not in df.columns or not len(df):
        return {}
    s = df.groupby(x)[count].sum()
    return {k: int(v) for k, v in s.items() if v > 0}


def mark_nonfinite(ax: "Axes", df: "pd.DataFrame", x: str, count: str = "nonfinite",
                   position: Callable[[Any], float] | Mapping[Any, float] | Sequence[Any] | None = None,
                   width: float = 0.8) -> int:
    """Mark the x positions of ``ax`` where ``df`` counted non-finite values; return the total.

    ``position`` maps an x value to the axes coordinate: None for data coordinates (line plots
    over layers), a sequence of the plotted categories (heat-map columns: cell centres at i+0.5)
    or a mapping / callable."""
    from matplotlib.patches import Patch

    hits = nonfinite_by(df, x, count)
    if not hits:
        return 0
    if position is None:
        pos, half = (lambda v: float(v)), width / 2
    elif callable(position):
        pos, half = position, width / 2
    elif isinstance(position, Mapping):
        pos, half = (lambda v: float(position[v])), width / 2
    else:
        cats = list(position)
        pos, half = (lambda v: cats.index(v) + 0.5), 0.5
    trans = ax.get_xaxis_transform()  # x in data, y in axes fraction: a full-height band
    for v, n in hits.items():
        try:
            c = pos(v)
        except (KeyError, ValueError):
            continue  # not drawn on this axes
        ax.axvspan(c - half, c + half, facecolor="none", edgecolor=HATCH_COLOR, hatch="///", linewidth=0.8, zorder=5)
        ax.text(c, 0.98, f"{n}", transform=trans, ha="center", va="top", fontsize=7, color=HATCH_COLOR, zorder=6)
    handles, labels = ax.get_legend_handles_labels()
    if NONFINITE_LABEL not in labels:
        patch = Patch(facecolor="none", edgecolor=HATCH_COLOR, hatch="///", label=NONFINITE_LABEL)
        ax.legend(handles=[*handles, patch], labels=[*labels, NONFINITE_LABEL], fontsize=7, loc="best")
    return sum(hits.values())


def mark_nonfinite_grid(grid: Any, df: "pd.DataFrame", x: str, row: str | None = None, col: str | None = None,
                        count: str = "nonfinite") -> int:
    """:func:`mark_nonfinite` on every facet of a seaborn FacetGrid, each with its own rows of ``df``."""
    total = 0
    for key, ax in grid.axes_dict.items():
        sub = df
        keys = key if isinstance(key, tuple) else (key,)
        names = [n for n in (row, col) if n is not None]
        for n, k in zip(names, keys):
            if n in sub.columns:
                sub = sub[sub[n] == k]
        total += mark_nonfinite(ax, sub, x, count)
    return total


def save_figure(fig: Any, png: "str | Path", **savefig_kw: Any) -> None:
    """Write a figure as the declared PNG and, beside it, a vector copy (``.pdf``, same name) a paper
    can scale: text and lines stay vectors, images (sample grids, heatmaps) stay embedded rasters.
    ``fig``: a matplotlib Figure or anything with ``.figure`` (a seaborn grid)."""
    from pathlib import Path

    fig = getattr(fig, "figure", fig)
    png = Path(png)
    if png.suffix != FIGURE_SUFFIX:
        raise ValueError(f"save_figure: {png} is not a {FIGURE_SUFFIX} path (the figure's declared name)")
    fig.savefig(png, **savefig_kw)
    fig.savefig(png.with_suffix(VECTOR_SUFFIX), **{k: v for k, v in savefig_kw.items() if k != "dpi"})


def figure_files(name: str) -> list[str]:
    """The file names one figure is made of (PNG, then its vector copy): what a plot step must
    write for each declared figure, and all it may write (layerscope.merge.plot_from_tables)."""
    return [name + FIGURE_SUFFIX, name + VECTOR_SUFFIX]


def image_grid(sub: Any, df: "pd.DataFrame") -> None:
    """One panel of generated images into a (sub)figure: rows seeds, columns the ``group`` values in
    ``order``; cells read the ``png`` column. Titled with the model, prompt label and text."""
    import numpy as np
    from PIL import Image

    cols = df.sort_values("order")["group"].drop_duplicates().tolist()
    seeds = sorted(df["seed"].unique())
    axs = sub.subplots(len(seeds), len(cols), squeeze=False)
    for i, s in enumerate(seeds):
        for j, g in enumerate(cols):
            ax = axs[i][j]
            hit = df[(df["seed"] == s) & (df["group"] == g)]
            if len(hit):
                ax.imshow(np.asarray(Image.open(hit["png"].iloc[0]).convert("RGB")))
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_title(g.replace(".attentions.", "\n.attn."), fontsize=7)
            if j == 0:
                ax.set_ylabel(f"seed {s}", fontsize=7)
    m, p = df["model"].iloc[0], df["prompt"].iloc[0]
    sub.suptitle(f"{m} {p}: {df['prompt_text'].iloc[0][:80]!r}", fontsize=8)


def integer_ticks(target: Any, axis: str = "x") -> None:
    """Integer-only ticks on ``axis`` of an Axes or of every Axes of a seaborn grid (layer, block,
    frame and step axes: a tick at 2.5 blocks means nothing)."""
    from matplotlib.ticker import MaxNLocator

    grid_axes = getattr(target, "axes", None)  # a seaborn grid: an array of Axes; an Axes: itself
    for ax in (grid_axes.flat if hasattr(grid_axes, "flat") else [target]):
        getattr(ax, f"{axis}axis").set_major_locator(MaxNLocator(integer=True))
