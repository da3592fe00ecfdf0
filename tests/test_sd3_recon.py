"""sd3_light text-reconstruction capture and loss (design note 001).

References are independent of the hooks: a hand-run pass over the diffusers modules, numpy in
float64, float64 central finite differences, and a second forward under no_grad for the target."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from layerscope.models.sd3_light import (
    LightSD3Pipeline, LossSettings, ReconConfigError, TextReconConfig, compute_losses, denoise_loss, final_hook_name,
    target_hook_name, text_recon_loss, valid_target_layers)

torch.set_num_threads(1)
L = 4  # blocks of the tiny MMDiT


def tiny_transformer(seed: int = 0, dtype: torch.dtype = torch.float32):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    tr = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=L,
                               attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                               caption_projection_dim=16, pooled_projection_dim=16)
    # diffusers zero-initialises nothing here, but make every weight clearly non-zero so gradients are informative
    with torch.no_grad():
        for p in tr.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return tr.to(dtype).eval()


def inputs(seed: int = 1, dtype: torch.dtype = torch.float32, batch: int = 2, tokens: int = 6):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 4, 8, 8, generator=g).to(dtype),
                timestep=torch.tensor([500.0, 250.0][:batch], dtype=dtype),
                encoder_hidden_states=torch.randn(batch, tokens, 32, generator=g).to(dtype),
                pooled_projections=torch.randn(batch, 16, generator=g).to(dtype))


def manual_text_states(tr, x):
    """Independent reference: run diffusers' modules by hand; list of text tokens
    [context_embedder output, block 1 output, ..., block L-1 output]."""
    temb = tr.time_text_embed(x["timestep"], x["pooled_projections"])
    h = tr.pos_embed(x["hidden_states"]).contiguous()
    c = tr.context_embedder(x["encoder_hidden_states"])
    out = [c]
    for blk in tr.transformer_blocks[:-1]:
        c, h = blk(hidden_states=h, encoder_hidden_states=c, temb=temb)
        out.append(c)
    return out


def n_hooks(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def test_note_minimal_check_as_written():
    pipe = LightSD3Pipeline.__new__(LightSD3Pipeline)
    pipe.config = {}
    pipe.model_config = {"text_recon_gamma": 0.5, "text_recon_target_layer": 0}
    loss_fn = pipe.get_loss_fn()
    pred = torch.tensor([1.0, 2.0])
    target = torch.zeros_like(pred)
    mask = torch.tensor([])
    final_tokens = torch.tensor([[1.0, 1.0]])
    target_tokens = torch.tensor([[0.0, 0.0]])
    loss = loss_fn((pred, final_tokens, target_tokens), (target, mask))
    expected = torch.mean((pred - target) ** 2) + 0.5 * torch.mean((final_tokens - target_tokens) ** 2)
    assert torch.allclose(loss, expected)
    assert float(loss) == 2.5 + 0.5 * 1.0


def test_gamma_zero_is_bit_identical_and_hook_free():
    tr = tiny_transformer()
    x = inputs()
    with torch.no_grad():
        plain = tr(**x, return_dict=False)[0]
    light = LightSD3Pipeline(tr, {"text_recon_gamma": 0.0, "text_recon_target_layer": 2})
    assert n_hooks(tr) == 0  # no extra cost: nothing installed
    with torch.no_grad():
        out = light(**x)
    assert isinstance(out, torch.Tensor) and torch.equal(out, plain)
    target = torch.randn_like(plain)
    loss = light.get_loss_fn()(out, (target, torch.tensor([])))
    assert torch.equal(loss, F.mse_loss(plain.float(), target.float()))
    ref = np.mean((plain.double().numpy() - target.double().numpy()) ** 2)
    assert abs(float(loss) - ref) < 1e-6 * ref
    # with the reconstruction on, the velocity is still exactly the plain one; closing removes every hook
    on = LightSD3Pipeline(tr, {"text_recon_gamma": 0.7, "text_recon_target_layer": 1})
    assert n_hooks(tr) == 2
    with torch.no_grad():
        v, _, _ = on(**x)
    assert torch.equal(v, plain)
    on.close()
    assert n_hooks(tr) == 0


@pytest.mark.parametrize("k", [0, 1, 2])
def test_capture_matches_a_hand_run_pass(k):
    tr = tiny_transformer()
    x = inputs()
    with LightSD3Pipeline(tr, {"text_recon_gamma": 1.0, "text_recon_target_layer": k}) as light:
        with torch.no_grad():
            _, final, target = light(**x)
            ref = manual_text_states(tr, x)
    assert torch.allclose(final, ref[L - 1], atol=1e-6, rtol=0)  # output of block L-1 (1-based) = blocks[L-2]
    assert torch.allclose(target, ref[k], atol=1e-6, rtol=0)
    assert final_hook_name(L) == "blocks.2.hook_text_out"
    assert target_hook_name(k) == ("hook_text_embed" if k == 0 else f"blocks.{k - 1}.hook_text_out")


def text_params(block):
    """Parameters of a block's text stream (those the context_pre_only final block lacks are absent there)."""
    names = ("norm1_context", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "ff_context")
    return {n: p for n, p in block.named_parameters() if n.startswith(names)}


