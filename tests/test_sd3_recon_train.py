"""sd3_recon_train: the fine-tune loop, its checkpoints, and the probe's shard -> table -> figure path.

A tiny StableDiffusion3Pipeline (two tiny CLIP encoders with in-memory vocabularies, no T5, tiny
VAE, 4-block MMDiT) is built offline once per module."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_hooks_documented  # noqa: E402
import torch
import torch.nn.functional as F

from layerscope.models.sd3_light import ReconConfigError

torch.set_num_threads(1)
CAPTIONS = ["a red square", "a blue circle on grass", "a cat", "two green lines"]


def _bytes_to_unicode() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def build_tiny_pipeline(out: Path) -> Path:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)

    def clip(seed: int):
        torch.manual_seed(seed)
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=77, projection_dim=8, bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"]))

    torch.manual_seed(0)
    tr = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=8,
                               num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
                        norm_num_groups=4, layers_per_block=1, sample_size=16, shift_factor=0.06, scaling_factor=1.5)
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    pipe = StableDiffusion3Pipeline(transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
                                    vae=vae, text_encoder=clip(1), tokenizer=tok, text_encoder_2=clip(2), tokenizer_2=tok,
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    from PIL import Image

    from layerscope.data import build_index

    root = tmp_path_factory.mktemp("recon")
    base = build_tiny_pipeline(root / "sd3_base")
    img_dir = root / "imgs"
    img_dir.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i, cap in enumerate(CAPTIONS):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(img_dir / f"im{i}.png")
        lines.append(f"im{i}.png\t{cap}")
    (root / "caps.tsv").write_text("\n".join(lines) + "\n")
    index = build_index("toy", {"kind": "folder", "path": str(img_dir), "captions": str(root / "caps.tsv")}, root / "data" / "index.tsv")
    from layerscope.models import build_tiny

    build_tiny("sd3", "default", 0, root / "sd3_tiny_t5")  # the default study's tiny SD3 (with a tiny T5)
    return {"root": root, "base": base, "index": index, "tiny_t5": root / "sd3_tiny_t5"}


def _data(pipe, index, max_seq=4):
    from layerscope.data import load_image, read_index
    from layerscope.training import encode_dataset

    recs = read_index(index)
    return encode_dataset(pipe, [load_image(r.path, 16) for r in recs], [r.caption for r in recs], 16, max_seq)


def test_text_mask_and_first_step_against_independent_flow_matching(study):
    from diffusers.training_utils import compute_density_for_timestep_sampling

    from layerscope.training import FineTuneConfig, fine_tune, load_pipeline

    pipe = load_pipeline({"kind": "path", "path": str(study["base"])}, torch.device("cpu"))
    data = _data(pipe, study["index"])
    # mask: CLIP positions holding bos + caption tokens + eos (byte-level vocab: one token per character
    # plus '</w>' word ends), the 4 T5 positions all padding (no T5 in this pipeline)
    n_tok = [len(c.replace(" ", "")) + 2 for c in CAPTIONS]
    assert data["text_mask"].shape == (4, 77 + 4) and data["text_mask"].sum(1).tolist() == n_tok
    assert not data["text_mask"][:, 77:].any()
    base_state = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}

    # independent reference of step 0 under the default convention (the existing SD3 training): the same
    # random draws; sigma = sigmoid(N(0,1)) then the scheduler's shift (3.0), model timestep sigma * 1000
    cfg = FineTuneConfig(gamma=0.0, steps=1, batch_size=2, seed=3, max_sequence_length=4)
    gen = torch.Generator().manual_seed(3)
    order = torch.randperm(4, generator=gen)
    ix = order[:2]
    x0 = data["latents"][ix]
    noise = torch.randn(x0.shape, generator=gen)
    s = 1.0 / (1.0 + torch.exp(-torch.randn(2, generator=gen)))
    s = 3.0 * s / (1.0 + 2.0 * s)
    x_t = (1.0 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * noise
    with torch.no_grad():
        v = pipe.transformer(hidden_states=x_t, timestep=s * 1000.0, encoder_hidden_states=data["prompt_embeds"][ix],
                             pooled_projections=data["pooled"][ix], return_dict=False)[0]
    ref = F.mse_loss(v, noise - x0)
    res0, _ = fine_tune(pipe, data, cfg)
    assert abs(res0.denoise[0] - float(ref)) <= 1e-6 * float(ref)
    assert abs(res0.sigma[0] - float(s.mean())) < 1e-7
    assert res0.total[0] == res0.denoise[0] and res0.recon[0] == 0.0 and not res0.recon_computed
    assert res0.extra["shift"] == 3.0 and res0.extra["loss_convention"] == "mse, mean(l*w), text: all tokens"

    # the option timestep_sampling: discrete = diffusers' training scripts: uniform index into the shifted
    # table, x_t from the scheduler's own scale_noise
    gen = torch.Generator().manual_seed(3)
    order = torch.randperm(4, generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    u = compute_density_for_timestep_sampling("uniform", 2, generator=gen)
    ti = (u * 1000).long()
    from diffusers import FlowMatchEulerDiscreteScheduler

    sch = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    t = sch.timesteps[ti]
    x_t = sch.scale_noise(x0, t, noise)
    with torch.no_grad():
        v = pipe.transformer(hidden_states=x_t, timestep=t, encoder_hidden_states=data["prompt_embeds"][ix],
                             pooled_projections=data["pooled"][ix], return_dict=False)[0]
    ref_d = F.mse_loss(v, noise - x0)
    res_d, _ = fine_tune(pipe, data, FineTuneConfig(gamma=0.0, steps=1, batch_size=2, seed=3, max_sequence_length=4,
                                                    timestep_sampling="discrete"))
    assert abs(res_d.denoise[0] - float(ref_d)) <= 1e-6 * float(ref_d)
    pipe.transformer.load_state_dict(base_state)

    # gamma > 0 from the same weights and seed: same first denoise loss (the capture does not change
    # the forward), total = denoise + gamma * recon on every step; the text MSE over all 2 x 81 tokens
    # by default, over the batch's real tokens with ignore_padding
    pipe.transformer.load_state_dict(base_state)
    res, _ = fine_tune(pipe, data, FineTuneConfig(gamma=0.5, target_layer=1, steps=4, batch_size=2, seed=3, max_sequence_length=4))
    assert res.denoise[0] == res0.denoise[0]
    np.testing.assert_allclose(res.total, res.denoise + 0.5 * res.recon, rtol=1e-6)
    assert (res.recon > 0).all() and np.isfinite(res.total).all() and not res.skipped.any()
    assert (res.n_valid_tokens == 2 * 81).all()
    pipe.transformer.load_state_dict(base_state)
    res_p, _ = fine_tune(pipe, data, FineTuneConfig(gamma=0.5, target_layer=1, steps=4, batch_size=2, seed=3, max_sequence_length=4,
                                                    ignore_padding=True))
    assert res_p.denoise[0] == res0.denoise[0] and res_p.recon[0] != res.recon[0]
    assert res_p.n_valid_tokens[0] == sum(n_tok[i] for i in ix.tolist())
    assert res.final_hook == "blocks.2.hook_text_out" and res.target_hook == "blocks.0.hook_text_out"
    changed = [k for k, w in pipe.transformer.state_dict().items() if not torch.equal(w, base_state[k])]
    assert len(changed) > 0


def test_full_checkpoint_round_trip_and_lora_adapter(study, tmp_path):
    from layerscope.training import CHECKPOINT_MANIFEST, FineTuneConfig, fine_tune, load_pipeline, save_checkpoint

    dev = torch.device("cpu")
    pipe = load_pipeline({"kind": "path", "path": str(study["base"])}, dev)
    data = _data(pipe, study["index"])
    res, peft_model = fine_tune(pipe, data, FineTuneConfig(gamma=1.0, target_layer=0, steps=2, seed=1, max_sequence_length=4))
    assert peft_model is None
    ck = save_checkpoint(pipe, None, tmp_path / "ck_full", {"note": "test"})
    assert json.loads((ck / CHECKPOINT_MANIFEST).read_text())["kind"] == "pipeline"
    assert not list(tmp_path.glob(".partial-*"))
    back = load_pipeline({"kind": "path", "path": str(ck)}, dev)
    sd_a, sd_b = pipe.transformer.state_dict(), back.transformer.state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)

    # lora: base weights frozen, only adapter weights train; base + adapter reloads to the trained model
    pipe = load_pipeline({"kind": "path", "path": str(study["base"])}, dev)
    base = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    res, peft_model = fine_tune(pipe, data, FineTuneConfig(gamma=0.5, target_layer=2, steps=3, seed=2, mode="lora",
                                                           learning_rate=1e-2, max_sequence_length=4))
    assert peft_model is not None and 0 < res.trainable_params < sum(v.numel() for v in base.values())
    for k, v in pipe.transformer.state_dict().items():
        if "lora_" not in k:
            assert torch.equal(v, base[k.replace(".base_layer", "")]), k
    ck = save_checkpoint(pipe, peft_model, tmp_path / "ck_lora", {})
    assert (ck / "adapter_config.json").is_file() and json.loads((ck / CHECKPOINT_MANIFEST).read_text())["kind"] == "lora"
    back = load_pipeline({"kind": "path", "path": str(study["base"]), "lora": str(ck)}, dev)
    g = torch.Generator().manual_seed(0)
    x = dict(hidden_states=torch.randn(1, 4, 8, 8, generator=g), timestep=torch.tensor([300.0]),
             encoder_hidden_states=data["prompt_embeds"][:1], pooled_projections=data["pooled"][:1], return_dict=False)
    with torch.no_grad():
        trained, reloaded = pipe.transformer(**x)[0], back.transformer(**x)[0]
        plain = load_pipeline({"kind": "path", "path": str(study["base"])}, dev).transformer(**x)[0]
    assert torch.allclose(trained, reloaded, atol=1e-5) and not torch.allclose(trained, plain, atol=1e-4)
    # the adapted model is a plain diffusers transformer again (merged weights, plain keys): it trains and saves as one
    assert back.transformer.state_dict().keys() == load_pipeline({"kind": "path", "path": str(study["base"])}, dev).transformer.state_dict().keys()


def test_probe_shard_checkpoint_merge_plot_and_plan(study, tmp_path, monkeypatch):
    """Through the lead's CLI (run-shard), merge driver and plot driver, as the Snakemake rules run them."""
    import pandas as pd

    from layerscope.cli import main as cli
    from layerscope.h5io import Shard, ShardWriter
    from layerscope.merge import merge_to_tables, plot_from_tables
    from layerscope.plan import Plan, validate_config
    from layerscope.probes import get_probe
    from layerscope.probes.base import ShardSpec

    monkeypatch.chdir(tmp_path)
    probe = get_probe("sd3_recon_train")
    from layerscope.data import read_index

    lst = tmp_path / "toy.tsv"  # a well-formed list file (the plan parses it): path<TAB>caption per line
    lst.write_text("".join(f"{r.path}\t{r.caption}\n" for r in read_index(study["index"])))
    cfg = {
        "runtime": {"device": "cpu"},
        "models": {"tiny": {"family": "sd3", "source": str(study["tiny_t5"])},
                   "tiny_recon": {"family": "sd3", "source": "results/default/sd3_recon_train/checkpoints/tiny/gamma-0.5__target-1__seed-0"}},
        "datasets": {"toy": {"kind": "list", "path": str(lst)}},  # the index is built below
        "probes": {"sd3_recon_train": {"models": ["tiny"], "dataset": "toy", "gammas": [0.0, 0.5], "targets": [1],
                                       "seeds": [0], "steps": 3, "max_sequence_length": 8,
                                       # the count check below is of the padding-excluding option's tokens
                                       "ignore_padding": True}},
    }
    validate_config(cfg)
    plan = Plan(cfg, tmp_path)
    assert plan.shards("sd3_recon_train") == [("tiny", "gamma-0__target-1__seed-0"), ("tiny", "gamma-0.5__target-1__seed-0")]
    assert plan.model("tiny_recon")["kind"] == "path"  # a path under results/ is produced by a rule
    from layerscope.data import build_slice

    for idx in {i for m, lab in plan.shards("sd3_recon_train") for i in plan.data_inputs("sd3_recon_train", m, lab)}:
        build_slice("toy", plan.dataset("toy"), 0, "0of1", idx)  # what the dataset_slice rule writes

    paths = []
    for model, label in plan.shards("sd3_recon_train"):
        out = plan.shard_path("sd3_recon_train", model, label)
        assert cli(["run-shard", "--spec", plan.spec_json("sd3_recon_train", model, label), "--out", out]) == 0
        paths.append(out)
    shards = [Shard(p) for p in paths]
    ck = Path("results/default/sd3_recon_train/checkpoints/tiny/gamma-0.5__target-1__seed-0")
    assert ck == Path(plan.model("tiny_recon")["path"])  # the checkpoint is exactly what the second model loads
    assert (ck / "model_index.json").is_file() and (ck / "transformer").is_dir()
    assert Path("results/default/sd3_recon_train/checkpoints/tiny/gamma-0__target-1__seed-0/model_index.json").is_file()
    # full mode stores only the transformer; the other components are relative links to the base's
    import os

    assert not (ck / "transformer").is_symlink() and shards[1].attrs["checkpoint_kind"] == "transformer+links"
    for comp in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae", "tokenizer", "scheduler"):
        assert (ck / comp).is_symlink() and not os.readlink(ck / comp).startswith("/"), comp
        assert (ck / comp).resolve() == (Path(study["tiny_t5"]) / comp).resolve(), comp
    assert not list(Path("results/default/sd3_recon_train/shards/tiny").glob("*.resume"))  # resumable state cleaned
    man = json.loads((ck / "layerscope_checkpoint.json").read_text())
    assert man["train"]["gamma"] == 0.5 and man["train"]["target_layer"] == 1 and man["axes"]["seed"] == "0"
    assert shards[1].attrs["checkpoint"] == str(ck) and shards[1].attrs["target_hook"] == "blocks.0.hook_text_out"

    merge_to_tables("sd3_recon_train", "tiny", paths, "results/default/sd3_recon_train/tables/tiny", plan.config_hash("sd3_recon_train", "tiny"))
    df = pd.read_csv("results/default/sd3_recon_train/tables/tiny/losses.csv")
    assert len(df) == 6 and set(df["gamma"]) == {0.0, 0.5}
    assert_hooks_documented("sd3", set(df["target_hook"]) | set(df["final_hook"]))
    assert set(df["model"]) == {"tiny"}
    for sh in shards:
        sub = df[df["gamma"] == float(sh.axes["gamma"])]
        g = sh.groups["train/losses"]
        np.testing.assert_allclose(sub["total"].to_numpy(), g["total"], rtol=1e-15)
        np.testing.assert_allclose(sub["recon"].to_numpy(), g["recon"], rtol=1e-15)
    on = df[df["gamma"] == 0.5]
    np.testing.assert_allclose(on["total"], on["denoise"] + 0.5 * on["recon"], rtol=1e-6)
    assert (df[df["gamma"] == 0.0]["recon"] == 0).all() and (on["recon"] > 0).all()
    assert not df[df["gamma"] == 0.0]["recon_computed"].any() and on["recon_computed"].all()
    # every row records the conventions its run used
    assert (df["timestep_sampling"] == "logit_normal(mean=0, std=1)").all() and (df["shift"] == 3.0).all()
    assert (df["loss_convention"] == "mse, mean(l*w), text: real tokens").all()
    # with T5 the valid targets include T5 positions: every step's count is a sum of two captions' counts,
    # each counted here straight from the tokenizers (CLIP: either tokenizer's mask; T5: its own, 8 positions)
    from itertools import combinations_with_replacement

    from layerscope.data import read_index
    from layerscope.training import load_pipeline

    pipe = load_pipeline({"kind": "path", "path": str(study["tiny_t5"])}, torch.device("cpu"))
    assert pipe.text_encoder_3 is not None
    caps = [r.caption for r in read_index(study["index"])]
    per = []
    for c in caps:
        clip = max(int(t(c, max_length=77, truncation=True).attention_mask.__len__()) for t in (pipe.tokenizer, pipe.tokenizer_2))
        t5 = int(sum(pipe.tokenizer_3(c, max_length=8, truncation=True).attention_mask))
        per.append(clip + t5)
    sums = {a + b for a, b in combinations_with_replacement(per, 2)}
    assert set(on["n_valid_tokens"]) <= sums and (on["n_valid_tokens"] > max(per)).all()
    plot_from_tables("sd3_recon_train", ["results/default/sd3_recon_train/tables/tiny"], "results/default/sd3_recon_train/figures", "test")
    assert Path("results/default/sd3_recon_train/figures/loss_curves.png").stat().st_size > 10_000

    # a target layer beyond the model fails before any training, naming the key and the range
    spec = plan.spec("sd3_recon_train", "tiny", "gamma-0.5__target-1__seed-0")
    bad = ShardSpec(**{**spec.to_json_dict(), "axes": {"gamma": "0.5", "target": "3", "seed": "0"}})
    with pytest.raises(ReconConfigError, match=r"text_recon_target_layer: 3 is out of range .* valid: 0\.\.2"):
        with ShardWriter(tmp_path / "bad.h5", {}) as w:
            probe.run_shard(bad, w)
    assert not (tmp_path / "bad.h5").exists()


