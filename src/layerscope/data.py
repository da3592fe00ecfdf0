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
import json
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
from layerscope.layout import slice_images_dir  # noqa: E402


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

        img_dir = Path(slice_images_dir(out))
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
    _write_digest(tmp, out)
    tmp.replace(out)
    return out


def _write_digest(tmp: Path, out: Path) -> None:
    """The digest of the index *and every image's bytes*, computed once when the index is built and
    kept beside it (``index.tsv.digest``): shards and merges read it instead of the images."""
    dig = out.with_name(out.name + DIGEST_SUFFIX)
    dig_tmp = out.with_name(f".partial-{dig.name}")
    dig_tmp.write_text(json.dumps({"index_sha256": _sha256_file(tmp), "digest": _content_digest(tmp)}) + "\n")
    dig_tmp.replace(dig)


def read_index(path: str | Path) -> list[Record]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"dataset index {path} does not exist (it is built by the dataset_index rule)")
    with open(path, newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        rows = list(reader)  # may be empty: a data slice chosen by item key can hold no item
    if set(reader.fieldnames or ()) != {"image_id", "path", "caption"}:
        raise DataError(f"{path}: not a dataset index (expected columns image_id, path, caption)")
    return [Record(int(r["image_id"]), r["path"], r["caption"] or "") for r in rows]


DIGEST_SUFFIX = ".digest"  # sidecar of index.tsv: {"index_sha256": ..., "digest": ...}


def _sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _content_digest(index: str | Path) -> str:
    """sha256 over the index bytes and the bytes of every image it lists, in index order."""
    h = hashlib.sha256(Path(index).read_bytes())
    for rec in read_index(index):
        try:
            h.update(_sha256_file(rec.path).encode())
        except OSError as e:
            raise DataError(f"{index}: image {rec.path} cannot be read ({e.strerror or e})") from None
    return h.hexdigest()[:16]


def index_digest(path: str | Path) -> str:
    """The data digest every shard records: the index *and the image bytes* it lists, so shards
    that saw a changed image are refused next to shards that saw the new one.  Read from the
    sidecar ``index.tsv.digest`` that :func:`build_index` writes (valid while the index bytes
    match it); computed over all images when the sidecar is missing or stale."""
    path = Path(path)
    side = path.with_name(path.name + DIGEST_SUFFIX)
    try:
        rec = json.loads(side.read_text())
        if rec.get("index_sha256") == _sha256_file(path) and rec.get("digest"):
            return str(rec["digest"])
    except (OSError, ValueError, AttributeError):
        pass
    return _content_digest(path)


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


# ---------------------------------------------------------------- stable slices
# A data slice is chosen by a stable key of each item, never by its position: adding an image
# touches only the slice it lands in (positions would shift every slice after it). The trade-off:
# slices are unequal in size (a binomial spread around len/n), and `max_images` keeps the first N
# items in listing order, so an item that sorts before the cut displaces the last one kept (two
# slices change, not one). The merge still checks that slice labels 0..n-1 are all present, and
# every item lands in exactly one of them, so coverage stays exact.


@dataclass(frozen=True)
class Item:
    """One dataset item before any image is read: ``ident`` is its stable name (the skimage stem,
    the path relative to a folder, or the path as a list file writes it)."""

    ident: str
    path: str  # absolute path, or '' for skimage photographs (written out by build_slice)
    caption: str

    @property
    def key(self) -> str:
        return item_key(self.ident)

    @property
    def image_id(self) -> int:
        """A stable integer id (60 bits of the key): the same item has the same id in any slicing,
        so per-image noise and de-duplication do not depend on the listing."""
        return int(self.key[:15], 16)


def item_key(ident: str) -> str:
    return hashlib.sha256(ident.encode("utf-8")).hexdigest()


def slice_of(key: str, n: int) -> int:
    """The slice (0..n-1) an item of this key belongs to, among ``n``."""
    return int(key[:15], 16) % n


def list_items(name: str, ds: Mapping[str, Any]) -> list[Item]:
    """Every item of a dataset in listing order, from file names and list/caption files only."""
    kind = ds["kind"]
    if kind == "skimage":
        return [Item(stem, "", cap) for stem, cap in SKIMAGE_PHOTOS.items()]
    if kind == "folder":
        root = Path(ds["path"])
        if not root.is_dir():
            raise DataError(f"datasets.{name}.path: {root} is not a directory")
        caps = parse_captions_file(ds["captions"], f"datasets.{name}.captions") if ds.get("captions") else {}
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"datasets.{name}.path: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) below {root}")
        return [Item(p.relative_to(root).as_posix(), str(p.resolve()), caps.get(p.name, p.stem.replace("_", " ")))
                for p in files]
    if kind == "list":
        lst = Path(ds["path"])
        if not lst.is_file():
            raise DataError(f"datasets.{name}.path: {lst} does not exist")
        out = []
        for n, path, cap in parse_list_file(lst, f"datasets.{name}.path"):
            p = Path(path)
            p = p if p.is_absolute() else lst.parent / p
            out.append(Item(path, str(p.resolve()), cap))
        return out
    raise DataError(f"datasets.{name}.kind: unknown kind {kind!r}")