@pytest.mark.parametrize("k", [0, 2])
def test_target_has_no_gradient_and_recon_reaches_every_text_stream(k):
    tr = tiny_transformer(dtype=torch.float64)
    x = inputs(dtype=torch.float64)
    light = LightSD3Pipeline(tr, {"text_recon_gamma": 1.0, "text_recon_target_layer": k})
    _, final, target = light(**x)
    assert final.requires_grad and not target.requires_grad and target.grad_fn is None
    rec, n = text_recon_loss(final, target)
    assert n == x["encoder_hidden_states"].shape[0] * x["encoder_hidden_states"].shape[1]
    tr.zero_grad()
    rec.backward()
    for i in range(L - 1):  # every block before the final one: its text stream gets gradient
        ps = text_params(tr.transformer_blocks[i])
        assert ps, f"block {i} has no text-stream parameters?"
        for name, p in ps.items():
            assert p.grad is not None and float(p.grad.abs().sum()) > 0, f"block {i}: {name} got no gradient"
    for name, p in tr.transformer_blocks[L - 1].named_parameters():  # the final block does not shape the final text
        assert p.grad is None or float(p.grad.abs().sum()) == 0, name
    light.close()

    # independent reference: the target from a separate no_grad pass is a constant; float64 central
    # finite differences of recon(final(w), target_const) on one context_embedder weight (which feeds
    # the target at k=0: a gradient through the target would show up here) and one block-0 text weight
    with torch.no_grad():
        target_const = manual_text_states(tr, x)[k].clone()
    for param, where in ((tr.context_embedder.weight, (3, 5)), (tr.transformer_blocks[0].attn.add_q_proj.weight, (1, 2))):
        eps = 1e-6
        vals = []
        for s in (+1, -1):
            with torch.no_grad():
                param[where] += s * eps
                vals.append(float(((manual_text_states(tr, x)[L - 1] - target_const) ** 2).mean()))
                param[where] -= s * eps
        fd = (vals[0] - vals[1]) / (2 * eps)
        assert abs(float(param.grad[where]) - fd) <= 1e-6 * max(1.0, abs(fd)), (where, float(param.grad[where]), fd)


