"""The fused batch reduction: all three partial statistics of one activation batch at once.

The probes' hot path. :mod:`layerscope.stats` holds the mergeable records (numpy, merged on the
host) and their reference reductions one statistic at a time; this module computes the same
records in few passes over a tensor on its device (GEMV column sums, one ``abs``/``amax``, a
histogram read off the float bits, a top-k restricted to the channels that can hold it) and
falls back to the per-statistic reductions whenever the fast path cannot be trusted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from layerscope.stats import (HIST_EXP_MIN, HIST_NBINS, HIST_SUB, MagnitudeHistogram, Moments, TopK, _as_np,
                              _needs_float64)

if TYPE_CHECKING:
    import torch

__all__ = ["summarize"]


def _hist_from_bits(x: "torch.Tensor", nonnegative: bool = False, inplace: bool = False) -> np.ndarray:
    """Histogram of |x| read off the float's bits: exponent + top 3 mantissa bits is exactly
    'octave, then one of 8 linear sub-bins' - the bins of :class:`MagnitudeHistogram` - so no
    transcendental is needed. The codes are counted as they are (2**11 of them for float32) and
    the under- and overflow codes folded on the host: two fewer passes over x than clamping.
    ``inplace`` reuses x's memory for the codes (x is then garbage). Finite inputs only (Inf/NaN
    would land in the overflow bin)."""
    import torch

    if x.dtype == torch.float64:
        bits, shift, n_codes, offset = x.view(torch.int64), 49, 1 << 14, (1023 + HIST_EXP_MIN) * HIST_SUB - 1
        mask = 0x7FFFFFFFFFFFFFFF
    else:
        bits, shift, n_codes, offset = x.view(torch.int32), 20, 1 << 11, (127 + HIST_EXP_MIN) * HIST_SUB - 1
        mask = 0x7FFFFFFF
    if not nonnegative:  # clear the sign bit (a new tensor, so x itself is untouched)
        bits, inplace = bits & mask, True
    code = bits.bitwise_right_shift_(shift) if inplace else bits >> shift
    full = _as_np(torch.bincount(code.reshape(-1), minlength=n_codes)).astype(np.int64)
    hist = np.empty(HIST_NBINS, dtype=np.int64)
    hist[0] = full[: offset + 1].sum()
    hist[1:-1] = full[offset + 1: offset + HIST_NBINS - 1]
    hist[-1] = full[offset + HIST_NBINS - 1:].sum()
    return hist


def summarize(x: "torch.Tensor", sample_ids: np.ndarray, token_ids: np.ndarray, k: int) -> tuple[Moments, MagnitudeHistogram, TopK]:
    """All three partial statistics of a [N, C] tensor in few passes over it (the probes' hot path).

    Equal to ``Moments.from_tensor``, ``MagnitudeHistogram.from_tensor`` and ``TopK.from_tensor``
    (tested), but fused: GEMV column sums, one ``abs``/``amax``, a bit-level histogram and a top-k found
    among the elements at least as large as the k-th largest channel maximum (which must contain
    the k largest elements overall)."""
    import torch

    x = x.detach()
    x = x if x.dtype in (torch.float32, torch.float64) else x.float()
    n, c = x.shape
    if n == 0:
        return Moments.empty(c), MagnitudeHistogram.empty(), TopK.empty(k)
    # Column sums as a GEMV (ones @ x): on CPU and GPU far faster than a dim-0 reduction; two
    # passes (mean, then centred squares) keep M2 accurate. A non-finite sum means some value is
    # NaN/Inf (or the float32 sum overflowed): then take the masked, counting path.
    ones = torch.ones(1, n, dtype=x.dtype, device=x.device)
    s = (ones @ x).reshape(-1)
    if not bool(torch.isfinite(s).all()):
        return (Moments.from_tensor(x), MagnitudeHistogram.from_tensor(x), TopK.from_tensor(x, sample_ids, token_ids, k))
    mean = s / n
    d = x - mean
    m2 = (ones @ d.square_()).reshape(-1)  # in place: one temporary, not two
    del d
    a = x.abs()
    max_abs = a.amax(dim=0)
    if _needs_float64(m2, max_abs):  # finite values whose float32 squares overflow or underflow
        del a
        return (Moments.from_tensor(x), MagnitudeHistogram.from_tensor(x), TopK.from_tensor(x, sample_ids, token_ids, k))
    mom = Moments(np.full(c, n, dtype=np.int64), _as_np(mean).astype(np.float64),
                  _as_np(m2).astype(np.float64), _as_np(max_abs).astype(np.float64), np.zeros(c, dtype=np.int64))
    if c >= k:
        # every element >= the k-th largest channel maximum lies in a channel whose maximum reaches
        # it, so only those (about k) columns are searched
        thr = torch.topk(max_abs, k).values[-1]
        chans = torch.nonzero(max_abs >= thr).reshape(-1)
        sub = a[:, chans]
        rr, cc = torch.nonzero(sub >= thr, as_tuple=True)
        v = _as_np(sub[rr, cc]).astype(np.float64)
        rows, cols = _as_np(rr).astype(np.int64), _as_np(chans[cc]).astype(np.int64)
        tk = TopK._select(k, v, cols, np.asarray(sample_ids)[rows], np.asarray(token_ids)[rows])
    else:
        tk = TopK.from_tensor(x, sample_ids, token_ids, k)
    hist = MagnitudeHistogram(_hist_from_bits(a, nonnegative=True, inplace=True))  # last: a becomes codes
    return mom, hist, tk
