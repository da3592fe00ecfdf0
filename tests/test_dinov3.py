"""DINOv3 channel statistics against an independent numpy computation on the hidden states."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_hooks_documented  # noqa: E402
import torch

from layerscope.data import load_image, read_index
from layerscope.h5io import ShardWriter
from layerscope.merge import load_shards, merge_to_tables
from layerscope.models.dinov3 import IMAGENET_MEAN, IMAGENET_STD
from layerscope.plan import Plan, canonical_hash, shard_label
from layerscope.probes.dinov3_channels import DinoV3Channels, massive_mask

SIZE = 64


def _spec(model_dir, index, slice_label="0of1", lora=None, **probe):
    from layerscope.probes.base import ShardSpec

    pcfg = {"dataset": "photos", "batch_size": 5, "image_size": SIZE, "topk": 8, "layers": "all", "max_images": 0, **probe}
    mcfg = {"family": "dinov3", "kind": "path", "path": str(model_dir), "lora": lora, "dtype": "fp32"}
    return ShardSpec(probe="dinov3_channels", model="m", axes={"slice": slice_label}, probe_cfg=pcfg, model_cfg=mcfg,
                     datasets={"photos": {"kind": "skimage", "index": str(index)}}, config_hash="h", device="cpu")


def _run(spec, out: Path) -> Path:
    prov = {"probe": spec.probe, "model": spec.model, "axes": spec.axes, "config_hash": spec.config_hash,
            "data_digest": "d", "spec": spec.to_json_dict()}
    with ShardWriter(out, prov) as w:
        DinoV3Channels().run_shard(spec, w)
    return out


def _reference(model, index, n_images=None):
    """Independent path: numpy on hidden states from a plain HF forward, LayerNorms written out."""
    recs = read_index(index)[:n_images]
    arr = np.stack([np.asarray(load_image(r.path, SIZE), dtype=np.float64) / 255.0 for r in recs])
    arr = (arr - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    pix = torch.tensor(arr.transpose(0, 3, 1, 2), dtype=torch.float32)
    with torch.no_grad():
        hs = model(pixel_values=pix, output_hidden_states=True).hidden_states
    R = model.config.num_register_tokens
    w = model.norm.weight.detach().double().numpy()
    b = model.norm.bias.detach().double().numpy()
    eps = model.config.layer_norm_eps
    out = {}
    for i in range(model.config.num_hidden_layers):
        x = hs[i + 1].double().numpy()
        ln = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
        for rep, y in (("pre", x), ("per_layer_ln", ln), ("global_ln", ln * w + b)):
            out[(i, rep, "cls")] = y[:, 0]
            out[(i, rep, "patch")] = y[:, 1 + R:].reshape(-1, y.shape[-1])
    return out


def _check_against_reference(tables, ref, rtol=2e-4, atol=2e-5, std_eps=1e-8):
    ch = tables["channels"]
    for (i, rep, role), x in ref.items():
        sub = ch[(ch.layer == i) & (ch.rep == rep) & (ch.role == role)].sort_values("channel")
        assert len(sub) == x.shape[1]
        np.testing.assert_array_equal(sub["count"], x.shape[0])
        np.testing.assert_allclose(sub["mean"], x.mean(0), rtol=rtol, atol=atol)
        np.testing.assert_allclose(sub["std"], np.sqrt(x.var(0) + std_eps), rtol=rtol, atol=atol)  # note 004's std
        np.testing.assert_allclose(sub["max_abs"], np.abs(x).max(0), rtol=rtol, atol=atol)
        lay = tables["layers"]
        row = lay[(lay.layer == i) & (lay.rep == rep) & (lay.role == role)].iloc[0]
        top = np.sort(np.abs(x).ravel())[::-1]
        np.testing.assert_allclose([row.top1, row.top2, row.top3], top[:3], rtol=rtol)
        med = np.median(np.abs(x))
        assert abs(row.median_abs - med) <= 0.125 * med


@pytest.fixture(scope="module")
def model(dinov3_dir):
    from transformers import DINOv3ViTModel

    return DINOv3ViTModel.from_pretrained(dinov3_dir).eval()


def test_stats_equal_numpy_reference_all_reps_and_roles(tmp_path, dinov3_dir, photos_index, model):
    sh = _run(_spec(dinov3_dir, photos_index), tmp_path / "slice-0of1.h5")
    tables = DinoV3Channels().merge(load_shards([sh], "dinov3_channels", "m"))
    ref = _reference(model, photos_index)
    assert {k[1] for k in ref} == {"pre", "per_layer_ln", "global_ln"}
    # the three representations really differ in the tiny model (the norms carry an affine)
    assert not np.allclose(ref[(1, "per_layer_ln", "patch")], ref[(1, "global_ln", "patch")])
    _check_against_reference(tables, ref)
    assert_hooks_documented("dinov3", {h for name in ("channels", "layers", "outliers") for h in tables[name]["hook"]})
    assert tables["channels"]["hook"].str.match(r"blocks\.\d\.(hook_resid_post|ln_layer\.hook_normalized|ln_final\.hook_normalized)").all()


def test_std_eps_default_is_the_notes_and_zero_gives_the_plain_std(tmp_path, dinov3_dir, photos_index, model):
    """Merge-side epsilon: one shard, merged under three settings, against numpy's population std."""
    ref = _reference(model, photos_index, n_images=4)
    x = ref[(2, "pre", "patch")]
    for key, eps in ((None, 1e-8), (0.0, 0.0), (0.5, 0.5)):  # None: key absent, the default
        extra = {} if key is None else {"std_eps": key}
        sh = _run(_spec(dinov3_dir, photos_index, max_images=4, **extra), tmp_path / f"e{key}" / "slice-0of1.h5")
        tables = DinoV3Channels().merge(load_shards([sh], "dinov3_channels", "m"))
        ch = tables["channels"]
        sub = ch[(ch.layer == 2) & (ch.rep == "pre") & (ch.role == "patch")].sort_values("channel")
        np.testing.assert_allclose(sub["std"], np.sqrt(x.var(0) + eps), rtol=2e-5)
        if eps == 0.0:
            np.testing.assert_allclose(sub["std"], x.std(0), rtol=2e-5)
        lay = tables["layers"]
        row = lay[(lay.layer == 2) & (lay.rep == "pre") & (lay.role == "patch")].iloc[0]
        assert abs(row.std_mean - np.sqrt(x.var(0) + eps).mean()) <= 2e-5 * row.std_mean
    # a constant channel: the note's std is sqrt(1e-8) = 1e-4, not 0; NaN (no value seen) stays NaN
    from layerscope.probes.dinov3_channels import STD_EPS_NOTE, channel_std
    from layerscope.probes import get_probe

    assert STD_EPS_NOTE == 1e-8 == get_probe("dinov3_channels").settings({}).std_eps  # the note's value is the schema's default

    np.testing.assert_array_equal(channel_std(np.array([0.0, np.nan, 4.0]), 1e-8)[[0, 2]], [1e-4, np.sqrt(4.0 + 1e-8)])
    assert np.isnan(channel_std(np.array([np.nan]), 1e-8)[0]) and channel_std(np.array([0.0]), 0.0)[0] == 0.0