def test_wrong_target_layer_fails_with_the_valid_range():
    tr = tiny_transformer()
    assert list(valid_target_layers(L)) == [0, 1, 2]
    with pytest.raises(ReconConfigError, match=r"text_recon_target_layer: 3 is out of range .* valid: 0\.\.2"):
        LightSD3Pipeline(tr, {"text_recon_gamma": 0.5, "text_recon_target_layer": 3})
    with pytest.raises(ReconConfigError, match="text_recon_target_layer: -1 is negative"):
        TextReconConfig.from_model_config({"text_recon_target_layer": -1})
    with pytest.raises(ReconConfigError, match="text_recon_target_layer: expected an integer"):
        TextReconConfig.from_model_config({"text_recon_target_layer": "2"})
    with pytest.raises(ReconConfigError, match="text_recon_gamma: expected a finite number >= 0"):
        TextReconConfig.from_model_config({"text_recon_gamma": -0.1})
    with pytest.raises(ReconConfigError, match="text_recon_gamma"):
        TextReconConfig.from_model_config({"text_recon_gamma": float("nan")})
    # a bad layer fails even while the reconstruction is off (config errors must not hide)
    with pytest.raises(ReconConfigError, match="valid: 0..2"):
        LightSD3Pipeline(tr, {"text_recon_gamma": 0.0, "text_recon_target_layer": 7})
    assert n_hooks(tr) == 0


def test_recon_loss_all_tokens_by_default_and_valid_tokens_as_option():
    g = torch.Generator().manual_seed(3)
    final, target = torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 0, 1, 1, 0]], dtype=torch.bool)
    f, t, m = final.double().numpy(), target.double().numpy(), mask.numpy()
    # note 001's per-token MSE: every token counts, padding included (the mask is not consulted)
    rec, n = text_recon_loss(final, target, mask)
    assert n == 10 and abs(float(rec) - ((f - t) ** 2).mean()) < 1e-6
    # option ignore_padding: brute force over the valid (token, channel) pairs
    rec, n = text_recon_loss(final, target, mask, ignore_padding=True)
    ref = ((f - t) ** 2)[m].sum() / (m.sum() * f.shape[-1])
    assert n == 5 and abs(float(rec) - ref) < 1e-6
    zero, n0 = text_recon_loss(final, target, torch.zeros_like(mask), ignore_padding=True)
    assert n0 == 0 and float(zero) == 0.0 and torch.isfinite(zero)
    with pytest.raises(ValueError, match="text mask of shape"):
        text_recon_loss(final, target, mask[:, :3], ignore_padding=True)


def _existing_pipeline_loss(pred, target, mask, c=None):
    """Reference written from the existing pipeline's formulas (float64 numpy, not the project's code):
    l = (p - t)^2, or sqrt((p - t)^2 + c^2) - c when pseudo_huber_c is set; l *= mask (broadcast,
    empty = none); loss = mean(l) over all elements."""
    d = pred.double().numpy() - target.double().numpy()
    el = d ** 2 if c is None else np.sqrt(d ** 2 + c * c) - c
    if mask is not None and mask.numel() > 0:
        el = el * mask.double().numpy()
    return el.mean()


def _loss_fn(config, gamma=0.0):
    pipe = LightSD3Pipeline.__new__(LightSD3Pipeline)  # as the note builds it: only the two configs
    pipe.config, pipe.model_config = dict(config), {"text_recon_gamma": gamma, "text_recon_target_layer": 0}
    return pipe.get_loss_fn()


