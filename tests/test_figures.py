"""Figures a paper can use: every axis label carries its unit (a parenthesis), and every layer,
block, frame, step or head axis has integer tick labels only (a tick at 2.5 blocks means nothing).

Each probe's plot runs on small tables made here (no model), and every figure is inspected at the
moment it is saved (``save_figure`` wrapped), drawn, as the PNG shows it.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from layerscope import plots
from layerscope.probes import get_probe

INTEGER_AXIS = re.compile(r"\b(block|layer|frame|step|head|channel)", re.I)
RNG = np.random.default_rng(0)


def problems_of(fig) -> list[str]:
    """Labels without a unit and non-integer tick labels on index axes, for every Axes of ``fig``."""
    fig = getattr(fig, "figure", fig)
    fig.canvas.draw()
    out = []
    for ax in fig.axes:
        if ax.images:  # image panels (comparison grids): no quantity on their axes
            continue
        for axis, label in (("x", ax.get_xlabel()), ("y", ax.get_ylabel())):
            if not label.strip():
                continue
            if not re.search(r"\(.+\)", label):
                out.append(f"{axis} label {label!r} has no unit")
            if INTEGER_AXIS.search(label):
                ticks = [t.get_text().replace("\u2212", "-") for t in getattr(ax, f"get_{axis}ticklabels")()]
                bad = [t for t in ticks if t and not re.fullmatch(r"-?\d+", t)]
                if bad:
                    out.append(f"{axis} axis {label!r}: non-integer ticks {bad}")
    return out


@pytest.fixture
def inspected(monkeypatch):
    """figure file name -> problems, for every figure a probe saves."""
    seen: dict[str, list[str]] = {}
    original = plots.save_figure

    def save(fig, png, **kw):
        seen[Path(png).name] = problems_of(fig)
        original(fig, png, **kw)

    for mod in ("dinov3_channels", "wan_logits", "sd3_recon_train", "textgrad_plots", "sdxl_ablation_plots"):
        monkeypatch.setattr(f"layerscope.probes.{mod}.save_figure", save)
    return seen


def tables_dinov3() -> dict[str, pd.DataFrame]:
    ch, ly = [], []
    for layer in range(5):
        for rep in ("pre", "per_layer_ln", "global_ln"):
            for role in ("cls", "patch"):
                for c in range(20):
                    ch.append({"model": "m", "layer": layer, "rep": rep, "role": role, "channel": c,
                               "std": RNG.uniform(0.5, 2), "max_abs": RNG.uniform(1, 50), "nonfinite": 0})
                ly.append({"model": "m", "layer": layer, "rep": rep, "role": role, "top1": 40.0, "top2": 30.0,
                           "top3": 20.0, "median_abs": 0.5})
    return {"channels": pd.DataFrame(ch), "layers": pd.DataFrame(ly)}


def tables_wan() -> dict[str, pd.DataFrame]:
    prof, mets = [], []
    for layer in range(3):
        for head in range(2):
            for kf in range(7):
                prof.append({"model": "m", "layer": layer, "step": 0, "chunk": 1, "key_frame": kf, "head": head,
                             "mean_logit": RNG.normal(), "mass": 1 / 7})
            mets.append({"model": "m", "layer": layer, "step": 0, "chunk": 1, "head": head, "nonfinite": 0,
                         **{k: RNG.uniform() for k in ("first_frame_mass", "first_k_mass", "current_chunk_mass",
                                                       "entropy_frames_norm", "first_minus_middle_logit")}})
    return {"frame_profile": pd.DataFrame(prof), "sink_metrics": pd.DataFrame(mets)}


def tables_recon() -> dict[str, pd.DataFrame]:
    rows = [{"model": "m", "gamma": g, "target": 0, "seed": s, "step": st, "recon_computed": g > 0,
             "denoise": RNG.uniform(), "recon": RNG.uniform(), "total": RNG.uniform()}
            for g in (0.0, 0.5) for s in (0, 1) for st in range(7)]
    return {"losses": pd.DataFrame(rows)}


def tables_textgrad() -> dict[str, pd.DataFrame]:
    rows = [{"model": "m", "line": "all timesteps", "block": b, "seed": s, "image_id": i, "strength": RNG.uniform(1, 2),
             "topk_mass": RNG.uniform(), "entropy": RNG.uniform(), "nonfinite": 0}
            for b in range(5) for s in (0, 1) for i in range(3)]
    return {"samples": pd.DataFrame(rows)}


def tables_sdxl(root: Path) -> dict[str, pd.DataFrame]:
    from PIL import Image

    img, sc = [], []
    for s in (0, 1):
        for order, g in enumerate(("down_blocks.1.attentions.0", "all", "none")):
            png = root / f"{g}-{s}.png"
            Image.fromarray(RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(png)
            row = {"model": "m", "group": g, "prompt": "p0", "prompt_text": "t", "seed": s, "order": order}
            img.append({**row, "png": str(png)})
            sc.append({**row, "ssim_to_all": RNG.uniform(), "clip_cosine": RNG.uniform()})
    return {"images": pd.DataFrame(img), "scores": pd.DataFrame(sc)}


@pytest.mark.parametrize("probe", ["dinov3_channels", "wan_logits", "sd3_recon_train", "sd3_textgrad", "sdxl_ablation"])
def test_axis_labels_have_units_and_index_axes_integer_ticks(probe, inspected, tmp_path):
    make = {"dinov3_channels": tables_dinov3, "wan_logits": tables_wan, "sd3_recon_train": tables_recon,
            "sd3_textgrad": tables_textgrad, "sdxl_ablation": lambda: tables_sdxl(tmp_path)}[probe]
    p = get_probe(probe)
    (tmp_path / "fig").mkdir()
    p.plot(make(), tmp_path / "fig", caption="(test)")
    assert {f"{f}.png" for f in p.figures} <= set(inspected)
    assert {f: v for f, v in inspected.items() if v} == {}


def test_the_check_can_fail(tmp_path):
    """A label without a unit and a layer axis ticked at halves are both caught."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1, 2], [1, 2, 3])
    ax.set_xlabel("layer")
    ax.set_ylabel("norm (a.u.)")
    got = problems_of(fig)
    assert any("has no unit" in g for g in got) and any("non-integer ticks" in g for g in got), got
    plots.integer_ticks(ax)
    ax.set_xlabel("layer (block index)")
    assert problems_of(fig) == []
    plt.close(fig)
