"""Family discovery: the declarations the planner reads from each family's source (no torch) are
exactly the ones Python imports, so a table written in a form the source reader cannot follow fails
here instead of silently dropping a family from a plan; and the derived registries (families, the
probes each serves, weight keys, block configs) match what the modules say."""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path

import pytest

from layerscope import hooks, model_configs
from layerscope.models import FAMILIES, WEIGHT_KEYS, check_weight_keys
from layerscope.errors import ConfigError
from layerscope.probes import PROBES, get_probe

PKG = Path(model_configs.__file__).parent / "models"


def _norm(x):
    """Tuples and lists alike (the source reader returns lists for both)."""
    return json.loads(json.dumps(x))


def test_families_are_the_modules_defining_load_and_build_tiny():
    expected = sorted(p.stem for p in PKG.glob("*.py")
                      if not p.stem.startswith("_")
                      and callable(getattr(importlib.import_module(f"layerscope.models.{p.stem}"), "load", None))
                      and callable(getattr(importlib.import_module(f"layerscope.models.{p.stem}"), "build_tiny", None)))
    assert sorted(FAMILIES) == expected == ["clip", "dinov3", "sd3", "sdxl", "wan"]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_source_reading_equals_the_imported_declarations(family):
    mod = importlib.import_module(f"layerscope.models.{family}")
    man = model_configs.family_manifest(family)
    assert _norm(model_configs.tiny_archs(family)) == _norm(mod.TINY_ARCHS)
    assert tuple(man["WEIGHT_KEYS"]) == tuple(mod.WEIGHT_KEYS) == WEIGHT_KEYS[family]
    if hasattr(mod, "HOOKS"):
        assert _norm(man["HOOKS"]) == _norm({k: dataclasses.asdict(p) for k, p in mod.HOOKS.items()})
    for name in ("BLOCKS_CONFIG", "HUB_FILES"):
        if hasattr(mod, name):
            assert _norm(man[name]) == _norm(getattr(mod, name))


def test_each_probe_is_served_by_the_families_whose_hook_table_names_it():
    served = {p: get_probe(p).families for p in PROBES}
    assert served == {"dinov3_channels": ("dinov3",), "sdxl_ablation": ("sdxl",), "wan_logits": ("wan",),
                      "sd3_recon_train": ("sd3",), "sd3_textgrad": ("sd3",)}
    for probe, fams in served.items():
        for fam in fams:
            assert any(probe in p.probes for p in hooks.table(fam).values())


def test_a_weight_key_of_another_family_is_refused():
    with pytest.raises(ConfigError, match=r"models\.m\.use_ema: family 'dinov3' does not read use_ema \(only wan do\)"):
        check_weight_keys("m", {"family": "dinov3", "use_ema": True})
    check_weight_keys("m", {"family": "wan", "use_ema": True})


def test_block_configs_point_at_the_block_indexed_network():
    assert model_configs._blocks_config("sd3") == ("transformer", ("transformer/config.json",))
    assert model_configs._blocks_config("dinov3") == (None, ("config.json",))
    cfg = model_configs.arch_config({"family": "sdxl", "kind": "tiny", "arch": "default"})
    assert cfg == model_configs.tiny_archs("sdxl")["default"]["unet"]


def test_an_unparseable_or_helper_module_is_no_family(tmp_path, monkeypatch):
    for f in ("wan_sampler", "sd3_light", "lora", "__init__", "nope", "../plan"):
        assert model_configs.family_manifest(f) == {}
    with pytest.raises(ConfigError, match=r"models\.x\.family: unknown model family 'sd4'; did you mean 'sd3'\?"):
        model_configs.check_family("x", "sd4")
