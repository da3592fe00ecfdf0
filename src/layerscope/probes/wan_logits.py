"""wan_logits: pre-softmax self-attention logits of Wan2.1 during Self-Forcing-style block-causal generation
(the attention-sink study of Deep Forcing, Figure 4; design note 003).

One shard = one model x layer group x denoising step x seed.  The shard runs the whole block-wise
autoregressive generation (KV cache, :func:`layerscope.models.wan.generate`) and captures, for the chosen
layers and chunks (default: the last chunk, whose keys span every frame) at the shard's pass (a denoising
step index, or ``clean`` for the timestep-0 pass that writes the cache), the logits ``QK^T/sqrt(d)`` after
q/k norms and RoPE.  They are reduced on the device, query chunk by query chunk, to per (head, query frame,
key frame) sums of logits and of softmax mass; full logits are written only when ``save_logits`` is set.

Shard layout::

    stats/blocks.<L>.attn.hook_attn_scores/chunk<C>/{logit_sum, mass_sum, logit_max}   [heads, q frames, k frames]
                                                   /{query_tokens [q frames], key_tokens_per_frame, nonfinite [heads]}
        attrs: geometry (JSON: frame_seq_length, query/key frame counts and indices, is_logits, q_len, k_len, ...)
    stats/hook_latents/{count, mean, m2, max_abs, nonfinite}     Moments of the generated latents per channel
    attrs: wan_logits (JSON: prompt, text source, step, timestep, seed, chunks, layers, logits file)

Full logits (``save_logits: true``) go to a sidecar ``<shard>.logits.h5`` (gzip float16, chunked by query
chunk), dataset ``blocks.<L>.attn.hook_attn_scores/chunk<C>/logits`` of shape [B, heads, Q, K]: the shard
itself stays small because shards are read eagerly at merge time.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

from layerscope.plots import integer_ticks, save_figure
from layerscope.probes.base import MOMENTS_LAYOUT, GroupLayout, Probe, ShardSpec

if TYPE_CHECKING:
    import pandas as pd

    from layerscope.h5io import Shard, ShardWriter

def hook_name(layer: int) -> str:
    """The canonical name (layerscope.hooks, ``wan`` table: ``blocks.{i}.attn.hook_attn_scores``) of layer ``layer``."""
    return "blocks.{i}.attn.hook_attn_scores".format(i=layer)


def parse_layers(label: str, n_layers: int) -> list[int]:
    if label == "all":
        return list(range(n_layers))
    try:
        layers = [int(x) for x in label.split("-")]
    except ValueError:
        raise ValueError(f"probes.wan_logits.layer_groups: bad layer group label {label!r}") from None
    bad = [x for x in layers if not 0 <= x < n_layers]
    if bad:
        raise ValueError(f"probes.wan_logits.layer_groups: layers {bad} out of range for a {n_layers}-block model")
    return layers


def parse_step(label: str, n_steps: int) -> int | str:
    if label == "clean":
        return "clean"
    try:
        s = int(label)
    except ValueError:
        raise ValueError(f"probes.wan_logits.steps: {label!r} is neither a step index nor 'clean'") from None
    if not 0 <= s < n_steps:
        raise ValueError(f"probes.wan_logits.steps: step {s} outside 0..{n_steps - 1} (denoising_steps has {n_steps})")
    return s


def sink_metrics(mean_logit: Any, mass: Any, chunk_start: int, first_k: int) -> dict[str, Any]:
    """Sink metrics of one head from its query-averaged frame profile (arrays over key frames).

    * first_frame_mass, first_k_mass: softmax mass on key frame 0 / frames [0, k);
    * current_chunk_mass: mass on the query chunk's own frames [chunk_start, K);
    * entropy_frames: entropy (nats) of the query-averaged mass distribution over key frames; _norm divides
      by log(K);
    * first_minus_middle_logit: mean logit on frame 0 minus on the middle frame K // 2."""
    import numpy as np

    m = np.asarray(mass, dtype=np.float64)
    lg = np.asarray(mean_logit, dtype=np.float64)
    k = m.shape[0]
    p = m / m.sum() if m.sum() > 0 else m
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = float(-(np.where(p > 0, p * np.log(p), 0.0)).sum())
    mid = k // 2
    return {
        "num_key_frames": k,
        "first_frame_mass": float(m[0]),
        "first_k": min(first_k, k),
        "first_k_mass": float(m[:first_k].sum()),
        "current_chunk_mass": float(m[chunk_start:].sum()),
        "entropy_frames": ent,
        "entropy_frames_norm": ent / math.log(k) if k > 1 else float("nan"),
        "first_logit": float(lg[0]),
        "middle_frame": mid,
        "middle_logit": float(lg[mid]),
        "first_minus_middle_logit": float(lg[0] - lg[mid]),
    }