def test_logit_normal_sigmas_follow_the_shifted_logit_normal_law():
    """sample_timesteps against the law itself: sigma = s(3)(sigmoid(z)) with s(k)(x) = kx / (1 + (k-1)x) is
    monotone, so its quantiles are s(3)(sigmoid(mean + std * Phi^-1(q))); t = 1000 sigma."""
    from scipy.stats import norm

    from layerscope.training import FineTuneConfig, sample_timesteps

    def law(q, mean, std, k):
        x = 1.0 / (1.0 + np.exp(-(mean + std * norm.ppf(q))))
        return k * x / (1.0 + (k - 1.0) * x)

    qs = np.array([0.1, 0.25, 0.5, 0.75, 0.9])
    for mean, std, k in ((0.0, 1.0, 3.0), (0.5, 0.7, 1.0)):
        cfg = FineTuneConfig(logit_mean=mean, logit_std=std)
        sig, t = sample_timesteps(cfg, 40_000, torch.Generator().manual_seed(0), torch.empty(0), torch.empty(0), k)
        assert torch.equal(t, sig * 1000)
        np.testing.assert_allclose(np.quantile(sig.numpy(), qs), law(qs, mean, std, k), atol=6e-3)
    # discrete: only values of the table, uniform over its indices
    sigmas, tsteps = torch.linspace(1.0, 0.001, 1000), torch.linspace(1000.0, 1.0, 1000)
    sig, t = sample_timesteps(FineTuneConfig(timestep_sampling="discrete"), 20_000, torch.Generator().manual_seed(0), sigmas, tsteps, 3.0)
    idx = torch.searchsorted(-sigmas, -sig)
    assert torch.equal(sigmas[idx], sig) and torch.equal(tsteps[idx], t)
    assert abs(float(idx.float().mean()) - 499.5) < 6


