"""sdxl_ablation's figures: the comparison grids and the per-group scores.

The names of the per-(model, prompt) grids are computed here once, by :func:`comparison_grid_name`,
for both sides: the planner declares them from the settings (``SdxlAblation.figure_names``: each
model of the probe x each label of :func:`~layerscope.probes.sdxl_ablation.prompt_labels`) and the
plot names the panels it draws from the merged tables (whose ``prompt`` column holds those same
labels, the shard axis). A panel the plan did not declare, or a declared one the tables lack,
fails the plot step (:func:`layerscope.merge.plot_from_tables`).

Heavy imports (pandas, matplotlib, seaborn) stay inside :func:`plot_ablation`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from layerscope.plots import image_grid, save_figure

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["GRID", "comparison_grid_name", "plot_ablation"]

GRID = "comparison_grid"  # every (model, prompt) panel in one figure; per-panel figures add -<model>-<prompt>


def comparison_grid_name(model: str, prompt_label: str) -> str:
    """Figure name of one (model, prompt) panel: ``comparison_grid-<model>-<prompt label>``."""
    return f"{GRID}-{model}-{prompt_label}"


def plot_ablation(tables: dict[str, "pd.DataFrame"], fig_dir: Path, caption: str = "") -> None:
    """``comparison_grid.png``: per (model, prompt) a panel, rows seeds, columns groups in forward
    order then ``all`` and ``none``; also one :func:`comparison_grid_name` figure per panel.
    ``scores.png``: each score per group, mean with 95% bootstrap CI over seeds. Each with a PDF."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig_dir = Path(fig_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    imgs = tables["images"]
    panels = list(imgs.groupby(["model", "prompt"], sort=True))

    cell = 1.3
    max_cols = max(df["group"].nunique() for _, df in panels)
    heights = [df["seed"].nunique() * cell + 0.6 for _, df in panels]
    fig = plt.figure(figsize=(max_cols * cell, sum(heights)), layout="constrained")
    subs = fig.subfigures(len(panels), 1, squeeze=False, height_ratios=heights)[:, 0]
    for sub, (_, df) in zip(subs, panels):
        image_grid(sub, df)
    if caption:
        fig.supxlabel(caption, fontsize=6)
    save_figure(fig, fig_dir / f"{GRID}.png", dpi=150)
    plt.close(fig)
    for (m, p), df in panels:
        f = plt.figure(figsize=(df["group"].nunique() * cell, df["seed"].nunique() * cell + 0.6), layout="constrained")
        image_grid(f, df)
        save_figure(f, fig_dir / f"{comparison_grid_name(str(m), str(p))}.png", dpi=150)
        plt.close(f)

    sc = tables["scores"]
    value_cols = [c for c in ("ssim_to_all", "clip_cosine") if c in sc.columns]
    long = sc.melt(id_vars=["model", "group", "prompt", "seed", "order"], value_vars=value_cols,
                   var_name="score", value_name="value")
    order = sc.sort_values("order")["group"].drop_duplicates().tolist()
    g = sns.catplot(data=long, x="group", y="value", hue="model", row="score", col="prompt", kind="point",
                    order=order, errorbar=("ci", 95), seed=0, sharey="row", height=2.6, aspect=1.6,
                    dodge=0.3 if sc["model"].nunique() > 1 else False)
    g.set_axis_labels("cross-attention group kept (name)", "score (dimensionless, -1 to 1)")
    for ax in g.axes.flat:
        ax.tick_params(axis="x", labelrotation=60, labelsize=7)
    n_seeds = sc["seed"].nunique()
    g.figure.suptitle(f"per-group scores, mean and 95% CI over {n_seeds} seed(s)" + (f"\n{caption}" if caption else ""),
                      fontsize=8)
    g.figure.tight_layout()
    save_figure(g, fig_dir / "scores.png", dpi=150)
    plt.close(g.figure)
