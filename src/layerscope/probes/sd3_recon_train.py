"""sd3_recon_train: fine-tune SD3 with the sd3_light text-reconstruction loss (design note 001).

One shard = one training run (model, gamma, target layer, seed).  ``run_shard`` trains, writes the
per-step losses to the shard and saves the trained model to a deterministic checkpoint directory::

    <checkpoint_root>/<model>/gamma-<g>__target-<t>__seed-<s>/     (default root results/sd3_recon/checkpoints)

which the study can then use as a model (``source: results/sd3_recon/checkpoints/...`` for
``mode: full``; ``source: <base>`` + ``lora: results/sd3_recon/checkpoints/...`` for ``mode: lora``),
e.g. for the sd3_textgrad probe, so one study compares per-block text influence before and after
training.  The checkpoint is complete before the shard is: a shard on disk implies its checkpoint.

Shard layout: group ``train/losses`` with float64 arrays ``step, denoise, recon, total, sigma,
grad_norm`` (one entry per optimizer step), int64 ``n_valid_tokens`` and bool ``skipped``; root
attributes ``checkpoint``, ``checkpoint_kind``, ``final_hook``, ``target_hook``, ``trainable_params``,
``train_seconds``, ``n_images``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

from layerscope.probes.base import GroupLayout, Probe, ShardSpec

if TYPE_CHECKING:
    import pandas as pd

    from layerscope.h5io import Shard, ShardWriter

DEFAULT_CHECKPOINT_ROOT = "results/sd3_recon/checkpoints"
LOSS_COLUMNS = ("denoise", "recon", "total", "sigma", "grad_norm")


def gamma_label(g: float) -> str:
    """Canonical, filename-safe label of a gamma value (0.5 -> '0.5', 0 -> '0', 1e-05 -> '1e-05')."""
    return format(float(g), "g")


def checkpoint_dir(probe_cfg: Mapping[str, Any], model: str, axes: Mapping[str, str]) -> Path:
    """Where the run of (model, axes) saves its checkpoint (relative to the study's working directory)."""
    root = Path(str(probe_cfg.get("checkpoint_root", DEFAULT_CHECKPOINT_ROOT)))
    return root / model / f"gamma-{axes['gamma']}__target-{axes['target']}__seed-{axes['seed']}"


class SD3ReconTrain(Probe):
    name: ClassVar[str] = "sd3_recon_train"
    axes: ClassVar[tuple[str, ...]] = ("gamma", "target", "seed")
    families: ClassVar[tuple[str, ...]] = ("sd3",)
    datasets_key: ClassVar[str | None] = "dataset"
    tables: ClassVar[tuple[str, ...]] = ("losses",)
    figures: ClassVar[tuple[str, ...]] = ("loss_curves",)
    axis_keys: ClassVar[dict[str, str]] = {"gamma": "gammas", "target": "targets", "seed": "seeds"}
    # losses are data as trained: a NaN/inf loss is a result (kept, never dropped), not corruption
    layout: ClassVar[tuple[GroupLayout, ...]] = (
        GroupLayout(r"train/losses", {"step": "index", **{c: "float" for c in LOSS_COLUMNS},
                                      "n_valid_tokens": "count", "skipped": "bool"}),
    )

    def axis_values(self, probe_cfg: Mapping[str, Any], model: str, model_cfg: Mapping[str, Any]) -> dict[str, list[str]]:
        return {"gamma": [gamma_label(g) for g in probe_cfg.get("gammas", [0.0])],
                "target": [str(int(t)) for t in probe_cfg.get("targets", [0])],
                "seed": [str(int(s)) for s in probe_cfg.get("seeds", [0])]}

    def extra_outputs(self, probe_cfg: Mapping[str, Any]) -> dict[str, str]:
        """The trained checkpoint, which other probes load as a model (source: or lora:)."""
        root = str(probe_cfg.get("checkpoint_root", DEFAULT_CHECKPOINT_ROOT)).rstrip("/")
        return {"checkpoint": root + "/{model}/{shard}/"}

    def check_config(self, probe_cfg: Mapping[str, Any], config: Mapping[str, Any]) -> None:
        from layerscope.plan import ConfigError

        for key in ("gammas", "targets", "seeds"):
            vals = list(probe_cfg.get(key, []))
            if len(set(map(str, vals))) != len(vals):
                raise ConfigError(f"config field probes.{self.name}.{key}: duplicate values {vals}")
        if probe_cfg.get("mode", "full") == "lora":
            for i, m in enumerate(probe_cfg.get("models", [])):
                if config.get("models", {}).get(m, {}).get("lora"):
                    raise ConfigError(f"config field probes.{self.name}.models[{i}]: model '{m}' already has a LoRA; "
                                      "mode: lora trains a fresh adapter on an un-adapted base")

    # ---- the three steps ----
    def run_shard(self, spec: ShardSpec, writer: "ShardWriter") -> None:
        import torch

        from layerscope.data import index_digest, load_image, read_index
        from layerscope.models import resolve_device, set_threads
        from layerscope.training import config_from_probe, encode_dataset, fine_tune, load_pipeline, manifest_of, save_checkpoint

        set_threads(spec.threads)
        pcfg = spec.probe_cfg
        cfg = config_from_probe(pcfg, float(spec.axes["gamma"]), int(spec.axes["target"]), int(spec.axes["seed"]))
        device = resolve_device(spec.device)
        # training keeps fp32 master weights whatever the model's inference dtype
        pipe = load_pipeline(spec.model_cfg, device, torch.float32)
        from layerscope.models.sd3_light import TextReconConfig

        TextReconConfig.from_model_config(cfg.model_config, len(pipe.transformer.transformer_blocks))  # range check, early
        ds = spec.datasets[pcfg["dataset"]]
        records = read_index(ds["index"])
        if cfg.max_images:
            records = records[: cfg.max_images]
        size = cfg.image_size or int(pipe.transformer.config.sample_size) * int(pipe.vae_scale_factor)
        images = [load_image(r.path, size) for r in records]
        data = encode_dataset(pipe, images, [r.caption for r in records], size, cfg.max_sequence_length)
        result, peft_model = fine_tune(pipe, data, cfg)

        ckpt = checkpoint_dir(pcfg, spec.model, spec.axes)
        manifest = {**manifest_of(cfg, spec.model_cfg), "model": spec.model, "axes": spec.axes,
                    "config_hash": spec.config_hash, "dataset": pcfg["dataset"], "data_digest": index_digest(ds["index"]),
                    "final_hook": result.final_hook, "target_hook": result.target_hook}
        save_checkpoint(pipe, peft_model, ckpt, manifest)

        import numpy as np

        writer.write("train/losses", {
            "step": np.arange(cfg.steps, dtype=np.int64), "denoise": result.denoise, "recon": result.recon,
            "total": result.total, "sigma": result.sigma, "grad_norm": result.grad_norm,
            "n_valid_tokens": result.n_valid_tokens, "skipped": result.skipped,
        }, attrs={"recon_computed": result.recon_computed, "gamma": cfg.gamma, "target_layer": cfg.target_layer})
        writer.set_attr("checkpoint", str(ckpt))
        writer.set_attr("checkpoint_kind", "pipeline" if peft_model is None else "lora")
        writer.set_attr("final_hook", result.final_hook)
        writer.set_attr("target_hook", result.target_hook)
        writer.set_attr("trainable_params", int(result.trainable_params))
        writer.set_attr("train_seconds", float(result.seconds))
        writer.set_attr("n_images", len(records))

    def merge(self, shards: list["Shard"]) -> dict[str, "pd.DataFrame"]:
        """One row per (shard, step): the losses as trained, NaN included (never dropped).

        ``recon`` is 0 and ``recon_computed`` False for gamma = 0 runs (the term is not computed),
        so ``total == denoise + gamma * recon`` holds on every row."""
        import pandas as pd

        from layerscope.h5io import ShardError

        frames = []
        for sh in shards:
            g = sh.groups.get("train/losses")
            if g is None:
                raise ShardError(f"{sh.path}: no train/losses group (not an sd3_recon_train shard?)")
            ax = sh.axes
            df = pd.DataFrame({"step": g["step"], **{c: g[c] for c in LOSS_COLUMNS},
                               "n_valid_tokens": g["n_valid_tokens"], "skipped": g["skipped"].astype(bool),
                               "recon_computed": bool(sh.group_attrs.get("train/losses", {}).get("recon_computed", False))})
            df.insert(0, "gamma", float(ax["gamma"]))  # no 'model' column: plot_from_tables adds it
            df.insert(1, "target", int(ax["target"]))
            df.insert(2, "seed", int(ax["seed"]))
            df["final_hook"] = sh.attrs.get("final_hook")
            df["target_hook"] = sh.attrs.get("target_hook")
            df["checkpoint"] = sh.attrs.get("checkpoint")
            frames.append(df)
        if not frames:
            raise ShardError("no sd3_recon_train shards to merge")
        out = pd.concat(frames, ignore_index=True).sort_values(["gamma", "target", "seed", "step"], kind="stable")
        return {"losses": out.reset_index(drop=True)}

    def plot(self, tables: dict[str, "pd.DataFrame"], fig_dir: Path, caption: str = "") -> None:
        """loss_curves.png: denoise / recon / total against the step; hue = gamma, style = target
        layer, one row per model; the band is the spread over seeds (sd) when there are several."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import seaborn as sns

        df = tables["losses"]  # every model's rows, with the 'model' column plot_from_tables adds
        if "model" not in df.columns:
            df = df.assign(model="model")
        long = df.melt(id_vars=["model", "gamma", "target", "seed", "step", "recon_computed"],
                       value_vars=["denoise", "recon", "total"], var_name="loss", value_name="value")
        # gamma = 0 runs never compute the reconstruction (no capture, no cost): leave them out of that panel
        long = long[(long["loss"] != "recon") | long["recon_computed"].astype(bool)]
        long["gamma"] = long["gamma"].map(gamma_label)
        long["target"] = long["target"].astype(str)
        g = sns.relplot(data=long, x="step", y="value", hue="gamma", style="target", col="loss", row="model",
                        kind="line", errorbar="sd", facet_kws={"sharey": False}, height=2.6, aspect=1.3)
        g.set_titles("{row_name} | {col_name}")
        if caption:
            g.figure.suptitle(caption, y=1.02, fontsize=9)
        fig_dir = Path(fig_dir)
        fig_dir.mkdir(parents=True, exist_ok=True)
        g.figure.savefig(fig_dir / "loss_curves.png", dpi=110, bbox_inches="tight")
        plt.close(g.figure)
