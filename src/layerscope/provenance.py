"""What actually produced a shard: resolved device and dtype, accelerator, builds, code revision.

A spec says ``device: auto`` and ``dtype: auto``; the shard must say what those became on the
node that ran it (a bf16 run on an H100 and an fp32 run on a CPU give different numbers), which
GPU model and torch/CUDA build ran it, which code revision, and how much accelerator memory it
peaked at (to size ``resources:`` for the next study). ``layerscope run-shard`` writes these as
root attributes of every shard (``layerscope inspect`` prints them).
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    import torch

__all__ = ["git_revision", "runtime_provenance", "reset_peak_memory", "peak_memory_mb", "PROVENANCE_KEYS"]

PROVENANCE_KEYS = ("device", "dtype", "gpu_name", "torch_version", "cuda_version", "git_revision",
                   "peak_accelerator_mem_mb")


@functools.lru_cache(maxsize=None)
def git_revision(where: str | None = None) -> str:
    """The commit of the checkout holding the package (``+dirty`` with uncommitted changes), or
    "unknown" when the code is not in a git work tree or git is absent (an installed wheel)."""
    d = Path(where) if where else Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "-C", str(d), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if rev.returncode != 0 or not rev.stdout.strip():
            return "unknown"
        dirty = subprocess.run(["git", "-C", str(d), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return rev.stdout.strip() + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def runtime_provenance(device_pref: str, model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The device and dtype the spec's preferences resolve to here, the GPU's name and the builds."""
    import torch

    from layerscope.models import resolve_device, resolve_dtype

    dev = resolve_device(device_pref)
    pref = str(model_cfg.get("dtype", "fp32"))
    try:
        dtype = str(resolve_dtype(pref, dev)).replace("torch.", "")
    except KeyError:
        dtype = pref
    gpu = "none"
    if dev.type == "cuda":
        gpu = torch.cuda.get_device_name(dev)
    return {"device": str(dev), "dtype": dtype, "gpu_name": str(gpu), "torch_version": str(torch.__version__),
            "cuda_version": str(torch.version.cuda or "none"), "git_revision": git_revision()}


def reset_peak_memory(device: "torch.device | str") -> None:
    import torch

    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_mb(device: "torch.device | str") -> float:
    """Peak accelerator memory allocated by torch since the last reset (MiB); 0.0 on CPU (the host's
    peak RSS is in the rule's benchmark file)."""
    import torch

    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return 0.0