def test_merging_shards_split_several_ways_equals_one_shard(tmp_path, dinov3_dir, photos_index):
    one = DinoV3Channels().merge(load_shards([_run(_spec(dinov3_dir, photos_index), tmp_path / "slice-0of1.h5")], "dinov3_channels", "m"))
    for n in (2, 3):
        paths = [_run(_spec(dinov3_dir, photos_index, f"{i}of{n}"), tmp_path / f"n{n}" / f"slice-{i}of{n}.h5") for i in range(n)]
        for order in (paths, paths[::-1]):
            many = DinoV3Channels().merge(load_shards(order, "dinov3_channels", "m"))
            a, b = one["channels"], many["channels"]
            np.testing.assert_array_equal(a["count"], b["count"])
            np.testing.assert_array_equal(a["max_abs"], b["max_abs"])
            np.testing.assert_allclose(a["mean"], b["mean"], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(a["std"], b["std"], rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(one["layers"][["top1", "top2", "top3", "median_abs"]], many["layers"][["top1", "top2", "top3", "median_abs"]])


def test_lora_changes_statistics_and_matches_merged_reference(tmp_path, dinov3_dir, photos_index):
    from peft import LoraConfig, get_peft_model
    from transformers import DINOv3ViTModel

    base = DINOv3ViTModel.from_pretrained(dinov3_dir).eval()
    torch.manual_seed(1)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)  # LoRA B starts at zero; make the adapter do something
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = peft_model.merge_and_unload().eval()

    sh_base = _run(_spec(dinov3_dir, photos_index), tmp_path / "base" / "slice-0of1.h5")
    sh_lora = _run(_spec(dinov3_dir, photos_index, lora=str(tmp_path / "adapter")), tmp_path / "lora" / "slice-0of1.h5")
    t_base = DinoV3Channels().merge(load_shards([sh_base], "dinov3_channels", "m"))
    t_lora = DinoV3Channels().merge(load_shards([sh_lora], "dinov3_channels", "m"))
    assert not np.allclose(t_base["channels"]["std"], t_lora["channels"]["std"], rtol=1e-3)
    _check_against_reference(t_lora, _reference(merged, photos_index))


def test_untied_cls_norm_is_honoured(tmp_path, dinov3_dir, photos_index, monkeypatch):
    """A model with a separate CLS norm (DINOv3's untie option) normalises CLS with it."""
    import layerscope.models.dinov3 as d

    real_load = d.load
    cls_norm = torch.nn.LayerNorm(64)
    with torch.no_grad():
        cls_norm.weight.fill_(3.0)
        cls_norm.bias.fill_(-1.0)

    def load_with_cls_norm(cfg, device, dtype):
        m = real_load(cfg, device, dtype)
        m.cls_norm = cls_norm
        return m

    monkeypatch.setattr(d, "load", load_with_cls_norm)
    sh = _run(_spec(dinov3_dir, photos_index, max_images=4), tmp_path / "slice-0of1.h5")
    t = DinoV3Channels().merge(load_shards([sh], "dinov3_channels", "m"))
    ch = t["channels"]
    cls_g = ch[(ch.rep == "global_ln") & (ch.role == "cls")]
    cls_l = ch[(ch.rep == "per_layer_ln") & (ch.role == "cls")]
    # cls_norm(x) = 3 * LN(x) - 1 per channel, so mean and std follow exactly
    np.testing.assert_allclose(cls_g["mean"].to_numpy(), 3.0 * cls_l["mean"].to_numpy() - 1.0, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(cls_g["std"].to_numpy(), 3.0 * cls_l["std"].to_numpy(), rtol=1e-4)


def test_massive_activation_criterion():
    top1 = np.array([150.0, 150.0, 99.0, 5000.0])
    med = np.array([0.1, 0.2, 0.001, 10.0])
    np.testing.assert_array_equal(massive_mask(top1, med, 100.0, 1000.0), [True, False, False, False])
