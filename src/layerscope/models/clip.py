"""Family "clip": a CLIP model used as a scorer (text-image alignment), not as a probe subject.

``load`` returns ``(CLIPModel, CLIPProcessor)`` from ``from_pretrained``; :func:`image_text_cosine`
is the alignment score (cosine of the projected, L2-normalised embeddings; CLIPScore of Hessel et
al. 2021 is ``100 * max(cos, 0)``).  The tiny architecture is a real ``CLIPModel`` with an
offline byte-level tokenizer, saved and reloaded like a hub checkpoint, for tests and the default study.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = ["TINY_ARCHS", "build_tiny", "load", "image_text_cosine"]

# Per-model weight settings this loader reads (models.<name>.<key>); another family's key is refused.
WEIGHT_KEYS = ()

TINY_ARCHS: dict[str, dict[str, Any]] = {
    "default": {
        "text": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                     max_position_embeddings=77),
        "vision": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                       image_size=32, patch_size=8),
        "projection_dim": 16,
    },
}


def build_tiny(arch: str, seed: int, out_dir: Path) -> None:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from layerscope.models.sdxl import tiny_clip_tokenizer

    if arch not in TINY_ARCHS:
        raise ValueError(f"family clip has no tiny architecture {arch!r}; known: {', '.join(TINY_ARCHS)}")
    a = TINY_ARCHS[arch]
    tok = tiny_clip_tokenizer()
    text = dict(a["text"], vocab_size=len(tok), bos_token_id=0, eos_token_id=1, pad_token_id=1)
    cfg = CLIPConfig(text_config=text, vision_config=a["vision"], projection_dim=a["projection_dim"])
    torch.manual_seed(seed)
    model = CLIPModel(cfg).eval()
    size = a["vision"]["image_size"]
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": size},
                                                            crop_size={"height": size, "width": size}),
                         tokenizer=tok)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    proc.save_pretrained(out_dir)


def load(model_cfg: Mapping[str, Any], device: "torch.device", dtype: "torch.dtype") -> tuple[Any, Any]:
    from transformers import CLIPModel, CLIPProcessor

    from layerscope.models import config_field, loading, source_of

    src = source_of(model_cfg)
    with loading("CLIP", src, config_field(model_cfg)):
        model = CLIPModel.from_pretrained(src, dtype=dtype).to(device).eval()
        proc = CLIPProcessor.from_pretrained(src)
    return model, proc


def image_text_cosine(model: Any, processor: Any, images: Sequence["np.ndarray"], texts: Sequence[str]) -> "np.ndarray":
    """Cosine similarity of each uint8 HxWx3 image with its text (pairwise, not all-pairs), float64.

    Texts longer than the text tower's context are truncated (recorded by the caller)."""
    import numpy as np
    import torch

    if len(images) != len(texts):
        raise ValueError(f"{len(images)} images for {len(texts)} texts")
    dev = next(model.parameters()).device
    with torch.no_grad():
        batch = processor(text=list(texts), images=[np.asarray(i) for i in images], return_tensors="pt",
                          padding=True, truncation=True)
        batch = {k: v.to(dev) for k, v in batch.items()}
        out = model(**batch)
        img = out.image_embeds.double()
        txt = out.text_embeds.double()
        cos = (img / img.norm(dim=-1, keepdim=True) * (txt / txt.norm(dim=-1, keepdim=True))).sum(-1)
    return cos.cpu().numpy()
