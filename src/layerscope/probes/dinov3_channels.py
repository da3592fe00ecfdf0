"""DINOv3 per-layer channel statistics (design note 004, ``analyze_dinov3_features.py``).

For every selected block i, three representations of the block output x_i (all tokens, one
forward with ``output_hidden_states``):

=================  ======================================  ====================================
rep                what                                    hook (HDF5 group, table column)
=================  ======================================  ====================================
``pre``            the block output itself (pre-norm)      ``blocks.{i}.hook_resid_post``
``per_layer_ln``   a fresh ``LayerNorm(affine=False)``      ``blocks.{i}.ln_layer.hook_normalized``
``global_ln``      the model's own final norm (CLS through ``blocks.{i}.ln_final.hook_normalized``
                   ``cls_norm`` when the model unties it)
=================  ======================================  ====================================

Roles: ``cls`` (token 0; one row per image) and ``patch`` (tokens after the storage tokens; one
row per image x patch).  Storage/register tokens are excluded, as in the note.

Per (hook, role) a shard stores mergeable partial statistics: per-channel :class:`Moments`
(count, mean, M2, max|x|, non-finite count), a :class:`MagnitudeHistogram` of |x| pooled over
channels (for the median magnitude), and the :class:`TopK` largest |x| with their channel, image
and token — enough for the massive-activation test of Sun et al. (|x| > 100 and > 1000 x median).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

from layerscope.plots import integer_ticks, save_figure
from layerscope.probes.base import MOMENTS_LAYOUT, GroupLayout, Probe, ShardSpec, with_model

if TYPE_CHECKING:
    import pandas as pd

    from layerscope.h5io import Shard, ShardWriter

REPS = ("pre", "per_layer_ln", "global_ln")
ROLES = ("cls", "patch")


def hook_name(layer: int, rep: str) -> str:
    return {
        "pre": f"blocks.{layer}.hook_resid_post",
        "per_layer_ln": f"blocks.{layer}.ln_layer.hook_normalized",
        "global_ln": f"blocks.{layer}.ln_final.hook_normalized",
    }[rep]


STD_EPS_NOTE = 1e-8  # note 004's script: std = sqrt(var + 1e-8) (the schema's std_eps default)


def channel_std(var: Any, eps: float = STD_EPS_NOTE) -> Any:
    """Per-channel std as note 004's script reports it, ``sqrt(var + eps)`` (population variance);
    ``eps = 0`` gives the plain ``sqrt(var)``.  Applied at merge time to the merged variance, so
    shards stay eps-free and the choice can change without rerunning them.  NaN (no finite value
    seen) stays NaN."""
    import numpy as np

    return np.sqrt(np.maximum(var, 0.0) + eps)


def massive_mask(top1: Any, median: Any, abs_threshold: float, ratio: float) -> Any:
    """Sun et al.'s criterion for a massive activation: |x| > abs_threshold and > ratio x median |x|."""
    return (top1 > abs_threshold) & (top1 > ratio * median)


