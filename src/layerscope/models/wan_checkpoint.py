"""Wan checkpoints: original Wan / Self-Forcing key names <-> diffusers names, and loading a
Self-Forcing ``generator_ema`` / ``generator`` state dict into a diffusers transformer.

Kept apart from the loader (:mod:`layerscope.models.wan`) as diffusers keeps its single-file
conversion apart from the model: the key table is data, read in both directions.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from layerscope.models import ModelLoadError, loading

# ---------------------------------------------------------------------------------------------
# original Wan / Self-Forcing key names <-> diffusers names
# ---------------------------------------------------------------------------------------------

# (original, diffusers) key templates, {i} a block index and {p} weight|bias; both directions of
# the conversion are built from this one list, so they cannot drift apart. Keys are matched with
# any wrapper prefix removed.
_ATTN = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0", "norm_q": "norm_q", "norm_k": "norm_k",
         "k_img": "add_k_proj", "v_img": "add_v_proj", "norm_k_img": "norm_added_k"}
_KEYS: list[tuple[str, str]] = [
    ("patch_embedding.{p}", "patch_embedding.{p}"),
    ("text_embedding.0.{p}", "condition_embedder.text_embedder.linear_1.{p}"),
    ("text_embedding.2.{p}", "condition_embedder.text_embedder.linear_2.{p}"),
    ("time_embedding.0.{p}", "condition_embedder.time_embedder.linear_1.{p}"),
    ("time_embedding.2.{p}", "condition_embedder.time_embedder.linear_2.{p}"),
    ("time_projection.1.{p}", "condition_embedder.time_proj.{p}"),
    ("head.head.{p}", "proj_out.{p}"),
    ("head.modulation", "scale_shift_table"),
    ("blocks.{i}.modulation", "blocks.{i}.scale_shift_table"),
    # original norm3 is the (affine) norm before cross-attention: diffusers calls it norm2
    ("blocks.{i}.norm3.{p}", "blocks.{i}.norm2.{p}"),
    ("blocks.{i}.ffn.0.{p}", "blocks.{i}.ffn.net.0.proj.{p}"),
    ("blocks.{i}.ffn.2.{p}", "blocks.{i}.ffn.net.2.{p}"),
    ("img_emb.proj.0.{p}", "condition_embedder.image_embedder.norm1.{p}"),
    ("img_emb.proj.1.{p}", "condition_embedder.image_embedder.ff.net.0.proj.{p}"),
    ("img_emb.proj.3.{p}", "condition_embedder.image_embedder.ff.net.2.{p}"),
    ("img_emb.proj.4.{p}", "condition_embedder.image_embedder.norm2.{p}"),
] + [(f"blocks.{{i}}.{orig}.{name}.{{p}}", f"blocks.{{i}}.{new}.{tgt}.{{p}}")
     for orig, new in (("self_attn", "attn1"), ("cross_attn", "attn2")) for name, tgt in _ATTN.items()]
_GROUPS = {"i": r"(\d+)", "p": r"(weight|bias)"}


def _table(to_diffusers: bool) -> list[tuple[re.Pattern[str], str]]:
    """(regex, replacement) per key template pair, in one direction."""
    table = []
    for orig, diff in _KEYS:
        src, dst = (orig, diff) if to_diffusers else (diff, orig)
        parts = re.split(r"\{(\w)\}", src)  # literal, name, literal, name, ..., literal
        names = parts[1::2]
        pattern = "".join(re.escape(x) if j % 2 == 0 else _GROUPS[x] for j, x in enumerate(parts))
        repl = re.sub(r"\{(\w)\}", lambda m: "\\" + str(names.index(m.group(1)) + 1), dst)
        table.append((re.compile(f"^{pattern}$"), repl))
    return table


_O2D, _D2O = _table(True), _table(False)

# wrappers around the original model's keys: Self-Forcing's WanDiffusionWrapper ('model.'), ComfyUI
# ('model.diffusion_model.'), FSDP and torch.compile.
_WRAPPERS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def _strip_wrappers(key: str) -> str:
    for w in _WRAPPERS:
        key = key.replace(w, "")
    for prefix in ("model.diffusion_model.", "model."):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _rename(sd: Mapping[str, torch.Tensor], table: list[tuple[re.Pattern[str], str]], what: str,
            pre: Callable[[str], str] = lambda k: k) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in sd.items():
        k = pre(key)
        for pat, tmpl in table:
            if pat.match(k):
                out[pat.sub(tmpl, k)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ModelLoadError(f"{what}: {len(unknown)} keys have no mapping, e.g. {unknown[:3]}")
    return out


def convert_original_to_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original Wan2.1 (and Self-Forcing ``generator``) transformer keys -> diffusers
    ``WanTransformer3DModel`` keys.  The same mapping as diffusers' ``convert_wan_transformer_to_diffusers``
    (norm2/norm3 swap, ``ffn.0`` -> ``ffn.net.0.proj``, ``self_attn.o`` -> ``attn1.to_out.0``...), written as
    anchored patterns so an unexpected key is an error instead of a silent pass-through."""
    return _rename(sd, _O2D, "original Wan state dict", pre=_strip_wrappers)


def convert_diffusers_to_original(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`convert_original_to_diffusers` (without wrapper prefixes)."""
    return _rename(sd, _D2O, "diffusers Wan state dict")


def load_self_forcing_checkpoint(transformer: torch.nn.Module, path: str | Path, use_ema: bool | None = True,
                                 field: str = "models.<name>.checkpoint") -> str | None:
    """Load ``generator_ema`` (or ``generator``) of a Self-Forcing-style checkpoint into a diffusers transformer.

    Accepts a ``.pt`` dict of state dicts, a bare original-key state dict, or a ``.safetensors`` file.
    ``use_ema``: True / False ask for that state dict (its absence is an error: an explicit request is
    never silently substituted); None takes ``generator_ema`` when present, else ``generator``.
    The log says which was used; the key is returned (None for a bare state dict).
    Every transformer parameter must be covered (strict load): a partial checkpoint is an error."""
    import logging

    p = Path(path)
    if not p.is_file():
        raise ModelLoadError(f"checkpoint {p} does not exist ({field})")
    with loading("the Self-Forcing checkpoint", p, field):
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Mapping[str, Any] = load_file(str(p))
        else:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
    used = None
    if isinstance(sd, Mapping) and any(k in sd for k in ("generator", "generator_ema")):
        if use_ema is None:
            used = "generator_ema" if "generator_ema" in sd else "generator"
        else:
            used = "generator_ema" if use_ema else "generator"
            if used not in sd:
                raise ModelLoadError(f"checkpoint {p}: no '{used}' state dict (has {sorted(k for k in sd if isinstance(sd[k], Mapping))}); "
                                     f"set {field.rsplit('.', 1)[0]}.use_ema accordingly (null: whichever is there)")
        sd = sd[used]
    logging.getLogger("layerscope.wan").info("Self-Forcing checkpoint %s: loaded %s", p,
                                             used or "a bare state dict")
    conv = convert_original_to_diffusers({k: v for k, v in sd.items() if not k.endswith("freqs")})
    res = transformer.load_state_dict(conv, strict=False)
    if res.missing_keys or res.unexpected_keys:
        raise ModelLoadError(f"checkpoint {p}: does not match the transformer (missing {res.missing_keys[:3]}, "
                             f"unexpected {res.unexpected_keys[:3]}) ({field})")
    return used
