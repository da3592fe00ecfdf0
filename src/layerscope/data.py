"""Datasets: an index file (TSV: image_id, path, caption) that every shard slices.

The index is built once per dataset by the ``dataset_index`` rule; shards read it, take their
contiguous slice, and record the index's digest so a merge can refuse shards that saw different
data.  Kinds:

* ``skimage`` - real photographs bundled with scikit-image (offline), with hand-written captions;
  written out as PNG files so the rest of the study treats them like any folder of images.
* ``folder`` - every ``.png/.jpg/.jpeg/.webp/.bmp`` below ``path`` (sorted); captions from an
  optional TSV ``filename<TAB>caption``, else the file stem with '_' as spaces.
* ``list`` - a text file of ``path<TAB>caption`` lines (both required; relative paths are
  relative to the list file).
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from PIL import Image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}

# scikit-image's bundled colour photographs (no download needed), with captions for text probes.
SKIMAGE_PHOTOS: dict[str, str] = {
    "astronaut": "a portrait photograph of an astronaut in a white spacesuit in front of a flag",
    "coffee": "a cup of coffee on a saucer, seen from above",
    "chelsea": "a ginger tabby cat looking to the side",
    "rocket": "a rocket on a launch pad under a blue sky",
    "moon": "a grey close-up photograph of the surface of the moon",
    "hubble_deep_field": "a deep field telescope image of many distant galaxies",
    "immunohistochemistry": "a microscope image of stained tissue",
    "retina": "a photograph of the retina of a human eye",
    "coins": "a grey photograph of old coins on a table",
    "camera": "a black and white photograph of a man with a camera on a tripod",
    "horse": "a black silhouette of a horse",
    "brick": "a grey brick wall texture",
}


from layerscope.errors import DataError  # noqa: E402  (re-exported)


@dataclass(frozen=True)
class Record:
    image_id: int
    path: str
    caption: str


def _parse_tab_file(path: str | Path, field: str, first: str) -> list[tuple[int, str, str]]:
    """(line number, first column, caption) of every ``<first><TAB>caption`` line; blank lines and
    lines starting with '#' are skipped. Every other line must have exactly one TAB with text on
    both sides: a malformed line is named with its number instead of turning into an empty caption."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{field}: {path.name}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{field}: cannot read {path}: {e.strerror}") from None
    rows: list[tuple[int, str, str]] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
            raise DataError(f"{field}: {path.name} line {n}: expected '{first}<TAB>caption'")
        rows.append((n, parts[0].strip(), parts[1].strip()))
    return rows


def parse_list_file(path: str | Path, field: str = "datasets.<name>.path") -> list[tuple[int, str, str]]:
    """A ``list`` dataset's file: (line number, image path, caption) per line."""
    rows = _parse_tab_file(path, field, "path")
    if not rows:
        raise DataError(f"{field}: {Path(path).name} lists no images")
    return rows


def parse_captions_file(path: str | Path, field: str = "datasets.<name>.captions") -> dict[str, str]:
    """A ``folder`` dataset's captions TSV: file name -> caption; a repeated file name is refused."""
    out: dict[str, str] = {}
    for n, fname, cap in _parse_tab_file(path, field, "filename"):
        if fname in out:
            raise DataError(f"{field}: {Path(path).name} line {n}: file name '{fname}' is repeated")
        out[fname] = cap
    return out


def build_index(name: str, ds: Mapping[str, Any], out: str | Path) -> Path:
    """Write the dataset's index TSV (and, for skimage, the images beside it)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str]] = []
    kind = ds["kind"]
    if kind == "skimage":
        import numpy as np
        import skimage.data

        img_dir = out.parent / "images"
        img_dir.mkdir(exist_ok=True)
        for stem, caption in SKIMAGE_PHOTOS.items():
            arr = getattr(skimage.data, stem)()
            if arr.dtype == bool:
                arr = arr.astype("uint8") * 255
            if arr.ndim == 2:
                arr = np.stack([arr] * 3, axis=-1)
            p = img_dir / f"{stem}.png"
            Image.fromarray(arr[..., :3].astype("uint8")).save(p)
            rows.append((str(p), caption))
    elif kind == "folder":
        root = Path(ds["path"])
        if not root.is_dir():
            raise DataError(f"datasets.{name}.path: {root} is not a directory")
        caps: dict[str, str] = {}
        if ds.get("captions"):
            cap_file = Path(ds["captions"])
            if not cap_file.is_file():
                raise DataError(f"datasets.{name}.captions: {cap_file} does not exist")
            caps = parse_captions_file(cap_file, f"datasets.{name}.captions")
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"datasets.{name}.path: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) below {root}")
        for p in files:
            rows.append((str(p.resolve()), caps.get(p.name, p.stem.replace("_", " "))))
    elif kind == "list":
        lst = Path(ds["path"])
        if not lst.is_file():
            raise DataError(f"datasets.{name}.path: {lst} does not exist")
        for n, path, cap in parse_list_file(lst, f"datasets.{name}.path"):
            p = Path(path)
            p = p if p.is_absolute() else lst.parent / p
            if not p.is_file():
                raise DataError(f"datasets.{name}.path: {lst.name} line {n}: image {p} does not exist")
            rows.append((str(p.resolve()), cap))
    else:
        raise DataError(f"datasets.{name}.kind: unknown kind {kind!r}")
    tmp = out.with_name(f".partial-{out.name}")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(["image_id", "path", "caption"])
        for i, (p, c) in enumerate(rows):
            w.writerow([i, p, c])
    tmp.replace(out)
    return out


def read_index(path: str | Path) -> list[Record]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"dataset index {path} does not exist (it is built by the dataset_index rule)")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows or set(rows[0]) != {"image_id", "path", "caption"}:
        raise DataError(f"{path}: not a dataset index (expected columns image_id, path, caption)")
    return [Record(int(r["image_id"]), r["path"], r["caption"] or "") for r in rows]


def index_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def load_image(path: str | Path, size: int) -> Image.Image:
    """RGB image, shorter side resized to ``size`` then centre-cropped to size x size."""
    try:
        img = Image.open(path).convert("RGB")
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read image {path}: {e}") from None
    w, h = img.size
    s = size / min(w, h)
    img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))
