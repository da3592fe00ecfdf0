"""sd3_textgrad: one-pass gradients against independent references, metrics by hand, padding
masks, LoRA, and a shard -> merge -> figures round trip on the tiny SD3 pipeline."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_hooks_documented, shard_hooks  # noqa: E402
import torch

torch.set_num_threads(1)

from layerscope.models import ModelLoadError  # noqa: E402
from layerscope.models import sd3  # noqa: E402
from layerscope.probes import sd3_textgrad as P  # noqa: E402
from layerscope.probes import textgrad_compute  # noqa: E402

CPU = torch.device("cpu")
PROMPTS = ["a cat", "a ginger tabby cat looking to the side"]
MSL = 16  # T5 positions in the tests' text sequence


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("sd3") / "tiny"
    sd3.build_tiny("default", 0, d)
    return d


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    return sd3.load({"kind": "path", "path": str(tiny_dir)}, CPU, torch.float32)


def call_kwargs(pipe, prompts=PROMPTS, seed=0):
    with torch.no_grad():
        pe, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=CPU,
                                              do_classifier_free_guidance=False, max_sequence_length=MSL)
    g = torch.Generator().manual_seed(seed)
    s = pipe.transformer.config.sample_size
    x = torch.randn(len(prompts), 4, s, s, generator=g)
    return dict(hidden_states=x, timestep=torch.full((len(prompts),), 750.0), encoder_hidden_states=pe,
                pooled_projections=pooled)


def isolated_grad(tr, block, kw, shift=None):
    """Reference: a hook on ONE block replaces its text input by a fresh leaf; autograd.grad of y wrt it.
    With ``shift`` given, return y with the block's text input moved by ``shift`` instead."""
    box = {}

    def hook(mod, args, kwargs):
        h = kwargs["encoder_hidden_states"].detach()
        h = h + shift if shift is not None else h.requires_grad_(True)
        box["h"] = h
        return args, {**kwargs, "encoder_hidden_states": h}

    handle = tr.transformer_blocks[block].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.enable_grad():
            y = tr(**kw, return_dict=False)[0].double().pow(2).sum()
            if shift is not None:
                return float(y)
            return torch.autograd.grad(y, box["h"])[0], box["h"].detach()
    finally:
        handle.remove()


