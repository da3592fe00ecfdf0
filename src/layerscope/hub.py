"""Hugging Face hub models of a study: what to download, whether it is cached, where it lies.

Why this module exists: compute nodes of a cluster are usually offline. Without a check, every shard
job that names ``hub:<id>`` spends ~40 s in network retries and then fails. So

* on a login node, ``layerscope fetch <config>`` downloads every hub model the study uses with
  ``huggingface_hub.snapshot_download`` - only the files its loader reads (``allow_patterns``), at
  the pinned ``revision:`` when one is given;
* the planner (dry run, ``check-config``) calls :func:`check_cached` on every hub model the enabled
  probes use and names EVERY missing one in one message, before any job is submitted;
* shard jobs resolve a hub id to its local snapshot folder with ``local_files_only=True``
  (:func:`local_snapshot`): no network call at all, so no retries.

Pure Python with huggingface_hub only (no torch): the Snakefile imports the planner, which imports this.
The cache folder is read from the environment at call time (``HF_HUB_CACHE``, else ``HF_HOME/hub``,
else ``~/.cache/huggingface/hub``), so a test or a job can point it elsewhere after import.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from layerscope.errors import ConfigError, ModelLoadError

__all__ = ["hub_cache_dir", "allow_patterns", "marker_file", "hub_models", "check_cached", "check_all_cached",
           "local_snapshot", "fetch_models"]

# Files never needed: other frameworks' weights and the fp16 duplicates diffusers repos ship.
IGNORE = ["*.bin", "*.ckpt", "*.msgpack", "*.h5", "*.onnx", "*.onnx_data", "*.pb", "*openvino*", "*.mlmodel*", "*.gguf"]

_PIPE_FILES = ("*.json", "*.txt", "*.model", "*.safetensors")


def hub_cache_dir() -> Path:
    """The hub cache folder, from the environment as it is now (not at import time)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def _sub(folders: Iterable[str]) -> list[str]:
    return [f"{f}/{pat}" for f in folders for pat in _PIPE_FILES]


def allow_patterns(model_cfg: Mapping[str, Any]) -> list[str]:
    """The files a family's loader reads from a hub repository (what ``fetch`` downloads).

    DINOv3 with an official ``checkpoint:`` needs only config.json (the weights come from the .pth);
    Wan without its own ``text_encoder:`` needs the repository's UMT5 too; SD3 with ``t5: false``
    skips the 4.7 B T5-XXL."""
    fam = model_cfg["family"]
    if fam == "dinov3":
        return ["config.json"] if model_cfg.get("checkpoint") else ["config.json", "*.safetensors", "*.safetensors.index.json"]
    if fam == "clip":
        return ["*.json", "*.txt", "*.safetensors"]
    if fam == "wan":
        subs = ["transformer", "scheduler"]
        if not model_cfg.get("text_encoder"):
            subs += ["text_encoder", "tokenizer"]
        return ["model_index.json", *_sub(subs)]
    if fam == "sd3":
        subs = ["transformer", "vae", "scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"]
        if model_cfg.get("t5", True):
            subs += ["text_encoder_3", "tokenizer_3"]
        return ["model_index.json", *_sub(subs)]
    if fam == "sdxl":
        return ["model_index.json", *_sub(["unet", "vae", "scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"])]
    return _declared_files(fam)


def _declared_files(family: str) -> list[str]:
    """Another family's ``HUB_FILES`` (glob patterns, read from its module's source); everything
    in the repository when it declares none."""
    from layerscope.model_configs import family_manifest

    return [str(p) for p in family_manifest(family).get("HUB_FILES", ["*"])]


def ignore_patterns(model_cfg: Mapping[str, Any]) -> list[str]:
    """fp16 variants are skipped unless the model asks for fp16 (the plain files load in any dtype)."""
    return IGNORE + ([] if model_cfg.get("dtype") == "fp16" else ["*.fp16.*"])


