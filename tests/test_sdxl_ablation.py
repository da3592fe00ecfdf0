"""sdxl_ablation on the tiny SDXL pipeline: hooks, groups, determinism, and the probe end to end.

References are independent of the code under test: module groups from ``named_modules`` of
UNets built on the meta device from the real SDXL / SD 1.5 configs, plain capture hooks instead
of the probe's recorder, a CLIP cosine recomputed from the towers in float64 numpy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_hooks_documented, shard_hooks  # noqa: E402
import torch

from layerscope.h5io import Shard, ShardWriter
from layerscope.models import build_tiny
from layerscope.models import clip as clipfam
from layerscope.models import sdxl as fam
from layerscope.plan import ConfigError, Plan, validate_config
from layerscope.probes import get_probe
from layerscope.probes.sdxl_ablation import CONTROLS, ablate_cross_attention

torch.set_num_threads(1)

PROMPTS = ["a red cube on a table", "a photograph of a blue dog"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    wd = tmp_path_factory.mktemp("study")
    build_tiny("sdxl", "default", 0, wd / "results/default/models/sdxl_tiny")
    build_tiny("clip", "default", 0, wd / "results/default/models/clip_tiny")
    return wd


@pytest.fixture(scope="module")
def pipe(workdir):
    return fam.load({"kind": "path", "path": str(workdir / "results/default/models/sdxl_tiny")}, torch.device("cpu"), torch.float32)


def config(**probe) -> dict:
    cfg = {
        "models": {"sdxl_tiny": {"family": "sdxl", "source": "tiny:default"},
                   "clip_tiny": {"family": "clip", "source": "tiny:default"}},
        "probes": {"sdxl_ablation": {"models": ["sdxl_tiny"], "prompts": PROMPTS, "seeds": [0, 1],
                                     "steps": 2, "height": 32, "width": 32, **probe}},
    }
    validate_config(cfg)
    return cfg


def unet_inputs(pipe, seed: int = 0, text_seed: int = 1, pooled_seed: int = 2):
    u = pipe.unet
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=g)
    ehs = torch.randn(2, 77, u.config.cross_attention_dim, generator=torch.Generator().manual_seed(text_seed))
    pooled = torch.randn(2, 16, generator=torch.Generator().manual_seed(pooled_seed))
    time_ids = torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)
    return x, ehs, {"text_embeds": pooled, "time_ids": time_ids}


def unet_out(pipe, x, ehs, acd):
    with torch.no_grad():
        return pipe.unet(x, torch.tensor(500), encoder_hidden_states=ehs, added_cond_kwargs=acd).sample


def all_attn2(pipe, groups=None):
    groups = groups or fam.cross_attention_groups(pipe.unet)
    return [n for names in groups.values() for n in names]


# ------------------------------------------------------------------ groups


def _groups_by_named_modules(unet) -> list[str]:
    out = []
    for name, _ in unet.named_modules():
        if name.endswith(".attn2"):
            parts = name.split(".")
            out.append(".".join(parts[: parts.index("attentions") + 2]))
    return sorted(set(out))


SDXL_UNET = dict(down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                 block_out_channels=[320, 640, 1280], layers_per_block=2, transformer_layers_per_block=[1, 2, 10],
                 attention_head_dim=[5, 10, 20], cross_attention_dim=2048, use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, sample_size=128)
SD15_UNET = dict(down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                 block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, attention_head_dim=8,
                 cross_attention_dim=768, sample_size=64)


@pytest.mark.parametrize("cfg,n", [(SDXL_UNET, 11), (SD15_UNET, 16)])
def test_plan_time_groups_match_real_unet_layouts(cfg, n):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):  # the real architectures, without allocating their weights
        unet = UNet2DConditionModel(**cfg)
    derived = fam.cross_attention_groups_from_config(dict(unet.config))
    assert len(derived) == n
    assert sorted(derived) == _groups_by_named_modules(unet)
    assert list(fam.cross_attention_groups(unet)) == derived  # forward order: down, mid, up


def test_tiny_groups_and_auto_planning(workdir, pipe, monkeypatch):
    groups = fam.cross_attention_groups(pipe.unet)
    assert list(groups) == ["down_blocks.1.attentions.0", "mid_block.attentions.0",
                            "up_blocks.0.attentions.0", "up_blocks.0.attentions.1"]
    assert list(groups) == fam.cross_attention_groups_from_config(fam.TINY_ARCHS["default"]["unet"])
    monkeypatch.chdir(workdir)
    plan = Plan(config(groups="auto"), workdir)
    shards = plan.shards("sdxl_ablation")
    assert len(shards) == (4 + 2) * 2 * 2
    assert ("sdxl_tiny", "group-mid_block.attentions.0__prompt-p1__seed-0") in shards
    # a local checkpoint directory is read from its unet/config.json, still without torch
    cfg = config(groups="auto")
    cfg["models"]["sdxl_tiny"]["source"] = "results/default/models/sdxl_tiny"
    assert Plan(cfg, workdir).shards("sdxl_ablation") == shards
    # the prompt text is hashed (labels are positions), seeds are not
    h = plan.config_hash("sdxl_ablation", "sdxl_tiny")
    assert Plan(config(groups="auto", seeds=[0, 1, 2]), workdir).config_hash("sdxl_ablation", "sdxl_tiny") == h
    swapped = config(groups="auto", prompts=PROMPTS[::-1])
    assert Plan(swapped, workdir).config_hash("sdxl_ablation", "sdxl_tiny") != h


@pytest.mark.parametrize("probe,msg", [
    ({"groups": ["down_blocks.1.attn2"]}, "probes.sdxl_ablation.groups"),
    ({"clip_model": "clip_tiny"}, "probes.sdxl_ablation.aux_models"),
    ({"clip_model": "sdxl_tiny", "aux_models": ["sdxl_tiny"]}, "expected 'clip'"),
])
def test_bad_config_names_the_field(workdir, monkeypatch, probe, msg):
    monkeypatch.chdir(workdir)
    with pytest.raises(ConfigError, match=msg.replace("(", r"\(")):
        Plan(config(**probe), workdir)


# ------------------------------------------------------------------ hooks


def test_every_group_zeroed_makes_unet_independent_of_text(pipe):
    x, ehs, acd = unet_inputs(pipe)
    _, ehs2, acd2 = unet_inputs(pipe, text_seed=7, pooled_seed=8)
    assert not torch.equal(unet_out(pipe, x, ehs, acd), unet_out(pipe, x, ehs2, acd))  # the test can fail
    with ablate_cross_attention(pipe.unet, all_attn2(pipe)):
        a = unet_out(pipe, x, ehs, acd)
        assert torch.equal(a, unet_out(pipe, x, ehs2, acd))  # token sequence: no path left
        # SDXL's pooled embedding is a second text path the attn2 ablation does not close ...
        assert not torch.equal(a, unet_out(pipe, x, ehs2, acd2))
    with ablate_cross_attention(pipe.unet, all_attn2(pipe), zero_pooled_text=True):
        # ... pooled_text: zero closes it: the UNet no longer sees the text at all
        assert torch.equal(unet_out(pipe, x, ehs, acd), unet_out(pipe, x, ehs2, acd2))


@pytest.mark.parametrize("target", ["down_blocks.1.attentions.0", "up_blocks.0.attentions.1"])
def test_target_run_leaves_exactly_that_group_nonzero(pipe, target):
    groups = fam.cross_attention_groups(pipe.unet)
    zero = [n for g, names in groups.items() if g != target for n in names]
    seen: dict[str, float] = {}
    record: dict = {}
    x, ehs, acd = unet_inputs(pipe)
    with ablate_cross_attention(pipe.unet, zero, record=record):
        hs = [pipe.unet.get_submodule(n).register_forward_hook(
            lambda m, a, o, n=n: seen.__setitem__(n, float(o.abs().max()))) for n in all_attn2(pipe, groups)]
        try:
            unet_out(pipe, x, ehs, acd)
        finally:
            for h in hs:
                h.remove()
    for g, names in groups.items():
        for n in names:
            assert (seen[n] > 0) == (g == target), (n, seen[n])
            assert float(record[n].max_abs.max()) == seen[n]  # the probe's recorder agrees


def test_hooks_removed_restore_output_bit_for_bit(pipe):
    x, ehs, acd = unet_inputs(pipe)
    before = unet_out(pipe, x, ehs, acd)
    zero = all_attn2(pipe)[1:]
    with ablate_cross_attention(pipe.unet, zero, zero_pooled_text=True, record={}):
        assert not torch.equal(unet_out(pipe, x, ehs, acd), before)
    assert torch.equal(unet_out(pipe, x, ehs, acd), before)
    with pytest.raises(RuntimeError, match="boom"):
        with ablate_cross_attention(pipe.unet, zero, zero_pooled_text=True):
            raise RuntimeError("boom")
    assert torch.equal(unet_out(pipe, x, ehs, acd), before)
    assert not pipe.unet._forward_pre_hooks and all(not m._forward_hooks for m in pipe.unet.modules())


# ------------------------------------------------------------------ shards and merge


def run_shard(plan: Plan, shard: str, out: Path) -> Path:
    probe = get_probe("sdxl_ablation")
    spec = plan.spec("sdxl_ablation", "sdxl_tiny", shard)
    prov = {"probe": "sdxl_ablation", "model": "sdxl_tiny", "axes": spec.axes,
            "config_hash": spec.config_hash, "spec": spec.to_json_dict(), "data_digest": ""}
    path = out / plan.shard_path("sdxl_ablation", "sdxl_tiny", shard)
    with ShardWriter(path, prov) as w:
        probe.run_shard(spec, w)
    return path


def test_same_seed_same_image_and_failed_generation_fails_shard(workdir, monkeypatch, tmp_path):
    monkeypatch.chdir(workdir)
    plan = Plan(config(), workdir)
    s = "group-mid_block.attentions.0__prompt-p0__seed-0"
    a = Shard(run_shard(plan, s, tmp_path / "a")).groups["image"]["rgb"]
    b = Shard(run_shard(plan, s, tmp_path / "b")).groups["image"]["rgb"]
    c = Shard(run_shard(plan, s.replace("seed-0", "seed-1"), tmp_path / "a")).groups["image"]["rgb"]
    assert a.dtype == np.uint8 and a.shape == (32, 32, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)

    real_load = fam.load

    def nan_load(*args, **kw):
        p = real_load(*args, **kw)
        p.vae.decoder.register_forward_hook(lambda m, i, o: o * float("nan"))
        return p

    monkeypatch.setattr(fam, "load", nan_load)
    with pytest.raises(RuntimeError, match="non-finite"):
        run_shard(plan, s, tmp_path / "c")
    assert not list((tmp_path / "c").rglob("*.h5"))  # no shard file: Snakemake sees the job fail


def test_end_to_end_scores_grid_and_controls(workdir, monkeypatch, tmp_path):
    from skimage.metrics import structural_similarity

    monkeypatch.chdir(workdir)
    plan = Plan(config(groups="auto", seeds=[0, 1], pooled_text="zero",
                       clip_model="clip_tiny", aux_models=["clip_tiny"]), workdir)
    paths = [run_shard(plan, s, tmp_path) for _, s in plan.shards("sdxl_ablation")]
    probe = get_probe("sdxl_ablation")
    tables = probe.merge([Shard(p) for p in paths])
    sc, im = tables["scores"], tables["images"]
    assert len(sc) == len(im) == 24
    assert_hooks_documented("sdxl", shard_hooks(Shard(p) for p in paths))

    def img(prompt, group, seed):
        row = im[(im.prompt == prompt) & (im.group == group) & (im.seed == seed)]
        return Shard(row["shard"].iloc[0]).groups["image"]["rgb"]

    # controls: 'all' is the reference; with pooled_text zero the 'none' image ignores the prompt
    assert np.allclose(sc.loc[sc.group == "all", "ssim_to_all"], 1.0)
    for seed in (0, 1):
        assert np.array_equal(img("p0", "none", seed), img("p1", "none", seed))
        assert not np.array_equal(img("p0", "all", seed), img("p1", "all", seed))
        assert not np.array_equal(img("p0", "none", seed), img("p0", "all", seed))
    # every shard proves which groups were silent
    assert (sc["max_abs_zeroed_out"] == 0).all()
    assert (sc.loc[sc.group != "none", "max_abs_kept_out"] > 0).all()
    assert (sc.n_zeroed == sc.group.map(lambda g: {"all": 0, "none": 4}.get(g, 3))).all()
    # SSIM recomputed on the PNG exports; CLIP cosine recomputed from the towers in float64
    model, proc = clipfam.load({"kind": "path", "path": str(workdir / "results/default/models/clip_tiny")},
                               torch.device("cpu"), torch.float32)
    for r in sc.sample(4, random_state=0).itertuples():
        png = im[(im.prompt == r.prompt) & (im.group == r.group) & (im.seed == r.seed)]["png"].iloc[0]
        from PIL import Image

        x = np.asarray(Image.open(png))
        assert np.array_equal(x, img(r.prompt, r.group, r.seed))
        ref = img(r.prompt, "all", r.seed)
        assert r.ssim_to_all == pytest.approx(structural_similarity(ref, x, channel_axis=-1, data_range=255, win_size=7))
        b = proc(text=[r.prompt_text], images=[x], return_tensors="pt", padding=True)
        with torch.no_grad():
            v = model.visual_projection(model.vision_model(pixel_values=b["pixel_values"]).pooler_output)
            t = model.text_projection(model.text_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).pooler_output)
        v, t = v.double().numpy()[0], t.double().numpy()[0]
        assert r.clip_cosine == pytest.approx(v @ t / np.linalg.norm(v) / np.linalg.norm(t), abs=1e-6)
    assert sc.loc[(sc.prompt == "p1"), "prompt_text"].eq(PROMPTS[1]).all()
    # columns: groups in forward order, then the controls
    assert im.sort_values("order").group.drop_duplicates().tolist()[-2:] == list(CONTROLS)

    probe.plot({k: v.assign(model=v.model) for k, v in tables.items()}, tmp_path / "fig", caption="tiny")
    for f in ("comparison_grid.png", "scores.png", "comparison_grid-sdxl_tiny-p0.png"):
        assert (tmp_path / "fig" / f).stat().st_size > 1000


def test_merge_rejects_stale_prompt_text(workdir, monkeypatch, tmp_path):
    monkeypatch.chdir(workdir)
    s = "group-all__prompt-p0__seed-0"
    a = run_shard(Plan(config(), workdir), s, tmp_path / "a")
    b = run_shard(Plan(config(prompts=["another prompt"]), workdir), s.replace("all", "none"), tmp_path / "a")
    from layerscope.h5io import ShardError

    with pytest.raises(ShardError, match="stale"):
        get_probe("sdxl_ablation").merge([Shard(a), Shard(b)])


def test_explicit_group_missing_from_model_fails_the_shard(workdir, monkeypatch, tmp_path):
    monkeypatch.chdir(workdir)
    with pytest.raises(ConfigError, match=r"probes.sdxl_ablation.groups: model 'sdxl_tiny' has no cross-attention group "
                                          r"'down_blocks.0.attentions.0' \(it has down_blocks.1.attentions.0, "):
        Plan(config(groups=["down_blocks.0.attentions.0"]), workdir)  # the plan checks names against the UNet
    plan = Plan(config(), workdir)  # a shard label the plan would not make still fails its shard
    with pytest.raises(ValueError, match=r"probes.sdxl_ablation.groups: down_blocks.0.attentions.0 is not"):
        run_shard(plan, "group-down_blocks.0.attentions.0__prompt-p0__seed-0", tmp_path)
    assert not list(tmp_path.rglob("*.h5"))


# ------------------------------------------------------------------ batched ablation


def test_batched_hook_equals_note_hook_per_sample_under_cfg(pipe):
    """A batch of n samples x 2 guidance halves, each sample with its own keep-mask, equals the
    note's zeroing hooks run on each sample alone (rows i and i + n form sample i)."""
    from layerscope.probes.sdxl_ablation import ablate_cross_attention_batched

    groups = fam.cross_attention_groups(pipe.unet)
    targets = list(groups) + ["all", "none"]
    n = len(targets)
    zeroed = {t: [] if t == "all" else [g for g in groups if g != t] for t in targets}
    x, ehs, acd = unet_inputs(pipe)  # 2 rows: one (uncond, cond) pair
    rows = lambda t: torch.cat([t[:1].expand(n, *t.shape[1:]), t[1:].expand(n, *t.shape[1:])])  # noqa: E731
    xb, eb = rows(x), rows(ehs)
    ab = {k: rows(v) for k, v in acd.items()}
    keep = {nm: [g not in zeroed[t] for t in targets] for g, names in groups.items() for nm in names}
    zero_pooled = [t != "all" for t in targets]
    records = [{} for _ in targets]
    with ablate_cross_attention_batched(pipe.unet, keep, zero_pooled_text=zero_pooled, records=records):
        out = unet_out(pipe, xb, eb, ab)
    assert not pipe.unet._forward_pre_hooks and all(not m._forward_hooks for m in pipe.unet.modules())
    outs = []
    for i, t in enumerate(targets):
        rec: dict = {}
        with ablate_cross_attention(pipe.unet, [nm for g in zeroed[t] for nm in groups[g]],
                                    zero_pooled_text=zero_pooled[i], record=rec):
            ref = unet_out(pipe, x, ehs, acd)
        outs.append(ref)
        torch.testing.assert_close(out[[i, i + n]], ref, rtol=1e-5, atol=1e-6)
        for nm in rec:
            np.testing.assert_allclose(records[i][nm].max_abs, rec[nm].max_abs, rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(records[i][nm].mean, rec[nm].mean, rtol=1e-4, atol=1e-7)
            assert np.array_equal(records[i][nm].count, rec[nm].count)
    assert not torch.allclose(outs[0], outs[1])  # the samples really differ: the masks matter


def test_batched_shards_equal_one_at_a_time_images_tables_and_figures(workdir, monkeypatch, tmp_path):
    """Same study, batch_groups false vs true: identical images (within one uint8 step), identical
    merged tables (but the shard file column) and the same figures."""
    import weakref

    from PIL import Image

    monkeypatch.chdir(workdir)
    kw = dict(groups="auto", seeds=[3], prompts=PROMPTS[:1], pooled_text="zero", clip_model="clip_tiny", aux_models=["clip_tiny"])
    one = Plan(config(**kw), workdir)
    bat = Plan(config(batch_groups=True, batch_size=4, **kw), workdir)  # 6 images in runs of 4 + 2
    assert [s for _, s in bat.shards("sdxl_ablation")] == ["group-batched__prompt-p0__seed-3"]
    assert len(one.shards("sdxl_ablation")) == 6

    # the pipeline is gone (not just unnamed) before the CLIP scorer loads
    refs: list = []
    real_load, real_clip = fam.load, clipfam.load
    monkeypatch.setattr(fam, "load", lambda *a, **k: (refs.append(weakref.ref(p := real_load(*a, **k))), p)[1])

    def clip_load(*a, **k):
        assert refs and refs[-1]() is None, "SDXL pipeline still alive while CLIP loads"
        return real_clip(*a, **k)

    monkeypatch.setattr(clipfam, "load", clip_load)
    pa = [run_shard(one, s, tmp_path / "one") for _, s in one.shards("sdxl_ablation")]
    pb = [run_shard(bat, s, tmp_path / "bat") for _, s in bat.shards("sdxl_ablation")]
    probe = get_probe("sdxl_ablation")
    from layerscope.merge import check_layout

    for p in pa + pb:  # both layouts pass the merge's structural checks (a batched shard once did not)
        assert check_layout(Shard(p), probe) == [], p
    assert probe.expected_groups(Shard(pb[0])) == [f"image/{t}" for t in [*fam.cross_attention_groups_from_config(
        fam.TINY_ARCHS["default"]["unet"]), *CONTROLS]]
    ta, tb = probe.merge([Shard(p) for p in pa]), probe.merge([Shard(p) for p in pb])
    for (g, s), path in zip(((r.group, r.seed) for r in ta["images"].itertuples()), ta["images"]["png"]):
        b = tb["images"][(tb["images"].group == g) & (tb["images"].seed == s)]["png"].iloc[0]
        assert Path(b).name == Path(path).name
        ia, ib = np.asarray(Image.open(path)).astype(int), np.asarray(Image.open(b)).astype(int)
        assert np.abs(ia - ib).max() <= 1 and (ia != ib).mean() < 0.01, g
    import pandas as pd

    pd.testing.assert_frame_equal(ta["scores"], tb["scores"], rtol=1e-3)
    assert set(ta["scores"].group) == set(fam.cross_attention_groups_from_config(fam.TINY_ARCHS["default"]["unet"])) | set(CONTROLS)
    pd.testing.assert_frame_equal(ta["images"].drop(columns=["shard", "png"]), tb["images"].drop(columns=["shard", "png"]))
    assert (ta["scores"]["max_abs_zeroed_out"] == 0).all() and (tb["scores"]["max_abs_zeroed_out"] == 0).all()
    probe.plot(ta, tmp_path / "fa")
    probe.plot(tb, tmp_path / "fb")
    for f in ("comparison_grid.png", "comparison_grid-sdxl_tiny-p0.png"):
        fa, fb = (np.asarray(Image.open(tmp_path / d / f)).astype(int) for d in ("fa", "fb"))
        assert fa.shape == fb.shape and np.abs(fa - fb).mean() < 0.5
    # mixing the two layouts is refused, not double counted
    from layerscope.h5io import ShardError

    with pytest.raises(ShardError, match="duplicate"):
        probe.merge([Shard(p) for p in pa + pb])


# ---- figures: the plot step writes exactly the figures the plan declares ------------------------

def fake_tables(root: Path, panels: dict[str, list[str]], seeds=(0, 1)) -> list[Path]:
    """Merged tables (images.csv, scores.csv) per model without any model: random 8x8 PNGs, the
    columns the plot reads. ``panels``: model -> the prompt labels its tables hold."""
    import pandas as pd
    from PIL import Image

    rng = np.random.default_rng(0)
    dirs = []
    for m, labels in panels.items():
        d = root / "tables" / m
        d.mkdir(parents=True)
        img_rows, score_rows = [], []
        for p in labels:
            for s in seeds:
                for order, g in enumerate(["down_blocks.1.attentions.0", *CONTROLS]):
                    png = root / "images" / m / f"group-{g}__prompt-{p}__seed-{s}.png"
                    png.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(png)
                    row = {"model": m, "group": g, "prompt": p, "prompt_text": f"text of {p}", "seed": s, "order": order}
                    img_rows.append({**row, "shard": "x.h5", "png": str(png)})
                    score_rows.append({**row, "ssim_to_all": 1.0 if g == "all" else rng.uniform(-1, 1)})
        pd.DataFrame(img_rows).to_csv(d / "images.csv", index=False)
        pd.DataFrame(score_rows).to_csv(d / "scores.csv", index=False)
        dirs.append(d)
    return dirs


def declared(tmp_path: Path, models: list[str], prompts: list[str]) -> dict[str, str | None]:
    cfg = config(groups=["down_blocks.1.attentions.0"], prompts=prompts)
    cfg["models"].update({m: {"family": "sdxl", "source": "tiny:default"} for m in models})
    cfg["probes"]["sdxl_ablation"]["models"] = models
    return Plan(cfg, tmp_path).figure_names("sdxl_ablation")


def test_plot_writes_exactly_the_declared_figures_for_two_models_and_two_prompts(tmp_path):
    from layerscope.cli import main

    names = declared(tmp_path, ["sdxl_tiny", "sdxl-b"], PROMPTS)
    grids = {f"comparison_grid-{m}-{p}": m for m in ("sdxl_tiny", "sdxl-b") for p in ("p0", "p1")}
    assert names == {"comparison_grid": None, "scores": None, **grids}
    dirs = fake_tables(tmp_path, {"sdxl_tiny": ["p0", "p1"], "sdxl-b": ["p0", "p1"]})
    fig = tmp_path / "figures"
    rc = main(["plot", "--probe", "sdxl_ablation", "--out-dir", str(fig), "--caption", "(test)",
               "--figures", ",".join(names), *map(str, dirs)])
    assert rc == 0
    assert sorted(p.name for p in fig.iterdir()) == sorted(f"{n}.{e}" for n in names for e in ("png", "pdf"))
    for n in names:  # a real PNG and a real PDF each; a grid's size follows its panel (3 groups x 2 seeds)
        assert (fig / f"{n}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (fig / f"{n}.pdf").read_bytes()[:5] == b"%PDF-"
    from PIL import Image

    w, h = Image.open(fig / "comparison_grid-sdxl-b-p1.png").size
    assert (w, h) == (round(3 * 1.3 * 150), round((2 * 1.3 + 0.6) * 150))


def test_plot_fails_on_a_declared_grid_it_cannot_draw_and_on_an_undeclared_one(tmp_path):
    from layerscope.errors import DataError
    from layerscope.merge import plot_from_tables

    # stale tables: the plan has two prompts, model sdxl-b's tables only p0
    names = declared(tmp_path, ["sdxl_tiny", "sdxl-b"], PROMPTS)
    dirs = fake_tables(tmp_path / "a", {"sdxl_tiny": ["p0", "p1"], "sdxl-b": ["p0"]})
    fig = tmp_path / "a" / "figures"
    with pytest.raises(DataError, match=r"declared figure file\(s\) not drawn: comparison_grid-sdxl-b-p1\.png, "
                                        r"comparison_grid-sdxl-b-p1\.pdf .*rerun the sdxl_ablation_merge rule"):
        plot_from_tables("sdxl_ablation", dirs, fig, "", names)
    assert list(fig.iterdir()) == []  # nothing half-written, no scratch folder left
    # a panel the plan did not declare (one prompt planned, tables hold two): refused, nothing written
    names = declared(tmp_path, ["sdxl_tiny"], PROMPTS[:1])
    dirs = fake_tables(tmp_path / "b", {"sdxl_tiny": ["p0", "p1"]})
    fig = tmp_path / "b" / "figures"
    with pytest.raises(DataError, match=r"undeclared figure file\(s\) drawn: comparison_grid-sdxl_tiny-p1\.pdf, "
                                        r"comparison_grid-sdxl_tiny-p1\.png"):
        plot_from_tables("sdxl_ablation", dirs, fig, "", names)
    assert list(fig.iterdir()) == []
    # without the plan's names only the static figures are declared: the grids are refused too
    with pytest.raises(DataError, match=r"undeclared figure file\(s\) drawn: comparison_grid-sdxl_tiny-p0\.pdf"):
        plot_from_tables("sdxl_ablation", dirs, fig, "")


def test_a_prompt_removed_from_the_config_leaves_no_stale_grid(tmp_path, capsys):
    """Plotting with two prompts, then with one: the second prompt's grids (no longer declared) are
    removed from the figure folder, the declared set stays, and a line says what was removed."""
    from layerscope.merge import plot_from_tables

    fig = tmp_path / "figures"
    plot_from_tables("sdxl_ablation", fake_tables(tmp_path / "two", {"sdxl_tiny": ["p0", "p1"]}), fig, "",
                     declared(tmp_path, ["sdxl_tiny"], PROMPTS))
    assert (fig / "comparison_grid-sdxl_tiny-p1.png").is_file()
    (fig / "notes.txt").write_text("kept: not a figure file")
    names = declared(tmp_path, ["sdxl_tiny"], PROMPTS[:1])
    plot_from_tables("sdxl_ablation", fake_tables(tmp_path / "one", {"sdxl_tiny": ["p0"]}), fig, "", names)
    want = sorted(f"{n}{s}" for n in names for s in (".png", ".pdf"))
    assert sorted(p.name for p in fig.iterdir()) == sorted(want + ["notes.txt"])
    assert "removed" in capsys.readouterr().err and "comparison_grid-sdxl_tiny-p1.png" not in want