# ----------------------------------------------------------------------------- gradients
def test_one_pass_equals_isolated_autograd_for_every_block(pipe):
    tr = pipe.transformer
    kw = call_kwargs(pipe)
    n = len(tr.transformer_blocks)
    out, grads = P.text_input_grads(tr, list(range(n)), kw)
    assert torch.equal(out, tr(**kw, return_dict=False)[0])  # hooks do not change the forward
    norms = []
    for i in range(n):
        ref, _ = isolated_grad(tr, i, kw)
        torch.testing.assert_close(grads[i], ref.float(), rtol=1e-5, atol=1e-7)
        norms.append(float(ref.norm()))
    assert min(norms) > 0  # the last (context_pre_only) block's text input matters too
    assert len({round(v, 6) for v in norms}) == n  # every block differs
    # a subset of blocks, without block 0: same gradients
    _, sub = P.text_input_grads(tr, [2, n - 1], kw)
    torch.testing.assert_close(sub[2], grads[2], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(sub[n - 1], grads[n - 1], rtol=1e-5, atol=1e-7)


def test_one_pass_matches_float64_finite_differences(pipe, tiny_dir):
    tr = sd3.load({"kind": "path", "path": str(tiny_dir)}, CPU, torch.float64).transformer
    kw = {k: (v.double() if v.is_floating_point() else v) for k, v in call_kwargs(pipe).items()}
    n = len(tr.transformer_blocks)
    _, grads = P.text_input_grads(tr, list(range(n)), kw)
    g = torch.Generator().manual_seed(1)
    for i in range(n):
        v = torch.randn(grads[i].shape, generator=g, dtype=torch.float64)
        eps = 1e-5
        fd = (isolated_grad(tr, i, kw, eps * v) - isolated_grad(tr, i, kw, -eps * v)) / (2 * eps)
        an = float((grads[i] * v).sum())
        assert fd == pytest.approx(an, rel=1e-6), (i, fd, an)


def test_batch_rows_are_independent(pipe):
    tr = pipe.transformer
    kw = call_kwargs(pipe)
    _, both = P.text_input_grads(tr, [0, 3], kw)
    one = {k: v[1:] for k, v in kw.items()}
    _, single = P.text_input_grads(tr, [0, 3], one)
    torch.testing.assert_close(both[3][1:], single[3], rtol=1e-5, atol=1e-7)


def test_without_forcing_frozen_blocks_have_no_gradient(pipe):
    _, grads = P.text_input_grads(pipe.transformer, [0, 1], call_kwargs(pipe), force_txt_grad=False)
    assert grads == {0: None, 1: None}


# ----------------------------------------------------------------------------- metrics
def test_metrics_equal_hand_computation():
    s = np.array([[3.0, 1.0, 0.0, 4.0]])
    m = P.token_metrics(s, None, topk=2)
    p = np.array([3, 1, 4]) / 8.0
    h = -(p * np.log(p)).sum()
    assert m["strength"][0] == pytest.approx(2.0)
    assert m["topk_mass"][0] == pytest.approx(7 / 8)
    assert m["entropy"][0] == pytest.approx(h)
    assert m["entropy_norm"][0] == pytest.approx(h / math.log(4))
    assert (m["n_tokens"][0], m["nonfinite"][0], m["status"][0]) == (4, 0, P.OK)
    # masked positions are not counted; k larger than n gives mass 1; uniform scores give entropy log n
    m = P.token_metrics(np.array([[2.0, 2.0, 9.0]]), np.array([[True, True, False]]), topk=5)
    assert (m["strength"][0], m["topk_mass"][0], m["n_tokens"][0]) == (2.0, 1.0, 2)
    assert m["entropy"][0] == pytest.approx(math.log(2)) and m["entropy_norm"][0] == pytest.approx(1.0)


def test_metrics_guard_nonfinite_empty_and_zero_rows():
    s = np.array([[1.0, np.nan, np.inf, 3.0], [np.nan, np.nan, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [5.0, 1.0, 1.0, 1.0]])
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=bool)
    m = P.token_metrics(s, mask, topk=1)
    assert list(m["nonfinite"]) == [2, 2, 0, 0]  # counted, not dropped
    assert list(m["n_tokens"]) == [2, 0, 4, 0]
    assert list(m["status"]) == [P.OK, P.EMPTY, P.ZERO_MASS, P.EMPTY]
    assert m["strength"][0] == pytest.approx(2.0) and m["topk_mass"][0] == pytest.approx(0.75)
    assert np.isnan(m["strength"][1]) and np.isnan(m["entropy"][3])
    assert m["strength"][2] == 0.0 and np.isnan(m["topk_mass"][2]) and np.isnan(m["entropy"][2])


# ----------------------------------------------------------------------------- padding
def test_padding_mask_for_a_short_prompt(pipe, tmp_path):
    mask = sd3.text_token_mask(pipe, PROMPTS, MSL)
    pe = call_kwargs(pipe)["encoder_hidden_states"]
    assert mask.shape == pe.shape[:2] == (2, 77 + MSL)
    for r, prompt in enumerate(PROMPTS):
        # independent count: the unpadded tokenisations (BOS/EOS and '</s>' are content)
        n_clip = len(pipe.tokenizer(prompt).input_ids)
        assert n_clip == len(pipe.tokenizer_2(prompt).input_ids)
        n_t5 = len(pipe.tokenizer_3(prompt).input_ids)
        expect = torch.zeros(77 + MSL, dtype=torch.bool)
        expect[:n_clip] = True
        expect[77:77 + n_t5] = True
        assert torch.equal(mask[r], expect), prompt
    assert mask[0].sum() == len("acat") + 2 + len(pipe.tokenizer_3("a cat").input_ids)  # character-level CLIP vocab
    # the masked-out positions hold exactly each tokenizer's pad token
    ids1 = pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    ids2 = pipe.tokenizer_2(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert (ids1[~mask[:, :77]] == pipe.tokenizer.pad_token_id).all()
    assert (ids2[~mask[:, :77]] == pipe.tokenizer_2.convert_tokens_to_ids("!")).all()
    # without T5 every T5 position is padding, and diffusers feeds zeros there
    d = tmp_path / "no_t5"
    sd3.build_tiny("no_t5", 0, d)
    p2 = sd3.load({"kind": "path", "path": str(d)}, CPU, torch.float32)
    m2 = sd3.text_token_mask(p2, PROMPTS, MSL)
    assert torch.equal(m2[:, :77], mask[:, :77]) and not m2[:, 77:].any()
    pe2 = call_kwargs(p2)["encoder_hidden_states"]
    assert pe2.shape == pe.shape and (pe2[:, 77:] == 0).all()


# ----------------------------------------------------------------------------- LoRA
def make_adapter(tiny_dir: Path, out: Path, targets=("add_q_proj", "add_v_proj", "to_q")) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    tr = sd3.load({"kind": "path", "path": str(tiny_dir)}, CPU, torch.float32).transformer
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=list(targets), init_lora_weights=False)
    torch.manual_seed(5)
    inject_adapter_in_model(cfg, tr)
    sd3.save_lora_adapter(tr, cfg, out)


def test_lora_changes_scores_and_reloads_identically(pipe, tiny_dir, tmp_path):
    from safetensors.torch import load_file

    make_adapter(tiny_dir, tmp_path / "lora")
    mcfg = {"kind": "path", "path": str(tiny_dir), "lora": str(tmp_path / "lora")}
    a = sd3.load(mcfg, CPU, torch.float32)
    b = sd3.load(mcfg, CPU, torch.float32)
    kw = call_kwargs(pipe)
    blocks = [0, 1, 2, 3]
    _, g0 = P.text_input_grads(pipe.transformer, blocks, kw)
    _, ga = P.text_input_grads(a.transformer, blocks, kw)
    _, gb = P.text_input_grads(b.transformer, blocks, kw)
    for i in blocks:
        assert torch.equal(ga[i], gb[i])  # reloads identically
        s0, sa = g0[i].norm(dim=-1), ga[i].norm(dim=-1)
        assert float((s0 - sa).abs().max() / s0.abs().max()) > 1e-3  # the adapter changes every block's scores
    # merged weight == W + (alpha / r) B A, from the saved tensors
    st = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    key = "transformer_blocks.1.attn.add_q_proj"
    A, B = st[f"{key}.lora_A.weight"], st[f"{key}.lora_B.weight"]
    w0 = dict(pipe.transformer.named_parameters())[f"{key}.weight"]
    wa = dict(a.transformer.named_parameters())[f"{key}.base_layer.weight"]
    torch.testing.assert_close(wa, w0 + 2.0 * B @ A)
    # config override: a subset of the adapter's modules applies only those
    c = sd3.load({**mcfg, "lora_target": "add_q_proj"}, CPU, torch.float32)
    wc = dict(c.transformer.named_parameters())
    torch.testing.assert_close(wc[f"{key}.base_layer.weight"], wa)
    assert torch.equal(wc["transformer_blocks.1.attn.to_q.weight"], dict(pipe.transformer.named_parameters())["transformer_blocks.1.attn.to_q.weight"])


def test_lora_errors_name_the_problem(tiny_dir, tmp_path):
    sd3.build_tiny_lora(tmp_path / "lora", targets=("add_q_proj",))
    mcfg = {"kind": "path", "path": str(tiny_dir), "lora": str(tmp_path / "lora")}
    with pytest.raises(ModelLoadError, match="lora_target.*to_k"):
        sd3.load({**mcfg, "lora_target": ["add_q_proj", "to_k"]}, CPU, torch.float32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="adapter_config.json"):
        sd3.load({**mcfg, "lora": str(tmp_path / "empty")}, CPU, torch.float32)
    with pytest.raises(ModelLoadError, match="model_index.json"):
        sd3.load({"kind": "path", "path": str(tmp_path / "empty")}, CPU, torch.float32)
    assert sd3.parse_lora_target("text, to_q") == ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "to_q"]