def slice_items(items: list[Item], max_images: int, slice_label: str) -> list[Item]:
    """The items of one slice ``IofN``: the first ``max_images`` (0: all), then those whose key
    falls in slice I of N, in listing order."""
    from layerscope.layout import parse_slice

    i, n = parse_slice(slice_label)
    cut = items[:max_images] if max_images else items
    return [it for it in cut if slice_of(it.key, n) == i]


def slice_fingerprints(name: str, ds: Mapping[str, Any], max_images: int, n: int) -> list[str]:
    """What each of the ``n`` slices is built from, cheaply (names, captions, sizes and mtimes; no
    image read): a param of the slice rule, so an added or changed image reruns only the slice that
    holds it. One listing and one stat per item for all ``n`` slices (a dry run of many slices of a
    large folder stays linear)."""
    h = [hashlib.sha256(f"{ds.get('kind')}\n".encode()) for _ in range(n)]
    extra = b""
    if ds.get("kind") == "skimage":
        from importlib.metadata import version

        extra = version("scikit-image").encode()
    try:
        items = list_items(name, ds)
    except DataError as e:  # the slice job reports it; the plan still forms
        return ["error:" + hashlib.sha256(str(e).encode()).hexdigest()[:16]] * n
    for it in items[:max_images] if max_images else items:
        try:
            st = Path(it.path).stat() if it.path else None
            stat = f"{st.st_size}\t{st.st_mtime_ns}" if st else ""
        except OSError:
            stat = "missing"
        h[slice_of(it.key, n)].update(f"{it.ident}\t{it.caption}\t{stat}\n".encode())
    for x in h:
        x.update(extra)
    return [x.hexdigest()[:16] for x in h]


def slice_fingerprint(name: str, ds: Mapping[str, Any], max_images: int, slice_label: str) -> str:
    """:func:`slice_fingerprints` of one slice ``IofN``."""
    from layerscope.layout import parse_slice

    i, n = parse_slice(slice_label)
    return slice_fingerprints(name, ds, max_images, n)[i]


def build_slice(name: str, ds: Mapping[str, Any], max_images: int, slice_label: str, out: str | Path) -> Path:
    """Write one slice's index TSV (image_id, path, caption) - and, for skimage, its images beside it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    items = slice_items(list_items(name, ds), max_images, slice_label)
    rows: list[tuple[int, str, str]] = []
    for it in items:
        path = it.path
        if not path:  # skimage: write the photograph out so shards treat it like any image file
            import numpy as np
            import skimage.data

            arr = getattr(skimage.data, it.ident)()
            if arr.dtype == bool:
                arr = arr.astype("uint8") * 255
            if arr.ndim == 2:
                arr = np.stack([arr] * 3, axis=-1)
            img_dir = Path(slice_images_dir(out))
            img_dir.mkdir(exist_ok=True)
            p = img_dir / f"{it.ident}.png"
            Image.fromarray(arr[..., :3].astype("uint8")).save(p)
            path = str(p)
        elif not Path(path).is_file():
            raise DataError(f"datasets.{name}.path: image {path} does not exist")
        rows.append((it.image_id, path, it.caption))
    tmp = out.with_name(f".partial-{out.name}")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(["image_id", "path", "caption"])
        w.writerows(rows)
    _write_digest(tmp, out)
    tmp.replace(out)
    return out
