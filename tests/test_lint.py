"""The workflow passes Snakemake's linter and is formatted with snakefmt.

`snakemake --lint` checks the workflow as it is planned from the default config.yaml (it flags
absolute paths, path composition with '+', missing log/conda directives, ...). `snakefmt --check`
covers the Snakefile, workflow/rules/*.smk and the SLURM test workflow; it needs snakefmt (and the
`shfmt` it runs on shell blocks, from shfmt-py) next to the interpreter or on PATH.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SNAKEFILES = [REPO / "Snakefile", *sorted((REPO / "workflow" / "rules").glob("*.smk")), REPO / "tests/slurm/Snakefile"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    return env


def test_snakemake_lint_is_clean(tmp_path):
    exe = BIN / "snakemake"
    r = subprocess.run([str(exe) if exe.exists() else "snakemake", "--lint", "-s", str(REPO / "Snakefile"),
                        "-d", str(tmp_path), "--configfile", str(REPO / "config.yaml")],
                       capture_output=True, text=True, env=_env(), timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "Lints for" not in out, out[-6000:]


def test_snakefmt_check_is_clean():
    exe = BIN / "snakefmt" if (BIN / "snakefmt").exists() else shutil.which("snakefmt")
    if exe is None:
        pytest.skip("snakefmt is not installed (pip install snakefmt)")
    r = subprocess.run([str(exe), "--check", "--diff", *map(str, SNAKEFILES)], capture_output=True, text=True,
                       env=_env(), cwd=REPO, timeout=120)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]


def test_the_repository_stands_alone():
    """No tracked file names a path outside the repository (a developer's sibling folders, a
    machine's home): what the study needs from outside lives in docs/ (design notes, background)."""
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    if not files:
        pytest.skip("not a git checkout")
    outside = ("../" + "shared", "/" + "work/")  # split so this file does not match itself
    hits = []
    for name in files:
        path = REPO / name
        if not path.is_file() or path.suffix in {".png", ".pdf", ".h5", ".safetensors", ".pt"}:
            continue
        try:
            text = path.read_text(errors="ignore")
        except OSError:
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if any(o in line for o in outside):
                hits.append(f"{name}:{n}: {line.strip()[:100]}")
    assert not hits, "paths outside the repository:\n" + "\n".join(hits)