# ----------------------------------------------------------------------------- shard round trip
@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from PIL import Image

    from layerscope.data import build_index

    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    lines = []
    for i, cap in enumerate(["a red square", "a blue sky over the sea", "noise"]):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(d / f"im{i}.png")
        lines.append(f"im{i}.png\t{cap}")
    (d / "list.txt").write_text("\n".join(lines) + "\n")
    idx = build_index("pairs", {"kind": "list", "path": str(d / "list.txt")}, d / "index.tsv")
    return {"kind": "list", "path": str(d / "list.txt"), "index": str(idx)}


def run(tmp_path, tiny_dir, dataset, axes, name="tiny", dtype="fp32", **cfg):
    from layerscope.h5io import Shard, ShardWriter
    from layerscope.probes.base import ShardSpec

    probe_cfg = {"models": [name], "dataset": "pairs", "max_sequence_length": MSL, "topk": 3, "batch_size": 2,
                 "ignore_padding": True, **cfg}
    spec = ShardSpec(probe="sd3_textgrad", model=name, axes=axes, probe_cfg=probe_cfg,
                     model_cfg={"family": "sd3", "kind": "path", "path": str(tiny_dir), "dtype": dtype, "name": name},
                     datasets={"pairs": dataset}, config_hash="h", device="cpu")
    out = tmp_path / (name + "__" + "__".join(f"{a}-{v}" for a, v in axes.items()) + ".h5")
    prov = {"probe": "sd3_textgrad", "model": name, "axes": axes, "config_hash": "h", "data_digest": "{}",
            "spec": spec.to_json_dict()}
    with ShardWriter(out, prov) as w:
        P.SD3TextGrad().run_shard(spec, w)
    return Shard(out)


