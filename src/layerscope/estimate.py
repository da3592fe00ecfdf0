"""Expected peak accelerator memory of one shard, before any job runs.

Why: ``resources: mem_mb`` / the GPU model must be set before a first job fails for memory (and
on SLURM a failure costs a queue wait). The estimate is weights x dtype + the activations the probe
keeps, computed without torch (the planner imports this) from what is on disk:

* parameter counts are exact, read from the ``*.safetensors`` headers of the model folder or cached
  snapshot (8-byte length + JSON of dtype and shape per tensor; no tensor is read); a component that
  has no weights on disk counts from its config.json where a formula is written here (DINOv3, the Wan
  and SD3 transformers), else it is reported as unknown;
* activations follow the probe's own algorithm (what it holds at once), with the geometry from the
  probe settings and config.json. They are upper-bound style formulas, documented per probe below,
  not measurements: compare with the measured table in docs/real-models.md.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Mapping

__all__ = ["safetensors_params", "folder_params", "estimate_probe", "format_estimates"]

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
GiB = 1024 ** 3


def safetensors_params(path: str | Path) -> int:
    """Number of parameters in one safetensors file, from its header only."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    total = 0
    for k, v in header.items():
        if k == "__metadata__":
            continue
        c = 1
        for d in v["shape"]:
            c *= int(d)
        total += c
    return total


def _weights(folder: Path) -> int | None:
    files = [f for f in folder.glob("*.safetensors") if ".fp16." not in f.name]
    return sum(safetensors_params(f) for f in files) if files else None


def _config(folder: Path) -> dict[str, Any]:
    f = folder / "config.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def _dinov3_params(c: Mapping[str, Any]) -> int:
    D, L, I, p = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"], c.get("patch_size", 16)
    mlp = (3 if c.get("use_gated_mlp") else 2) * D * I
    return L * (4 * D * D + mlp + 8 * D) + 3 * p * p * D + (6 + c.get("num_register_tokens", 0)) * D


def _wan_params(c: Mapping[str, Any]) -> int:
    D = c["num_attention_heads"] * c["attention_head_dim"]
    # blocks (self + cross attention, FFN) + text embedder + time embedder + time projection to 6 modulations
    return (c["num_layers"] * (8 * D * D + 2 * D * c["ffn_dim"] + 6 * D) + c["text_dim"] * D + D * D
            + c.get("freq_dim", 256) * D + D * D + 6 * D * D + 16 * 4 * D)


def _sd3_params(c: Mapping[str, Any]) -> int:
    D = c["num_attention_heads"] * c["attention_head_dim"]
    return c["num_layers"] * 2 * (4 * D * D + 8 * D * D + 6 * D * D) + c["joint_attention_dim"] * D


FORMULAS = {"dinov3": _dinov3_params, "wan": _wan_params, "sd3": _sd3_params}


def folder_params(folder: str | Path, family: str, components: tuple[str, ...] = ("",)) -> dict[str, int | None]:
    """Parameters per component subfolder ('' = the folder itself)."""
    root = Path(folder)
    out: dict[str, int | None] = {}
    for comp in components:
        d = root / comp if comp else root
        n = _weights(d) if d.is_dir() else None
        if n is None and d.is_dir() and family in FORMULAS and comp in ("", "transformer"):
            try:
                n = FORMULAS[family](_config(d))
            except KeyError:
                n = None
        out[comp or family] = n
    return out


def _unknown(parts: Mapping[str, int | None]) -> str:
    missing = [k for k, v in parts.items() if v is None]
    return f"weights of {', '.join(missing)} unknown (not on disk), not counted; " if missing else ""


def _folder_of(mcfg: Mapping[str, Any], workdir: Path) -> Path | None:
    if mcfg.get("kind") == "hub":
        from layerscope.hub import _snapshot

        return _snapshot(str(mcfg["hub_id"]), mcfg.get("revision"))
    if mcfg.get("kind") in ("path", "tiny") and mcfg.get("path"):  # tiny: once the study has built it
        p = Path(str(mcfg["path"]))
        return p if p.is_absolute() else workdir / p
    return None