def marker_file(model_cfg: Mapping[str, Any]) -> str:
    """The file whose presence in the snapshot says the repository was fetched for this family."""
    fam = model_cfg["family"]
    if fam in ("dinov3", "clip"):
        return "config.json"
    if fam in ("wan", "sd3", "sdxl"):
        return "model_index.json"
    return "model_index.json" if "model_index.json" in _declared_files(fam) else "config.json"


def hub_models(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{field: model-like cfg}`` for every hub reference the enabled probes use: each model's
    ``source: hub:<id>`` and a Wan ``text_encoder: hub:<id>``. The key is the config field to name."""
    models = config.get("models", {}) or {}
    used: list[str] = []
    for pcfg in (config.get("probes", {}) or {}).values():
        if isinstance(pcfg, Mapping) and pcfg.get("enabled", True):
            used += list(pcfg.get("models", []) or []) + list(pcfg.get("aux_models", []) or [])
    out: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(used):
        m = models.get(name)
        if not isinstance(m, Mapping):
            continue
        src = str(m.get("source", ""))
        if src.startswith("hub:"):
            out[f"models.{name}.source"] = {**m, "name": name, "hub_id": src[4:]}
        for key in ("checkpoint", "lora_payload"):
            ref = m.get(key)
            if isinstance(ref, str) and ref.startswith("hub:"):
                repo_id, filename = split_file_ref(ref, f"models.{name}.{key}")
                out[f"models.{name}.{key}"] = {"family": "file", "name": name, "hub_id": repo_id, "filename": filename,
                                               "revision": None}
        te = m.get("text_encoder")
        if isinstance(te, str) and te.startswith("hub:"):
            out[f"models.{name}.text_encoder"] = {"family": "text_encoder", "name": name, "hub_id": te[4:],
                                                  "revision": m.get("text_encoder_revision")}
    return out


def _snapshot(hub_id: str, revision: str | None) -> Path | None:
    """The cached snapshot folder of ``hub_id`` at ``revision`` (a branch, tag or commit), or None.
    Reads the cache layout ``models--org--name/{refs/<rev>, snapshots/<commit>/}`` directly: no network."""
    repo = hub_cache_dir() / ("models--" + hub_id.replace("/", "--"))
    rev = revision or "main"
    ref = repo / "refs" / rev
    commit = ref.read_text().strip() if ref.is_file() else rev
    snap = repo / "snapshots" / commit
    return snap if snap.is_dir() else None


def check_cached(field: str, model_cfg: Mapping[str, Any]) -> str | None:
    """None when the hub model is in the local cache with its marker file, else a one-line reason."""
    hub_id = str(model_cfg["hub_id"])
    rev = model_cfg.get("revision")
    snap = _snapshot(hub_id, rev)
    at = f"@{rev}" if rev else ""
    if snap is None:
        return f"{field}: {hub_id}{at} is not in the hub cache {hub_cache_dir()}"
    if model_cfg.get("family") == "file":
        if not (snap / model_cfg["filename"]).is_file():
            return f"{field}: {model_cfg['filename']} of {hub_id}{at} is not in the hub cache {hub_cache_dir()}"
        return None
    marker = "config.json" if model_cfg.get("family") == "text_encoder" else marker_file(model_cfg)
    if model_cfg.get("family") == "text_encoder":
        ok = (snap / "config.json").is_file() or (snap / "text_encoder" / "config.json").is_file()
    else:
        ok = (snap / marker).is_file()
    if not ok:
        return f"{field}: {hub_id}{at} is cached without {marker} (an incomplete download)"
    return None


def check_all_cached(config: Mapping[str, Any]) -> None:
    """Raise one ConfigError naming every hub model of the study that is not cached (plan time).

    Why all at once: on a cluster each round trip (fix one, dry-run again) costs a login-node session;
    the message ends with the command that fixes them all."""
    missing = [r for f, m in hub_models(config).items() if (r := check_cached(f, m))]
    if missing:
        raise ConfigError(f"{len(missing)} hub model(s) not in the local cache: " + "; ".join(missing)
                          + " - run `layerscope fetch <config>` on a machine with network (same HF_HOME)")


def local_snapshot(hub_id: str, revision: str | None, field: str, allow: list[str] | None = None) -> str:
    """The local folder of a cached hub model, for ``from_pretrained`` in a shard job.

    ``local_files_only=True``: a compute node never tries the network (the 40 s of retries the
    issue measured), and a missing model fails at once with the field named."""
    from huggingface_hub import snapshot_download

    try:
        return str(snapshot_download(hub_id, revision=revision, cache_dir=str(hub_cache_dir()),
                                     local_files_only=True, allow_patterns=allow))
    except Exception as e:  # noqa: BLE001 - LocalEntryNotFoundError and friends
        raise ModelLoadError(f"{field}: hub model {hub_id}{'@' + revision if revision else ''} is not in the local cache "
                             f"{hub_cache_dir()} ({type(e).__name__}); run `layerscope fetch <config>` on a login node") from None


def split_file_ref(ref: str, field: str) -> tuple[str, str]:
    """``hub:<org>/<repo>/<path in repo>`` -> (repo id, path): a single file of a hub repository,
    e.g. ``hub:gdhe17/Self-Forcing/checkpoints/self_forcing_dmd.pt``."""
    parts = ref[4:].split("/")
    if len(parts) < 3 or not all(parts):
        raise ConfigError(f"config field {field}: '{ref}' must be hub:<org>/<repo>/<file path>")
    return "/".join(parts[:2]), "/".join(parts[2:])


def local_file(ref: str, field: str) -> str:
    """A weight-file setting as a local path: ``hub:<org>/<repo>/<file>`` from the cache (no network), else as given."""
    if not ref.startswith("hub:"):
        return ref
    repo_id, filename = split_file_ref(ref, field)
    return str(Path(local_snapshot(repo_id, None, field, allow=[filename])) / filename)


def fetch_models(config: Mapping[str, Any], dry_run: bool = False, log: Any = print) -> list[str]:
    """Download every hub model of the study (login node), each repository once with the union of
    the files its uses need. Returns the fields fetched."""
    merged: dict[tuple[str, str | None], tuple[list[str], list[str], list[str]]] = {}
    for field, m in hub_models(config).items():
        if m.get("family") == "file":
            allow, ignore = [m["filename"]], []
        elif m.get("family") == "text_encoder":
            allow = ["config.json", "*.safetensors", "*.safetensors.index.json", "*.json", "*.model", "*.txt",
                     "text_encoder/*", "tokenizer/*"]
            ignore = IGNORE
        else:
            allow, ignore = allow_patterns(m), ignore_patterns(m)
        key = (m["hub_id"], m.get("revision"))
        fields, a, ig = merged.setdefault(key, ([], [], list(ignore)))
        fields.append(field)
        a.extend(x for x in allow if x not in a)
        ig[:] = [x for x in ig if x in ignore]  # a pattern is ignored only if every use ignores it
    done = []
    for (hub_id, rev), (fields, allow, ignore) in merged.items():
        log(f"{hub_id}{'@' + rev if rev else ''} ({', '.join(fields)}) <- {', '.join(allow)}")
        if not dry_run:
            from huggingface_hub import snapshot_download

            try:
                snapshot_download(hub_id, revision=rev, cache_dir=str(hub_cache_dir()), allow_patterns=allow,
                                  ignore_patterns=ignore or None)
            except Exception as e:  # noqa: BLE001 - gated repo, no network, bad revision: one line naming the fields
                first = next((x.strip() for x in str(e).splitlines() if x.strip()), "")
                hint = " (gated: accept the licence on the hub, then `huggingface-cli login`)" if "gated" in str(e).lower() else ""
                raise ModelLoadError(f"{', '.join(fields)}: cannot fetch {hub_id}{'@' + rev if rev else ''}: "
                                     f"{type(e).__name__}: {first}{hint}") from e
        done += fields
    return done
