"""The Snakemake HTML report of a finished run, opened in headless Chromium: every figure shows.

workflow/scripts/check_report.py drives the report's own viewer (the React app's setView, what a
click on a result does) for each figure and reads back whether the browser decoded the image,
comparing its pixel size with the PNG on disk; captions must be free of reStructuredText errors.
Skips without a Chromium (Debian: apt-get install --no-install-recommends chromium).
"""

from __future__ import annotations

import base64
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow" / "scripts"))

import check_report  # noqa: E402

pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    import os

    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _snakemake(wd: Path, *args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("snakemake")
    r = subprocess.run([str(exe), "-s", str(REPO / "Snakefile"), "--profile", str(REPO / "profiles/local"), *args],
                       cwd=wd, capture_output=True, text=True, env=_env(), timeout=600)
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def browser() -> str:
    b = check_report.find_browser()
    if b is None:
        pytest.skip("no Chromium (Debian: apt-get install --no-install-recommends chromium)")
    return b


@pytest.fixture(scope="module")
def report(tmp_path_factory, browser) -> Path:
    """A finished small run of the default study's first probe, and its report."""
    wd = tmp_path_factory.mktemp("report")
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    probe = "dinov3_channels" if "dinov3_channels" in cfg["probes"] else next(iter(cfg["probes"]))
    cfg["probes"] = {probe: cfg["probes"][probe]}
    if probe == "dinov3_channels":
        cfg["probes"][probe].update(max_images=4, batch_size=2, slices=1)
    cfg["runtime"] = {"device": "cpu", "threads": 1}
    (wd / "study.yaml").write_text(yaml.safe_dump(cfg))
    _snakemake(wd, "--configfile", str(wd / "study.yaml"))
    _snakemake(wd, "--configfile", str(wd / "study.yaml"), "--report", "report.html")
    return wd / "report.html"


def test_every_figure_of_the_report_loads_in_chromium(report, browser):
    wd = report.parent
    summary, problems = check_report.check(report, workdir=wd, browser=browser)
    assert problems == [], "\n".join(problems)
    from layerscope.plan import plan_from_file

    # the report shows each figure the plan names as its PNG (its PDF copy is declared, not shown)
    plan = plan_from_file(wd / "study.yaml", wd)
    declared = sorted(plan.layout.figure(p, f) for p in plan.probes for f in plan.figure_names(p))
    assert declared and sorted(summary["figures"]) == declared
    assert all((wd / plan.layout.figure_vector(p, f)).is_file() for p in plan.probes for f in plan.figure_names(p))
    for path, fig in summary["figures"].items():
        assert (fig["width"], fig["height"]) == check_report.png_size(wd / path)


def test_check_catches_a_broken_figure_and_a_caption_error(report, browser, tmp_path):
    """The check can fail: a figure whose bytes are not an image, and a docutils error box."""
    html = report.read_text(encoding="utf-8")
    uris = re.findall(r'"data_uri": "(data:image/png;[^"]*?base64,)([^"]+)"', html)
    assert uris
    prefix, payload = uris[0]
    bad = html.replace(prefix + payload, prefix + base64.b64encode(b"not a png" * 50).decode(), 1)
    bad = bad.replace('"caption": "<p>', '"caption": "<div class=\\"system-message\\"><p>System Message: ERROR/3'
                      '</p></div><p>', 1)
    broken = tmp_path / "report.html"
    broken.write_text(bad, encoding="utf-8")
    _, problems = check_report.check(broken, browser=browser)
    assert any("not displayed by the report" in p for p in problems), problems
    assert any("reStructuredText error in its caption" in p for p in problems), problems
    assert len([p for p in problems if "not displayed" in p]) == 1, problems
