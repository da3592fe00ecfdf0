"""sd3_recon_train: fine-tune SD3 with the sd3_light text-reconstruction loss (design note 001).

One shard = one training run (model, gamma, target layer, seed).  ``run_shard`` trains, writes the
per-step losses to the shard and saves the trained model to a deterministic checkpoint directory::

    <checkpoint_root>/<model>/gamma-<g>__target-<t>__seed-<s>/     (default root results/<study>/sd3_recon_train/checkpoints)

(``mode: full`` from a local base: the trained ``transformer/`` plus relative links to the base's
other components, see ``training.save_checkpoint``) which the study can then use as a model (``source: results/<study>/sd3_recon_train/checkpoints/...`` for
``mode: full``; ``source: <base>`` + ``lora: results/<study>/sd3_recon_train/checkpoints/...`` for ``mode: lora``),
e.g. for the sd3_textgrad probe, so one study compares per-block text influence before and after
training.  The checkpoint is complete before the shard is: a shard on disk implies its checkpoint.

Shard layout: group ``train/losses`` with float64 arrays ``step, denoise, recon, total, sigma,
grad_norm`` (one entry per optimizer step), int64 ``n_valid_tokens`` (tokens the text MSE averaged)
and bool ``skipped``, with attributes ``timestep_sampling``, ``shift`` and ``loss_convention`` (the
conventions used; columns of the losses table); root
attributes ``checkpoint``, ``checkpoint_kind``, ``final_hook``, ``target_hook``, ``trainable_params``,
``train_seconds``, ``n_images``, ``resumed_at_step``.

Resume (``checkpoint_every: N``): every N steps the run's full state is saved atomically to
``<shard>.resume/state.pt`` beside the shard; a rerun of a killed shard continues from it with the
same losses and final weights as an uninterrupted run; the folder is removed when the shard ends.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

from layerscope.layout import Layout
from layerscope.plots import integer_ticks, save_figure
from layerscope.probes.base import GroupLayout, Probe, ShardSpec, with_model

if TYPE_CHECKING:
    import pandas as pd

    from layerscope.h5io import Shard, ShardWriter

DEFAULT_CHECKPOINT_ROOT = Layout().checkpoints("sd3_recon_train")  # the default study's; the plan fills in its own study's
LOSS_COLUMNS = ("denoise", "recon", "total", "sigma", "grad_norm")
# how the run drew timesteps and computed its loss: group attributes of train/losses, columns of the table
CONVENTION_COLUMNS = ("timestep_sampling", "shift", "loss_convention")


def convention_attrs(cfg: Any, shift: float) -> dict[str, Any]:
    """The conventions a run used, recorded beside its losses (so runs made under different defaults
    never mix unnoticed), e.g. timestep_sampling 'logit_normal(mean=0, std=1)', shift 3.0,
    loss_convention 'mse, mean(l*w), text: all tokens'."""
    if cfg.timestep_sampling == "logit_normal":
        ts = f"logit_normal(mean={cfg.logit_mean:g}, std={cfg.logit_std:g})"
    else:
        ts = f"discrete({cfg.weighting or 'uniform'})"
    return {"timestep_sampling": ts, "shift": float(shift), "loss_convention": cfg.loss_settings.describe()}


def gamma_label(g: float) -> str:
    """Canonical, filename-safe label of a gamma value (0.5 -> '0.5', 0 -> '0', 1e-05 -> '1e-05')."""
    return format(float(g), "g")


def resume_dir(shard_path: str | Path) -> Path:
    """Where a training shard keeps its resumable state while it runs: beside the shard,
    ``<shard>.resume/state.pt`` (deliberately not a declared output, so Snakemake does not delete it
    when a killed job fails; removed once the shard's checkpoint is written)."""
    p = Path(shard_path)
    return p.with_name(p.name.removesuffix(".h5") + ".resume")


def checkpoint_dir(probe_cfg: Mapping[str, Any], model: str, axes: Mapping[str, str]) -> Path:
    """Where the run of (model, axes) saves its checkpoint (relative to the study's working directory)."""
    root = Path(str(SD3ReconTrain().settings(probe_cfg).checkpoint_root or DEFAULT_CHECKPOINT_ROOT))
    return root / model / f"gamma-{axes['gamma']}__target-{axes['target']}__seed-{axes['seed']}"


class SD3ReconTrain(Probe):
    name: ClassVar[str] = "sd3_recon_train"
    axes: ClassVar[tuple[str, ...]] = ("gamma", "target", "seed")
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
        st = self.settings(probe_cfg)
        return {"gamma": [gamma_label(g) for g in st.gammas],
                "target": [str(int(t)) for t in st.targets],
                "seed": [str(int(s)) for s in st.seeds]}

    def extra_outputs(self, probe_cfg: Mapping[str, Any], layout: Any = None) -> dict[str, str]:
        """The trained checkpoint, which other probes load as a model (source: or lora:)."""
        root = str(self.settings(probe_cfg).checkpoint_root or (layout or Layout()).checkpoints(self.name)).rstrip("/")
        return {"checkpoint": root + "/{model}/{shard}/"}

    def check_config(self, probe_cfg: Mapping[str, Any], config: Mapping[str, Any]) -> None:
        from layerscope.models.sd3_light_settings import LossSettings, ReconConfigError, check_timestep_settings
        from layerscope.errors import ConfigError

        st = self.settings(probe_cfg)
        try:  # renamed keys, loss and timestep settings that contradict each other: before any job (torch-free)
            LossSettings.from_config(probe_cfg)
            check_timestep_settings(st.timestep_sampling, st.weighting, st.shift)
        except ReconConfigError as e:
            raise ConfigError(f"config field probes.{self.name}.{e}") from None

        for key in ("gammas", "targets", "seeds"):
            vals = list(getattr(st, key))
            if len(set(map(str, vals))) != len(vals):
                raise ConfigError(f"config field probes.{self.name}.{key}: duplicate values {vals}")
        if st.mode == "lora":
            for i, m in enumerate(st.models or ()):
                if config.get("models", {}).get(m, {}).get("lora"):
                    raise ConfigError(f"config field probes.{self.name}.models[{i}]: model '{m}' already has a LoRA; "
                                      "mode: lora trains a fresh adapter on an un-adapted base")

    def check_model(self, probe_cfg: Mapping[str, Any], model: str, index: int, model_cfg: Mapping[str, Any],
                    arch: Mapping[str, Any] | None) -> None:
        """Target layers: 0 (context_embedder output) .. num_layers-2 (the last block's text output is discarded)."""
        from layerscope.errors import ConfigError
        from layerscope.model_configs import model_depth

        depth = model_depth(arch)
        if depth is None:
            return
        for t in self.settings(probe_cfg).targets:
            if isinstance(t, int) and not 0 <= t <= depth - 2:
                raise ConfigError(f"config field probes.{self.name}.targets: target {t} is beyond model '{model}' "
                                  f"({depth} blocks: targets 0..{depth - 2})")

    # ---- the three steps ----
    def run_shard(self, spec: ShardSpec, writer: "ShardWriter") -> None:
        import torch

        from layerscope.data import index_digest, load_image, read_index
        from layerscope.models import resolve_device
        from layerscope.training import (base_pipeline_dir, config_from_probe, encode_dataset, fine_tune, free_frozen_components,
                                         load_pipeline, manifest_of, save_checkpoint)

        pcfg = spec.probe_cfg
        cfg = config_from_probe(spec.settings, float(spec.axes["gamma"]), int(spec.axes["target"]), int(spec.axes["seed"]))
        device = resolve_device(spec.device)
        # training keeps fp32 master weights whatever the model's inference dtype
        pipe = load_pipeline(spec.model_cfg, device, torch.float32)
        from layerscope.models.sd3_light import TextReconConfig

        TextReconConfig.from_model_config(cfg.model_config, len(pipe.transformer.transformer_blocks))  # range check, early
        ds = spec.datasets[spec.settings.dataset]
        records = read_index(ds["index"])
        if cfg.max_images:
            records = records[: cfg.max_images]
        size = cfg.image_size or int(pipe.transformer.config.sample_size) * int(pipe.vae_scale_factor)
        images = [load_image(r.path, size) for r in records]
        data = encode_dataset(pipe, images, [r.caption for r in records], size, cfg.max_sequence_length)
        base_dir = base_pipeline_dir(spec.model_cfg) if cfg.mode == "full" else None
        free_frozen_components(pipe, drop=cfg.mode == "lora" or base_dir is not None)
        digest = index_digest(ds["index"])
        resume = resume_dir(writer.path)
        result, peft_model = fine_tune(pipe, data, cfg, resume_dir=resume, fingerprint=f"{spec.config_hash}:{digest}")

        ckpt = checkpoint_dir(pcfg, spec.model, spec.axes)
        manifest = {**manifest_of(cfg, spec.model_cfg), "model": spec.model, "axes": spec.axes,
                    "config_hash": spec.config_hash, "dataset": spec.settings.dataset, "data_digest": digest,
                    "final_hook": result.final_hook, "target_hook": result.target_hook}
        save_checkpoint(pipe, peft_model, ckpt, manifest, base_dir=base_dir)

        import numpy as np

        writer.write("train/losses", {
            "step": np.arange(cfg.steps, dtype=np.int64), "denoise": result.denoise, "recon": result.recon,
            "total": result.total, "sigma": result.sigma, "grad_norm": result.grad_norm,
            "n_valid_tokens": result.n_valid_tokens, "skipped": result.skipped,
        }, attrs={"recon_computed": result.recon_computed, "gamma": cfg.gamma, "target_layer": cfg.target_layer,
                  **convention_attrs(cfg, result.extra["shift"])})
        writer.set_attr("checkpoint", str(ckpt))
        writer.set_attr("checkpoint_kind", "lora" if peft_model is not None else "transformer+links" if base_dir else "pipeline")
        writer.set_attr("resumed_at_step", int(result.extra.get("resumed_at", 0)))
        import shutil

        shutil.rmtree(resume, ignore_errors=True)  # the checkpoint is final: the resumable state is spent
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
            gattrs = sh.group_attrs.get("train/losses", {})
            missing = [c for c in CONVENTION_COLUMNS if c not in gattrs]
            if missing:
                raise ShardError(f"{sh.path}: train/losses lacks {', '.join(missing)} (written before conventions were "
                                 "recorded); rerun the shard")
            for c in CONVENTION_COLUMNS:
                df[c] = gattrs[c]
            df["final_hook"] = sh.attrs.get("final_hook")
            df["target_hook"] = sh.attrs.get("target_hook")
            df["checkpoint"] = sh.attrs.get("checkpoint")
            frames.append(df)
        if not frames:
            raise ShardError("no sd3_recon_train shards to merge")
        out = pd.concat(frames, ignore_index=True).sort_values(["gamma", "target", "seed", "step"], kind="stable")
        return with_model(shards, {"losses": out.reset_index(drop=True)})

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
        g.set_axis_labels("training step (optimizer steps)", "loss (per-token mean, see loss_convention)")
        integer_ticks(g)
        if caption:
            g.figure.suptitle(caption, y=1.02, fontsize=9)
        fig_dir = Path(fig_dir)
        fig_dir.mkdir(parents=True, exist_ok=True)
        save_figure(g.figure, fig_dir / "loss_curves.png", dpi=110, bbox_inches="tight")
        plt.close(g.figure)