def test_gamma_zero_reproduces_the_existing_denoise_loss_with_mask_and_pseudo_huber():
    g = torch.Generator().manual_seed(4)
    pred, target = torch.randn(2, 4, 6, 6, generator=g), torch.randn(2, 4, 6, 6, generator=g)
    mask = (torch.rand(2, 1, 6, 6, generator=g) > 0.4).float()  # the pipeline's (bs, 1, h, w) latent mask
    soft = torch.rand(2, 1, 6, 6, generator=g)  # fractional weights too
    c = 0.3
    for m in (torch.tensor([]), mask, soft):
        for cfg, cc in (({}, None), ({"pseudo_huber_c": c}, c)):
            ref = _existing_pipeline_loss(pred, target, m, cc)
            got = float(_loss_fn(cfg)(pred, (target, m)))
            assert abs(got - ref) <= 1e-6 * ref, (m.shape, cfg, got, ref)
    # the normalised form is a different number here (the bug this default fixes); it stays an option
    w = np.broadcast_to(mask.double().numpy(), pred.shape)
    d = pred.double().numpy() - target.double().numpy()
    norm = (w * d ** 2).sum() / w.sum()
    assert abs(norm - _existing_pipeline_loss(pred, target, mask)) > 0.3 * norm
    assert abs(float(_loss_fn({"masked_mean": True})(pred, (target, mask))) - norm) <= 1e-6 * norm
    hub2 = 2 * c * (np.sqrt(d ** 2 + c * c) - c)
    got = float(_loss_fn({"loss_type": "pseudo_huber_scaled", "pseudo_huber_c": c, "masked_mean": True})(pred, (target, mask)))
    assert abs(got - (w * hub2).sum() / w.sum()) <= 1e-6 * got
    assert abs(float(denoise_loss(pred, target, None, "pseudo_huber_scaled", c)) - hub2.mean()) < 1e-6
    # gamma = 0 is bit-identical to the plain loss: without a mask F.mse_loss itself, and compute_losses
    # with gamma 0 returns exactly denoise_loss
    assert torch.equal(_loss_fn({})(pred, (target, torch.tensor([]))), F.mse_loss(pred, target))
    for s in (LossSettings(), LossSettings("pseudo_huber", c)):
        terms = compute_losses(pred, (target, mask), 0.0, s)
        assert terms.recon is None and torch.equal(terms.total, denoise_loss(pred, target, mask, s.loss_type, s.pseudo_huber_c))
    with pytest.raises(ValueError, match="selects no element"):
        denoise_loss(pred, target, torch.zeros(2, 1, 6, 6), masked_mean=True)
    assert float(denoise_loss(pred, target, torch.zeros(2, 1, 6, 6))) == 0.0  # mean(l*w): the pipeline's 0
    with pytest.raises(ValueError, match="does not broadcast"):
        denoise_loss(pred, target, torch.ones(3, 2))


def test_note_check_with_mask_pseudo_huber_and_padding():
    """total = denoise + gamma * recon with the existing pipeline's parts, against formulas in the test."""
    g = torch.Generator().manual_seed(5)
    pred, target = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    mask = (torch.rand(2, 1, 3, 3, generator=g) > 0.4).float()
    fin, tgt = torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    tm = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    c, gamma = 0.2, 0.25
    rec_all = ((fin.double() - tgt.double()) ** 2).mean().item()
    got = float(_loss_fn({"pseudo_huber_c": c}, gamma)((pred, fin, tgt), (target, mask, tm)))
    assert abs(got - (_existing_pipeline_loss(pred, target, mask, c) + gamma * rec_all)) < 1e-6
    terms = compute_losses((pred, fin, tgt), (target, mask, tm), gamma, LossSettings("pseudo_huber", c))
    assert torch.equal(terms.total, terms.denoise + gamma * terms.recon) and terms.n_valid_tokens == 10
    terms = compute_losses((pred, fin, tgt), (target, mask, tm), gamma, LossSettings("pseudo_huber", c, ignore_padding=True))
    assert terms.n_valid_tokens == 5
    with pytest.raises(ValueError, match="needs outputs"):
        compute_losses(pred, (target, None), gamma=0.5)


@pytest.mark.parametrize("config, message", [
    ({"huber_c": 0.1}, "huber_c: renamed to pseudo_huber_c"),
    ({"loss_type": "l1"}, "loss_type: 'l1' is not one of"),
    ({"loss_type": "mse", "pseudo_huber_c": 0.1}, "pseudo_huber_c: set .* but loss_type is mse"),
    ({"loss_type": "pseudo_huber"}, "loss_type: pseudo_huber needs pseudo_huber_c"),
    ({"pseudo_huber_c": 0}, "pseudo_huber_c: expected a number > 0"),
    ({"masked_mean": "yes"}, "masked_mean: expected true or false"),
])
def test_bad_or_renamed_loss_keys_fail_naming_the_key(config, message):
    with pytest.raises(ReconConfigError, match=message):
        _loss_fn(config)
    assert LossSettings.from_config({"pseudo_huber_c": 0.1}).loss_type == "pseudo_huber"  # the key alone selects it