def test_shard_merge_and_figures(tmp_path, tiny_dir, dataset, pipe):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from layerscope.data import load_image, read_index

    probe = P.SD3TextGrad()
    shards = [run(tmp_path, tiny_dir, dataset, {"timestep": "300", "seed": str(s), "slice": sl}, save_token_scores=True,
                  timestep_convention="schedule_index")
              for s in (0, 1) for sl in ("0of2", "1of2")]
    tables = probe.merge(shards)
    smp = tables["samples"]
    assert len(smp) == 2 * 3 * 4 and set(smp["status"]) == {"ok"} and smp["nonfinite"].sum() == 0

    # recompute one row independently: VAE mean latent, scheduler.scale_noise, isolated autograd
    rec = read_index(dataset["index"])[1]
    sch = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    with torch.no_grad():
        pe, _, pooled, _ = pipe.encode_prompt(prompt=[rec.caption], prompt_2=None, prompt_3=None, device=CPU,
                                              do_classifier_free_guidance=False, max_sequence_length=MSL)
        pix = pipe.image_processor.preprocess([load_image(rec.path, 32)], height=32, width=32)
        z0 = (pipe.vae.encode(pix).latent_dist.mode() - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
        xt = sch.scale_noise(z0, sch.timesteps[300:301], P.noise_for(1, rec.image_id, z0.shape[1:])[None])
    kw = dict(hidden_states=xt, timestep=sch.timesteps[300:301], encoder_hidden_states=pe, pooled_projections=pooled)
    g, _ = isolated_grad(pipe.transformer, 2, kw)
    scores = g.norm(dim=-1)[0].numpy()
    mask = sd3.text_token_mask(pipe, [rec.caption], MSL)[0].numpy()
    v = scores[mask]
    row = smp[(smp.seed == 1) & (smp.image_id == rec.image_id) & (smp.block == 2)].iloc[0]
    assert row.n_tokens == mask.sum() < len(mask)
    assert row.strength == pytest.approx(v.mean(), rel=1e-4)
    assert row.topk_mass == pytest.approx(np.sort(v)[-3:].sum() / v.sum(), rel=1e-4)
    for name in P.SD3TextGrad.tables:
        assert_hooks_documented("sd3", tables[name]["hook"])
    assert_hooks_documented("sd3", shard_hooks(shards))
    assert row.hook == "blocks.2.hook_text_grad" and row.sigma == pytest.approx(float(sch.sigmas[300]))

    # the per-block table: numpy over the samples; the pooled row equals the single timestep's
    blk, blk_all = tables["blocks"], tables["blocks_all_timesteps"]
    for b in range(4):
        vals = smp[smp.block == b]["entropy"].to_numpy()
        r = blk[(blk.block == b) & (blk.timestep_index == "300")].iloc[0]
        assert r.entropy_mean == pytest.approx(vals.mean()) and r.entropy_std == pytest.approx(vals.std(ddof=1))
        assert r.rows == 6 and r.n_ok == 6
        assert blk_all[blk_all.block == b].iloc[0].entropy_mean == pytest.approx(vals.mean())
    # per-token table: mean over seeds and samples of the stored scores
    tok = tables["tokens"]
    t = tok[(tok.block == 2) & (tok.position == 0)].iloc[0]
    col = np.concatenate([sh.groups["stats/blocks.2.hook_text_grad"]["token_scores"][:, 0] for sh in shards])
    assert t["count"] == 6 and t.mean_score == pytest.approx(col.mean(), rel=1e-6) and t.content_fraction == 1.0

    # figures
    import pandas as pd

    figs = tmp_path / "figs"
    figs.mkdir()
    probe.plot({k: pd.concat([v.assign(model="a"), v.assign(model="b")]) for k, v in tables.items()}, figs)
    for f in probe.figures:
        assert (figs / f"{f}.png").stat().st_size > 5000


def test_nonfinite_gradients_are_counted_or_refused_in_fp16(tmp_path, tiny_dir, dataset, monkeypatch):
    real = P.text_input_grads

    def nan_grads(tr, blocks, kw, force_txt_grad=True):
        out, grads = real(tr, blocks, kw, force_txt_grad)
        grads[1] = grads[1].clone()
        grads[1][:, 0] = float("nan")  # token 0 (CLIP BOS, always content) of block 1
        return out, grads

    monkeypatch.setattr(textgrad_compute, "text_input_grads", nan_grads)
    sh = run(tmp_path, tiny_dir, dataset, {"timestep": "500", "seed": "0", "slice": "0of1"})
    d = sh.groups["stats/blocks.1.hook_text_grad"]
    assert list(d["nonfinite"]) == [1, 1, 1] and (d["status"] == P.OK).all()
    assert (d["n_tokens"] == sh.groups["inputs"]["token_mask"].sum(1) - 1).all()
    assert (sh.groups["stats/blocks.0.hook_text_grad"]["nonfinite"] == 0).all()
    from layerscope.plan import ConfigError

    with pytest.raises(ConfigError, match="fp16.*dtype: fp32"):
        run(tmp_path, tiny_dir, dataset, {"timestep": "500", "seed": "0", "slice": "0of1"}, name="half", dtype="fp16")


def test_bad_timestep_and_layers_name_the_field(tmp_path, tiny_dir, dataset):
    from layerscope.plan import ConfigError

    with pytest.raises(ConfigError, match="timesteps: index 1000"):
        run(tmp_path, tiny_dir, dataset, {"timestep": "1000", "seed": "0", "slice": "0of1"}, timestep_convention="schedule_index")
    with pytest.raises(ConfigError, match="timesteps: timestep 1001 outside 0..1000"):
        run(tmp_path, tiny_dir, dataset, {"timestep": "1001", "seed": "0", "slice": "0of1"})
    with pytest.raises(ConfigError, match="layers: \\[7\\]"):
        run(tmp_path, tiny_dir, dataset, {"timestep": "10", "seed": "0", "slice": "0of1"}, layers=[1, 7])


def test_lora_saved_by_peftmodel_matches_peft_forward(pipe, tiny_dir, tmp_path):
    """An adapter written by PeftModel.save_pretrained ('base_model.model.' keys) loads, and the
    merged transformer equals peft's own (unmerged) LoRA forward."""
    from peft import LoraConfig, get_peft_model

    base = sd3.load({"kind": "path", "path": str(tiny_dir)}, CPU, torch.float32).transformer
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["add_k_proj", "to_v"], init_lora_weights=False)
    torch.manual_seed(3)
    pm = get_peft_model(base, cfg)
    pm.save_pretrained(str(tmp_path / "peft"))
    merged = sd3.load({"kind": "path", "path": str(tiny_dir), "lora": str(tmp_path / "peft")}, CPU, torch.float32).transformer
    kw = call_kwargs(pipe)
    with torch.no_grad():
        ref = pm(**kw, return_dict=False)[0]
        got = merged(**kw, return_dict=False)[0]
        plain = pipe.transformer(**kw, return_dict=False)[0]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert float((ref - plain).abs().max()) > 1e-3


