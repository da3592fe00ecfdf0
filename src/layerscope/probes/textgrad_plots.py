"""The three curves of the text-gradient probe (design note 000: ``grad_strength_curve.png``,
``grad_topk_mass_curve.png``, ``grad_entropy_curve.png``): one metric versus MMDiT block each.

Default, as the note draws them: the ``pooled`` table's curves - per pair the token scores averaged
over every timestep x seed before the metric, then the mean over pairs - with their 95 % t interval
over pairs as the band, and the same pooled per timestep (``pooled_per_timestep``) as thin dashed
lines when there are several timesteps. With ``pooled_curves: false`` (no per-token scores stored)
the figures show the project's per-row view instead: the mean of per-(sample, seed) metrics with a
95 % bootstrap band, one line style per timestep. The title says which, with the counts behind it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from layerscope.plots import integer_ticks, mark_nonfinite, save_figure

if TYPE_CHECKING:
    import pandas as pd

FIGURES = {"strength": "grad_strength_curve", "topk_mass": "grad_topk_mass_curve", "entropy": "grad_entropy_curve"}
LABELS = {"strength": "mean token gradient norm (grad units)", "topk_mass": "top-k mass (fraction, 0-1)",
          "entropy": "entropy of normalised scores (nats)"}
XLABEL = "MMDiT block index i (hook blocks.i.hook_text_grad)"


def plot_curves(tables: dict[str, "pd.DataFrame"], fig_dir: Path, caption: str = "") -> None:
    """Write the three figures (PNG + vector copy) into ``fig_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="paper")
    pooled = tables.get("pooled")
    for metric, fname in FIGURES.items():
        if pooled is not None and len(pooled):
            fig = _pooled_figure(tables, metric, caption)
        else:
            fig = _per_row_figure(tables["samples"], metric, caption)
        save_figure(fig, Path(fig_dir) / f"{fname}.png", dpi=120)
        plt.close(fig)


def _finish(fig: Any, ax: Any, samples: "pd.DataFrame", metric: str, title: str) -> None:
    import seaborn as sns

    if metric == "strength":
        ax.set_yscale("log")
    ax.set_xlabel(XLABEL)
    ax.set_ylabel(LABELS[metric])
    ax.set_title(title, fontsize=9)
    integer_ticks(ax, "x")
    mark_nonfinite(ax, samples, "block")
    if ax.get_legend() is not None:
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()


def _pooled_figure(tables: dict[str, "pd.DataFrame"], metric: str, caption: str) -> Any:
    import matplotlib.pyplot as plt
    import numpy as np
    import seaborn as sns

    pooled, per_t, s = tables["pooled"], tables.get("pooled_per_timestep"), tables["samples"]
    models = sorted(pooled["model"].unique())
    colours = dict(zip(models, sns.color_palette(n_colors=len(models))))
    # lines_per_timestep: false writes every sample row's line as 'all timesteps': no per-timestep lines
    several_t = per_t is not None and per_t["timestep_index"].nunique() > 1 and bool((s["line"] != "all timesteps").any())
    fig, ax = plt.subplots(figsize=(10, 4.4))
    for m in models:
        d = pooled[pooled["model"] == m].sort_values("block")
        ax.plot(d["block"], d[metric], marker="o", color=colours[m], label=f"{m}: pooled over all timesteps x seeds")
        lo, hi = d[f"{metric}_ci_low"].to_numpy(float), d[f"{metric}_ci_high"].to_numpy(float)
        if np.isfinite(lo).any():
            ax.fill_between(d["block"], lo, hi, color=colours[m], alpha=0.2, linewidth=0)
        if several_t:
            for t, g in per_t[per_t["model"] == m].groupby("timestep_index", sort=True):
                g = g.sort_values("block")
                ax.plot(g["block"], g[metric], linestyle="--", linewidth=0.8, alpha=0.7, color=colours[m],
                        label=f"{m}: timestep {t} (over its seeds)")
    ax.legend(fontsize=7)
    pairs = int(pooled["pairs"].max())
    spp = int(pooled["samples_per_pair"].min())
    title = (f"{LABELS[metric]}: the note's curve per block\ntoken scores pooled per pair over {spp} timestep x seed "
             f"row(s), mean over {pairs} pair(s)\nband: 95% t interval over pairs {caption}").strip()
    _finish(fig, ax, s, metric, title)
    return fig


def _per_row_figure(s: "pd.DataFrame", metric: str, caption: str) -> Any:
    import matplotlib.pyplot as plt
    import numpy as np
    import seaborn as sns

    several = s["line"].nunique() > 1
    d = s[np.isfinite(s[metric].astype(float))]
    fig, ax = plt.subplots(figsize=(10, 4.4))
    sns.lineplot(data=d, x="block", y=metric, hue="model", style="line" if several else None, markers=True,
                 dashes=True, errorbar=("ci", 95), n_boot=500, seed=0, ax=ax)
    title = (f"{LABELS[metric]}: mean of per-row metrics per block (pooled_curves: false)\nband: 95% bootstrap CI "
             f"over {d['seed'].nunique()} seed(s) x {d['image_id'].nunique()} sample(s) {caption}").strip()
    _finish(fig, ax, s, metric, title)
    return fig