@pytest.mark.parametrize("key, value, message", [
    ("huber_c", 0.1, "probes.sd3_recon_train.huber_c: renamed to pseudo_huber_c"),
    ("loss_type", "pseudo_huber", "probes.sd3_recon_train.loss_type: pseudo_huber needs pseudo_huber_c"),
    ("weighting", "mode", "probes.sd3_recon_train.weighting: applies to timestep_sampling: discrete only"),
    ("timestep_sampling", "uniform", "probes.sd3_recon_train.timestep_sampling: 'uniform' is not one of"),
])
def test_renamed_and_contradictory_keys_fail_the_plan_in_one_line(study, tmp_path, key, value, message):
    from layerscope.plan import ConfigError, Plan, validate_config

    cfg = {"runtime": {"device": "cpu"}, "models": {"tiny": {"family": "sd3", "source": str(study["base"])}},
           "datasets": {"toy": {"kind": "list", "path": str(study["index"])}},
           "probes": {"sd3_recon_train": {"models": ["tiny"], "dataset": "toy", key: value}}}
    with pytest.raises(ConfigError, match=message) as e:
        validate_config(cfg)
        Plan(cfg, tmp_path)
    assert "\n" not in str(e.value)


def test_merge_refuses_a_shard_without_recorded_conventions(tmp_path):
    """A shard from before the conventions were recorded cannot mix silently with new ones."""
    from layerscope.h5io import Shard, ShardError, ShardWriter
    from layerscope.probes.sd3_recon_train import SD3ReconTrain

    arrays = {"step": np.arange(2), "denoise": np.ones(2), "recon": np.zeros(2), "total": np.ones(2), "sigma": np.full(2, 0.5),
              "grad_norm": np.ones(2), "n_valid_tokens": np.zeros(2, np.int64), "skipped": np.zeros(2, bool)}
    prov = {"probe": "sd3_recon_train", "model": "m", "axes": {"gamma": "0", "target": "0", "seed": "0"}, "config_hash": "h",
            "data_digest": "d", "spec": {}}
    attrs = {"recon_computed": False, "gamma": 0.0, "target_layer": 0}
    conv = {"timestep_sampling": "logit_normal(mean=0, std=1)", "shift": 3.0, "loss_convention": "mse, mean(l*w), text: all tokens"}
    with ShardWriter(tmp_path / "new.h5", prov) as w:
        w.write("train/losses", arrays, attrs={**attrs, **conv})
    with ShardWriter(tmp_path / "old.h5", prov) as w:
        w.write("train/losses", arrays, attrs=attrs)
    df = SD3ReconTrain().merge([Shard(tmp_path / "new.h5")])["losses"]
    assert (df["loss_convention"] == conv["loss_convention"]).all() and (df["shift"] == 3.0).all()
    with pytest.raises(ShardError, match=r"old\.h5: train/losses lacks timestep_sampling, shift, loss_convention"):
        SD3ReconTrain().merge([Shard(tmp_path / "new.h5"), Shard(tmp_path / "old.h5")])


