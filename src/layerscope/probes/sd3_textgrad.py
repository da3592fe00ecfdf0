"""SD3 text-gradient sensitivity (design note 000, ``compute_sd3_text_grad_sensitivity.py``).

How much does each text token, as it enters each MMDiT block, move the denoiser's output?  For an
image/caption pair, a timestep and a noise seed:

1. ``z0 = (vae.encode(image).mode() - shift_factor) * scaling_factor`` (the posterior mean: the
   seed only drives the noise), text through the pipeline's own ``encode_prompt``;
2. ``x_t = (1 - sigma) z0 + sigma eps``; by default in the note's convention (``sigma = t / 1000``,
   no shift, the model is fed ``t``, 0 = clean), or with ``timestep_convention: schedule_index`` from
   the shifted training table of a fresh ``FlowMatchEulerDiscreteScheduler`` (index 0 = noisiest);
3. ``y = sum(transformer(x_t, t, text)^2)`` and, in ONE backward pass, ``dy/dh_i`` for the text
   hidden states ``h_i`` entering every selected block ``transformer_blocks.i`` (forward
   pre-hooks with ``with_kwargs=True`` capture ``encoder_hidden_states``; one
   ``torch.autograd.grad(y, [h_i ...])`` returns them all).  Many (pair, timestep, seed) samples
   share that forward and backward (:func:`compute_samples`): y is a sum over samples, which do
   not interact, so every sample keeps its own gradient;
4. token score ``s = ||dy/dh_i[token]||_2``; per (sample, block): mean strength, top-k mass
   (share of the k largest scores in the total) and the entropy of ``s / sum(s)`` (natural log,
   also divided by ``log n``); and the note's curves, which pool each pair's token scores over
   its timesteps x seeds before the metrics (table ``pooled``; per timestep, over its seeds only:
   ``pooled_per_timestep``; both computed in the merge).

Shards: one per (model, timestep, seed, data slice) holding every selected block, with one row
per sample so merges show the spread over seeds and samples.  Nothing is dropped silently:
non-finite token scores are excluded from the metrics and counted per row; rows with no usable
token (``empty``), an all-zero score vector (``zero_mass``) or no gradient (``no_grad``) keep NaN
metrics and a status.  ``layerscope textgrad`` (:func:`run_pair`) is the note's single-pair mode.
See docs/probes/sd3_textgrad.md.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Sequence

import numpy as np

from layerscope.probes.base import GroupLayout, Probe, ShardSpec, with_model

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from layerscope.h5io import Shard, ShardWriter

from layerscope.probes.textgrad_compute import (  # noqa: E402,F401  (the probe's GPU side)
    CONVENTIONS, ENCODE_CHUNK, Sample, Settings, batch_size_for_budget, compute_samples, graph_bytes, noise_for,
    resolve_timestep, saved_bytes, text_input_grads, text_input_grads_per_block)
from layerscope.probes.textgrad_metrics import (  # noqa: E402,F401  (pure numpy metrics)
    EMPTY, METRICS, NO_GRAD, OK, STATUS, ZERO_MASS, no_grad_rows, note_metrics, pool_pair, token_metrics)

POOLED_COLS = ["timestep_index", "block", "hook", "pairs", "samples_per_pair", "nonfinite"] + [
    f"{m}{suffix}" for m in ("strength", "topk_mass", "entropy") for suffix in ("_n", "", "_ci_low", "_ci_high")]
from layerscope.probes.textgrad_plots import FIGURES  # noqa: E402  (the note's three figure names)


def hook_name(block: int) -> str:
    """The canonical name (layerscope.hooks, ``sd3`` table: ``blocks.{i}.hook_text_grad``) of block ``block``."""
    return "blocks.{i}.hook_text_grad".format(i=block)


class SD3TextGrad(Probe):
    name: ClassVar[str] = "sd3_textgrad"
    axes: ClassVar[tuple[str, ...]] = ("timestep", "seed", "slice")
    # samples do not interact (per-sample noise, per-sample gradients): the batch is a speed knob
    exec_keys: ClassVar[tuple[str, ...]] = ("batch_size", "memory_budget_mb")
    tables: ClassVar[tuple[str, ...]] = ("samples", "blocks", "blocks_all_timesteps", "pooled", "pooled_per_timestep", "tokens")
    figures: ClassVar[tuple[str, ...]] = tuple(FIGURES.values())
    layer_keys: ClassVar[tuple[str, ...]] = ("layers",)
    layout: ClassVar[tuple[GroupLayout, ...]] = (
        GroupLayout(r"stats/blocks\.\d+\.hook_text_grad",
                    {**{m: "metric" for m in METRICS}, "image_id": "index", "n_tokens": "count",
                     "nonfinite": "count", "status": "int", "token_scores": "metric?"}, attrs=("block",)),
        GroupLayout(r"inputs", {"image_id": "index", "token_mask": "uint8", "objective": "metric"}),
    )

    def expected_groups(self, shard: "Shard") -> list[str] | None:
        return ["inputs", *(f"stats/{hook_name(int(b))}" for b in shard.json_attr("blocks"))]

    def check_config(self, probe_cfg: Mapping[str, Any], config: Mapping[str, Any]) -> None:
        from layerscope.errors import ConfigError

        ps = self.settings(probe_cfg)  # typed; defaults from the schema only
        for key in ("timesteps", "seeds"):
            vals = list(getattr(ps, key))
            if len(set(vals)) != len(vals):
                raise ConfigError(f"config field probes.{self.name}.{key}: duplicate values {vals}")
        if ps.pooled_curves and not ps.save_token_scores:
            raise ConfigError(f"config field probes.{self.name}.save_token_scores: false, but pooled_curves (the note's "
                              f"curves, pooled per pair over timesteps x seeds) need every token's score; "
                              f"set save_token_scores: true or pooled_curves: false")
        conv = ps.timestep_convention
        if conv not in CONVENTIONS:
            raise ConfigError(f"config field probes.{self.name}.timestep_convention: {conv!r}, expected one of {CONVENTIONS}")

    # ------------------------------------------------------------------ shard
    def setup(self, model_cfg: Mapping[str, Any], probe_cfg: Mapping[str, Any], device_name: str,
              model: str = "?") -> tuple[Any, Any, Settings]:
        """Load the pipeline and resolve the probe's settings (shared by shards and ``layerscope textgrad``)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        from layerscope.errors import ConfigError

        ps = self.settings(probe_cfg)  # typed; defaults from the schema only
        from layerscope.models import family_module, model_dtype, resolve_device

        field = f"probes.{self.name}"
        device = resolve_device(device_name)
        dtype = model_dtype(model_cfg, device)  # auto: the checkpoint's own dtype on a GPU, fp32 on CPU
        pipe = family_module(str(model_cfg["family"])).load(model_cfg, device, dtype)
        tr = pipe.transformer
        n_layers = len(tr.transformer_blocks)
        blocks = list(range(n_layers)) if ps.layers == "all" else [int(b) for b in ps.layers]
        bad = [b for b in blocks if not 0 <= b < n_layers]
        if bad:
            raise ConfigError(f"config field {field}.layers: {bad} out of range for a {n_layers}-block transformer (0..{n_layers - 1})")
        sch = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)  # training look-ups only
        vsf = int(pipe.vae_scale_factor)
        size = int(ps.image_size) or int(tr.config.sample_size) * vsf
        if size % (vsf * int(tr.config.patch_size)):
            raise ConfigError(f"config field {field}.image_size: {size} is not a multiple of {vsf * tr.config.patch_size} "
                              f"(VAE scale {vsf} x patch size {tr.config.patch_size})")
        msl = int(ps.max_sequence_length)
        st = Settings(blocks=blocks, msl=msl, size=size, force=bool(ps.force_txt_grad),
                      batch_size=ps.batch_size,
                      memory_budget_mb=float(ps.memory_budget_mb),
                      seq_len=pipe.tokenizer_max_length + msl)
        return pipe, sch, st

    def run_shard(self, spec: ShardSpec, writer: "ShardWriter") -> None:
        pipe, sch, st = self.setup(spec.model_cfg, spec.probe_cfg, spec.device, spec.model)
        conv = spec.settings.timestep_convention
        t_val = int(spec.axes["timestep"])
        sigma, t_model = resolve_timestep(t_val, conv, sch)
        seed = int(spec.axes["seed"])
        samples = [Sample(r, t_val, sigma, t_model, seed) for r in spec.records()]
        res = compute_samples(pipe, samples, st, log=logging.getLogger("layerscope.sd3_textgrad"))
        self.write_results(writer, pipe, sch, st, spec.probe_cfg, spec.model_cfg, spec.model, samples, res,
                           np.arange(len(samples)))

    def write_results(self, writer: "ShardWriter", pipe: Any, sch: Any, st: Settings, probe_cfg: Mapping[str, Any],
                      model_cfg: Mapping[str, Any], model: str, samples: Sequence[Sample], res: Mapping[str, Any],
                      idx: np.ndarray) -> None:
        """Write the rows ``idx`` of ``res`` (all of one (timestep, seed)) as one shard's groups and attributes."""
        import torch

        log = logging.getLogger("layerscope.sd3_textgrad")
        ps = self.settings(probe_cfg)  # typed; defaults from the schema only
        topk = int(ps.topk)
        ignore_padding = bool(ps.ignore_padding)  # the note: an opt-in flag
        keep_tokens = bool(ps.save_token_scores)
        dtype = pipe.transformer.dtype
        sub = [samples[i] for i in idx]
        s0 = sub[0] if sub else None
        mask = res["mask"][idx]
        y = res["objective"][idx]
        ids = [s.record.image_id for s in sub]
        n, L = len(sub), st.seq_len
        for b in st.blocks:
            sc_all = res["scores"][b]
            if sc_all is None:
                sc = np.full((n, L), np.nan)
                met = no_grad_rows(n)
            else:
                sc = sc_all[idx]
                met = token_metrics(sc, mask if ignore_padding else None, topk)
                n_bad = int(met["nonfinite"].sum()) + int((~np.isfinite(y)).sum())
                if n_bad and dtype == torch.float16:
                    from layerscope.errors import ConfigError

                    raise ConfigError(
                        f"non-finite text gradients in fp16 ({n_bad} values at {hook_name(b)}, timestep {s0.timestep}): "
                        f"set models.{model}.dtype: fp32 (or bf16)")
                if n_bad:
                    log.warning("%s: %d non-finite token scores excluded and counted (column nonfinite)", hook_name(b), n_bad)
            arrays: dict[str, np.ndarray] = {"image_id": np.asarray(ids, np.int64)}
            for k in (*METRICS, "n_tokens", "nonfinite", "status"):
                dt = {"n_tokens": np.int64, "nonfinite": np.int64, "status": np.int8}.get(k, np.float64)
                arrays[k] = np.asarray(met[k]).astype(dt)
            if keep_tokens:
                arrays["token_scores"] = sc.astype(np.float32)
            writer.write(f"stats/{hook_name(b)}", arrays, attrs={"block": b}, compress=True)
        writer.write("inputs", {"image_id": np.asarray(ids, np.int64), "token_mask": mask.astype(np.uint8),
                                "objective": y.astype(np.float64)}, compress=True)
        for k, v in {
            "blocks": st.blocks, "num_layers": len(pipe.transformer.transformer_blocks),
            "timestep_convention": ps.timestep_convention,
            "timestep_index": int(s0.timestep) if s0 else -1, "timestep": float(s0.t_model) if s0 else np.nan,
            "sigma": float(s0.sigma) if s0 else np.nan, "seed": int(s0.seed) if s0 else -1,
            "n_images": n, "image_ids": ids, "seq_len": L, "clip_len": pipe.tokenizer_max_length,
            "t5_len": st.msl, "has_t5": pipe.text_encoder_3 is not None, "ignore_padding": ignore_padding,
            "force_txt_grad": st.force, "topk": topk, "dtype": str(dtype).removeprefix("torch."), "image_size": st.size,
            "used_lora": bool(model_cfg.get("lora")), "checkpoint": str(model_cfg.get("checkpoint") or ""),
            "scheduler_shift": float(sch.config.shift), "num_train_timesteps": int(sch.config.num_train_timesteps),
            "batch_size": int(res["batch_size"]),
        }.items():
            writer.set_attr(k, v)

    # ------------------------------------------------------------------ merge
    def merge(self, shards: list["Shard"]) -> dict[str, "pd.DataFrame"]:
        import pandas as pd

        from layerscope.h5io import ShardError

        ps = self.settings(shards[0].json_attr("spec")["probe_cfg"])  # typed; defaults from the schema only
        per_timestep = bool(ps.lines_per_timestep)
        pooled_on = bool(ps.pooled_curves)
        blocks0 = shards[0].json_attr("blocks")
        frames, tok_rows = [], []
        pool: dict[tuple[int, int], list[tuple[int, np.ndarray, np.ndarray | None]]] = {}  # (block, image) -> rows
        no_tokens = []
        for sh in shards:
            if sh.json_attr("blocks") != blocks0:
                raise ShardError(f"{sh.path}: blocks {sh.json_attr('blocks')} differ from {shards[0].path}'s {blocks0}")
            t_idx, seed = int(sh.attrs["timestep_index"]), int(sh.attrs["seed"])
            conv = str(sh.attrs.get("timestep_convention", "schedule_index"))
            inputs = sh.groups["inputs"]
            clip_len = int(sh.attrs["clip_len"])
            ignore_padding = bool(sh.attrs["ignore_padding"])
            topk = int(sh.attrs["topk"])
            for g in sh.subgroups("stats"):
                d = sh.groups[g]
                block = int(sh.group_attrs[g]["block"])
                hook = g.split("/", 1)[1]
                if pooled_on:
                    if "token_scores" not in d:
                        no_tokens.append(str(sh.path))
                    else:
                        mk = inputs["token_mask"].astype(bool)
                        for r, img in enumerate(d["image_id"]):
                            pool.setdefault((block, int(img)), []).append(
                                (t_idx, d["token_scores"][r], mk[r] if ignore_padding else None))
                df = pd.DataFrame({
                    "timestep_convention": conv, "timestep_index": t_idx, "timestep": float(sh.attrs["timestep"]),
                    "sigma": float(sh.attrs["sigma"]),
                    "seed": seed, "slice": sh.axes["slice"], "image_id": d["image_id"], "block": block, "hook": hook,
                    **{k: d[k] for k in METRICS}, "n_tokens": d["n_tokens"], "nonfinite": d["nonfinite"],
                    "status": [STATUS[int(s)] for s in d["status"]],
                })
                frames.append(df)
                if "token_scores" in d and len(d["token_scores"]):
                    sc = d["token_scores"].astype(np.float64)
                    mk = inputs["token_mask"].astype(bool)
                    for pos in range(sc.shape[1]):
                        col = sc[:, pos]
                        fin = np.isfinite(col)
                        tok_rows.append({"timestep_index": t_idx, "seed": seed, "block": block, "hook": hook, "position": pos,
                                         "segment": "clip" if pos < clip_len else "t5",
                                         "segment_position": pos if pos < clip_len else pos - clip_len,
                                         "count": int(fin.sum()), "nonfinite": int((~fin).sum()), "sum": float(col[fin].sum()),
                                         "content": int(mk[:, pos].sum())})
        if no_tokens:
            bad = sorted(set(no_tokens))
            raise ShardError(f"pooled curves need per-token scores, but {len(bad)} shard(s) were written without them "
                             f"(save_token_scores off), e.g. {bad[0]}; set probes.{self.name}.save_token_scores: true and "
                             f"rerun them (snakemake --forcerun {' '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}), "
                             f"or set pooled_curves: false")
        samples = pd.concat(frames, ignore_index=True).sort_values(
            ["timestep_index", "seed", "block", "image_id"], ignore_index=True)
        dup = samples.duplicated(["timestep_index", "seed", "block", "image_id"])
        if dup.any():
            r = samples[dup].iloc[0]
            raise ShardError(f"sample {r.image_id} appears twice for timestep {r.timestep_index}, seed {r.seed}: overlapping shards")
        samples.insert(0, "line", [f"step {t} (sigma {sg:.2f})" if per_timestep else "all timesteps"
                                   for t, sg in zip(samples["timestep_index"], samples["sigma"])])
        blocks = self._block_table(samples, by_timestep=True)
        blocks_all = self._block_table(samples, by_timestep=False)  # pooled over timesteps: its own table
        tok_cols = ["timestep_index", "block", "hook", "position", "segment", "segment_position", "count", "nonfinite",
                    "mean_score", "content_fraction"]
        if tok_rows:
            t = pd.DataFrame(tok_rows).groupby(["timestep_index", "block", "hook", "position", "segment", "segment_position"],
                                                as_index=False)[["count", "nonfinite", "sum", "content"]].sum()
            t["mean_score"] = t["sum"] / t["count"].where(t["count"] > 0)
            t["content_fraction"] = t["content"] / (t["count"] + t["nonfinite"])
            tokens = t[tok_cols]
        else:
            tokens = pd.DataFrame(columns=tok_cols)
        both = self._pooled_table(pool, topk) if pooled_on else pd.DataFrame(columns=POOLED_COLS)
        # the note's curves (pooled over every timestep) and the same per timestep: two tables, so
        # timestep_index never mixes integers with an 'all' marker
        is_all = both["timestep_index"].astype(str) == "all"
        pooled = both[is_all].drop(columns="timestep_index").reset_index(drop=True)
        pooled_t = both[~is_all].reset_index(drop=True)
        pooled_t["timestep_index"] = pooled_t["timestep_index"].map({str(k): k for k in samples["timestep_index"].unique()})
        # every per-timestep row names its timestep as configured, the convention, sigma and the model timestep
        conv = str(samples["timestep_convention"].iloc[0])
        per_t = samples.drop_duplicates("timestep_index").set_index("timestep_index")[["timestep", "sigma"]]
        lookup = {str(k): (float(v.timestep), float(v.sigma)) for k, v in per_t.iterrows()}
        for df in (blocks, pooled_t, tokens):
            keys = df["timestep_index"].astype(str)
            pos = df.columns.get_loc("timestep_index") + 1
            df.insert(pos, "sigma", [lookup.get(k, (np.nan, np.nan))[1] for k in keys])
            df.insert(pos, "timestep", [lookup.get(k, (np.nan, np.nan))[0] for k in keys])
            df.insert(0, "timestep_convention", conv)
        for df in (blocks_all, pooled):
            df.insert(0, "timestep_convention", conv)
        return with_model(shards, {"samples": samples, "blocks": blocks, "blocks_all_timesteps": blocks_all,
                                   "pooled": pooled, "pooled_per_timestep": pooled_t, "tokens": tokens})

    @staticmethod
    def _pooled_table(pool: Mapping[tuple[int, int], list], topk: int) -> "pd.DataFrame":
        """The note's three curves: per (block, pair) the token scores pooled over every (timestep,
        seed) row of the pair (``timestep_index`` 'all'; per timestep: over its seeds only), the
        metrics of that pooled vector (:func:`pool_pair`), then the mean over pairs with a 95 % t
        interval.  Exact across shards: the rows are the stored per-token scores."""
        import pandas as pd
        from scipy import stats as sps

        per_pair = []
        for (block, img), rows in pool.items():
            groups: dict[str, list] = {"all": rows}
            for t in sorted({r[0] for r in rows}):
                groups[str(t)] = [r for r in rows if r[0] == t]
            for tkey, rr in groups.items():
                m = rr[0][2]
                per_pair.append({"timestep_index": tkey, "block": block, "image_id": img,
                                 **pool_pair(np.stack([r[1] for r in rr]), m, topk)})
        if not per_pair:
            return pd.DataFrame(columns=POOLED_COLS)
        pp = pd.DataFrame(per_pair)
        out = []
        for (tkey, block), g in pp.groupby(["timestep_index", "block"], sort=True):
            row: dict[str, Any] = {"timestep_index": tkey, "block": block, "hook": hook_name(block), "pairs": len(g),
                                   "samples_per_pair": int(g["samples"].min()), "nonfinite": int(g["nonfinite"].sum())}
            for mname in ("strength", "topk_mass", "entropy"):
                v = g[mname].to_numpy(dtype=np.float64)
                v = v[np.isfinite(v)]
                mean = float(v.mean()) if v.size else np.nan
                half = float(sps.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else np.nan
                row.update({f"{mname}_n": v.size, mname: mean, f"{mname}_ci_low": mean - half, f"{mname}_ci_high": mean + half})
            out.append(row)
        return pd.DataFrame(out)[POOLED_COLS]

    @staticmethod
    def _block_table(samples: "pd.DataFrame", by_timestep: bool) -> "pd.DataFrame":
        """The note's per-block table: counts by status, then mean and std (over seeds and samples)
        of each metric, over the rows where it is finite."""
        import pandas as pd

        keys = ["timestep_index", "block", "hook"] if by_timestep else ["block", "hook"]
        out = []
        for key, g in samples.groupby(keys, sort=True):
            key = key if isinstance(key, tuple) else (key,)
            row: dict[str, Any] = dict(zip(keys, key))
            if by_timestep:
                row["timestep_index"] = str(row["timestep_index"])
            row["rows"] = len(g)
            for s in STATUS:
                row[f"n_{s}"] = int((g["status"] == s).sum())
            row["nonfinite"] = int(g["nonfinite"].sum())
            for m in METRICS:
                v = g[m].to_numpy(dtype=np.float64)
                v = v[np.isfinite(v)]
                row[f"{m}_n"] = v.size
                row[f"{m}_mean"] = float(v.mean()) if v.size else np.nan
                row[f"{m}_std"] = float(v.std(ddof=1)) if v.size > 1 else np.nan
            out.append(row)
        return pd.DataFrame(out)

    # ------------------------------------------------------------------ plot
    def plot(self, tables: dict[str, "pd.DataFrame"], fig_dir: Path, caption: str = "") -> None:
        """The note's three curves (``pooled``), or per-row means with ``pooled_curves: false``:
        :mod:`layerscope.probes.textgrad_plots`."""
        from layerscope.probes.textgrad_plots import plot_curves

        plot_curves(tables, fig_dir, caption)
