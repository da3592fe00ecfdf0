"""The hook vocabulary and the shape of the tree: docs/hooks.md equals the registry, names resolve to
real modules of the tiny models, a toy family plugs in with one table, imports only run down the
layers, and no source file grows past 400 lines."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from conftest import REPO, documented_hooks

from layerscope import hooks
from layerscope.hooks import HookPoint


def test_docs_hooks_md_has_every_family_table_verbatim():
    text = (REPO / "docs" / "hooks.md").read_text()
    for fam in hooks.BUILTIN_FAMILIES:
        assert f"## {fam}\n\n{hooks.markdown_table(fam)}\n" in text, f"docs/hooks.md: the {fam} table is stale"
    # the parser the probe tests use reads the same rows back
    assert "blocks.{i}.attn.hook_attn_scores" in documented_hooks("wan")
    assert documented_hooks("sd3") == set(hooks.table("sd3"))


def test_resolve_concrete_names_and_refuse_unknown_ones():
    assert hooks.resolve("sd3", "blocks.12.hook_text_grad")[0] == "transformer_blocks.12"
    assert hooks.resolve("wan", "blocks.3.attn.hook_attn_scores")[0] == "blocks.3.attn1"
    assert hooks.resolve("sdxl", "up_blocks.0.attentions.2.transformer_blocks.1.attn2.hook_out")[0] == \
        "up_blocks.0.attentions.2.transformer_blocks.1.attn2"
    assert hooks.resolve("dinov3", "blocks.0.ln_final.hook_normalized")[0] == "model.layer.0"
    for fam, bad in (("sd3", "transformer_blocks.2.hook_text_grad"), ("wan", "blocks.x.attn.hook_attn_scores"),
                     ("dinov3", "blocks.1.hook_resid_pre"), ("wan", "blocks.1.attn1.hook_attn_logits")):
        with pytest.raises(KeyError, match="is not a"):
            hooks.resolve(fam, bad)
    with pytest.raises(KeyError, match="is not a sd3 hook"):
        hooks.name("sd3", "blocks.{i}.hook_nothing", i=0)


def test_module_paths_exist_in_the_tiny_models(dinov3_dir):
    """Every block-indexed module path of a family is a real submodule of its tiny build."""
    import torch
    from diffusers import SD3Transformer2DModel, WanTransformer3DModel
    from transformers import DINOv3ViTModel

    from layerscope.models import sd3, wan

    roots = {"dinov3": DINOv3ViTModel.from_pretrained(dinov3_dir),
             "sd3": SD3Transformer2DModel(**sd3.TINY_ARCHS["default"]["transformer"]),
             "wan": WanTransformer3DModel(**wan.TINY_ARCHS["default"])}
    for fam, root in roots.items():
        for template, point in hooks.table(fam).items():
            if not point.module:
                continue
            concrete = template.format(i=0)
            mod = hooks.get_module(root, fam, concrete)
            assert isinstance(mod, torch.nn.Module), (fam, concrete)


def test_a_toy_family_registers_one_table_and_resolves():
    import torch

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(3)])

    hooks.register("toy", {"blocks.{i}.hook_resid_post": HookPoint("layers.{i}", "[B, 2]", "layer output", ("demo",))})
    try:
        assert hooks.get_module(Toy(), "toy", "blocks.2.hook_resid_post").in_features == 2
        assert "| `blocks.{i}.hook_resid_post` | `layers.{i}` | [B, 2] |" in hooks.markdown_table("toy")
        with pytest.raises(AttributeError):
            hooks.get_module(Toy(), "toy", "blocks.7.hook_resid_post")
    finally:
        hooks._REGISTERED.pop("toy")


# ------------------------------------------------------------------ the tree

# models -> probes -> stats/h5io -> merge -> CLI -> rules: a module may import its own layer and below.
# layout is path arithmetic that imports nothing of the package, so every layer may ask it for a path.
LAYER = {"errors": 0, "settings": 0, "hooks": 1, "models": 1, "model_configs": 1, "stats": 1, "batch_stats": 1, "h5io": 1, "h5read": 1, "progress": 0, "plots": 1,
         "provenance": 4, "data": 1, "hub": 1, "real_geometry": 1, "training": 2, "probes": 2, "estimate": 2,
         "merge": 3, "plan": 3, "layout": 0, "status": 4, "forkserver": 5, "textgrad_pair": 4, "cli": 5, "__main__": 5}
# known upward imports, owned elsewhere, per (file, imported module): listed so that a new one fails.
# (ConfigError lives in layerscope.errors and shard_label belongs in layout; the probes should import them there.)
KNOWN_UP: set[tuple[str, str]] = set()


def _layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_imports_only_run_down_the_layers():
    src = REPO / "src" / "layerscope"
    bad = []
    for f in src.rglob("*.py"):
        here = _layer_of("layerscope." + ".".join(f.relative_to(src).with_suffix("").parts))
        if here not in LAYER:
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for n in names:
                if not n.startswith("layerscope."):
                    continue
                there = _layer_of(n)
                if there in LAYER and LAYER[there] > LAYER[here] and (str(f.relative_to(REPO)), n) not in KNOWN_UP:
                    bad.append(f"{f.relative_to(REPO)}:{node.lineno} imports {n} ({here} -> {there})")
    assert not bad, "imports that run back up:\n" + "\n".join(bad)


def test_no_source_file_over_400_lines():
    long = {str(f.relative_to(REPO)): n for f in (REPO / "src").rglob("*.py") if (n := len(f.read_text().splitlines())) > 400}
    assert not long, long


def test_no_probe_or_model_keeps_its_own_defaults():
    src = REPO / "src" / "layerscope"
    hits = [f"{f.relative_to(REPO)}:{i}" for d in ("probes", "models") for f in (src / d).rglob("*.py")
            for i, line in enumerate(f.read_text().splitlines(), 1) if re.search(r"probe_cfg\.get\(|probe_cfg\[", line)]
    hits += [str(f.relative_to(REPO)) for f in src.rglob("*.py") if "DEFAULTS" in f.read_text()]
    assert not hits, hits


def test_training_dataclass_defaults_equal_the_schema():
    """FineTuneConfig keeps defaults for direct (test, benchmark) use only; they must be the schema's,
    which is what every run reads (config_from_probe fills every field from the typed settings)."""
    from dataclasses import MISSING, fields

    from layerscope.probes import get_probe
    from layerscope.training import FineTuneConfig, config_from_probe

    st = get_probe("sd3_recon_train").settings({})
    differ = {f.name: (f.default, getattr(st, f.name)) for f in fields(FineTuneConfig)
              if f.name not in ("gamma", "target_layer", "seed") and f.default is not MISSING
              and getattr(st, f.name) is not None and f.default != getattr(st, f.name)}
    assert not differ, differ
    assert config_from_probe(st, 0.5, 1, 3) == FineTuneConfig(gamma=0.5, target_layer=1, seed=3)
