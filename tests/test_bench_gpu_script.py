"""benchmarks/gpu.sh in its CPU-reduced mode (no GPU here): it runs a note-vs-probe comparison end
to end and writes the result file with the machine, the table row and a ratio."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_gpu_script_cpu_reduced_writes_results(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: gpu.sh would run the real-geometry benchmarks")
    out = tmp_path / "results-gpu.md"
    env = dict(os.environ, OUT=str(out), BENCH_ONLY="dinov3_channels", PYTHON=sys.executable)
    r = subprocess.run(["bash", str(REPO / "benchmarks/gpu.sh")], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "no CUDA device" in r.stderr
    text = out.read_text()
    assert "(cpu-reduced)" in text and "Measured on:" in text and "torch" in text
    row = next(ln for ln in text.splitlines() if ln.startswith("| dinov3_channels"))
    ratio = float(re.search(r"\| ([0-9.]+)x / ([0-9.]+)x / ([0-9.]+)x \|", row).group(2))
    assert 0.2 < ratio < 5  # same forwards on both sides: the statistics cost cannot dominate 5x
    assert "images/s" in row
