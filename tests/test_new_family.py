"""Adding a model family touches one file (plus its hook table): the worked example of
docs/adding-a-model-family.md, taken verbatim from the doc, is written into a copy of the package as
``models/vit.py`` and nothing else changes; the copy then plans, refuses a typo'd family and runs
``dinov3_channels`` end to end through Snakemake on the new family. The merged statistics are checked
against numpy on hidden states from a plain transformers forward (the test's own preprocessing)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import REPO, snakemake_cmd

SIZE = 32  # the example's ViT image_size


def _doc_block() -> str:
    text = (REPO / "docs" / "adding-a-model-family.md").read_text()
    m = re.search(r"```python\n(# src/layerscope/models/vit\.py\n.*?)```", text, re.S)
    assert m, "docs/adding-a-model-family.md lost its worked example"
    return m.group(1)


@pytest.fixture(scope="module")
def copy(tmp_path_factory) -> Path:
    """The repository's package, Snakefile and workflow copied, plus the doc's vit.py: the one new file."""
    root = tmp_path_factory.mktemp("newfam")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "src", root / "src", ignore=ignore)
    shutil.copytree(REPO / "workflow", root / "workflow", ignore=ignore)
    shutil.copytree(REPO / "envs", root / "envs")
    shutil.copy(REPO / "Snakefile", root / "Snakefile")
    before = {p.relative_to(root) for p in root.rglob("*") if p.is_file()}
    (root / "src" / "layerscope" / "models" / "vit.py").write_text(_doc_block())
    after = {p.relative_to(root) for p in root.rglob("*") if p.is_file()}
    assert after - before == {Path("src/layerscope/models/vit.py")}
    return root


def _env(copy: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(copy / "src"), "OMP_NUM_THREADS": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


def _py(copy: Path, code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(copy), timeout=300)


def _config(wd: Path, family: str = "vit") -> Path:
    cfg = {
        "runtime": {"device": "cpu", "threads": 1},
        "datasets": {"photos": {"kind": "skimage"}},
        "models": {"vit_tiny": {"family": family, "source": "tiny:default", "seed": 0}},
        "probes": {"dinov3_channels": {"models": ["vit_tiny"], "dataset": "photos", "image_size": SIZE,
                                       "batch_size": 6, "slices": 2, "topk": 4}},
    }
    p = wd / f"{family}.yaml"
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


def test_the_copy_discovers_the_family_and_it_serves_the_probe(copy):
    r = _py(copy, "import layerscope, sys; from layerscope.models import FAMILIES; "
                  "from layerscope.probes import get_probe; from layerscope import hooks;"
                  "print(layerscope.__file__); print(sorted(FAMILIES)); print(get_probe('dinov3_channels').families);"
                  "print('torch' in sys.modules); print(hooks.markdown_table('vit'))")
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert out[0].startswith(str(copy)), out[0]  # the copy, not the repository's package
    assert "'vit'" in out[1] and "'vit'" in out[2]
    assert "| `blocks.{i}.hook_resid_post` | `encoder.layer.{i}` |" in r.stdout  # its docs/hooks.md table
    assert out[3] == "False"  # discovery and the probe's families read the source: no torch import
    # the repository itself does not know the family
    from layerscope.models import FAMILIES

    assert "vit" not in FAMILIES


def test_a_typo_in_the_new_family_is_one_line_naming_it(copy, tmp_path):
    r = subprocess.run(["layerscope", "check-config", str(_config(tmp_path, "vitt"))], cwd=tmp_path,
                       capture_output=True, text=True, env=_env(copy), timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert "models.vit_tiny.family: unknown model family 'vitt'; did you mean 'vit'?" in line, line


def test_a_study_on_the_new_family_equals_numpy(copy, tmp_path):
    cmd = snakemake_cmd() + ["-s", str(copy / "Snakefile"), "-d", str(tmp_path), "--cores", "2",
                             "--configfile", str(_config(tmp_path))]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(copy), timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    tables = tmp_path / "results" / "default" / "dinov3_channels" / "tables" / "vit_tiny"
    ch = pd.read_csv(tables / "channels.csv")
    assert set(ch["model"]) == {"vit_tiny"}
    assert len(list((tmp_path / "results" / "default" / "dinov3_channels" / "shards" / "vit_tiny").glob("*.h5"))) == 2

    # independent reference: the saved tiny ViT through plain transformers, the doc's normalisation
    # written out here, LayerNorms in numpy
    import torch
    from transformers import ViTModel

    from layerscope.data import load_image, read_index

    model = ViTModel.from_pretrained(tmp_path / "results" / "default" / "models" / "vit_tiny",
                                     add_pooling_layer=False).eval()
    slices = sorted((tmp_path / "results" / "default" / "data" / "photos").rglob("*of2/index.tsv"))
    assert len(slices) == 2
    recs = [rec for f in slices for rec in read_index(f)]
    assert len(recs) == 12  # every photograph once
    paths = [Path(rec.path) if Path(rec.path).is_absolute() else tmp_path / rec.path for rec in recs]  # the study's workdir
    assert all(p.is_file() for p in paths)
    arr = np.stack([np.asarray(load_image(str(p), SIZE), dtype=np.float64) / 255.0 for p in paths])
    pix = torch.tensor(((arr - 0.5) / 0.5).transpose(0, 3, 1, 2), dtype=torch.float32)
    with torch.no_grad():
        hs = model(pixel_values=pix, output_hidden_states=True).hidden_states
    eps = model.config.layer_norm_eps
    w, b = model.layernorm.weight.detach().double().numpy(), model.layernorm.bias.detach().double().numpy()
    for i in range(model.config.num_hidden_layers):
        x = hs[i + 1].double().numpy()
        ln = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
        for rep, y in (("pre", x), ("per_layer_ln", ln), ("global_ln", ln * w + b)):
            for role, v in (("cls", y[:, 0]), ("patch", y[:, 1:].reshape(-1, y.shape[-1]))):
                sub = ch[(ch.layer == i) & (ch.rep == rep) & (ch.role == role)].sort_values("channel")
                assert len(sub) == model.config.hidden_size
                np.testing.assert_array_equal(sub["count"], v.shape[0])
                np.testing.assert_allclose(sub["mean"], v.mean(0), rtol=2e-4, atol=2e-5)
                np.testing.assert_allclose(sub["std"], np.sqrt(v.var(0) + 1e-8), rtol=2e-4, atol=2e-5)
                np.testing.assert_allclose(sub["max_abs"], np.abs(v).max(0), rtol=2e-4, atol=2e-5)
    assert set(ch["hook"]) == {f"blocks.{i}.{h}" for i in range(3)
                               for h in ("hook_resid_post", "ln_layer.hook_normalized", "ln_final.hook_normalized")}
