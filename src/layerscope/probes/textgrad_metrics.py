"""Token-score metrics of the SD3 text-gradient probe (design note 000): per-row strength, top-k mass
and entropy, and the note's pooled curves (scores pooled over a pair's timesteps x seeds first).

Pure numpy: the merge and the tests use these without torch.
"""

from __future__ import annotations

from typing import Any

import numpy as np

STATUS = ("ok", "empty", "zero_mass", "no_grad")  # row status codes 0..3
OK, EMPTY, ZERO_MASS, NO_GRAD = range(4)
METRICS = ("strength", "topk_mass", "entropy", "entropy_norm")


# ------------------------------------------------------------------------------------ metrics
def token_metrics(scores: np.ndarray, mask: np.ndarray | None, topk: int) -> dict[str, np.ndarray]:
    """Per-row metrics of token scores [N, L] over the positions where ``mask`` is True.

    Non-finite scores are excluded and counted (``nonfinite``); ``n_tokens`` counts the finite
    scores used.  Rows: ``status`` 0 ok; 1 empty (no finite score left: every metric NaN);
    2 zero_mass (all scores 0: strength 0, the distribution metrics NaN).  Entropy uses the natural
    log with 0 log 0 = 0; ``entropy_norm = entropy / log(n)`` (0 when n = 1).  Top-k mass is the
    sum of the min(k, n) largest scores over the sum of all.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"scores must be [N, L], got shape {s.shape}")
    m = np.ones_like(s, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    n_rows = s.shape[0]
    out = {k: np.full(n_rows, np.nan) for k in METRICS}
    out["n_tokens"] = np.zeros(n_rows, np.int64)
    out["nonfinite"] = np.zeros(n_rows, np.int64)
    out["status"] = np.zeros(n_rows, np.int8)
    for r in range(n_rows):
        row = s[r][m[r]]
        fin = np.isfinite(row)
        out["nonfinite"][r] = int((~fin).sum())
        v = row[fin]
        n = v.size
        out["n_tokens"][r] = n
        if n == 0:
            out["status"][r] = EMPTY
            continue
        out["strength"][r] = v.mean()
        total = v.sum()
        if total <= 0:
            out["status"][r] = ZERO_MASS
            continue
        out["topk_mass"][r] = np.sort(v)[::-1][: min(topk, n)].sum() / total
        p = v / total
        nz = p[p > 0]
        h = float(-(nz * np.log(nz)).sum())
        out["entropy"][r] = h
        out["entropy_norm"][r] = h / np.log(n) if n > 1 else 0.0
    return out


def no_grad_rows(n_rows: int) -> dict[str, np.ndarray]:
    """Rows for a block whose text input has no gradient (force_txt_grad off): NaN metrics, status no_grad."""
    out = {k: np.full(n_rows, np.nan) for k in METRICS}
    out.update(n_tokens=np.zeros(n_rows, np.int64), nonfinite=np.zeros(n_rows, np.int64),
               status=np.full(n_rows, NO_GRAD, np.int8))
    return out


# ------------------------------------------------------------------------------------ pooled curves
def note_metrics(scores: np.ndarray, topk: int) -> tuple[float, float, float]:
    """The note script's ``compute_metrics`` on one pooled score vector: mean strength, top-k mass
    with ``k = max(1, min(topk, n))`` and entropy ``-sum p log(p + 1e-12)``, ``p = s / sum s``.
    The caller passes finite scores only (non-finite ones are counted, not zeroed as the script does);
    an empty vector or a non-positive sum gives NaN (the script: 0)."""
    s = np.asarray(scores, dtype=np.float64)
    total = s.sum()
    if s.size == 0 or not np.isfinite(total) or total <= 0:
        return (float(s.mean()) if s.size else np.nan), np.nan, np.nan
    k = max(1, min(topk, s.size))
    p = s / total
    return float(s.mean()), float(np.sort(s)[::-1][:k].sum() / total), float(-(p * np.log(p + 1e-12)).sum())


def pool_pair(rows: np.ndarray, mask: np.ndarray | None, topk: int) -> dict[str, Any]:
    """Pool one pair's token scores over its (timestep, seed) rows [R, L] BEFORE the metrics, as the
    note's script does: the per-token mean over the rows, restricted to ``mask``, then
    :func:`note_metrics`.  A token with a non-finite score in any row is excluded and counted."""
    r = np.asarray(rows, dtype=np.float64)
    avg = r.mean(axis=0)
    keep = np.ones(avg.shape, bool) if mask is None else np.asarray(mask, bool)
    v = avg[keep]
    fin = np.isfinite(v)
    strength, topk_mass, entropy = note_metrics(v[fin], topk)
    return {"strength": strength, "topk_mass": topk_mass, "entropy": entropy, "n_tokens": int(fin.sum()),
            "nonfinite": int((~fin).sum()), "samples": int(r.shape[0])}