class WanLogits(Probe):
    name: ClassVar[str] = "wan_logits"
    axes: ClassVar[tuple[str, ...]] = ("layers", "step", "seed")
    datasets_key: ClassVar[str | None] = None
    tables: ClassVar[tuple[str, ...]] = ("frame_profile", "sink_metrics")
    figures: ClassVar[tuple[str, ...]] = ("frame_logits", "frame_mass", "sink_heatmaps")
    axis_keys: ClassVar[dict[str, str]] = {"layers": "layer_groups", "step": "steps", "seed": "seeds"}
    layout: ClassVar[tuple[GroupLayout, ...]] = (
        GroupLayout(r"stats/blocks\.\d+\.attn\.hook_attn_scores/chunk\d+",
                    {"logit_sum": "finite", "mass_sum": "finite", "logit_max": "max", "query_tokens": "count",
                     "key_tokens_per_frame": "count", "nonfinite": "count"}, attrs=("geometry",)),
        GroupLayout(r"stats/hook_latents", MOMENTS_LAYOUT),
    )
    layout_varies_with: ClassVar[tuple[str, ...]] = ("layers",)

    def expected_groups(self, shard: "Shard") -> list[str] | None:
        meta = shard.json_attr("wan_logits")
        return ["stats/hook_latents", *(f"stats/{hook_name(int(l))}/chunk{int(c)}" for l in meta["layers"] for c in meta["chunks"])]

    # ---- planning ----
    layer_keys: ClassVar[tuple[str, ...]] = ("layer_groups",)

    def axis_values(self, probe_cfg: Mapping[str, Any], model: str, model_cfg: Mapping[str, Any]) -> dict[str, list[str]]:
        cfg = self.settings(probe_cfg)
        groups = cfg.layer_groups
        return {
            "layers": [g if isinstance(g, str) else "-".join(str(int(x)) for x in g) for g in groups],
            "step": [str(s) for s in cfg.steps],
            "seed": [str(int(s)) for s in cfg.seeds],
        }

    def extra_outputs(self, probe_cfg: Mapping[str, Any], layout: Any = None) -> dict[str, str]:
        """The full-logits sidecar, when asked for: declared so Snakemake removes it with a failed shard."""
        from layerscope.layout import Layout

        if self.settings(probe_cfg).save_logits:
            return {"logits": (layout or Layout()).shard_sidecar(self.name, "{model}", "{shard}", ".logits.h5")}
        return {}

    def check_config(self, probe_cfg: Mapping[str, Any], config: Mapping[str, Any]) -> None:
        from layerscope.errors import ConfigError

        cfg = self.settings(probe_cfg)
        f, n = int(cfg.num_frames), int(cfg.num_frame_per_block)
        if f % n:
            raise ConfigError(f"config field probes.wan_logits.num_frames: {f} is not a multiple of num_frame_per_block {n}")
        for s in cfg.steps:
            try:
                parse_step(str(s), len(cfg.denoising_steps))
            except ValueError as e:
                raise ConfigError(f"config field {e}") from None
        n_chunks = f // n
        for c in cfg.chunks:
            if not -n_chunks <= int(c) < n_chunks:
                raise ConfigError(f"config field probes.wan_logits.chunks: chunk {c} outside {-n_chunks}..{n_chunks - 1} ({n_chunks} chunks)")

    def check_model(self, probe_cfg: Mapping[str, Any], model: str, index: int, model_cfg: Mapping[str, Any],
                    arch: Mapping[str, Any] | None) -> None:
        """Layer groups within the depth, and the latent frame geometry divisible by the patch size."""
        from layerscope.errors import ConfigError

        super().check_model(probe_cfg, model, index, model_cfg, arch)
        patch = (arch or {}).get("patch_size")
        if isinstance(patch, (list, tuple)) and len(patch) == 3:
            cfg = self.settings(probe_cfg)
            h, w = (int(x) for x in cfg.latent_size)
            if h % int(patch[1]) or w % int(patch[2]):
                raise ConfigError(f"config field probes.wan_logits.latent_size: [{h}, {w}] is not divisible by model '{model}''s "
                                  f"patch size {int(patch[1])}x{int(patch[2])}")
            if int(cfg.num_frames) % int(patch[0]):
                raise ConfigError(f"config field probes.wan_logits.num_frames: {cfg.num_frames} is not divisible by model "
                                  f"'{model}''s temporal patch size {int(patch[0])}")

    # ---- shard ----
    def run_shard(self, spec: ShardSpec, writer: "ShardWriter") -> None:
        import numpy as np
        import torch

        from layerscope.h5io import atomic_path
        from layerscope.models import model_dtype, resolve_device
        from layerscope.stats import Moments

        cfg = spec.settings
        device = resolve_device(spec.device)
        mcfg = {"name": spec.model, **spec.model_cfg}  # errors name models.<name>.<field>
        dtype = model_dtype(mcfg, device)
        wan = spec.family()
        bundle = wan.load(mcfg, device, dtype)
        tr = bundle.transformer
        layers = parse_layers(spec.axes["layers"], len(tr.blocks))
        step = parse_step(spec.axes["step"], len(cfg.denoising_steps))
        seed = int(spec.axes["seed"])
        gcfg = wan.GenerationConfig(num_frames=int(cfg.num_frames), block_frames=int(cfg.num_frame_per_block),
                                    denoising_steps=tuple(int(t) for t in cfg.denoising_steps), shift=float(cfg.shift),
                                    context_noise=int(cfg.context_noise))
        n_chunks = gcfg.num_frames // gcfg.block_frames
        chunks = sorted({int(c) % n_chunks for c in cfg.chunks})

        text_dim = tr.config.text_dim
        if cfg.text == "umt5":
            text = wan.encode_prompt(bundle, [cfg.prompt], int(cfg.max_sequence_length), device, dtype)
        else:  # seeded random embeddings: a documented stand-in when no text encoder is wanted
            g = torch.Generator("cpu").manual_seed(10_000 + seed)
            text = torch.randn((1, int(cfg.max_sequence_length), text_dim), generator=g).to(device, dtype)
        if text.shape[-1] != text_dim:
            raise ValueError(f"text embeddings have {text.shape[-1]} channels, the transformer expects text_dim {text_dim}")

        h, w = (int(x) for x in cfg.latent_size)
        g = torch.Generator("cpu").manual_seed(seed)
        noise = torch.randn((1, tr.config.in_channels, gcfg.num_frames, h, w), generator=g).to(device, dtype)

        reducers: dict[tuple[int, int], tuple[dict[str, Any], Any]] = {}
        logit_file = None
        h5 = None
        ctx = None
        if cfg.save_logits:
            import h5py

            logit_file = writer.path.with_name(writer.path.name.removesuffix(".h5") + ".logits.h5")
            ctx = atomic_path(logit_file)
            h5 = h5py.File(ctx.__enter__(), "w")

        def sinks_for(layer: int, geo: dict[str, Any]) -> list[Any]:
            red = wan.FrameReducer(geo["heads"], geo["num_query_frames"], geo["num_key_frames"], geo["frame_seq_length"], device)
            reducers[(layer, geo["chunk"])] = (geo, red)
            sinks: list[Any] = [red]
            if h5 is not None:
                shape = (geo["batch"], geo["heads"], geo["q_len"], geo["k_len"])
                ds = h5.require_group(f"{hook_name(layer)}/chunk{geo['chunk']}").create_dataset(
                    "logits", shape=shape, dtype="float16", compression="gzip", compression_opts=4,
                    chunks=(1, 1, min(int(cfg.query_chunk), shape[2]), min(shape[3], 8192)))
                ds.attrs["geometry"] = json.dumps(geo)
                sinks.append(wan.FullLogitsSink(ds, np.float16))
            return sinks

        cap = wan.CaptureRequest(frozenset(layers), frozenset((c, step) for c in chunks), sinks_for, int(cfg.query_chunk))
        from layerscope.progress import current as progress

        prog = progress(1, "generations")
        try:
            latents = wan.generate(tr, text, noise, gcfg, "cache", capture=cap, step_noise_seed=seed + 1)
            prog.update(1)
            if h5 is not None:
                h5.close()
                h5 = None
                ctx.__exit__(None, None, None)  # type: ignore[union-attr]
        except BaseException as e:
            if h5 is not None:
                h5.close()
                ctx.__exit__(type(e), e, e.__traceback__)  # type: ignore[union-attr]
            raise
        missing = [(lay, c) for lay in layers for c in chunks if (lay, c) not in reducers]
        if missing:
            raise RuntimeError(f"no attention call was captured for (layer, chunk) {missing}")
        for (layer, chunk), (geo, red) in sorted(reducers.items()):
            writer.write(f"stats/{hook_name(layer)}/chunk{chunk}", red.arrays(), attrs={"geometry": geo})
        c = latents.shape[1]
        writer.write("stats/hook_latents", Moments.from_tensor(latents.permute(0, 2, 3, 4, 1).reshape(-1, c)).to_dict())
        writer.set_attr("wan_logits", {
            "prompt": cfg.prompt, "text": cfg.text, "step": step, "seed": seed, "layers": layers, "chunks": chunks,
            "timesteps": [s * 1000 for s in wan.self_forcing_sigmas(gcfg.denoising_steps, gcfg.shift)],
            "checkpoint": bundle.checkpoint, "logits_file": logit_file.name if logit_file else None,
            "first_k": int(cfg.first_k),
        })

    # ---- merge ----
    def merge(self, shards: list["Shard"]) -> dict[str, "pd.DataFrame"]:
        """Sum the partial sums of every seed per (layer, step, chunk); profile rows per key frame, metrics per head."""
        import numpy as np
        import pandas as pd

        acc: dict[tuple[str, int, str, int], dict[str, Any]] = {}
        for sh in shards:
            meta = sh.json_attr("wan_logits")
            for group in sh.subgroups("stats"):
                if ".hook_attn_scores/" not in group:
                    continue
                arr = sh.groups[group]
                geo = json.loads(sh.group_attrs[group]["geometry"])
                key = (sh.model, int(geo["layer"]), str(geo["step"]), int(geo["chunk"]))
                a = acc.get(key)
                if a is None:
                    acc[key] = a = {"geo": geo, "logit_sum": 0.0, "mass_sum": 0.0, "logit_max": -np.inf, "query_tokens": 0,
                                    "nonfinite": 0, "seeds": [], "first_k": int(meta.get("first_k", 3))}
                elif (a["geo"]["num_key_frames"], a["geo"]["frame_seq_length"], a["geo"]["timestep"]) != (
                        geo["num_key_frames"], geo["frame_seq_length"], geo["timestep"]):
                    raise ValueError(f"{sh.path}: geometry of {group} differs from other seeds' shards")
                if meta["seed"] in a["seeds"]:
                    raise ValueError(f"{sh.path}: seed {meta['seed']} of {group} appears in two shards")
                a["seeds"].append(meta["seed"])
                a["logit_sum"] = a["logit_sum"] + arr["logit_sum"].sum(axis=1)  # over query frames -> [H, KF]
                a["mass_sum"] = a["mass_sum"] + arr["mass_sum"].sum(axis=1)
                a["logit_max"] = np.maximum(a["logit_max"], arr["logit_max"].max(axis=1))
                a["query_tokens"] += int(arr["query_tokens"].sum())
                a["nonfinite"] = a["nonfinite"] + arr["nonfinite"]
        prof, mets = [], []
        for (model, layer, step, chunk), a in sorted(acc.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2], kv[0][3])):
            geo = a["geo"]
            fsl, nq = geo["frame_seq_length"], a["query_tokens"]
            mean_logit = a["logit_sum"] / (nq * fsl)
            mass = a["mass_sum"] / nq
            chunk_start = geo["query_frames"][0]
            base = {"model": model, "hook": hook_name(layer), "layer": layer, "step": step, "timestep": geo["timestep"],
                    "chunk": chunk, "n_seeds": len(a["seeds"]), "frame_seq_length": fsl}
            for hd in range(mean_logit.shape[0]):
                for kf in range(mean_logit.shape[1]):
                    prof.append({**base, "head": hd, "key_frame": kf,
                                 "key_role": "first" if kf == 0 else ("current" if kf >= chunk_start else "past"),
                                 "mean_logit": mean_logit[hd, kf], "mass": mass[hd, kf], "max_logit": a["logit_max"][hd, kf],
                                 "query_tokens": nq})
                mets.append({**base, "head": hd, **sink_metrics(mean_logit[hd], mass[hd], chunk_start, a["first_k"]),
                             "nonfinite": int(a["nonfinite"][hd])})
        return {"frame_profile": pd.DataFrame(prof), "sink_metrics": pd.DataFrame(mets)}

    # ---- figures ----
    def plot(self, tables: dict[str, "pd.DataFrame"], fig_dir: Path, caption: str = "") -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import seaborn as sns

        from layerscope.plots import mark_nonfinite

        fig_dir = Path(fig_dir)
        fig_dir.mkdir(parents=True, exist_ok=True)
        prof, mets = tables["frame_profile"], tables["sink_metrics"]
        # Figure 4 view: the latest captured chunk per (model, layer, step)
        last = prof.groupby(["model", "layer", "step"])["chunk"].transform("max") == prof["chunk"]
        p = prof[last].copy()
        p["panel"] = p["model"] + " L" + p["layer"].astype(str)
        p["step"] = "step " + p["step"].astype(str)
        for value, fname, ylabel in (("mean_logit", "frame_logits", "query-averaged logit QK^T/sqrt(d) (logit)"),
                                     ("mass", "frame_mass", "query-averaged softmax mass (fraction, 0-1)")):
            g = sns.relplot(data=p, x="key_frame", y=value, hue="head", style="step", col="panel", col_wrap=min(4, p["panel"].nunique()),
                            kind="line", marker="o", errorbar=None, height=2.6, aspect=1.3, palette="tab20",
                            facet_kws={"sharey": False})
            g.set_axis_labels("key frame (latent frame index)", ylabel)
            integer_ticks(g)
            g.set_titles("{col_name}")
            g.figure.suptitle(f"Wan last-chunk attention to each key frame ({value}) {caption}".strip(), y=1.02, fontsize=9)
            save_figure(g, fig_dir / f"{fname}.png", dpi=110, bbox_inches="tight")
            plt.close(g.figure)
        UNITS = {"logit": "logit (QK^T/sqrt(d))", "norm": "normalised entropy (0-1)"}  # colour bars; masses: fraction
        metrics = ["first_frame_mass", "first_k_mass", "current_chunk_mass", "entropy_frames_norm", "first_minus_middle_logit"]
        mlast = mets[mets.groupby(["model", "layer", "step"])["chunk"].transform("max") == mets["chunk"]]
        rows = sorted(mlast.groupby(["model", "step"]).groups)
        fig, axes = plt.subplots(len(rows), len(metrics), figsize=(3.2 * len(metrics), 2.6 * len(rows)), squeeze=False)
        for r, (model, step) in enumerate(rows):
            sub = mlast[(mlast["model"] == model) & (mlast["step"] == step)]
            for c, m in enumerate(metrics):
                mat = sub.pivot_table(index="layer", columns="head", values=m)
                sns.heatmap(mat, ax=axes[r][c], annot=mat.size <= 64, fmt=".2f", cmap="viridis", cbar=True,
                            cbar_kws={"label": UNITS.get(m.rsplit("_", 1)[-1], "fraction (0-1)")})
                axes[r][c].set(title=f"{model} step {step}\n{m}", xlabel="head (index)", ylabel="layer (block index)")
                axes[r][c].title.set_fontsize(8)
                mark_nonfinite(axes[r][c], sub, "head", position=list(mat.columns))
        fig.suptitle(f"Sink metrics per layer x head (last captured chunk) {caption}".strip(), fontsize=9)
        fig.tight_layout()
        save_figure(fig, fig_dir / "sink_heatmaps.png", dpi=110)
        plt.close(fig)