# ---------------------------------------------------------------------------------------- resume
def _state(tr) -> dict:
    return {k: v.detach().clone() for k, v in tr.state_dict().items()}


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_killed_and_resumed_training_equals_uninterrupted_bitwise(study, tmp_path, mode):
    """A run stopped after step 3 (state saved after step 2) and resumed from its resumable state
    gives exactly the losses and final weights of the run that was never stopped."""
    from layerscope.training import RESUME_FILE, FineTuneConfig, fine_tune, load_pipeline

    dev = torch.device("cpu")
    cfg = FineTuneConfig(gamma=0.5, target_layer=1, steps=5, batch_size=3, seed=4, max_sequence_length=4, mode=mode,
                         learning_rate=1e-2, checkpoint_every=2)
    pipe = load_pipeline({"kind": "path", "path": str(study["base"])}, dev)
    data = _data(pipe, study["index"])
    ref, _ = fine_tune(pipe, data, cfg, resume_dir=tmp_path / "ref.resume", fingerprint="f")
    ref_w = _state(pipe.transformer)
    assert ref.extra["resumed_at"] == 0

    class Killed(Exception):
        pass

    def kill_after_third(step, _losses):
        if step == 2:
            raise Killed

    pipe = load_pipeline({"kind": "path", "path": str(study["base"])}, dev)
    with pytest.raises(Killed):
        fine_tune(pipe, data, cfg, on_step=kill_after_third, resume_dir=tmp_path / "run.resume", fingerprint="f")
    saved = torch.load(tmp_path / "run.resume" / RESUME_FILE, weights_only=False)
    assert saved["step"] == 2 and not list((tmp_path / "run.resume").glob(".*tmp"))

    torch.manual_seed(12345)  # the resumed process starts with other global RNG states
    np.random.seed(7)
    pipe = load_pipeline({"kind": "path", "path": str(study["base"])}, dev)
    res, _ = fine_tune(pipe, data, cfg, resume_dir=tmp_path / "run.resume", fingerprint="f")
    assert res.extra["resumed_at"] == 2
    for k in ("denoise", "recon", "total", "sigma", "grad_norm", "n_valid_tokens", "skipped"):
        np.testing.assert_array_equal(getattr(res, k), getattr(ref, k), err_msg=k)
    got = _state(pipe.transformer)
    assert got.keys() == ref_w.keys() and all(torch.equal(got[k], ref_w[k]) for k in ref_w)
    # the state really was used: the weights after step 2 differ from the start (this is not a rerun from 0)
    assert (res.total[:2] == ref.total[:2]).all() and res.recon_computed

    # a state written with other settings (or data: the fingerprint) is not resumed from
    pipe = load_pipeline({"kind": "path", "path": str(study["base"])}, dev)
    other, _ = fine_tune(pipe, data, FineTuneConfig(**{**cfg.__dict__, "learning_rate": 2e-2}),
                         resume_dir=tmp_path / "run.resume", fingerprint="f")
    assert other.extra["resumed_at"] == 0
    pipe = load_pipeline({"kind": "path", "path": str(study["base"])}, dev)
    assert fine_tune(pipe, data, cfg, resume_dir=tmp_path / "run.resume", fingerprint="other-data")[0].extra["resumed_at"] == 0