class ChannelAccumulator:
    """Partial statistics of every (hook, role) over batches of hidden states.

    ``update`` takes the tuple of hidden states of one forward (embedding output first) and the
    batch's global image ids; all reductions run on the hidden states' device."""

    def __init__(self, layers: list[int], channels: int, n_register: int, topk: int,
                 cls_norm: Any, patch_norm: Any, eps: float) -> None:
        from layerscope.stats import MagnitudeHistogram, Moments, TopK

        self.layers, self.C, self.n_reg, self.k = layers, channels, n_register, topk
        self.cls_norm, self.patch_norm, self.eps = cls_norm, patch_norm, eps
        self.stats: dict[tuple[str, str], tuple[Any, Any, Any]] = {
            (hook_name(i, rep), role): (Moments.empty(channels), MagnitudeHistogram.empty(), TopK.empty(topk))
            for i in layers for rep in REPS for role in ROLES
        }

    def _add(self, key: tuple[str, str], x: Any, sample_ids: Any, token_ids: Any) -> None:
        from layerscope.stats import summarize

        parts = summarize(x, sample_ids, token_ids, self.k)
        self.stats[key] = tuple(a.merge(b) for a, b in zip(self.stats[key], parts))  # type: ignore[assignment]

    def _final(self, norm: Any, x: Any, z: Any) -> Any:
        """The model's final norm of x; when it is a LayerNorm with our eps, it is w * LN(x) + b,
        one elementwise pass on the already normalised z instead of a second normalisation."""
        import torch

        if isinstance(norm, torch.nn.LayerNorm) and norm.eps == self.eps and norm.elementwise_affine:
            w = norm.weight.to(z.dtype)
            return torch.addcmul(norm.bias.to(z.dtype), z, w) if norm.bias is not None else z * w
        return norm(x)

    def update(self, hidden_states: Any, image_ids: Any) -> None:
        import numpy as np
        import torch.nn.functional as F

        C, R = self.C, self.n_reg
        B, T, _ = hidden_states[0].shape
        patch_tok = np.arange(1 + R, T, dtype=np.int64)
        cls_rows = (image_ids, np.zeros(B, dtype=np.int64))
        patch_rows = (np.repeat(image_ids, len(patch_tok)), np.tile(patch_tok, B))
        for i in self.layers:
            x = hidden_states[i + 1]
            cls_x, patch_x = x[:, 0], x[:, 1 + R:].reshape(-1, C)
            cls_z, patch_z = F.layer_norm(cls_x, (C,), eps=self.eps), F.layer_norm(patch_x, (C,), eps=self.eps)
            reps = {
                "pre": (cls_x, patch_x),
                "per_layer_ln": (cls_z, patch_z),
                "global_ln": (self._final(self.cls_norm, cls_x, cls_z), self._final(self.patch_norm, patch_x, patch_z)),
            }
            for rep, (c, p) in reps.items():
                h = hook_name(i, rep)
                self._add((h, "cls"), c, *cls_rows)
                self._add((h, "patch"), p, *patch_rows)