# ----------------------------------------------------------------------------- note parity (issue 15)
def test_note_timestep_convention_gives_sigma_t_over_1000(tmp_path, tiny_dir, dataset, pipe):
    """The note's script: sigma = t / num_train_timesteps (no shift), the model is fed t itself."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from layerscope.data import load_image, read_index

    sch = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    for t in (0, 1, 250, 500, 900, 999, 1000):
        assert P.resolve_timestep(t, "note", sch) == (t / 1000, float(t))
    # the project's schedule index 250 is the note's 900, 750 the note's 500 (shift 3)
    assert P.resolve_timestep(250, "schedule_index", sch) == pytest.approx((0.9, 900.0), rel=1e-6)
    assert P.resolve_timestep(750, "schedule_index", sch) == pytest.approx((0.5, 500.0), rel=1e-6)

    sh = run(tmp_path, tiny_dir, dataset, {"timestep": "900", "seed": "3", "slice": "0of1"})
    assert (sh.attrs["timestep_convention"], sh.attrs["sigma"], sh.attrs["timestep"]) == ("note", 0.9, 900.0)
    # the script's noising, written from its formula: x_t = (1 - t/T) z0 + (t/T) eps, timestep a long tensor t
    rec = read_index(dataset["index"])[2]
    with torch.no_grad():
        pe, _, pooled, _ = pipe.encode_prompt(prompt=[rec.caption], prompt_2=None, prompt_3=None, device=CPU,
                                              do_classifier_free_guidance=False, max_sequence_length=MSL)
        pix = pipe.image_processor.preprocess([load_image(rec.path, 32)], height=32, width=32)
        z0 = (pipe.vae.encode(pix).latent_dist.mode() - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
        s = torch.full((1,), 900, dtype=torch.long).float().view(1, 1, 1, 1) / 1000.0
        xt = (1.0 - s) * z0 + s * P.noise_for(3, rec.image_id, z0.shape[1:])[None]
        out = pipe.transformer(hidden_states=xt, timestep=torch.full((1,), 900, dtype=torch.long),
                               encoder_hidden_states=pe, pooled_projections=pooled, return_dict=False)[0]
    row = list(sh.groups["inputs"]["image_id"]).index(rec.image_id)
    assert sh.groups["inputs"]["objective"][row] == pytest.approx(float(out.double().pow(2).sum()), rel=1e-5)
    tables = P.SD3TextGrad().merge([sh])
    smp = tables["samples"]
    assert set(smp["timestep_convention"]) == {"note"} and set(smp["sigma"]) == {0.9} and set(smp["timestep"]) == {900.0}
    assert set(smp["timestep_index"]) == {900}


def test_pooled_curves_equal_brute_force_from_token_scores(tmp_path, tiny_dir, dataset):
    """The note pools each pair's token scores over timesteps x seeds, then computes the metrics,
    then averages over pairs; recomputed here from the stored per-token scores with numpy."""
    from scipy import stats as sps

    shards = [run(tmp_path, tiny_dir, dataset, {"timestep": t, "seed": s, "slice": sl})
              for t in ("200", "800") for s in ("0", "1") for sl in ("0of2", "1of2")]
    merged = P.SD3TextGrad().merge(shards[::-1])  # order must not matter
    pooled, per_t = merged["pooled"], merged["pooled_per_timestep"]
    assert "timestep_index" not in pooled and set(per_t["timestep_index"]) == {200, 800}
    topk = 3
    for block in range(4):
        hook = f"stats/blocks.{block}.hook_text_grad"
        for tkey in ("all", "200"):
            per_pair = {"strength": [], "topk_mass": [], "entropy": []}
            for img in range(3):
                vecs, mask = [], None
                for sh in shards:
                    if tkey != "all" and sh.attrs["timestep_index"] != int(tkey):
                        continue
                    ids = list(sh.groups[hook]["image_id"])
                    if img in ids:
                        r = ids.index(img)
                        vecs.append(sh.groups[hook]["token_scores"][r].astype(np.float64))
                        mask = sh.groups["inputs"]["token_mask"][r].astype(bool)
                assert len(vecs) == (4 if tkey == "all" else 2)
                v = (sum(vecs) / len(vecs))[mask]
                p = v / v.sum()
                per_pair["strength"].append(v.mean())
                per_pair["topk_mass"].append(sum(sorted(v)[-topk:]) / v.sum())
                per_pair["entropy"].append(-sum(pi * math.log(pi + 1e-12) for pi in p))
            row = (pooled[pooled.block == block] if tkey == "all"
                   else per_t[(per_t.block == block) & (per_t.timestep_index == int(tkey))]).iloc[0]
            assert row.pairs == 3 and row.samples_per_pair == len(vecs) and row.nonfinite == 0
            for m, vals in per_pair.items():
                vals = np.array(vals)
                assert row[m] == pytest.approx(vals.mean(), rel=1e-9)
                half = sps.t.ppf(0.975, 2) * vals.std(ddof=1) / math.sqrt(3)
                assert row[f"{m}_ci_high"] - row[m] == pytest.approx(half, rel=1e-6)
    # pooling before the metrics is not the mean of per-row metrics (the project's per-row table)
    blk = P.SD3TextGrad().merge(shards)["blocks_all_timesteps"]
    r = blk[blk.block == 1].iloc[0]
    p = pooled[pooled.block == 1].iloc[0]
    assert abs(r.entropy_mean - p.entropy) > 1e-6


def test_pooled_curves_need_token_scores(tmp_path, tiny_dir, dataset):
    from layerscope.errors import ConfigError, ShardError

    probe = P.SD3TextGrad()
    with pytest.raises(ConfigError, match="save_token_scores: false.*pooled_curves"):
        probe.check_config({"save_token_scores": False}, {})
    probe.check_config({"save_token_scores": False, "pooled_curves": False}, {})
    with pytest.raises(ConfigError, match="timestep_convention"):
        probe.check_config({"timestep_convention": "sigma"}, {})
    sh = run(tmp_path, tiny_dir, dataset, {"timestep": "500", "seed": "0", "slice": "0of1"}, save_token_scores=False)
    with pytest.raises(ShardError, match="without them.*save_token_scores: true.*forcerun"):
        probe.merge([sh])
    sh2 = run(tmp_path, tiny_dir, dataset, {"timestep": "500", "seed": "1", "slice": "0of1"}, name="tiny2",
              save_token_scores=False, pooled_curves=False)
    t = probe.merge([sh2])
    assert len(t["pooled"]) == 0 and len(t["samples"]) == 12


# ----------------------------------------------------------------------------- batching (issue 18)
def _samples(sch, records, timesteps=(100, 600, 950), seeds=(0, 4)):
    return [P.Sample(r, t, *P.resolve_timestep(t, "note", sch), s) for r in records for t in timesteps for s in seeds]


def pair_records(d: Path, n: int = 2) -> list:
    from PIL import Image

    from layerscope.data import Record

    rng = np.random.default_rng(1)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return [Record(i, str(d / f"{i}.png"), PROMPTS[i % len(PROMPTS)]) for i in range(n)]


def test_batched_samples_equal_batch_one(pipe, tmp_path):
    """Pairs x timesteps x seeds in one forward and one backward give each sample's own gradient."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sch = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    recs = pair_records(tmp_path)
    samples = _samples(sch, recs)
    st = P.Settings(blocks=[0, 1, 2, 3], msl=MSL, size=32, force=True, batch_size=len(samples), memory_budget_mb=1.0,
                    seq_len=77 + MSL)
    big = P.compute_samples(pipe, samples, st)
    one = P.compute_samples(pipe, samples, P.Settings(**{**st.__dict__, "batch_size": 1}))
    assert big["batch_size"] == 12 and one["batch_size"] == 1
    for b in st.blocks:
        np.testing.assert_allclose(big["scores"][b], one["scores"][b], rtol=1e-4, atol=1e-9)
        assert np.unique(big["scores"][b].round(6), axis=0).shape[0] == 12  # every sample differs
    np.testing.assert_allclose(big["objective"], one["objective"], rtol=1e-5)
    # one sample computed alone, independently: isolated autograd on its own inputs
    s = samples[7]
    ref = P.compute_samples(pipe, [s], st)
    np.testing.assert_allclose(big["scores"][2][7], ref["scores"][2][0], rtol=1e-4, atol=1e-9)


