"""What training writes: the resumable state of a run (RNG, trainable weights, optimizer, step; a
SIGKILLed shard continues where it stopped) and the trained checkpoint (an adapter folder, a
transformer beside links to the base pipeline, or a whole pipeline), each replaced atomically.
Split from :mod:`layerscope.training`, which holds the training loop.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import torch

if TYPE_CHECKING:
    from diffusers import StableDiffusion3Pipeline

    from layerscope.training import FineTuneConfig

CHECKPOINT_MANIFEST = "layerscope_checkpoint.json"
RESUME_FILE = "state.pt"


def _rng_state() -> dict[str, Any]:
    import random

    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(st: Mapping[str, Any]) -> None:
    import random

    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if st.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _trainable_state(tr: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights that train (all of the MMDiT in full mode, the LoRA factors in lora mode)."""
    return {n: p.detach().clone() for n, p in tr.named_parameters() if p.requires_grad}


def save_resume_state(resume_dir: Path, state: Mapping[str, Any]) -> None:
    """Write ``resume_dir/state.pt`` atomically (temporary file, fsync, rename): a kill while
    writing leaves the previous resumable state intact."""
    resume_dir.mkdir(parents=True, exist_ok=True)
    tmp = resume_dir / f".{RESUME_FILE}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(dict(state), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, resume_dir / RESUME_FILE)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_resume_state(resume_dir: Path | None, cfg: FineTuneConfig, fingerprint: str) -> dict[str, Any] | None:
    """The last resumable state of this very run, or None (no state, or one written by a run with
    other settings or data: that one is ignored with a warning, and training starts over)."""
    import logging

    if resume_dir is None or not (resume_dir / RESUME_FILE).is_file():
        return None
    try:
        st = torch.load(resume_dir / RESUME_FILE, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: start over, say so
        logging.getLogger("layerscope").warning("ignoring unreadable resume state %s (%s); training from step 0",
                                                resume_dir / RESUME_FILE, e)
        return None
    if st.get("fingerprint") != fingerprint or st.get("train") != asdict(cfg):
        logging.getLogger("layerscope").warning("ignoring resume state %s: written by a run with other settings or data; "
                                                "training from step 0", resume_dir / RESUME_FILE)
        return None
    return st


def _replace_dir(tmp: Path, out: Path) -> None:
    if out.exists():
        old = out.with_name(f".old-{os.getpid()}-{out.name}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def save_checkpoint(pipe: "StableDiffusion3Pipeline", peft_model: Any, out_dir: str | Path, manifest: Mapping[str, Any],
                    base_dir: str | Path | None = None) -> Path:
    """Write the trained model to ``out_dir`` atomically (temporary directory, then rename).

    lora: the peft adapter directory (a few MB).  full with a ``base_dir``: a pipeline folder whose
    ``transformer/`` holds the trained weights and whose other components (text encoders, VAE,
    tokenizers, scheduler) are relative symbolic links to the base's folders - it loads as any SD3
    pipeline (``source: <checkpoint>``) yet stores only the transformer (kind ``transformer+links``).
    full without one: the whole pipeline (``save_pretrained``, kind ``pipeline``)."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".partial-{os.getpid()}-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if peft_model is None and base_dir is not None:
            base = Path(os.path.abspath(base_dir))
            tmp.mkdir()
            pipe.transformer.save_pretrained(tmp / "transformer")
            index = json.loads((base / "model_index.json").read_text())
            for comp, val in index.items():
                if comp.startswith("_") or comp == "transformer" or not isinstance(val, list) or val[0] is None:
                    continue
                if (base / comp).exists():
                    os.symlink(os.path.relpath(base / comp, os.path.abspath(out)), tmp / comp, target_is_directory=True)
            shutil.copyfile(base / "model_index.json", tmp / "model_index.json")
            kind = "transformer+links"
        elif peft_model is None:
            pipe.save_pretrained(tmp)
            kind = "pipeline"
        else:
            peft_model.save_pretrained(str(tmp))
            kind = "lora"
        (tmp / CHECKPOINT_MANIFEST).write_text(json.dumps({**manifest, "kind": kind}, indent=1, sort_keys=True, default=str))
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