def _dtype(mcfg: Mapping[str, Any], folder: Path | None) -> str:
    """The dtype a GPU shard computes in (``auto``: the checkpoint's own, bf16 when unknown)."""
    pref = str(mcfg.get("dtype", "auto"))
    if pref != "auto":
        return pref
    if folder is not None:
        for rel in ("config.json", "transformer/config.json", "unet/config.json"):
            f = folder / rel
            if f.is_file():
                v = str(json.loads(f.read_text()).get("torch_dtype") or json.loads(f.read_text()).get("dtype") or "")
                if "float16" in v and "b" not in v:
                    return "fp16"
                break
    return "bf16"


def estimate_probe(probe: str, pcfg: Mapping[str, Any], mcfg: Mapping[str, Any], workdir: str | Path = ".") -> dict[str, Any]:
    """``{weights_gb, activations_gb, peak_gb, dtype, note}`` for one shard of ``probe`` on one model.

    Formulas (b = bytes per element of the compute dtype):

    * dinov3_channels: weights + the hidden states the probe keeps for one batch,
      (L+1) x B x T x D x b, + one layer's attention scores B x H x T^2 x b; T = 1 + registers + (S/p)^2.
    * wan_logits: transformer weights + (with ``text: umt5``) the UMT5 weights, which are loaded after
      the transformer and freed after encoding, + the KV cache 2 x L x F x tpf x D x b + one chunk's
      activations ~12 x (chunk tokens) x D x b + the logit block heads x query_chunk x K x 4 x 3 (fp32
      logits, softmax, mass); tpf = (h/2)(w/2).
    * sd3_textgrad: every pipeline weight (T5 only with ``t5``) + the backward through all blocks,
      ~24 x L x B x N x D x b, N = image tokens + 77 + max_sequence_length.
    * sd3_recon_train: lora: as sd3_textgrad with 2x activations; full: + fp32 master weights, grads and
      AdamW moments, 16 bytes per transformer parameter.
    * sdxl_ablation: weights + 2 (guidance) x UNet activations ~ 60 x (H/8 x W/8) x 1280 x b per step.
    """
    workdir = Path(workdir)
    folder = _folder_of(mcfg, workdir)
    dt = _dtype(mcfg, folder)
    b = BYTES[dt]
    fam = str(mcfg.get("family"))
    note = ""
    if folder is None or not folder.is_dir():
        return {"weights_gb": None, "activations_gb": None, "peak_gb": None, "dtype": dt,
                "note": "model files not on this machine (tiny builds are made by the study; hub models: fetch first)"}
    if probe == "dinov3_channels":
        c = _config(folder)
        n = folder_params(folder, "dinov3")["dinov3"]
        D, L, H = c.get("hidden_size", 0), c.get("num_hidden_layers", 0), c.get("num_attention_heads", 1)
        S, B, p = int(pcfg.get("image_size", 224)), int(pcfg.get("batch_size", 8)), c.get("patch_size", 16)
        T = 1 + c.get("num_register_tokens", 0) + (S // p) ** 2
        act = (L + 1) * B * T * D * b + B * H * T * T * b
        weights = (n or 0) * b
        note = _unknown({"dinov3": n})
    elif probe == "wan_logits":
        parts = folder_params(folder, "wan", ("transformer", "text_encoder"))
        c = _config(folder / "transformer")
        D = c.get("num_attention_heads", 0) * c.get("attention_head_dim", 0)
        L = c.get("num_layers", 0)
        h, w = (int(x) for x in pcfg.get("latent_size", [60, 104]))
        F, nb = int(pcfg.get("num_frames", 21)), int(pcfg.get("num_frame_per_block", 3))
        tpf = (h // 2) * (w // 2)
        heads, qc = c.get("num_attention_heads", 1), int(pcfg.get("query_chunk", 1024))
        act = 2 * L * F * tpf * D * b + 12 * nb * tpf * D * b + heads * qc * F * tpf * 4 * 3
        weights = (parts["transformer"] or 0) * b
        note = _unknown({"transformer": parts["transformer"]})
        if pcfg.get("text", "umt5") == "umt5":
            te = parts["text_encoder"]
            if mcfg.get("text_encoder"):
                note += "text encoder from models.*.text_encoder not counted; "
            elif te is None:
                note += _unknown({"text_encoder": te})
            weights += (te or 0) * b
            note += "UMT5 is freed after encoding (peak while encoding)"
    elif probe in ("sd3_textgrad", "sd3_recon_train"):
        comps = ("transformer", "vae", "text_encoder", "text_encoder_2") + (("text_encoder_3",) if mcfg.get("t5", True) else ())
        parts = folder_params(folder, "sd3", comps)
        c = _config(folder / "transformer")
        D = c.get("num_attention_heads", 0) * c.get("attention_head_dim", 0)
        L = c.get("num_layers", 0)
        S = int(pcfg.get("image_size", 0)) or c.get("sample_size", 128) * 8
        N = (S // 16) ** 2 + 77 + int(pcfg.get("max_sequence_length", 256 if probe == "sd3_textgrad" else 77))
        per_sample = 24 * L * N * D * b
        bs = pcfg.get("batch_size", 4 if probe == "sd3_textgrad" else 2)
        if bs == "auto":  # the probe sizes its batch so one batch's autograd graph fits memory_budget_mb
            budget = float(pcfg.get("memory_budget_mb", 4096)) * 2**20
            B = max(1, int(budget // per_sample)) if per_sample else 1
            note += f"batch_size auto: up to {B} sample(s) per batch within memory_budget_mb; "
        else:
            B = int(bs)
        act = per_sample * B
        weights = sum(v or 0 for v in parts.values()) * b
        note += _unknown(parts)
        if probe == "sd3_recon_train":  # training keeps fp32 master weights whatever the inference dtype
            weights = sum(v or 0 for v in parts.values()) * 4
            act *= 2
            if pcfg.get("mode", "full") == "full":
                weights += 12 * (parts["transformer"] or 0)
                note += "full fine-tuning: fp32 weights + grads + AdamW moments"
            else:
                note += "LoRA, fp32 master weights"
    elif probe == "sdxl_ablation":
        parts = folder_params(folder, "sdxl", ("unet", "vae", "text_encoder", "text_encoder_2"))
        H = int(pcfg.get("height") or 1024)
        W = int(pcfg.get("width") or 1024)
        act = 2 * 60 * (H // 8) * (W // 8) * 1280 * b
        weights = sum(v or 0 for v in parts.values()) * b
        note = _unknown(parts)
    else:
        return {"weights_gb": None, "activations_gb": None, "peak_gb": None, "dtype": dt, "note": "no formula"}
    return {"weights_gb": weights / GiB, "activations_gb": act / GiB, "peak_gb": (weights + act) / GiB, "dtype": dt,
            "note": note}


def format_estimates(plan: Any) -> str:
    """One line per (probe, model): expected peak accelerator memory of one shard."""
    lines = []
    for pname in plan.probes:
        pcfg = plan.config["probes"][pname]
        for m in plan.models_of(pname):
            e = estimate_probe(pname, pcfg, plan.model(m), plan.workdir)
            if e["peak_gb"] is None:
                lines.append(f"  {pname} / {m}: peak memory unknown ({e['note']})")
            else:
                gpu_mb = pcfg.get("resources", {}).get("mem_mb")
                lines.append(f"  {pname} / {m}: ~{e['peak_gb']:.1f} GB peak per shard in {e['dtype']} "
                             f"(weights {e['weights_gb']:.1f} GB + activations {e['activations_gb']:.1f} GB)"
                             + (f"; {e['note'].rstrip('; ')}" if e["note"] else "")
                             + (f"; resources.mem_mb {gpu_mb}" if gpu_mb else ""))
    return "\n".join(lines)
