#!/usr/bin/env python3
"""Open a Snakemake HTML report in headless Chromium and check that every figure shows.

    python workflow/scripts/check_report.py report.html [--workdir DIR] [--json]

The report is a single-page React app with every result embedded as a data URI. This script
copies it with a small probe script appended, loads it with `chromium --headless --dump-dom`,
and the probe finds the app's root component, asks it to display each image result exactly as
a click on the result's button does (`setView({content: "img", ...})`), and records whether the
browser decoded the <img> the app rendered (complete, natural size). Checked here:
  - the app rendered and no JavaScript error was raised;
  - every image result was displayed and decoded, at the pixel size of the file on disk
    (read from the PNG header under --workdir, an independent reference);
  - every result has a caption, and no caption carries a reStructuredText error
    (docutils renders those as "System Message" boxes inside the report).
Exit status 0 when all hold, 1 otherwise (each problem on one line), 2 without a Chromium.
Needs only the standard library and Debian's `chromium` package (run as root: --no-sandbox).
"""

from __future__ import annotations

import argparse
import html as html_mod
import json
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

# Installed first in <head>: collects errors raised by any script of the report.
ERROR_HOOK = """<script>
window.__lsErrors = [];
window.addEventListener("error", (e) => window.__lsErrors.push(String(e.message || e)));
window.addEventListener("unhandledrejection", (e) => window.__lsErrors.push(String(e.reason)));
</script>"""

# Appended last in <body>: drives the report's own viewer, writes a JSON verdict into the DOM.
PROBE = """<script>
(async () => {
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  const out = {errors: window.__lsErrors, app: false, figures: {}};
  try {
    let app = null;
    for (let i = 0; i < 400 && !app; i++) {  // React renders asynchronously
      const root = document.querySelector("#app");
      const key = root && Object.keys(root).find((k) => k.startsWith("__reactContainer$"));
      // the container holds the HostRoot fiber; its FiberRoot points at the current tree
      const stack = key ? [root[key].stateNode ? root[key].stateNode.current : root[key]] : [];
      while (stack.length && !app) {
        const f = stack.pop();
        if (!f) continue;
        if (f.stateNode && typeof f.stateNode.setView === "function") app = f.stateNode;
        stack.push(f.child, f.sibling);
      }
      if (!app) await sleep(25);
    }
    out.app = !!app;
    out.text = document.querySelector("#app") ? document.querySelector("#app").innerText.slice(0, 2000) : "";
    for (const [path, r] of Object.entries(results)) {
      if (!String(r.mime_type).startsWith("image/")) continue;
      app.setView({content: "img", contentPath: r.data_uri, resultPath: path});
      let img = null;
      for (let i = 0; i < 400; i++) {
        await sleep(25);
        img = [...document.images].find((im) => im.getAttribute("src") === r.data_uri);
        if (img && img.complete) break;
      }
      if (img && !img.complete) await img.decode().catch(() => null);
      out.figures[path] = img ? {complete: img.complete, width: img.naturalWidth, height: img.naturalHeight} : null;
    }
  } catch (e) {
    out.errors.push("probe: " + String(e));
  }
  const pre = document.createElement("pre");
  pre.id = "layerscope-report-check";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
})();
</script>"""


def find_browser() -> str | None:
    for b in BROWSERS:
        if shutil.which(b):
            return shutil.which(b)
    return None


def embedded(html: str, name: str) -> dict:
    """A `var <name> = {...};` JSON object the report embeds in <script id="<name>">."""
    m = re.search(rf'<script id="{name}">\s*var {name} = (.*?);\s*</script>', html, re.S)
    if not m:
        raise ValueError(f"no <script id=\"{name}\"> in the report: not a Snakemake HTML report?")
    return json.loads(m.group(1))


def png_size(path: Path) -> tuple[int, int] | None:
    head = path.read_bytes()[:24]
    if head[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    return struct.unpack(">II", head[16:24])


def browse(report: Path, browser: str, timeout: float = 120) -> dict:
    html = report.read_text(encoding="utf-8")
    html = html.replace("<head>", "<head>" + ERROR_HOOK, 1)
    idx = html.rfind("</body>")
    html = html[:idx] + PROBE + html[idx:]
    with tempfile.TemporaryDirectory(prefix="report-check-") as tmp:
        page = Path(tmp) / "report.html"
        page.write_text(html, encoding="utf-8")
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--no-first-run", "--disable-extensions", f"--user-data-dir={tmp}/profile",
               "--virtual-time-budget=60000", "--dump-dom", page.as_uri()]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    m = re.search(r'<pre id="layerscope-report-check">(.*?)</pre>', r.stdout, re.S)
    if not m:
        raise RuntimeError(f"{browser} produced no verdict (exit {r.returncode}): {r.stderr.strip()[-1500:]}")
    return json.loads(html_mod.unescape(m.group(1)))


def check(report: Path, workdir: Path | None = None, browser: str | None = None) -> tuple[dict, list[str]]:
    """Return (summary, problems); problems is empty when the report is fine."""
    browser = browser or find_browser()
    if browser is None:
        raise FileNotFoundError("no Chromium found (Debian: apt-get install --no-install-recommends chromium)")
    html = report.read_text(encoding="utf-8")
    results = embedded(html, "results")
    problems: list[str] = []
    images = {p: r for p, r in results.items() if str(r.get("mime_type", "")).startswith("image/")}
    if not images:
        problems.append("the report holds no figures")
    for path, r in results.items():
        caption = r.get("caption") or ""
        if not re.sub(r"<[^>]+>", "", caption).strip():
            problems.append(f"{path}: no caption")
        if "system-message" in caption or "System Message" in caption:
            msg = html_mod.unescape(re.sub(r"<[^>]+>", " ", caption[caption.find("System Message"):]))
            problems.append(f"{path}: reStructuredText error in its caption: {' '.join(msg.split())[:200]}")
    seen = browse(report, browser)
    if not seen["app"]:
        problems.append("the report's app did not render")
    problems += [f"JavaScript error: {e}" for e in seen["errors"]]
    for path in images:
        fig = seen["figures"].get(path)
        if not fig or not fig["complete"] or not fig["width"]:
            problems.append(f"{path}: not displayed by the report (image did not load: {fig})")
            continue
        if workdir is not None and (workdir / path).is_file():
            size = png_size(workdir / path)
            if size is not None and (fig["width"], fig["height"]) != size:
                problems.append(f"{path}: shown at {fig['width']}x{fig['height']}, file is {size[0]}x{size[1]}")
    summary = {"report": str(report), "browser": browser, "figures": seen["figures"], "app": seen["app"],
               "categories": sorted(embedded(html, "categories"))}
    return summary, problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("report", type=Path)
    ap.add_argument("--workdir", type=Path, default=None, help="the run's folder (compare figure sizes with the files)")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    a = ap.parse_args(argv)
    try:
        summary, problems = check(a.report, a.workdir)
    except FileNotFoundError as e:
        print(f"check_report: {e}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps(summary, indent=1))
    else:
        print(f"{len(summary['figures'])} figures displayed in {a.report} ({summary['browser']})")
    for p in problems:
        print(f"PROBLEM: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
