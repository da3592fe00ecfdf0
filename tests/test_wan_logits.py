"""wan_logits: block-causal Wan inference with a KV cache and attention-logit capture, on the tiny model.

References are independent of the code under test: a full-sequence recompute under a block-causal mask
(diffusers' own RoPE, no cache), diffusers' stock WanAttnProcessor, numpy float64 reductions of fully
materialised logits, and diffusers' own Wan checkpoint converter."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

from diffusers import WanTransformer3DModel  # noqa: E402
from diffusers.models.transformers.transformer_wan import WanAttnProcessor  # noqa: E402

from layerscope.models import wan  # noqa: E402
from layerscope.models import wan_sampler  # noqa: E402

DEV = torch.device("cpu")


@pytest.fixture(scope="module")
def tr() -> WanTransformer3DModel:
    torch.manual_seed(0)
    return WanTransformer3DModel(**wan.TINY_ARCHS["default"]).eval()


def _text(seed: int = 1) -> torch.Tensor:
    return torch.randn((1, 8, 32), generator=torch.Generator().manual_seed(seed))


def _noise(frames: int, h: int, w: int, seed: int = 2) -> torch.Tensor:
    return torch.randn((1, 4, frames, h, w), generator=torch.Generator().manual_seed(seed))


def _capture(layers, passes, qc=7):
    store: dict = {}

    def sinks_for(layer, geo):
        red = wan.FrameReducer(geo["heads"], geo["num_query_frames"], geo["num_key_frames"], geo["frame_seq_length"], DEV)
        full = np.full((geo["batch"], geo["heads"], geo["q_len"], geo["k_len"]), np.nan, np.float32)
        store[(layer, geo["chunk"], geo["step"])] = (geo, red, full)
        return [red, wan.FullLogitsSink(full)]

    return wan.CaptureRequest(frozenset(layers), frozenset(passes), sinks_for, query_chunk=qc), store


def test_kv_cache_equals_block_causal_recompute(tr, monkeypatch):
    cfg = wan.GenerationConfig(num_frames=9, block_frames=3)
    text, noise = _text(), _noise(9, 8, 8)
    passes = [(0, 0), (1, 2), (2, 0), (2, 3), (2, "clean"), (1, "clean")]
    cap_a, got_a = _capture([0, 2, 3], passes)
    cap_b, got_b = _capture([0, 2, 3], passes)
    a = wan.generate(tr, text, noise, cfg, "cache", capture=cap_a, step_noise_seed=5)
    b = wan.generate(tr, text, noise, cfg, "mask", capture=cap_b, step_noise_seed=5)
    assert torch.isfinite(a).all() and a.abs().max() > 0.1
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert set(got_a) == set(got_b) == {(lay, c, s) for lay in (0, 2, 3) for c, s in passes}
    for key, (geo_a, red_a, full_a) in got_a.items():
        geo_b, red_b, full_b = got_b[key]
        assert not np.isnan(full_a).any()
        for g in ("frame_seq_length", "num_query_frames", "num_key_frames", "query_frames", "key_frames", "q_len", "k_len", "timestep"):
            assert geo_a[g] == geo_b[g], (key, g)
        np.testing.assert_allclose(full_a, full_b, rtol=1e-5, atol=1e-5)
        for name in ("logit_sum", "mass_sum", "logit_max"):
            np.testing.assert_allclose(red_a.arrays()[name], red_b.arrays()[name], rtol=1e-5, atol=1e-4)
    # the comparison can fail: without the block-causal mask the recompute is a different computation
    monkeypatch.setattr(wan_sampler, "block_causal_mask", lambda n, bf, fsl, dev: torch.ones(n * fsl, n * fsl, dtype=torch.bool))
    c = wan.generate(tr, text, noise, cfg, "mask", step_noise_seed=5)
    assert (c - a).abs().max() > 1e-3


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(2, (heads, -1))


def test_softmax_of_captured_logits_times_v_is_stock_attention_mask_mode(tr):
    """Full-sequence call: the last chunk's queries see every key, so the stock (unmasked) processor is the reference."""
    attn = tr.blocks[1].attn1
    frames, fsl, bf = 9, 16, 3
    x = torch.randn((1, frames * fsl, 32), generator=torch.Generator().manual_seed(3))
    rot = tr.rope(torch.zeros(1, 4, frames, 8, 8))
    cap, got = _capture([1], [(2, 0)], qc=5)
    state = wan.CausalState(mode="mask", block_frames=bf, frame_seq_length=fsl, start_frame=6, capture=cap, current=(2, 0),
                            mask=wan.block_causal_mask(frames, bf, fsl, DEV))
    with torch.no_grad():
        ours = wan.CausalWanAttnProcessor(1, state)(attn, x, None, None, rot)
        stock = WanAttnProcessor()(attn, x, None, None, rot)
        geo, _, logits = got[(1, 2, 0)]
        v = _heads(attn.to_v(x), attn.heads).transpose(1, 2).double()  # [B, H, K, D]
        p = torch.softmax(torch.from_numpy(logits).double(), dim=-1)
        o = (p @ v).transpose(1, 2).flatten(2, 3).float()
        o = attn.to_out[0](o)
    assert geo["q_len"] == 3 * fsl and geo["k_len"] == frames * fsl
    torch.testing.assert_close(o, stock[:, 6 * fsl:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[:, 6 * fsl:], stock[:, 6 * fsl:], rtol=1e-5, atol=1e-5)
    # earlier chunks are masked: they must differ from the unmasked stock output
    assert (ours[:, : 3 * fsl] - stock[:, : 3 * fsl]).abs().max() > 1e-4


def test_softmax_of_captured_logits_times_v_is_attention_output_cache_mode(tr):
    """During KV-cache generation: V rebuilt independently from the inputs of every chunk's clean pass."""
    layer, cfg = 2, wan.GenerationConfig(num_frames=9, block_frames=3, denoising_steps=(1000, 500))
    attn = tr.blocks[layer].attn1
    inputs, outputs = [], []
    h1 = attn.register_forward_pre_hook(lambda m, args: inputs.append(args[0].clone()))
    h2 = attn.register_forward_hook(lambda m, args, out: outputs.append(out.clone()))
    cap, got = _capture([layer], [(2, 1), (2, "clean")], qc=11)
    try:
        wan.generate(tr, _text(), _noise(9, 8, 8), cfg, "cache", capture=cap)
    finally:
        h1.remove()
        h2.remove()
    per_chunk = len(cfg.denoising_steps) + 1
    assert len(inputs) == 3 * per_chunk
    with torch.no_grad():
        v_past = [attn.to_v(inputs[c * per_chunk + per_chunk - 1]) for c in range(2)]  # clean passes of chunks 0, 1
        for step, call in ((1, 2 * per_chunk + 1), ("clean", 2 * per_chunk + 2)):
            v = _heads(torch.cat(v_past + [attn.to_v(inputs[call])], dim=1), attn.heads).transpose(1, 2).double()
            geo, _, logits = got[(layer, 2, step)]
            assert geo["k_len"] == v.shape[2] == 9 * 16 and geo["q_len"] == 3 * 16
            o = (torch.softmax(torch.from_numpy(logits).double(), -1) @ v).transpose(1, 2).flatten(2, 3).float()
            torch.testing.assert_close(attn.to_out[0](o), outputs[call], rtol=1e-5, atol=1e-5)


def test_chunked_reduction_equals_materialised_logits():
    g = torch.Generator().manual_seed(7)
    b, heads, d, fsl, nq, nk = 2, 3, 8, 5, 2, 4
    q = torch.randn((b, nq * fsl, heads, d), generator=g) * 2
    k = torch.randn((b, nk * fsl, heads, d), generator=g) * 2
    red = wan.FrameReducer(heads, nq, nk, fsl, DEV)
    for off, lg in wan.attention_logits_chunks(q, k, query_chunk=3):  # 3 does not divide the frame length 5
        red(off, lg)
    qn, kn = q.double().numpy(), k.double().numpy()
    full = np.einsum("bqhd,bkhd->bhqk", qn, kn) / np.sqrt(d)  # [B, H, Q, K]
    p = np.exp(full - full.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    lf = full.reshape(b, heads, nq, fsl, nk, fsl)
    pf = p.reshape(b, heads, nq, fsl, nk, fsl)
    arr = red.arrays()
    np.testing.assert_allclose(arr["logit_sum"], lf.sum(axis=(0, 3, 5)), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(arr["mass_sum"], pf.sum(axis=(0, 3, 5)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(arr["logit_max"], lf.max(axis=(0, 3, 5)), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(arr["query_tokens"], [b * fsl] * nq)
    assert arr["nonfinite"].sum() == 0
    # each query token's mass sums to one
    np.testing.assert_allclose(arr["mass_sum"].sum(-1) / arr["query_tokens"], 1.0, rtol=1e-6)
    # non-finite logits are counted, not dropped
    q[0, 0, 1, 0] = float("nan")
    red2 = wan.FrameReducer(heads, nq, nk, fsl, DEV)
    for off, lg in wan.attention_logits_chunks(q, k, query_chunk=4):
        red2(off, lg)
    assert red2.arrays()["nonfinite"].tolist() == [0, nk * fsl, 0]


@pytest.mark.parametrize("frames,block,h,w", [(9, 3, 8, 8), (8, 2, 6, 10)])
def test_geometry_inferred(tr, frames, block, h, w):
    cfg = wan.GenerationConfig(num_frames=frames, block_frames=block, denoising_steps=(1000,))
    last = frames // block - 1
    cap, got = _capture([0], [(0, 0), (last, 0), (last, "clean")])
    wan.generate(tr, _text(), _noise(frames, h, w), cfg, "cache", capture=cap)
    fsl = (h // 2) * (w // 2)
    for (lay, chunk, step), (geo, red, full) in got.items():
        assert geo["frame_seq_length"] == fsl
        assert geo["num_query_frames"] == block and geo["query_frames"] == list(range(chunk * block, (chunk + 1) * block))
        assert geo["num_key_frames"] == (chunk + 1) * block and geo["key_frames"] == list(range((chunk + 1) * block))
        assert geo["q_len"] == block * fsl and geo["k_len"] == (chunk + 1) * block * fsl and geo["is_logits"] is True
        assert full.shape == (1, 2, block * fsl, (chunk + 1) * block * fsl)
        assert geo["timestep"] == (1000.0 if step == 0 else 0.0)
    assert got[(0, last, 0)][0]["num_key_frames"] == frames  # the last chunk's keys span every frame


def test_self_forcing_sigmas():
    # shift 5: s' = 5s / (1 + 4s)
    assert wan.self_forcing_sigmas([1000, 750, 500, 250], 5.0) == pytest.approx([1.0, 0.9375, 2.5 / 3, 0.625])


def test_checkpoint_key_conversion_round_trip(tr, tmp_path):
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    sd = {k: v.clone() for k, v in tr.state_dict().items()}
    orig = wan.convert_diffusers_to_original(sd)
    for k in ("blocks.0.self_attn.q.weight", "blocks.0.self_attn.o.bias", "blocks.0.self_attn.norm_q.weight",
              "blocks.3.cross_attn.k.weight", "blocks.1.norm3.weight", "blocks.1.ffn.0.weight", "blocks.1.ffn.2.bias",
              "blocks.2.modulation", "head.modulation", "head.head.weight", "text_embedding.0.weight",
              "time_embedding.2.bias", "time_projection.1.weight", "patch_embedding.weight"):
        assert k in orig, k
    assert len(orig) == len(sd)
    # independent reference: diffusers' own converter of original Wan checkpoints
    ref = convert_wan_transformer_to_diffusers({"model.diffusion_model." + k: v for k, v in orig.items()})
    back = wan.convert_original_to_diffusers({"model." + k: v for k, v in orig.items()})
    assert set(ref) == set(back) == set(sd)
    for k in sd:
        assert back[k] is ref[k] and torch.equal(back[k], sd[k]), k
    with pytest.raises(wan.ModelLoadError, match="no mapping"):
        wan.convert_original_to_diffusers({"blocks.0.self_attn.qq.weight": torch.zeros(1)})
    # Self-Forcing-style checkpoint: generator (other weights) and generator_ema (the model's), 'model.' prefix
    torch.manual_seed(99)
    other = WanTransformer3DModel(**wan.TINY_ARCHS["default"]).eval()
    ck = {"generator": {"model." + k: v for k, v in wan.convert_diffusers_to_original(other.state_dict()).items()},
          "generator_ema": {"model." + k: v for k, v in orig.items()}}
    path = tmp_path / "self_forcing.pt"
    torch.save(ck, path)
    x, t, txt = _noise(3, 4, 4), torch.tensor([500.0]), _text()
    with torch.no_grad():
        want_ema, want_gen = tr(x, t, txt, return_dict=False)[0], other(x, t, txt, return_dict=False)[0]
        for use_ema, want in ((True, want_ema), (False, want_gen)):
            torch.manual_seed(5)
            fresh = WanTransformer3DModel(**wan.TINY_ARCHS["default"]).eval()
            wan.load_self_forcing_checkpoint(fresh, path, use_ema=use_ema)
            torch.testing.assert_close(fresh(x, t, txt, return_dict=False)[0], want, rtol=0, atol=0)
    assert (want_ema - want_gen).abs().max() > 1e-3
    torch.save({"generator": ck["generator"]}, tmp_path / "no_ema.pt")
    with pytest.raises(wan.ModelLoadError, match="generator_ema"):
        wan.load_self_forcing_checkpoint(fresh, tmp_path / "no_ema.pt", use_ema=True)