class DinoV3Channels(Probe):
    name: ClassVar[str] = "dinov3_channels"
    axes: ClassVar[tuple[str, ...]] = ("slice",)
    # per-image rows are accumulated in float64 Welford/Chan moments: the batch only groups images
    exec_keys: ClassVar[tuple[str, ...]] = ("batch_size",)
    tables: ClassVar[tuple[str, ...]] = ("channels", "layers", "outliers")
    figures: ClassVar[tuple[str, ...]] = ("std_max_abs_per_layer", "outlier_channels_heatmap", "magnitude_vs_layer")
    layer_keys: ClassVar[tuple[str, ...]] = ("layers",)
    layout: ClassVar[tuple[GroupLayout, ...]] = (
        GroupLayout(r"stats/blocks\.\d+\.[a-z_.]+/(cls|patch)",
                    {**MOMENTS_LAYOUT, "hist": "hist", "topk_value": "max_abs", "topk_channel": "index",
                     "topk_sample": "index", "topk_token": "index"}, attrs=("layer", "rep")),
    )

    def expected_groups(self, shard: "Shard") -> list[str] | None:
        n = int(shard.attrs["num_layers"])
        return [f"stats/{hook_name(i, r)}/{role}" for i in range(n) for r in REPS for role in ROLES]

    # ------------------------------------------------------------------ shard
    def run_shard(self, spec: ShardSpec, writer: "ShardWriter") -> None:
        import numpy as np
        import torch

        from layerscope.data import load_image
        from layerscope.models import model_dtype, resolve_device
        from layerscope.errors import ConfigError

        cfg = spec.settings  # typed; defaults from the schema only
        records = spec.records()

        device = resolve_device(spec.device)
        mcfg = {"name": spec.model, **spec.model_cfg}  # errors name models.<name>.<field>
        dtype = model_dtype(mcfg, device)
        fam = spec.family()  # load, final_norms, preprocess: what a family serving this probe provides
        model = fam.load(mcfg, device, dtype)
        n_layers = model.config.num_hidden_layers
        n_reg = int(getattr(model.config, "num_register_tokens", 0))
        layers = list(range(n_layers)) if cfg.layers == "all" else list(cfg.layers)
        bad = [i for i in layers if i >= n_layers]
        if bad:
            raise ConfigError(f"config field probes.dinov3_channels.layers: {bad} out of range for a {n_layers}-layer model (0..{n_layers - 1})")
        cls_norm, patch_norm = fam.final_norms(model)
        eps = float(getattr(model.config, "layer_norm_eps", 1e-5))
        topk = int(cfg.topk)
        size = int(cfg.image_size)
        C = model.config.hidden_size

        acc = ChannelAccumulator(layers, C, n_reg, topk, cls_norm, patch_norm, eps)
        bs = int(cfg.batch_size)
        from layerscope.progress import current as progress

        prog = progress(len(records), "images")
        with torch.inference_mode():
            for start in range(0, len(records), bs):
                batch = records[start:start + bs]
                pix = fam.preprocess([load_image(r.path, size) for r in batch], device, dtype)
                hs = model(pixel_values=pix, output_hidden_states=True).hidden_states
                acc.update(hs, np.array([r.image_id for r in batch], dtype=np.int64))
                prog.update(len(batch))

        for (hook, role), (mom, hist, tk) in acc.stats.items():
            layer = int(hook.split(".")[1])
            rep = {"hook_resid_post": "pre", "ln_layer": "per_layer_ln", "ln_final": "global_ln"}[hook.split(".")[2]]
            writer.write(f"stats/{hook}/{role}", {**mom.to_dict(), **hist.to_dict(), **tk.to_dict()},
                         attrs={"layer": layer, "rep": rep, "role": role})
        writer.set_attr("n_images", len(records))
        writer.set_attr("image_ids", [r.image_id for r in records])
        writer.set_attr("num_layers", n_layers)
        writer.set_attr("hidden_size", C)
        writer.set_attr("n_register_tokens", n_reg)
        writer.set_attr("used_lora", bool(spec.model_cfg.get("lora")))
        writer.set_attr("untied_cls_norm", cls_norm is not patch_norm)

    # ------------------------------------------------------------------ merge
    @staticmethod
    def merged_stats(shards: list["Shard"]) -> dict[str, tuple[Any, Any, Any, dict[str, Any]]]:
        """group path -> (Moments, MagnitudeHistogram, TopK, attrs) merged over shards."""
        from layerscope.stats import MagnitudeHistogram, Moments, TopK

        out: dict[str, tuple[Any, Any, Any, dict[str, Any]]] = {}
        for sh in shards:
            k = int(sh.json_attr("spec")["probe_cfg"].get("topk", 8))
            for g in sh.subgroups("stats"):
                d = sh.groups[g]
                parts = (Moments.from_dict(d), MagnitudeHistogram.from_dict(d), TopK.from_dict(d, k))
                if g in out:
                    m, h, t, a = out[g]
                    out[g] = (m.merge(parts[0]), h.merge(parts[1]), t.merge(parts[2]), a)
                else:
                    out[g] = (*parts, sh.group_attrs.get(g, {}))
        return out

    def merge(self, shards: list["Shard"]) -> dict[str, "pd.DataFrame"]:
        import numpy as np
        import pandas as pd

        cfg = self.settings(shards[0].json_attr("spec")["probe_cfg"])
        abs_thr, ratio, std_eps = float(cfg.massive_abs), float(cfg.massive_ratio), float(cfg.std_eps)
        chan_rows, layer_rows, outlier_rows = [], [], []
        for g, (mom, hist, tk, attrs) in sorted(self.merged_stats(shards).items(), key=lambda kv: (kv[1][3]["layer"], kv[0])):
            _, hook, role = g.split("/")
            layer, rep = int(attrs["layer"]), str(attrs["rep"])
            C = mom.channels
            chan_rows.append(pd.DataFrame({
                "hook": hook, "layer": layer, "rep": rep, "role": role, "channel": np.arange(C),
                "count": mom.count, "mean": mom.mean, "std": channel_std(mom.var, std_eps), "max_abs": mom.max_abs,
                "nonfinite": mom.nonfinite,
            }))
            median = hist.median
            top = list(tk.value[:3]) + [np.nan] * (3 - min(3, len(tk.value)))
            topc = list(tk.channel[:3]) + [-1] * (3 - min(3, len(tk.channel)))
            layer_rows.append({
                "hook": hook, "layer": layer, "rep": rep, "role": role, "tokens": int(mom.count.max(initial=0)),
                "values": hist.total, "nonfinite": int(mom.nonfinite.sum()),
                "std_mean": float(np.nanmean(channel_std(mom.var, std_eps))), "max_abs": float(mom.max_abs.max(initial=0.0)),
                "top1": top[0], "top2": top[1], "top3": top[2],
                "top1_channel": topc[0], "top2_channel": topc[1], "top3_channel": topc[2],
                "median_abs": median, "top1_over_median": top[0] / median if median > 0 else np.inf,
                "massive": bool(massive_mask(top[0], median, abs_thr, ratio)),
            })
            flagged = np.nonzero(massive_mask(mom.max_abs, median, abs_thr, ratio))[0]
            for c in flagged:
                outlier_rows.append({"hook": hook, "layer": layer, "rep": rep, "role": role, "channel": int(c),
                                     "max_abs": float(mom.max_abs[c]), "median_abs": median,
                                     "ratio": float(mom.max_abs[c] / median) if median > 0 else np.inf})
        outliers = pd.DataFrame(outlier_rows, columns=["hook", "layer", "rep", "role", "channel", "max_abs", "median_abs", "ratio"])
        return with_model(shards, {"channels": pd.concat(chan_rows, ignore_index=True), "layers": pd.DataFrame(layer_rows),
                                   "outliers": outliers})

    # ------------------------------------------------------------------ plot
    def plot(self, tables: dict[str, "pd.DataFrame"], fig_dir: Path, caption: str = "") -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
        import seaborn as sns

        from layerscope.plots import mark_nonfinite, mark_nonfinite_grid

        sns.set_theme(style="whitegrid", context="paper")
        fig_dir = Path(fig_dir)
        layers = tables["layers"]
        chans = tables["channels"]

        # 1. std and max|x| per layer for each representation and role
        per_layer = chans.groupby(["model", "layer", "rep", "role"], as_index=False).agg(
            std=("std", "mean"), max_abs=("max_abs", "max"))
        long = per_layer.melt(id_vars=["model", "layer", "rep", "role"], value_vars=["std", "max_abs"],
                              var_name="statistic", value_name="value")
        g = sns.relplot(data=long, x="layer", y="value", hue="rep", style="model", col="role", row="statistic",
                        kind="line", markers=True, errorbar=None, facet_kws={"sharey": "row"}, height=2.6, aspect=1.4)
        g.set(yscale="log")
        g.set_titles("{row_name} | {col_name}")
        g.set_axis_labels("block (layer index)", "value (activation units)")
        integer_ticks(g)
        g.figure.suptitle(f"Channel std (mean over channels) and max|x| per layer {caption}".strip(), y=1.02)
        mark_nonfinite_grid(g, chans, "layer", col="role")
        save_figure(g, fig_dir / "std_max_abs_per_layer.png", dpi=120, bbox_inches="tight")
        plt.close(g.figure)

        # 2. heat map of the top outlier channels across layers (pre-norm, patch tokens)
        models = list(dict.fromkeys(chans["model"]))
        fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 4), squeeze=False)
        for ax, m in zip(axes[0], models):
            sub = chans[(chans["model"] == m) & (chans["rep"] == "pre") & (chans["role"] == "patch")]
            piv = sub.pivot_table(index="channel", columns="layer", values="max_abs", aggfunc="max")
            top = piv.max(axis=1).sort_values(ascending=False).index[:16]
            sns.heatmap(np.log10(piv.loc[top].clip(lower=1e-6)), ax=ax, cmap="magma",
                        cbar_kws={"label": "log10 max|x| (log10 activation units)"})
            ax.set_title(f"{m}: top channels by max|x| (pre, patch)")
            ax.set_xlabel("block (layer index)")
            ax.set_ylabel("channel (index)")
            mark_nonfinite(ax, sub, "layer", position=list(piv.columns))
        fig.tight_layout()
        save_figure(fig, fig_dir / "outlier_channels_heatmap.png", dpi=120, bbox_inches="tight")
        plt.close(fig)

        # 3. magnitude (top-1/2/3, median) versus layer
        mag = layers.melt(id_vars=["model", "layer", "rep", "role"], value_vars=["top1", "top2", "top3", "median_abs"],
                          var_name="magnitude", value_name="value")
        g = sns.relplot(data=mag, x="layer", y="value", hue="magnitude", style="model", col="rep", row="role",
                        kind="line", markers=True, errorbar=None, height=2.6, aspect=1.3)
        g.set(yscale="log")
        g.set_titles("{row_name} | {col_name}")
        g.set_axis_labels("block (layer index)", "|x| (activation units)")
        integer_ticks(g)
        g.figure.suptitle(f"Top-1/2/3 and median |x| per layer (massive: >100 and >1000x median) {caption}".strip(), y=1.02)
        mark_nonfinite_grid(g, layers, "layer", row="role", col="rep")
        save_figure(g, fig_dir / "magnitude_vs_layer.png", dpi=120, bbox_inches="tight")
        plt.close(g.figure)
