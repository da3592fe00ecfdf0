"""sdxl_ablation: what one cross-attention group alone does to a Stable Diffusion image (design note 002).

For a target group (``down_blocks.N.attentions.M`` / ``mid_block.attentions.M`` /
``up_blocks.N.attentions.M``, each holding one or more ``attn2`` modules), forward hooks replace
the ``attn2`` output of *every other* group with zeros for the whole generation (every step, both
classifier-free-guidance branches), so the text reaches the image through that group only (plus
SDXL's pooled text embedding, see ``pooled_text``).  Two controls per (prompt, seed): ``all``
(no hooks: the normal image) and ``none`` (every group zeroed; the note lacks it).

One shard per (model, group, prompt, seed) holds the generated image (uint8 in the HDF5 file),
per-``attn2`` moments of the output the hooks passed on (so a shard proves which groups were
silent), and, when a CLIP scorer is configured, the image-prompt cosine.  The merge computes the
SSIM of every image to the same (prompt, seed)'s ``all`` image (a distance needs both images, so it
is a merge-time quantity), exports PNGs, and the plot draws comparison grids and score curves.

Batched mode (``batch_groups: true``, a project option; the note runs one full generation per
group, one after the other): every target group of a (prompt, seed) plus both controls is ONE
batched denoising run, each batch element with its own ``attn2`` keep-mask
(:func:`ablate_cross_attention_batched`; with classifier-free guidance the pipeline doubles the
batch as ``[uncond..., cond...]``, so sample *i* is rows *i* and *i + n*).  Every sample draws its
noise from its own generator seeded with the shard's seed, so it starts from the same latents as
the one-at-a-time run.  The shard axis ``group`` then has the single label ``batched`` and one
shard holds every image under ``image/<group>`` (same per-group attrs and stats).  The merge reads
both layouts into the same rows: tables and figures are the same either way.

Heavy imports (torch, diffusers, transformers, pandas, skimage, matplotlib) stay inside methods.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Sequence

from layerscope.errors import ConfigError
from layerscope.layout import images_dir_of_shard
from layerscope.models.sdxl_ablate import (  # noqa: F401  (the UNet hooks; re-exported)
    ablate_cross_attention, ablate_cross_attention_batched, generate_batched)
from layerscope.probes.base import MOMENTS_LAYOUT, GroupLayout, Probe, ShardSpec, with_model
from layerscope.probes.sdxl_ablation_plots import GRID, comparison_grid_name, plot_ablation

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    import torch

    from layerscope.h5io import Shard, ShardWriter

__all__ = ["SdxlAblation", "ablate_cross_attention", "ablate_cross_attention_batched", "generate_batched", "CONTROLS", "BATCHED",
           "GROUP_RE", "prompt_labels", "comparison_grid_name"]

CONTROLS = ("all", "none")  # all: no hooks; none: every group zeroed
BATCHED = "batched"  # group-axis label of a shard that holds every group of a (prompt, seed)
GROUP_RE = re.compile(r"^(?:(?:down|up)_blocks\.\d+|mid_block)\.attentions\.\d+$")
IMAGE_GROUP = "image"
CLIP_GROUP = "scores/clip"


def prompt_labels(prompts: Sequence[str]) -> list[str]:
    """Shard-axis labels of the prompt list: p0, p1, ... (the text itself travels in the spec)."""
    return [f"p{i}" for i in range(len(prompts))]



class SdxlAblation(Probe):
    """Cross-attention group ablation for Stable Diffusion UNets (SDXL, SD 1.x/2.x)."""

    name: ClassVar[str] = "sdxl_ablation"
    axes: ClassVar[tuple[str, ...]] = ("group", "prompt", "seed")
    datasets_key: ClassVar[str | None] = None
    tables: ClassVar[tuple[str, ...]] = ("scores", "images")
    exports_images: ClassVar[bool] = True  # one PNG per generated image, listed in the images table
    figures: ClassVar[tuple[str, ...]] = (GRID, "scores")  # + one grid per (model, prompt): figure_names
    # every shard records every attn2 output (kept or zeroed), so all of a model's shards hold the
    # same groups (layout_varies_with = ()); the CLIP score exists when a clip_model is configured
    layout: ClassVar[tuple[GroupLayout, ...]] = (
        GroupLayout(r"image(/[^/]+)?", {"rgb": "uint8"}, attrs=("prompt",)),  # batched: image/<target>
        GroupLayout(r"stats/.+\.attn2\.hook_out", MOMENTS_LAYOUT, attrs=("group", "zeroed")),
        GroupLayout(r"scores/clip(/[^/]+)?", {"cosine": "finite"}, min_groups=0),
    )
    def expected_groups(self, shard: "Shard") -> list[str] | None:
        """One image per shard, or with batch_groups one per target the shard says it made."""
        abl = shard.json_attr("ablation")
        return [f"image/{t}" for t in abl["targets"]] if abl.get("batched") else ["image"]

    def figure_names(self, models: Sequence[str], probe_cfg: Mapping[str, Any]) -> dict[str, str | None]:
        """The static figures, then one comparison grid per (model, prompt label): the labels the
        shards and so the merged tables carry (prompt_labels), named as the plot names them."""
        labels = prompt_labels(self.settings(probe_cfg).prompts or ())
        return {**super().figure_names(models, probe_cfg),
                **{comparison_grid_name(m, p): m for m in models for p in labels}}

    # 'prompts' is deliberately NOT an axis key: the prompt text stays in the config hash, so
    # editing or reordering prompts (labels p0, p1, ... are positions) invalidates old shards.
    axis_keys: ClassVar[dict[str, str]] = {"group": "groups", "seed": "seeds"}

    # ---------------------------------------------------------------- planning
    def target_groups(self, probe_cfg: Mapping[str, Any], model_cfg: Mapping[str, Any]) -> list[str]:
        """The model's ablation targets, known without torch: explicit list or derived from the UNet config."""
        from layerscope.models.sdxl import GroupConfigError, cross_attention_groups_from_config, unet_config_for

        field = "probes.sdxl_ablation.groups"
        spec = self.settings(probe_cfg).groups
        if spec == "auto":
            try:
                groups = cross_attention_groups_from_config(unet_config_for(model_cfg))
            except (GroupConfigError, OSError, json.JSONDecodeError) as e:
                raise ConfigError(f"config field {field}: 'auto' failed for model {model_cfg.get('name', '?')}: {e}") from None
            if not groups:
                raise ConfigError(f"config field {field}: the UNet of model {model_cfg.get('name', '?')} has no cross-attention groups")
            return groups
        if not isinstance(spec, (list, tuple)) or not spec:
            raise ConfigError(f"config field {field}: expected 'auto' or a non-empty list of group names")
        for g in spec:
            if not isinstance(g, str) or not GROUP_RE.match(g):
                raise ConfigError(f"config field {field}: {g!r} is not a group name like 'down_blocks.1.attentions.0' or 'mid_block.attentions.0'")
        if len(set(spec)) != len(spec):
            raise ConfigError(f"config field {field}: duplicate group names")
        return list(spec)

    def axis_values(self, probe_cfg: Mapping[str, Any], model: str, model_cfg: Mapping[str, Any]) -> dict[str, list[str]]:
        st = self.settings(probe_cfg)
        prompts = st.prompts or []
        groups = self.target_groups(probe_cfg, {"name": model, **model_cfg}) + list(CONTROLS)
        return {
            # batch_groups: one shard (one batched generation) per (prompt, seed) covers every group
            "group": [BATCHED] if st.batch_groups else groups,
            "prompt": prompt_labels(prompts),
            "seed": [str(int(s)) for s in st.seeds or ()],
        }

    def check_model(self, probe_cfg: Mapping[str, Any], model: str, index: int, model_cfg: Mapping[str, Any],
                    arch: Mapping[str, Any] | None) -> None:
        """Explicit groups must exist in the model's UNet (when its config is readable without weights)."""
        from layerscope.models.sdxl import GroupConfigError, cross_attention_groups_from_config

        groups = self.settings(probe_cfg).groups
        if not isinstance(groups, (list, tuple)) or not arch:
            return
        try:
            have = cross_attention_groups_from_config(dict(arch))
        except GroupConfigError:
            return
        for g in groups:
            if g not in have:
                raise ConfigError(f"config field probes.sdxl_ablation.groups: model '{model}' has no cross-attention group "
                                    f"'{g}' (it has {', '.join(have)})")

    def check_config(self, probe_cfg: Mapping[str, Any], config: Mapping[str, Any]) -> None:
        st = self.settings(probe_cfg)
        prompts = st.prompts
        if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ConfigError("config field probes.sdxl_ablation.prompts: list at least one non-empty prompt")
        seeds = st.seeds
        if not isinstance(seeds, (list, tuple)) or not seeds or len(set(seeds)) != len(seeds):
            raise ConfigError("config field probes.sdxl_ablation.seeds: list at least one seed, without repeats")
        clip = st.clip_model
        if clip:
            models = config.get("models", {})
            if clip not in models:
                raise ConfigError(f"config field probes.sdxl_ablation.clip_model: unknown model '{clip}'")
            if models[clip].get("family") != "clip":
                raise ConfigError(f"config field probes.sdxl_ablation.clip_model: model '{clip}' is family '{models[clip].get('family')}', expected 'clip'")
            if clip not in (st.aux_models or ()):
                raise ConfigError(f"config field probes.sdxl_ablation.aux_models: must list the clip_model '{clip}' (aux models travel with each shard's spec)")

    # ---------------------------------------------------------------- shard
    def run_shard(self, spec: ShardSpec, writer: "ShardWriter") -> None:
        import gc

        import numpy as np
        import torch

        from layerscope.models import model_dtype, resolve_device

        fam = spec.family()
        cfg = spec.settings  # typed; defaults from the schema only
        device = resolve_device(spec.device)
        dtype = model_dtype({"name": spec.model, **spec.model_cfg}, device)  # auto: the checkpoint's dtype on a GPU
        target = spec.axes["group"]
        label = spec.axes["prompt"]
        prompts = list(cfg.prompts)
        labels = prompt_labels(prompts)
        if label not in labels:
            raise ValueError(f"prompt label {label!r} not in probes.sdxl_ablation.prompts ({len(prompts)} prompts)")
        prompt = prompts[labels.index(label)]
        seed = int(spec.axes["seed"])
        batched = target == BATCHED
        if batched != bool(cfg.batch_groups):
            raise ValueError(f"shard group {target!r} does not match probes.sdxl_ablation.batch_groups "
                             f"({bool(cfg.batch_groups)}): stale plan, rerun")

        pipe = fam.load({"name": spec.model, **spec.model_cfg}, device, dtype)
        model_groups = fam.cross_attention_groups(pipe.unet)
        planned = self.target_groups(spec.probe_cfg, {"name": spec.model, **spec.model_cfg})
        if cfg.groups == "auto" and planned != list(model_groups):
            raise ValueError(f"probes.sdxl_ablation.groups 'auto' derived {planned} from the UNet config, "
                             f"but the loaded UNet of {spec.model} has {list(model_groups)}")
        unknown = [g for g in planned if g not in model_groups]
        if unknown:
            raise ValueError(f"probes.sdxl_ablation.groups: {unknown[0]} is not a cross-attention group of {spec.model}; "
                             f"it has {', '.join(model_groups)}")
        if not batched and target not in model_groups and target not in CONTROLS:
            raise ValueError(f"probes.sdxl_ablation.groups: {target} is not a cross-attention group of {spec.model}; "
                             f"it has {', '.join(model_groups)}")
        targets = planned + list(CONTROLS) if batched else [target]
        has_pooled = getattr(pipe.unet.config, "addition_embed_type", None) == "text_time"
        pooled_mode = str(cfg.pooled_text)
        zeroed = {t: ([] if t == "all" else [g for g in model_groups if g != t]) for t in targets}
        zero_pooled = {t: has_pooled and pooled_mode == "zero" and t != "all" for t in targets}
        height = int(cfg.height or 0) or None
        width = int(cfg.width or 0) or None
        call = dict(negative_prompt=cfg.negative_prompt or None, num_inference_steps=int(cfg.steps),
                    guidance_scale=float(cfg.guidance_scale), height=height, width=width, output_type="np")

        images: dict[str, np.ndarray] = {}
        records: dict[str, dict[str, Any]] = {t: {} for t in targets}
        from layerscope.progress import current as progress

        prog = progress(len(targets) * int(cfg.steps), "denoising steps")

        def on_step(_pipe: Any, _i: int, _t: Any, kw: dict[str, Any]) -> dict[str, Any]:
            prog.update(1)
            return kw

        if not batched:  # the note's way: hooks that zero every other group, one generation
            zero_modules = [n for g in zeroed[target] for n in model_groups[g]]
            gen = torch.Generator("cpu").manual_seed(seed)  # CPU noise: identical latents on any device
            with torch.no_grad(), ablate_cross_attention(pipe.unet, zero_modules, zero_pooled_text=zero_pooled[target],
                                                         record=records[target]):
                out = pipe(prompt=prompt, generator=gen, callback_on_step_end=on_step, **call)
            images[target] = np.asarray(out.images[0], dtype=np.float64)
        else:
            images = generate_batched(pipe, prompt, seed, targets, model_groups, zero_pooled, call,
                                      batch_size=int(cfg.batch_size or 0), records=records)
            prog.update(len(targets) * int(cfg.steps))
            out = None
        del pipe, out
        gc.collect()  # diffusers pipelines hold reference cycles: free it before the CLIP scorer loads
        if device.type == "cuda":
            torch.cuda.empty_cache()

        rgbs: dict[str, np.ndarray] = {}
        for t in targets:
            img = images[t]
            bad = int((~np.isfinite(img)).sum())
            if bad:
                raise RuntimeError(f"{spec.model} group {t} prompt {label} seed {seed}: the pipeline produced {bad} "
                                   f"non-finite pixel values (the SDXL VAE overflows in fp16: use dtype fp32/bf16)")
            rgbs[t] = (img * 255).round().clip(0, 255).astype(np.uint8)  # diffusers' numpy_to_pil rounding
            missing = [n for names in model_groups.values() for n in names if n not in records[t]]
            if missing:
                raise RuntimeError(f"attn2 module {missing[0]} never ran during generation")

        per_image = {t: {"target": t, "model_groups": list(model_groups), "zeroed_groups": zeroed[t],
                         "pooled_text": ("zero" if zero_pooled[t] else "keep") if has_pooled else "absent",
                         "prompt": prompt, "seed": seed} for t in targets}
        for t in targets:
            sub = f"/{t}" if batched else ""
            rgb = rgbs[t]
            writer.write(IMAGE_GROUP + sub, {"rgb": rgb}, attrs={
                "prompt": prompt, "prompt_label": label, "seed": seed, "group": t,
                "height": int(rgb.shape[0]), "width": int(rgb.shape[1])}, compress=True)
            for g, names in model_groups.items():
                for n in names:
                    writer.write(f"stats{sub}/{n}.hook_out", records[t][n].to_dict(), attrs={"group": g, "zeroed": g in zeroed[t]})
        writer.set_attr("ablation", {"batched": True, "targets": targets, "images": per_image} if batched else per_image[target])

        clip_name = cfg.clip_model
        if clip_name:
            from layerscope.models import clip as clipfam

            if clip_name not in spec.models:
                raise ValueError(f"probes.sdxl_ablation.clip_model '{clip_name}' is not in the shard's models (list it in aux_models)")
            model, proc = clipfam.load({"name": clip_name, **spec.models[clip_name]}, device, torch.float32)
            cos = clipfam.image_text_cosine(model, proc, [rgbs[t] for t in targets], [prompt] * len(targets))
            for t, c in zip(targets, cos):
                writer.write(CLIP_GROUP + (f"/{t}" if batched else ""), {"cosine": np.asarray(c, dtype=np.float64)},
                             attrs={"clip_model": clip_name})

    # ---------------------------------------------------------------- merge
    def merge(self, shards: list["Shard"]) -> dict[str, "pd.DataFrame"]:
        """Tables ``scores`` (one row per image) and ``images`` (exported PNG per shard).

        SSIM (skimage, RGB, data_range 255) to the same (prompt, seed)'s ``all`` image; the CLIP
        cosine when every shard has one.  PNGs go to ``results/<study>/<probe>/images/<model>/<shard>.png``
        beside the ``shards`` folder."""
        import numpy as np
        import pandas as pd
        from PIL import Image
        from skimage.metrics import structural_similarity

        from layerscope.h5io import ShardError
        from layerscope.layout import shard_label

        if not shards:
            raise ShardError("sdxl_ablation merge: no shards")
        rows: list[dict[str, Any]] = []
        images: dict[tuple[str, str, str, int], np.ndarray] = {}
        texts: dict[tuple[str, str], str] = {}
        for sh in shards:
            if sh.probe != self.name:
                raise ShardError(f"{sh.path}: shard of probe {sh.probe!r}, expected {self.name!r}")
            ax = sh.axes
            abl = sh.json_attr("ablation")
            if ax["group"] == BATCHED:  # one shard, every group of the (prompt, seed): image/<group>
                if not (isinstance(abl, dict) and abl.get("batched")):
                    raise ShardError(f"{sh.path}: group 'batched' but the shard holds no batched ablation")
                items = [(t, abl["images"][t], f"{IMAGE_GROUP}/{t}", f"stats/{t}/", f"{CLIP_GROUP}/{t}") for t in abl["targets"]]
            else:
                items = [(ax["group"], abl, IMAGE_GROUP, "stats/", CLIP_GROUP)]
            for group, ab, img_path, stats_prefix, clip_path in items:
                if img_path not in sh.groups:
                    raise ShardError(f"{sh.path}: no image for group {group}")
                rgb = sh.groups[img_path]["rgb"]
                key = (sh.model, ax["prompt"], group, int(ax["seed"]))
                if key in images:
                    raise ShardError(f"{sh.path}: duplicate image for {key} (batched and one-group shards mixed? rerun)")
                prev = texts.setdefault((sh.model, ax["prompt"]), ab["prompt"])
                if prev != ab["prompt"]:
                    raise ShardError(f"{sh.path}: prompt {ax['prompt']} is {ab['prompt']!r} here but {prev!r} in another shard (stale shards: rerun)")
                images[key] = rgb
                stats = [g for g in sh.subgroups("stats") if g.startswith(stats_prefix) and "/" not in g[len(stats_prefix):]]
                zeroed_max = [float(sh.groups[g]["max_abs"].max()) for g in stats if sh.group_attrs.get(g, {}).get("zeroed")]
                kept_max = [float(sh.groups[g]["max_abs"].max()) for g in stats if not sh.group_attrs.get(g, {}).get("zeroed")]
                label = shard_label({"group": group, "prompt": ax["prompt"], "seed": ax["seed"]})
                row = {"model": sh.model, "group": group, "prompt": ax["prompt"], "prompt_text": ab["prompt"],
                       "seed": int(ax["seed"]), "pooled_text": ab["pooled_text"],
                       "n_groups": len(ab["model_groups"]), "n_zeroed": len(ab["zeroed_groups"]),
                       "max_abs_zeroed_out": max(zeroed_max) if zeroed_max else 0.0,
                       "max_abs_kept_out": max(kept_max) if kept_max else 0.0,
                       "order": (ab["model_groups"] + list(CONTROLS)).index(group), "shard": str(sh.path),
                       "png_name": label + ".png"}
                if clip_path in sh.groups:
                    row["clip_cosine"] = float(sh.groups[clip_path]["cosine"])
                rows.append(row)
        n_clip = sum("clip_cosine" in r for r in rows)
        if 0 < n_clip < len(rows):
            raise ShardError("sdxl_ablation merge: some shards have a CLIP score and some do not (clip_model changed? rerun)")
        for r in rows:
            ref = images.get((r["model"], r["prompt"], "all", r["seed"]))
            if ref is None:
                raise ShardError(f"sdxl_ablation merge: no 'all' shard for model {r['model']} prompt {r['prompt']} seed {r['seed']}")
            img = images[(r["model"], r["prompt"], r["group"], r["seed"])]
            win = min(7, min(img.shape[:2]) - (1 - min(img.shape[:2]) % 2))
            r["ssim_to_all"] = float(structural_similarity(ref, img, channel_axis=-1, data_range=255, win_size=win))
            r["mean_abs_diff_to_all"] = float(np.abs(ref.astype(np.float64) - img).mean() / 255.0)
        scores = pd.DataFrame(rows).sort_values(["model", "prompt", "seed", "order"]).reset_index(drop=True)

        img_rows = []
        for r in scores.itertuples():
            path = Path(r.shard)  # PNGs are named by (group, prompt, seed), whichever shard holds them
            png = Path(images_dir_of_shard(path)) / r.png_name
            png.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[(r.model, r.prompt, r.group, r.seed)]).save(png)
            img_rows.append({"model": r.model, "group": r.group, "prompt": r.prompt, "prompt_text": r.prompt_text,
                             "seed": r.seed, "order": r.order, "shard": str(path), "png": str(png)})
        scores = scores.drop(columns=["shard", "png_name"])
        return with_model(shards, {"scores": scores, "images": pd.DataFrame(img_rows)})

    # ---------------------------------------------------------------- plot
    def plot(self, tables: dict[str, "pd.DataFrame"], fig_dir: Path, caption: str = "") -> None:
        """Comparison grids (all panels, and one per (model, prompt)) and scores: sdxl_ablation_plots."""
        plot_ablation(tables, fig_dir, caption)