def test_batch_size_from_memory_budget(pipe, tmp_path):
    kw3 = call_kwargs(pipe, prompts=PROMPTS + ["x"])
    tr = pipe.transformer
    b1, b2, b3 = (P.saved_bytes(tr, [0, 1, 2, 3], {k: v[:n] for k, v in kw3.items()}) for n in (1, 2, 3))
    per = b2 - b1
    assert per > 0 and b3 - b1 == pytest.approx(2 * per, rel=0.05)  # linear in the batch
    fixed = b1 - per
    assert P.batch_size_for_budget(per, fixed, fixed + 2 * 5.5 * per, n=100) == 5
    assert P.batch_size_for_budget(per, fixed, fixed + 2 * 5.5 * per, n=3) == 3
    assert P.batch_size_for_budget(per, fixed, 1.0, n=100) == 1
    # batch_size auto: the measured split decides the batch
    from diffusers import FlowMatchEulerDiscreteScheduler

    samples = _samples(FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config), pair_records(tmp_path, 1),
                       timesteps=(300, 700), seeds=(0, 1))
    st = P.Settings(blocks=[0, 1, 2, 3], msl=MSL, size=32, force=True, batch_size="auto", memory_budget_mb=1e-3,
                    seq_len=77 + MSL)
    assert P.compute_samples(pipe, samples, st)["batch_size"] == 1
    st.memory_budget_mb = (fixed + 2 * 2.5 * per) / 2**20
    assert P.compute_samples(pipe, samples, st)["batch_size"] == 2
    st.memory_budget_mb = 1e4
    assert P.compute_samples(pipe, samples, st)["batch_size"] == 4


# ----------------------------------------------------------------------------- --load-ckpt files
def _grads(p):
    _, g = P.text_input_grads(p.transformer, [0, 1, 2, 3], call_kwargs(p))
    return g


def test_checkpoint_state_dict_equals_saved_pipeline(tiny_dir, tmp_path):
    """A fine-tuned transformer state dict (safetensors, .pt in a {"state_dict": ...} wrapper, .bin with
    a 'transformer.' prefix) gives the same numbers as the pipeline folder saved with those weights."""
    from safetensors.torch import save_file

    ft = sd3.load({"kind": "path", "path": str(tiny_dir)}, CPU, torch.float32)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for prm in ft.transformer.parameters():
            prm.add_(0.05 * torch.randn(prm.shape, generator=g))  # "fine-tuned"
    ft.save_pretrained(tmp_path / "ft_pipe")
    sd = {k: v.contiguous() for k, v in ft.transformer.state_dict().items()}
    save_file(sd, str(tmp_path / "ft.safetensors"))
    torch.save({"state_dict": sd, "step": 3}, tmp_path / "ft.pt")
    torch.save({f"transformer.{k}": v for k, v in sd.items()}, tmp_path / "ft.bin")
    ref = _grads(sd3.load({"kind": "path", "path": str(tmp_path / "ft_pipe")}, CPU, torch.float32))
    base = _grads(sd3.load({"kind": "path", "path": str(tiny_dir)}, CPU, torch.float32))
    assert float((ref[1] - base[1]).abs().max()) > 1e-3
    for f in ("ft.safetensors", "ft.pt", "ft.bin"):
        got = _grads(sd3.load({"kind": "path", "path": str(tiny_dir), "checkpoint": str(tmp_path / f), "name": "m"},
                              CPU, torch.float32))
        for b in ref:
            assert torch.equal(got[b], ref[b]), f
    # a state dict of another shape, a truncated file, a wrong suffix: one line naming the field
    small = {k: v for k, v in sd.items() if not k.startswith("transformer_blocks.3.")}
    save_file(small, str(tmp_path / "small.safetensors"))
    with pytest.raises(ModelLoadError, match=r"models\.m\.checkpoint: .*small.safetensors.*missing keys"):
        sd3.load({"kind": "path", "path": str(tiny_dir), "checkpoint": str(tmp_path / "small.safetensors"), "name": "m"},
                 CPU, torch.float32)
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "ft.safetensors").read_bytes()[:100])
    with pytest.raises(ModelLoadError, match=r"cut.safetensors \(models\.m\.checkpoint\)"):
        sd3.load({"kind": "path", "path": str(tiny_dir), "checkpoint": str(tmp_path / "cut.safetensors"), "name": "m"},
                 CPU, torch.float32)
    with pytest.raises(ModelLoadError, match="not a weights file"):
        sd3.load({"kind": "path", "path": str(tiny_dir), "checkpoint": str(tmp_path / "ft_pipe" / "model_index.json"),
                  "name": "m"}, CPU, torch.float32)


