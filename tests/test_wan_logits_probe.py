"""wan_logits end to end on the tiny model: build (UMT5 + tokenizer + transformer), run shards of two
seeds (one with full logits), merge, plot.  Merged tables are checked against the sidecar full logits
(an independent float16 copy) and against sums of the per-seed shards."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from conftest import assert_hooks_documented, shard_hooks  # noqa: E402
import torch

torch.set_num_threads(1)

from layerscope.h5io import Shard, ShardWriter  # noqa: E402
from layerscope.models import wan  # noqa: E402
from layerscope.probes import get_probe  # noqa: E402
from layerscope.probes.base import ShardSpec  # noqa: E402
from layerscope.probes.wan_logits import sink_metrics  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("wan_tiny")
    wan.build_tiny("default", 0, d)
    return d


def test_probe_end_to_end(model_dir, tmp_path):
    probe = get_probe("wan_logits")
    pcfg = {"models": ["wan_tiny"], "prompt": "a cat walking on the beach", "max_sequence_length": 12,
            "num_frames": 9, "num_frame_per_block": 3, "latent_size": [4, 6], "denoising_steps": [1000, 750, 500, 250],
            "steps": [1], "chunks": [0, -1], "layer_groups": [[0, 3]], "seeds": [1, 2], "query_chunk": 5}
    mcfg = {"family": "wan", "kind": "tiny", "path": str(model_dir), "dtype": "fp32"}
    assert probe.axis_values(pcfg, "wan_tiny", mcfg) == {"layers": ["0-3"], "step": ["1"], "seed": ["1", "2"]}
    shards = []
    for seed in (1, 2):
        spec = ShardSpec(probe="wan_logits", model="wan_tiny", axes={"layers": "0-3", "step": "1", "seed": str(seed)},
                         probe_cfg={**pcfg, "save_logits": seed == 1}, model_cfg=mcfg, device="cpu")
        out = tmp_path / f"layers-0-3__step-1__seed-{seed}.h5"
        with ShardWriter(out, {"probe": "wan_logits", "model": "wan_tiny", "axes": spec.axes}) as w:
            probe.run_shard(spec, w)
        shards.append(Shard(out))
    sh1 = shards[0]
    assert_hooks_documented("wan", shard_hooks(shards))
    fsl = 2 * 3
    geo = __import__("json").loads(sh1.group_attrs["stats/blocks.3.attn.hook_attn_scores/chunk2"]["geometry"])
    assert geo["frame_seq_length"] == fsl and geo["num_key_frames"] == 9 and geo["query_frames"] == [6, 7, 8]
    assert geo["timestep"] == pytest.approx(937.5)  # step 1 of [1000, 750, ...] at shift 5
    # the sidecar's full float16 logits reduce to the shard's sums
    with h5py.File(tmp_path / "layers-0-3__step-1__seed-1.logits.h5") as f:
        full = f["blocks.3.attn.hook_attn_scores/chunk2/logits"][()].astype(np.float64)
        assert f["blocks.0.attn.hook_attn_scores/chunk0/logits"].shape == (1, 2, 3 * fsl, 3 * fsl)
    assert full.shape == (1, 2, 3 * fsl, 9 * fsl)
    g1 = sh1.groups["stats/blocks.3.attn.hook_attn_scores/chunk2"]
    lf = full.reshape(1, 2, 3, fsl, 9, fsl)
    np.testing.assert_allclose(g1["logit_sum"], lf.sum(axis=(0, 3, 5)), rtol=2e-3, atol=2e-2)
    p = np.exp(full - full.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(g1["mass_sum"], p.reshape(1, 2, 3, fsl, 9, fsl).sum(axis=(0, 3, 5)), atol=5e-3)

    tables = probe.merge(shards)
    prof, mets = tables["frame_profile"], tables["sink_metrics"]
    assert set(prof["layer"]) == {0, 3} and set(prof["chunk"]) == {0, 2} and (prof["n_seeds"] == 2).all()
    # merged means: sums of both seeds over the total query tokens
    g2 = shards[1].groups["stats/blocks.3.attn.hook_attn_scores/chunk2"]
    want_logit = (g1["logit_sum"].sum(1) + g2["logit_sum"].sum(1)) / (2 * 3 * fsl * fsl)
    want_mass = (g1["mass_sum"].sum(1) + g2["mass_sum"].sum(1)) / (2 * 3 * fsl)
    sub = prof[(prof.layer == 3) & (prof.chunk == 2)].sort_values(["head", "key_frame"])
    np.testing.assert_allclose(sub["mean_logit"].to_numpy().reshape(2, 9), want_logit, rtol=1e-12)
    np.testing.assert_allclose(sub["mass"].to_numpy().reshape(2, 9), want_mass, rtol=1e-12)
    np.testing.assert_allclose(prof.groupby(["layer", "chunk", "head"])["mass"].sum(), 1.0, rtol=1e-6)
    assert not (g1["logit_sum"] == g2["logit_sum"]).all()  # different seeds, different attention
    m = mets[(mets.layer == 3) & (mets.chunk == 2) & (mets["head"] == 1)].iloc[0]
    mass, logit = want_mass[1], want_logit[1]
    assert m.first_frame_mass == pytest.approx(mass[0]) and m.first_k_mass == pytest.approx(mass[:3].sum())
    assert m.current_chunk_mass == pytest.approx(mass[6:].sum())
    assert m.first_minus_middle_logit == pytest.approx(logit[0] - logit[4])
    q = mass / mass.sum()
    assert m.entropy_frames == pytest.approx(-(q * np.log(q)).sum())
    assert mets[(mets.chunk == 0)]["current_chunk_mass"].to_numpy() == pytest.approx(1.0)
    lat = sh1.groups["stats/hook_latents"]
    assert lat["count"].tolist() == [9 * 4 * 6] * 4 and lat["nonfinite"].sum() == 0

    probe.plot({k: v for k, v in tables.items()}, tmp_path / "fig", caption="(tiny)")
    for name in probe.figures:
        assert (tmp_path / "fig" / f"{name}.png").stat().st_size > 1000


def test_sink_metrics_uniform():
    s = sink_metrics(np.zeros(6), np.full(6, 1 / 6), chunk_start=3, first_k=2)
    assert s["entropy_frames_norm"] == pytest.approx(1.0) and s["first_k_mass"] == pytest.approx(1 / 3)
    assert s["current_chunk_mass"] == pytest.approx(0.5) and s["first_minus_middle_logit"] == 0.0


def test_bad_layer_group_is_named(model_dir, tmp_path):
    probe = get_probe("wan_logits")
    spec = ShardSpec(probe="wan_logits", model="m", axes={"layers": "0-9", "step": "0", "seed": "0"},
                     probe_cfg={"num_frames": 3, "latent_size": [4, 4], "max_sequence_length": 4},
                     model_cfg={"family": "wan", "kind": "tiny", "path": str(model_dir)}, device="cpu")
    with pytest.raises(ValueError, match="layer_groups"), ShardWriter(tmp_path / "x.h5", {}) as w:
        probe.run_shard(spec, w)
