"""SD3 text-gradient sensitivity (design note 000, ``compute_sd3_text_grad_sensitivity.py``).

How much does each text token, as it enters each MMDiT block, move the denoiser's output?  For an
image/caption pair, a timestep index and a noise seed:

1. ``z0 = (vae.encode(image).mode() - shift_factor) * scaling_factor`` (the posterior mean: the
   seed only drives the noise), text through the pipeline's own ``encode_prompt``;
2. ``x_t = (1 - sigma) z0 + sigma eps`` with ``sigma = sigmas[idx]``, ``t = timesteps[idx]`` from a
   fresh ``FlowMatchEulerDiscreteScheduler`` built from the pipeline's scheduler config (SD3:
   ``num_train_timesteps=1000, shift=3.0``; index 0 is the noisiest), as SD3 training noises;
3. ``y = sum(transformer(x_t, t, text)^2)`` and, in ONE backward pass, ``dy/dh_i`` for the text
   hidden states ``h_i`` entering every selected block ``transformer_blocks.i`` (forward
   pre-hooks with ``with_kwargs=True`` capture ``encoder_hidden_states``; one
   ``torch.autograd.grad(y, [h_i ...])`` returns them all);
4. token score ``s = ||dy/dh_i[token]||_2``; per (sample, block): mean strength, top-k mass
   (share of the k largest scores in the total) and the entropy of ``s / sum(s)`` (natural log,
   also divided by ``log n``).

Shards: one per (model, timestep, seed, data slice) holding every selected block, with one row
per sample so merges show the spread over seeds and samples.  Nothing is dropped silently:
non-finite token scores are excluded from the metrics and counted per row; rows with no usable
token (``empty``), an all-zero score vector (``zero_mass``) or no gradient (``no_grad``) keep NaN
metrics and a status.  See docs/probes/sd3_textgrad.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Sequence

import numpy as np

from layerscope.probes.base import GroupLayout, Probe, ShardSpec

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from layerscope.h5io import Shard, ShardWriter

STATUS = ("ok", "empty", "zero_mass", "no_grad")  # row status codes 0..3
OK, EMPTY, ZERO_MASS, NO_GRAD = range(4)
METRICS = ("strength", "topk_mass", "entropy", "entropy_norm")
FIGURES = {"strength": "grad_strength_curve", "topk_mass": "grad_topk_mass_curve", "entropy": "grad_entropy_curve"}


def hook_name(block: int) -> str:
    return f"transformer_blocks.{block}.hook_text_grad"


# ------------------------------------------------------------------------------------ metrics
def token_metrics(scores: np.ndarray, mask: np.ndarray | None, topk: int) -> dict[str, np.ndarray]:
    """Per-row metrics of token scores [N, L] over the positions where ``mask`` is True.

    Non-finite scores are excluded and counted (``nonfinite``); ``n_tokens`` counts the finite
    scores used.  Rows: ``status`` 0 ok; 1 empty (no finite score left: every metric NaN);
    2 zero_mass (all scores 0: strength 0, the distribution metrics NaN).  Entropy uses the natural
    log with 0 log 0 = 0; ``entropy_norm = entropy / log(n)`` (0 when n = 1).  Top-k mass is the
    sum of the min(k, n) largest scores over the sum of all.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"scores must be [N, L], got shape {s.shape}")
    m = np.ones_like(s, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    n_rows = s.shape[0]
    out = {k: np.full(n_rows, np.nan) for k in METRICS}
    out["n_tokens"] = np.zeros(n_rows, np.int64)
    out["nonfinite"] = np.zeros(n_rows, np.int64)
    out["status"] = np.zeros(n_rows, np.int8)
    for r in range(n_rows):
        row = s[r][m[r]]
        fin = np.isfinite(row)
        out["nonfinite"][r] = int((~fin).sum())
        v = row[fin]
        n = v.size
        out["n_tokens"][r] = n
        if n == 0:
            out["status"][r] = EMPTY
            continue
        out["strength"][r] = v.mean()
        total = v.sum()
        if total <= 0:
            out["status"][r] = ZERO_MASS
            continue
        out["topk_mass"][r] = np.sort(v)[::-1][: min(topk, n)].sum() / total
        p = v / total
        nz = p[p > 0]
        h = float(-(nz * np.log(nz)).sum())
        out["entropy"][r] = h
        out["entropy_norm"][r] = h / np.log(n) if n > 1 else 0.0
    return out


def no_grad_rows(n_rows: int) -> dict[str, np.ndarray]:
    """Rows for a block whose text input has no gradient (force_txt_grad off): NaN metrics, status no_grad."""
    out = {k: np.full(n_rows, np.nan) for k in METRICS}
    out.update(n_tokens=np.zeros(n_rows, np.int64), nonfinite=np.zeros(n_rows, np.int64),
               status=np.full(n_rows, NO_GRAD, np.int8))
    return out


# ------------------------------------------------------------------------------------ gradients
def text_input_grads(transformer: "torch.nn.Module", blocks: Sequence[int], call_kwargs: Mapping[str, Any],
                     force_txt_grad: bool = True) -> tuple["torch.Tensor", dict[int, "torch.Tensor | None"]]:
    """Output of one transformer forward and dy/d(text input of every block in ``blocks``), y = sum(out^2).

    One forward, one backward: a forward pre-hook (``with_kwargs=True``: SD3 calls its blocks with
    keyword arguments only) keeps each selected block's ``encoder_hidden_states``; a single
    ``torch.autograd.grad`` call then differentiates with respect to all of them.  With frozen
    parameters no text state requires grad, so with ``force_txt_grad`` the first hooked input that
    does not is made a leaf that does (every later block then depends on it; detaching a later
    input would cut the path to the earlier ones).  Without forcing, blocks whose input does not
    require grad get None.
    """
    import torch

    captured: dict[int, torch.Tensor] = {}
    handles = []

    def make_hook(i: int) -> Callable:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            h = kwargs["encoder_hidden_states"]
            if force_txt_grad and not h.requires_grad:
                h = h.detach().requires_grad_(True)
                captured[i] = h
                return args, {**kwargs, "encoder_hidden_states": h}
            captured[i] = h
            return None

        return hook

    for i in blocks:
        handles.append(transformer.transformer_blocks[i].register_forward_pre_hook(make_hook(i), with_kwargs=True))
    try:
        with torch.enable_grad():
            out = transformer(**call_kwargs, return_dict=False)[0]
            y = out.float().pow(2).sum()
            want = [i for i in blocks if captured[i].requires_grad]
            grads: dict[int, torch.Tensor | None] = {i: None for i in blocks}
            if want and y.requires_grad:
                got = torch.autograd.grad(y, [captured[i] for i in want], allow_unused=True)
                grads.update(dict(zip(want, got)))
    finally:
        for h in handles:
            h.remove()
    return out.detach(), grads


def text_input_grads_per_block(transformer: "torch.nn.Module", blocks: Sequence[int],
                               call_kwargs: Mapping[str, Any]) -> dict[int, "torch.Tensor"]:
    """A baseline for the one-pass method: one forward and one backward per block, each
    differentiating with respect to that block's text input alone (made a leaf there, so the
    backward stops at block i: the cheapest per-block loop; used by the benchmark)."""
    out = {}
    for i in blocks:
        out[i] = text_input_grads(transformer, [i], call_kwargs, force_txt_grad=True)[1][i]
    return out


def noise_for(seed: int, image_id: int, shape: Sequence[int]) -> "torch.Tensor":
    """Gaussian noise for one (seed, image), float32 on the CPU: the same whatever the slicing,
    batching or device."""
    import torch

    state = np.random.SeedSequence([int(seed), int(image_id)]).generate_state(2, dtype=np.uint32)
    g = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    return torch.randn(tuple(shape), generator=g, dtype=torch.float32)


# ------------------------------------------------------------------------------------ probe
class SD3TextGrad(Probe):
    name: ClassVar[str] = "sd3_textgrad"
    axes: ClassVar[tuple[str, ...]] = ("timestep", "seed", "slice")
    families: ClassVar[tuple[str, ...]] = ("sd3",)
    tables: ClassVar[tuple[str, ...]] = ("samples", "blocks", "tokens")
    figures: ClassVar[tuple[str, ...]] = tuple(FIGURES.values())
    layout: ClassVar[tuple[GroupLayout, ...]] = (
        GroupLayout(r"stats/transformer_blocks\.\d+\.hook_text_grad",
                    {**{m: "metric" for m in METRICS}, "image_id": "index", "n_tokens": "count",
                     "nonfinite": "count", "status": "int", "token_scores": "metric?"}, attrs=("block",)),
        GroupLayout(r"inputs", {"image_id": "index", "token_mask": "uint8", "objective": "metric"}),
    )

    def expected_groups(self, shard: "Shard") -> list[str] | None:
        return ["inputs", *(f"stats/{hook_name(int(b))}" for b in shard.json_attr("blocks"))]

    def check_config(self, probe_cfg: Mapping[str, Any], config: Mapping[str, Any]) -> None:
        from layerscope.plan import ConfigError

        for key in ("timesteps", "seeds"):
            vals = list(probe_cfg.get(key, []))
            if len(set(vals)) != len(vals):
                raise ConfigError(f"config field probes.{self.name}.{key}: duplicate values {vals}")

    # ------------------------------------------------------------------ shard
    def run_shard(self, spec: ShardSpec, writer: "ShardWriter") -> None:
        import logging

        import torch
        from diffusers import FlowMatchEulerDiscreteScheduler

        from layerscope.data import load_image
        from layerscope.models import resolve_device, resolve_dtype
        from layerscope.models.sd3 import load, text_token_mask
        from layerscope.plan import ConfigError

        log = logging.getLogger("layerscope.sd3_textgrad")
        cfg = spec.probe_cfg
        field = f"probes.{self.name}"
        records = spec.records()

        device = resolve_device(spec.device)
        dtype_name = spec.model_cfg.get("dtype", "fp32")
        dtype = resolve_dtype(dtype_name, device)
        pipe = load(spec.model_cfg, device, dtype)
        tr = pipe.transformer
        n_layers = len(tr.transformer_blocks)
        blocks = list(range(n_layers)) if cfg.get("layers", "all") == "all" else [int(b) for b in cfg["layers"]]
        bad = [b for b in blocks if not 0 <= b < n_layers]
        if bad:
            raise ConfigError(f"config field {field}.layers: {bad} out of range for a {n_layers}-block transformer (0..{n_layers - 1})")

        sch = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)  # training look-ups only
        t_idx = int(spec.axes["timestep"])
        if not 0 <= t_idx < len(sch.sigmas):
            raise ConfigError(f"config field {field}.timesteps: index {t_idx} outside 0..{len(sch.sigmas) - 1} "
                              f"(indices into the {sch.config.num_train_timesteps}-step training schedule; 0 is the noisiest)")
        sigma = float(sch.sigmas[t_idx])
        t_val = float(sch.timesteps[t_idx])
        seed = int(spec.axes["seed"])

        msl = int(cfg.get("max_sequence_length", 256))
        topk = int(cfg.get("topk", 10))
        ignore_padding = bool(cfg.get("ignore_padding", True))
        force = bool(cfg.get("force_txt_grad", True))
        keep_tokens = bool(cfg.get("save_token_scores", False))
        vsf = int(pipe.vae_scale_factor)
        size = int(cfg.get("image_size", 0)) or int(tr.config.sample_size) * vsf
        if size % (vsf * int(tr.config.patch_size)):
            raise ConfigError(f"config field {field}.image_size: {size} is not a multiple of {vsf * tr.config.patch_size} "
                              f"(VAE scale {vsf} x patch size {tr.config.patch_size})")
        vae_shift = float(getattr(pipe.vae.config, "shift_factor", 0.0) or 0.0)
        vae_scale = float(pipe.vae.config.scaling_factor)
        L = pipe.tokenizer_max_length + msl

        rows: dict[int, list[dict[str, np.ndarray]]] = {b: [] for b in blocks}
        tok_scores: dict[int, list[np.ndarray]] = {b: [] for b in blocks}
        masks, objectives, ids = [], [], []
        bs = int(cfg.get("batch_size", 4))
        for start in range(0, len(records), bs):
            batch = records[start:start + bs]
            caps = [r.caption for r in batch]
            with torch.no_grad():
                pe, _, pooled, _ = pipe.encode_prompt(prompt=caps, prompt_2=None, prompt_3=None, device=device,
                                                      do_classifier_free_guidance=False, max_sequence_length=msl)
                pix = pipe.image_processor.preprocess([load_image(r.path, size) for r in batch], height=size, width=size)
                lat = pipe.vae.encode(pix.to(device=device, dtype=pipe.vae.dtype)).latent_dist.mode()
                z0 = ((lat.float() - vae_shift) * vae_scale)
                eps = torch.stack([noise_for(seed, r.image_id, z0.shape[1:]) for r in batch]).to(device)
                xt = ((1.0 - sigma) * z0 + sigma * eps).to(tr.dtype)
            if pe.shape[1] != L:
                raise ConfigError(f"text sequence of {pe.shape[1]} tokens, expected {L} (77 CLIP + {field}.max_sequence_length)")
            kw = dict(hidden_states=xt, timestep=torch.full((len(batch),), t_val, device=device),
                      encoder_hidden_states=pe.to(tr.dtype), pooled_projections=pooled.to(tr.dtype))
            out, grads = text_input_grads(tr, blocks, kw, force_txt_grad=force)
            mask = text_token_mask(pipe, caps, msl)
            use_mask = mask.numpy() if ignore_padding else None
            y = out.float().pow(2).flatten(1).sum(1).cpu().numpy().astype(np.float64)
            for b in blocks:
                g = grads[b]
                if g is None:
                    sc = np.full((len(batch), L), np.nan)
                    met = no_grad_rows(len(batch))
                else:
                    sc = g.float().norm(dim=-1).cpu().numpy().astype(np.float64)
                    met = token_metrics(sc, use_mask, topk)
                    n_bad = int(met["nonfinite"].sum()) + int((~np.isfinite(y)).sum())
                    if n_bad and dtype == torch.float16:
                        raise ConfigError(
                            f"non-finite text gradients in fp16 ({n_bad} values at {hook_name(b)}, timestep index {t_idx}): "
                            f"set models.{spec.model}.dtype: fp32 (or bf16)")
                    if n_bad:
                        log.warning("%s: %d non-finite token scores excluded and counted (column nonfinite)", hook_name(b), n_bad)
                rows[b].append(met)
                if keep_tokens:
                    tok_scores[b].append(sc.astype(np.float32))
            masks.append(mask.numpy())
            objectives.append(y)
            ids.extend(r.image_id for r in batch)

        n = len(ids)
        for b in blocks:
            parts = rows[b]
            arrays: dict[str, np.ndarray] = {"image_id": np.asarray(ids, np.int64)}
            for k in (*METRICS, "n_tokens", "nonfinite", "status"):
                dt = {"n_tokens": np.int64, "nonfinite": np.int64, "status": np.int8}.get(k, np.float64)
                arrays[k] = np.concatenate([p[k] for p in parts]).astype(dt) if parts else np.zeros(0, dt)
            if keep_tokens:
                arrays["token_scores"] = np.concatenate(tok_scores[b]) if n else np.zeros((0, L), np.float32)
            writer.write(f"stats/{hook_name(b)}", arrays, attrs={"block": b}, compress=True)
        writer.write("inputs", {
            "image_id": np.asarray(ids, np.int64),
            "token_mask": np.concatenate(masks).astype(np.uint8) if n else np.zeros((0, L), np.uint8),
            "objective": np.concatenate(objectives) if n else np.zeros(0),
        }, compress=True)
        for k, v in {
            "blocks": blocks, "num_layers": n_layers, "timestep_index": t_idx, "timestep": t_val, "sigma": sigma,
            "seed": seed, "n_images": n, "image_ids": ids, "seq_len": L, "clip_len": pipe.tokenizer_max_length,
            "t5_len": msl, "has_t5": pipe.text_encoder_3 is not None, "ignore_padding": ignore_padding,
            "force_txt_grad": force, "topk": topk, "dtype": str(dtype).removeprefix("torch."), "image_size": size,
            "used_lora": bool(spec.model_cfg.get("lora")), "scheduler_shift": float(sch.config.shift),
            "num_train_timesteps": int(sch.config.num_train_timesteps),
        }.items():
            writer.set_attr(k, v)

    # ------------------------------------------------------------------ merge
    def merge(self, shards: list["Shard"]) -> dict[str, "pd.DataFrame"]:
        import pandas as pd

        from layerscope.h5io import ShardError

        per_timestep = bool(shards[0].json_attr("spec")["probe_cfg"].get("lines_per_timestep", True))
        blocks0 = shards[0].json_attr("blocks")
        frames, tok_rows = [], []
        for sh in shards:
            if sh.json_attr("blocks") != blocks0:
                raise ShardError(f"{sh.path}: blocks {sh.json_attr('blocks')} differ from {shards[0].path}'s {blocks0}")
            t_idx, seed = int(sh.attrs["timestep_index"]), int(sh.attrs["seed"])
            inputs = sh.groups["inputs"]
            clip_len = int(sh.attrs["clip_len"])
            for g in sh.subgroups("stats"):
                d = sh.groups[g]
                block = int(sh.group_attrs[g]["block"])
                hook = g.split("/", 1)[1]
                df = pd.DataFrame({
                    "timestep_index": t_idx, "timestep": float(sh.attrs["timestep"]), "sigma": float(sh.attrs["sigma"]),
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
        samples = pd.concat(frames, ignore_index=True).sort_values(
            ["timestep_index", "seed", "block", "image_id"], ignore_index=True)
        dup = samples.duplicated(["timestep_index", "seed", "block", "image_id"])
        if dup.any():
            r = samples[dup].iloc[0]
            raise ShardError(f"sample {r.image_id} appears twice for timestep {r.timestep_index}, seed {r.seed}: overlapping shards")
        samples.insert(0, "line", [f"step {t} (sigma {sg:.2f})" if per_timestep else "all timesteps"
                                   for t, sg in zip(samples["timestep_index"], samples["sigma"])])
        blocks = pd.concat([self._block_table(samples, by_timestep=True), self._block_table(samples, by_timestep=False)],
                           ignore_index=True)
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
        return {"samples": samples, "blocks": blocks, "tokens": tokens}

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
            row["timestep_index"] = str(row["timestep_index"]) if by_timestep else "all"
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
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import seaborn as sns

        sns.set_theme(style="whitegrid", context="paper")
        fig_dir = Path(fig_dir)
        s = tables["samples"]
        several = s["line"].nunique() > 1
        labels = {"strength": "mean token gradient norm", "topk_mass": "top-k mass", "entropy": "entropy (nats)"}
        for metric, fname in FIGURES.items():
            d = s[np.isfinite(s[metric].astype(float))]
            fig, ax = plt.subplots(figsize=(8, 3.8))
            sns.lineplot(data=d, x="block", y=metric, hue="model", style="line" if several else None, markers=True,
                         dashes=True, errorbar=("ci", 95), n_boot=500, seed=0, ax=ax)
            if metric == "strength":
                ax.set_yscale("log")
            ax.set_xlabel("MMDiT block (transformer_blocks.i)")
            ax.set_ylabel(labels[metric])
            n_seeds = d["seed"].nunique()
            n_img = d["image_id"].nunique()
            ax.set_title(f"{labels[metric]} of dy/d(text input) per block\n"
                         f"95% CI over {n_seeds} seed(s) x {n_img} sample(s) {caption}".strip(), fontsize=9)
            ax.xaxis.get_major_locator().set_params(integer=True)
            from layerscope.plots import mark_nonfinite

            mark_nonfinite(ax, s, "block")
            if ax.get_legend() is not None:
                sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
            fig.tight_layout()
            fig.savefig(fig_dir / f"{fname}.png", dpi=120)
            plt.close(fig)