def test_checkpoint_lora_file_equals_peft_adapter_folder(pipe, tiny_dir, tmp_path):
    """A LoRA file (peft keys + diffusers' alpha metadata; diffusers 'transformer.' keys with
    alpha = rank) gives the same numbers as the equivalent peft adapter folder."""
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    for r, alpha in ((2, 4), (3, 3)):
        d = tmp_path / f"r{r}"
        tr = sd3.load({"kind": "path", "path": str(tiny_dir)}, CPU, torch.float32).transformer
        cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=["add_q_proj", "add_v_proj", "to_q", "ff.net.2"],
                         init_lora_weights=False)
        torch.manual_seed(5 + r)
        inject_adapter_in_model(cfg, tr)
        sd3.save_lora_adapter(tr, cfg, d / "adapter")
        layers = get_peft_model_state_dict(tr)
        meta = {"transformer_lora_adapter_metadata": cfg.to_dict()} if alpha != r else {}
        StableDiffusion3Pipeline.save_lora_weights(d / "file", transformer_lora_layers=layers, **meta)
        lora_file = d / "file" / "pytorch_lora_weights.safetensors"
        ref = _grads(sd3.load({"kind": "path", "path": str(tiny_dir), "lora": str(d / "adapter")}, CPU, torch.float32))
        got = _grads(sd3.load({"kind": "path", "path": str(tiny_dir), "checkpoint": str(lora_file)}, CPU, torch.float32))
        base = _grads(pipe)
        for b in ref:
            torch.testing.assert_close(got[b], ref[b], rtol=1e-5, atol=1e-7)
        assert float((ref[2] - base[2]).abs().max() / base[2].abs().max()) > 1e-3
    # the peft folder's own weights file (no component prefix) loads as a checkpoint too (alpha = rank there)
    got = _grads(sd3.load({"kind": "path", "path": str(tiny_dir), "checkpoint": str(d / "adapter" / "adapter_model.safetensors")},
                          CPU, torch.float32))
    for b in ref:
        torch.testing.assert_close(got[b], ref[b], rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- single-pair CLI
def test_cli_single_pair_matches_the_study_shards(tiny_dir, tmp_path, capsys):
    """`layerscope textgrad --prompt --image` batches the pair's timesteps x seeds and writes the same
    rows the study's per-(timestep, seed) shards write for a one-line dataset."""
    import pandas as pd
    from PIL import Image

    from layerscope.cli import main
    from layerscope.data import build_index

    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "im.png")
    prompt = "a ginger tabby cat"
    make_adapter(tiny_dir, tmp_path / "lora")
    ckpt = tmp_path / "lora" / "adapter_model.safetensors"  # a LoRA file: --load-ckpt
    rc = main(["textgrad", "--prompt", prompt, "--image", str(tmp_path / "im.png"), "--model", str(tiny_dir),
               "--load-ckpt", str(ckpt), "--ignore-padding", "--timesteps", "900", "300", "--seeds", "0", "5", "--topk", "3",
               "--max-sequence-length", str(MSL), "--out", str(tmp_path / "out")])
    assert rc == 0
    tdir = tmp_path / "out" / "tables" / tiny_dir.name
    smp = pd.read_csv(tdir / "samples.csv")
    pooled = pd.read_csv(tdir / "pooled.csv")
    assert len(smp) == 2 * 2 * 4 and set(smp["sigma"]) == {0.9, 0.3}
    assert set(pooled["samples_per_pair"]) == {4}
    for f in P.FIGURES.values():
        assert (tmp_path / "out" / "figures" / f"{f}.png").stat().st_size > 5000
    # the study path, one shard per (timestep, seed), on a one-line list dataset with the same model
    (tmp_path / "list.txt").write_text(f"{tmp_path / 'im.png'}\t{prompt}\n")
    idx = build_index("one", {"kind": "list", "path": str(tmp_path / "list.txt")}, tmp_path / "index.tsv")
    ds = {"kind": "list", "path": str(tmp_path / "list.txt"), "index": str(idx)}
    from layerscope.h5io import ShardWriter
    from layerscope.probes.base import ShardSpec

    shard = tmp_path / "study.h5"
    spec = ShardSpec(probe="sd3_textgrad", model="m", axes={"timestep": "300", "seed": "5", "slice": "0of1"},
                     probe_cfg={"dataset": "one", "max_sequence_length": MSL, "topk": 3, "batch_size": 1, "ignore_padding": True},
                     model_cfg={"family": "sd3", "kind": "path", "path": str(tiny_dir), "checkpoint": str(ckpt)},
                     datasets={"one": ds}, device="cpu")
    with ShardWriter(shard, {"probe": "sd3_textgrad", "model": "m", "axes": spec.axes, "spec": spec.to_json_dict()}) as w:
        P.SD3TextGrad().run_shard(spec, w)
    from layerscope.h5io import Shard

    ref = P.SD3TextGrad().merge([Shard(shard)])["samples"]
    got = smp[(smp.timestep_index == 300) & (smp.seed == 5)].sort_values("block")
    np.testing.assert_allclose(got["strength"].to_numpy(), ref.sort_values("block")["strength"].to_numpy(), rtol=1e-4)
    np.testing.assert_allclose(got["entropy"].to_numpy(), ref.sort_values("block")["entropy"].to_numpy(), rtol=1e-5)
    # bad input: one line naming the flag, non-zero exit
    capsys.readouterr()
    rc = main(["textgrad", "--prompt", prompt, "--image", str(tmp_path / "nope.png"), "--model", str(tiny_dir),
               "--out", str(tmp_path / "o2")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "--image" in err[0] and "nope.png" in err[0]


def test_every_table_row_names_timestep_sigma_and_model_timestep(tmp_path, tiny_dir, dataset):
    shards = [run(tmp_path, tiny_dir, dataset, {"timestep": t, "seed": "0", "slice": "0of1"}, save_token_scores=True)
              for t in ("250", "600")]
    tables = P.SD3TextGrad().merge(shards)
    for aggregate in ("blocks_all_timesteps", "pooled"):  # rows pooled over timesteps: their own tables
        pooled_over_t = tables.pop(aggregate)
        assert set(pooled_over_t["timestep_convention"]) == {"note"} and "timestep_index" not in pooled_over_t
        assert set(pooled_over_t["model"]) == {shards[0].model}
    assert (tables["blocks"]["timestep_index"].astype(str) != "all").all()
    for name, df in tables.items():
        assert set(df["model"]) == {shards[0].model}, name
        assert {"timestep_convention", "timestep_index", "timestep", "sigma"} <= set(df.columns), name
        assert set(df["timestep_convention"]) == {"note"}, name
        per = df[df["timestep_index"].astype(str) != "all"]
        assert len(per) and np.allclose(per["sigma"].astype(float), per["timestep_index"].astype(float) / 1000), name
        assert np.allclose(per["timestep"].astype(float), per["timestep_index"].astype(float)), name
        assert df[df["timestep_index"].astype(str) == "all"]["sigma"].isna().all(), name


def _curve_tables(pooled_rows: bool):
    import pandas as pd

    rng = np.random.default_rng(0)
    samples = pd.DataFrame([{"model": m, "line": f"step {t}", "timestep_index": t, "seed": s, "image_id": i, "block": b,
                             "strength": rng.uniform(1, 2), "topk_mass": rng.uniform(), "entropy": rng.uniform(1, 2),
                             "nonfinite": 0}
                            for m in ("a", "b") for t in (200, 800) for s in (0, 1) for i in range(3) for b in range(4)])
    pooled = pd.DataFrame([{"model": m, "block": b, "pairs": 3, "samples_per_pair": 4, "nonfinite": 0,
                            **{k: v for metric in ("strength", "topk_mass", "entropy")
                               for k, v in ((metric, rng.uniform(1, 2)), (f"{metric}_ci_low", 0.9), (f"{metric}_ci_high", 2.1))}}
                           for m in ("a", "b") for b in range(4)]) if pooled_rows else pd.DataFrame(columns=["model"])
    per_t = pd.DataFrame([{"model": m, "timestep_index": t, "block": b, "pairs": 3, "samples_per_pair": 2,
                           "strength": 5.0 + t, "topk_mass": 0.5, "entropy": 1.0} for m in ("a", "b") for t in (200, 800)
                          for b in range(4)])
    return {"samples": samples, "pooled": pooled, "pooled_per_timestep": per_t}


def test_figures_draw_the_notes_pooled_curves_by_default(tmp_path):
    """The figure's solid line per model is the pooled table's value at each block (the note's
    curve), its band the table's t interval; per-timestep pooled curves are the dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    from layerscope.probes import textgrad_plots as TP

    t = _curve_tables(True)
    fig = TP._pooled_figure(t, "topk_mass", "")
    lines = [ln for ln in fig.axes[0].get_lines() if ln.get_label().endswith("pooled over all timesteps x seeds")]
    assert len(lines) == 2
    for ln in lines:
        m = ln.get_label().split(":")[0]
        want = t["pooled"][t["pooled"]["model"] == m].sort_values("block")["topk_mass"].to_numpy()
        np.testing.assert_array_equal(ln.get_ydata(), want)
    dashed = [ln for ln in fig.axes[0].get_lines() if "timestep" in ln.get_label() and "over its seeds" in ln.get_label()]
    assert len(dashed) == 4 and {ln.get_linestyle() for ln in dashed} == {"--"}
    assert "note's curve" in fig.axes[0].get_title() and "3 pair(s)" in fig.axes[0].get_title()
    t["samples"]["line"] = "all timesteps"  # lines_per_timestep: false
    assert len(TP._pooled_figure(t, "topk_mass", "").axes[0].get_lines()) == 2
    # without pooled rows (pooled_curves: false) the per-row view, titled so
    fig2 = TP._per_row_figure(_curve_tables(False)["samples"], "topk_mass", "")
    assert "pooled_curves: false" in fig2.axes[0].get_title() and "2 seed(s) x 3 sample(s)" in fig2.axes[0].get_title()
    TP.plot_curves(_curve_tables(True), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{f}{s}" for f in TP.FIGURES.values() for s in (".pdf", ".png"))