def test_shard_killed_by_sigkill_resumes_through_the_cli(study, tmp_path, monkeypatch):
    """run-shard in a subprocess is SIGKILLed after step 3 (LAYERSCOPE_FAULT hook); no shard is left,
    the resumable state is; the rerun resumes at step 2 and ends with the losses and checkpoint
    weights of an uninterrupted shard, and removes the resumable state."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from layerscope.cli import main as cli
    from layerscope.h5io import Shard
    from layerscope.plan import Plan, validate_config

    from layerscope.data import read_index

    monkeypatch.chdir(tmp_path)
    lst = tmp_path / "pairs.tsv"
    lst.write_text("".join(f"{r.path}\t{r.caption}\n" for r in read_index(study["index"])))
    pcfg = {"models": ["tiny"], "dataset": "toy", "gammas": [0.5], "targets": [1], "seeds": [0], "steps": 5,
            "max_sequence_length": 8, "checkpoint_every": 2, "batch_size": 3, "learning_rate": 1e-2}
    cfg = {"runtime": {"device": "cpu"}, "models": {"tiny": {"family": "sd3", "source": str(study["tiny_t5"])}},
           "datasets": {"toy": {"kind": "list", "path": str(lst)}},
           "probes": {"sd3_recon_train": pcfg}}
    validate_config(cfg)
    plan = Plan(cfg, tmp_path)
    from layerscope.data import build_slice

    for idx in {i for m, lab in plan.shards("sd3_recon_train") for i in plan.data_inputs("sd3_recon_train", m, lab)}:
        build_slice("toy", plan.dataset("toy"), 0, "0of1", idx)  # what the dataset_slice rule writes
    (model, label), = plan.shards("sd3_recon_train")
    spec = plan.spec_json("sd3_recon_train", model, label)
    out = Path(plan.shard_path("sd3_recon_train", model, label))
    env = {**os.environ, "LAYERSCOPE_FAULT": "kill_after_step:3", "LAYERSCOPE_PROGRESS_SECONDS": "0", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    r = subprocess.run([sys.executable, "-m", "layerscope", "run-shard", "--spec", spec, "--out", str(out)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == -9, r.stderr[-2000:]
    resume = out.with_name(out.name.removesuffix(".h5") + ".resume")
    assert not out.exists() and (resume / "state.pt").is_file()
    assert f"layerscope progress: sd3_recon_train tiny/{label}: 3/5 steps (60.0%)" in r.stderr
    assert "4/5 steps" not in r.stderr  # killed right after step 3

    assert cli(["run-shard", "--spec", spec, "--out", str(out)]) == 0
    assert not resume.exists()
    sh = Shard(out)
    assert sh.attrs["resumed_at_step"] == 2
    ck = Path(sh.attrs["checkpoint"])
    resumed_w = load_file(ck / "transformer" / "diffusion_pytorch_model.safetensors")

    ref_out = tmp_path / "ref" / "ref.h5"
    ref_out.parent.mkdir()
    assert cli(["run-shard", "--spec", spec, "--out", str(ref_out)]) == 0  # same checkpoint folder: rewritten
    ref = Shard(ref_out)
    assert ref.attrs["resumed_at_step"] == 0
    for k in ("total", "denoise", "recon", "grad_norm", "sigma"):
        np.testing.assert_array_equal(sh.groups["train/losses"][k], ref.groups["train/losses"][k], err_msg=k)
    ref_w = load_file(ck / "transformer" / "diffusion_pytorch_model.safetensors")
    assert resumed_w.keys() == ref_w.keys() and all(torch.equal(resumed_w[k], ref_w[k]) for k in ref_w)


def test_gradient_checkpointing_and_bf16_autocast(study):
    """gradient_checkpointing recomputes every block in the backward pass (each block runs twice
    per step) and changes no number beyond float rounding; mixed_precision bf16 runs the forward in
    bf16 (losses move by bf16 rounding, not more) while weights and AdamW states stay fp32."""
    from layerscope.training import FineTuneConfig, fine_tune, load_pipeline

    dev = torch.device("cpu")
    base = FineTuneConfig(gamma=0.5, target_layer=1, steps=3, batch_size=2, seed=5, max_sequence_length=4, learning_rate=1e-3)

    def run(**kw):
        pipe = load_pipeline({"kind": "path", "path": str(study["base"])}, dev)
        calls = []
        h = pipe.transformer.transformer_blocks[1].attn.to_q.register_forward_hook(lambda *a: calls.append(1))
        res, _ = fine_tune(pipe, _data(pipe, study["index"]), FineTuneConfig(**{**base.__dict__, **kw}))
        h.remove()
        return res, pipe, len(calls)

    ref, ref_pipe, n_ref = run()
    ck, ck_pipe, n_ck = run(gradient_checkpointing=True)
    assert (n_ref, n_ck) == (3, 6)
    np.testing.assert_allclose(ck.total, ref.total, rtol=1e-6)
    for (k, a), b in zip(ref_pipe.transformer.state_dict().items(), ck_pipe.transformer.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=k)
    assert not ck_pipe.transformer.is_gradient_checkpointing  # switched off again after training

    bf, bf_pipe, _ = run(mixed_precision="bf16")
    assert all(p.dtype == torch.float32 for p in bf_pipe.transformer.parameters())
    assert not np.array_equal(bf.total, ref.total)  # the forward really ran in bf16
    np.testing.assert_allclose(bf.denoise, ref.denoise, rtol=5e-2)
    with pytest.raises(ReconConfigError, match="mixed_precision: 'fp8' is not one of no, bf16"):
        FineTuneConfig(mixed_precision="fp8")
