"""Mergeable partial statistics.

Every shard of the study stores *partial* statistics that merge exactly: merging shards in any
grouping and order gives what one pass over the concatenated data gives (integer parts bit for
bit, floating parts to float64 rounding).  Three kinds cover the probes:

* :class:`Moments` - per-channel count, mean and M2 (Welford's sum of squared deviations),
  merged with Chan et al.'s pairwise formula; max |x|; and a count of non-finite values, which
  are excluded from the moments but never silently dropped.
* :class:`MagnitudeHistogram` - a fixed-bin histogram of |x| (8 linear sub-bins per octave of
  ``torch.frexp``), from which medians and quantiles of the magnitude are read.  Bins are fixed
  in advance, so histograms from different shards add.
* :class:`TopK` - the k largest |x| with where they occurred (channel, sample, token); merging
  keeps the k largest of the union, with a deterministic tie order.

Batch statistics are computed on the tensor's device (GPU in production) in float32 with a
two-pass mean/M2 and then folded into float64 accumulators on the host, so the per-batch cost
is a few memory-bound reductions rather than a host copy of the activations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

import numpy as np

if TYPE_CHECKING:  # torch is only needed where tensors are reduced, never for merging
    import torch

__all__ = ["Moments", "MagnitudeHistogram", "TopK", "HIST_EXP_MIN", "HIST_EXP_MAX", "HIST_SUB", "summarize"]

# Histogram geometry: octaves 2**e for e in [HIST_EXP_MIN, HIST_EXP_MAX), HIST_SUB linear bins each,
# plus an underflow bin (|x| < 2**HIST_EXP_MIN, zeros included) and an overflow bin.
HIST_EXP_MIN = -24
HIST_EXP_MAX = 24
HIST_SUB = 8
HIST_NBINS = (HIST_EXP_MAX - HIST_EXP_MIN) * HIST_SUB + 2


def _as_np(x: "torch.Tensor") -> np.ndarray:
    return x.detach().to("cpu").numpy()


# Below this magnitude the float32 squares of a channel lose their digits to underflow (the
# smallest normal float32 is 2**-126), above it M2 is checked for overflow directly.
_TINY = 2.0**-55


def _needs_float64(m2: "torch.Tensor", max_abs: "torch.Tensor") -> bool:
    """Whether a fast-path (input precision) M2 cannot be trusted: it overflowed, or a channel's
    values are so small that their squares underflow. Two reductions over [C] vectors: free."""
    import torch

    if m2.dtype == torch.float64:
        return not bool(torch.isfinite(m2).all())
    return not bool(torch.isfinite(m2).all()) or bool(((max_abs > 0) & (max_abs < _TINY)).any())


@dataclass
class Moments:
    """Per-channel moments of a [N, C] stream of values (rows are tokens, columns channels)."""

    count: np.ndarray  # int64 [C]: finite values seen
    mean: np.ndarray  # float64 [C]
    m2: np.ndarray  # float64 [C]: sum of squared deviations from the mean
    max_abs: np.ndarray  # float64 [C]: 0 where count == 0
    nonfinite: np.ndarray  # int64 [C]: NaN/Inf values seen and excluded from the moments

    @classmethod
    def empty(cls, channels: int) -> "Moments":
        z = np.zeros(channels, dtype=np.float64)
        return cls(np.zeros(channels, np.int64), z.copy(), z.copy(), z.copy(), np.zeros(channels, np.int64))

    @property
    def channels(self) -> int:
        return int(self.count.shape[0])

    @property
    def var(self) -> np.ndarray:
        """Population variance (ddof=0); NaN where a channel saw no finite value."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.count > 0, self.m2 / np.maximum(self.count, 1), np.nan)

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(np.maximum(self.var, 0.0))

    @property
    def sum(self) -> np.ndarray:
        return self.mean * self.count

    def merge(self, other: "Moments") -> "Moments":
        """Chan's pairwise combination: exact for counts and maxima, float64-exact for mean/M2."""
        if other.channels != self.channels:
            raise ValueError(f"cannot merge moments of {self.channels} and {other.channels} channels")
        na, nb = self.count.astype(np.float64), other.count.astype(np.float64)
        n = na + nb
        with np.errstate(invalid="ignore", divide="ignore"):
            delta = other.mean - self.mean
            wb = np.where(n > 0, nb / np.maximum(n, 1), 0.0)
            mean = self.mean + delta * wb
            m2 = self.m2 + other.m2 + delta * delta * np.where(n > 0, na * nb / np.maximum(n, 1), 0.0)
        return Moments(
            self.count + other.count,
            mean,
            m2,
            np.maximum(self.max_abs, other.max_abs),
            self.nonfinite + other.nonfinite,
        )

    @classmethod
    def from_numpy(cls, x: np.ndarray) -> "Moments":
        """Reference path: moments of a [N, C] array computed directly in float64."""
        x = np.asarray(x, dtype=np.float64)
        fin = np.isfinite(x)
        count = fin.sum(axis=0).astype(np.int64)
        xz = np.where(fin, x, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(count > 0, xz.sum(axis=0) / np.maximum(count, 1), 0.0)
        m2 = (np.where(fin, x - mean, 0.0) ** 2).sum(axis=0)
        max_abs = np.abs(xz).max(axis=0) if x.shape[0] else np.zeros(x.shape[1])
        return cls(count, mean, m2, max_abs, (~fin).sum(axis=0).astype(np.int64))

    @classmethod
    def from_tensor(cls, x: "torch.Tensor") -> "Moments":
        """Moments of a [N, C] tensor, reduced on its device.

        Fast path: if the float32 sum and M2 are finite every value is finite, and mean/M2 come
        from two passes in the input's precision.  Otherwise (a NaN/Inf, or finite values so large
        that the float32 sum or squares overflow, e.g. |x| ~ 1e37) the slow path works in float64,
        where no finite float32 input can overflow (|x - mean|**2 * N < 1e78 * N), masks
        non-finite values out and counts them per channel.
        """
        import torch

        x = x.detach()
        x = x if x.dtype in (torch.float32, torch.float64) else x.float()  # half precision -> fp32
        n, c = x.shape
        s = x.sum(dim=0)
        fast = bool(torch.isfinite(s).all())
        if fast:
            mean = s / max(n, 1)
            m2 = ((x - mean) ** 2).sum(dim=0)
            max_abs = x.abs().amax(dim=0) if n else torch.zeros(c, device=x.device, dtype=x.dtype)
            fast = not _needs_float64(m2, max_abs)
        if fast:
            return cls(
                np.full(c, n, dtype=np.int64),  # all finite
                _as_np(mean).astype(np.float64),
                _as_np(m2).astype(np.float64),
                _as_np(max_abs).astype(np.float64),
                np.zeros(c, dtype=np.int64),
            )
        fin = torch.isfinite(x)
        xd = torch.where(fin, x.double(), torch.zeros((), dtype=torch.float64, device=x.device))
        cnt = fin.sum(dim=0)
        mean = xd.sum(dim=0) / cnt.clamp(min=1)
        m2 = torch.where(fin, xd - mean, torch.zeros((), dtype=torch.float64, device=x.device)).pow(2).sum(dim=0)
        return cls(
            _as_np(cnt).astype(np.int64),
            _as_np(mean),
            _as_np(m2),
            _as_np(xd.abs().amax(dim=0)) if n else np.zeros(c),
            _as_np((~fin).sum(dim=0)).astype(np.int64),
        )

    def to_dict(self) -> dict[str, np.ndarray]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2, "max_abs": self.max_abs, "nonfinite": self.nonfinite}

    @classmethod
    def from_dict(cls, d: Mapping[str, np.ndarray]) -> "Moments":
        return cls(*(np.asarray(d[k]) for k in ("count", "mean", "m2", "max_abs", "nonfinite")))


def hist_edges() -> np.ndarray:
    """Lower edges of the finite-range bins (the underflow bin starts at 0, overflow at 2**HIST_EXP_MAX)."""
    e = np.arange(HIST_EXP_MIN, HIST_EXP_MAX, dtype=np.float64)
    sub = 1.0 + np.arange(HIST_SUB) / HIST_SUB
    return (np.exp2(e)[:, None] * sub[None, :]).ravel()


@dataclass
class MagnitudeHistogram:
    """Counts of |x| in fixed bins: [underflow, octave bins..., overflow]; non-finite values excluded."""

    counts: np.ndarray  # int64 [HIST_NBINS]

    @classmethod
    def empty(cls) -> "MagnitudeHistogram":
        return cls(np.zeros(HIST_NBINS, dtype=np.int64))

    @staticmethod
    def bin_index_numpy(a: np.ndarray) -> np.ndarray:
        """Reference binning of finite magnitudes (numpy's frexp: a = m * 2**e with m in [0.5, 1))."""
        m, e = np.frexp(a)
        # a in [2**(e-1), 2**e): octave index e-1, sub-bin from the mantissa (2m - 1) in [0, 1)
        idx = (e.astype(np.int64) - 1 - HIST_EXP_MIN) * HIST_SUB + np.floor((2 * m - 1) * HIST_SUB).astype(np.int64) + 1
        idx = np.where(a < 2.0**HIST_EXP_MIN, 0, idx)
        return np.where(a >= 2.0**HIST_EXP_MAX, HIST_NBINS - 1, idx)

    @classmethod
    def from_numpy(cls, x: np.ndarray) -> "MagnitudeHistogram":
        a = np.abs(np.asarray(x, dtype=np.float64).ravel())
        a = a[np.isfinite(a)]
        return cls(np.bincount(cls.bin_index_numpy(a), minlength=HIST_NBINS).astype(np.int64))

    @classmethod
    def from_tensor(cls, x: "torch.Tensor", assume_finite: bool = False) -> "MagnitudeHistogram":
        import torch

        a = x.detach().reshape(-1).float().abs()
        if not assume_finite:
            a = a[torch.isfinite(a)]
        m, e = torch.frexp(a)
        idx = (e.long() - 1 - HIST_EXP_MIN) * HIST_SUB + ((2 * m - 1) * HIST_SUB).long() + 1
        idx = idx.clamp_(0, HIST_NBINS - 1)  # below range -> underflow (zeros have e = 0 -> clamp low)
        idx = torch.where(a < 2.0**HIST_EXP_MIN, torch.zeros_like(idx), idx)
        return cls(_as_np(torch.bincount(idx, minlength=HIST_NBINS)).astype(np.int64))

    def merge(self, other: "MagnitudeHistogram") -> "MagnitudeHistogram":
        return MagnitudeHistogram(self.counts + other.counts)

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def quantile(self, q: float) -> float:
        """Magnitude at quantile q, interpolated linearly inside the bin (bin width <= 12.5 % of value).

        Values in the underflow bin are reported as 0 (their exact size is below 2**-24)."""
        n = self.total
        if n == 0:
            return float("nan")
        target = q * n
        cum = np.cumsum(self.counts)
        i = int(np.searchsorted(cum, target, side="left"))
        i = min(i, HIST_NBINS - 1)
        if i == 0:
            return 0.0
        if i == HIST_NBINS - 1:
            return float(2.0**HIST_EXP_MAX)
        lo_edges = hist_edges()
        lo = lo_edges[i - 1]
        hi = lo_edges[i] if i < HIST_NBINS - 2 else 2.0**HIST_EXP_MAX
        before = cum[i - 1] if i > 0 else 0
        frac = (target - before) / max(self.counts[i], 1)
        return float(lo + (hi - lo) * min(max(frac, 0.0), 1.0))

    @property
    def median(self) -> float:
        return self.quantile(0.5)

    def to_dict(self) -> dict[str, np.ndarray]:
        return {"hist": self.counts}

    @classmethod
    def from_dict(cls, d: Mapping[str, np.ndarray]) -> "MagnitudeHistogram":
        return cls(np.asarray(d["hist"], dtype=np.int64))


@dataclass
class TopK:
    """The k largest magnitudes with their (channel, sample, token) positions.

    Sorted by magnitude descending, ties by (sample, token, channel) ascending, so the merge of
    any grouping of shards is the same array."""

    k: int
    value: np.ndarray  # float64 [<=k]
    channel: np.ndarray  # int64
    sample: np.ndarray  # int64: global sample (image) id
    token: np.ndarray  # int64: token index within the sample

    @classmethod
    def empty(cls, k: int) -> "TopK":
        z = np.zeros(0, dtype=np.int64)
        return cls(k, np.zeros(0), z, z.copy(), z.copy())

    @classmethod
    def _select(cls, k: int, value, channel, sample, token) -> "TopK":
        order = np.lexsort((channel, token, sample, -value))[:k]
        return cls(k, value[order], channel[order], sample[order], token[order])

    @classmethod
    def from_numpy(cls, x: np.ndarray, sample_ids: np.ndarray, token_ids: np.ndarray, k: int) -> "TopK":
        """x: [N, C] with per-row sample and token ids. Non-finite values are excluded."""
        a = np.abs(np.asarray(x, dtype=np.float64))
        a = np.where(np.isfinite(a), a, -1.0)
        rows, cols = np.indices(a.shape)
        v = a.ravel()
        keep = v >= 0
        return cls._select(k, v[keep], cols.ravel()[keep], np.asarray(sample_ids)[rows.ravel()][keep], np.asarray(token_ids)[rows.ravel()][keep])

    @classmethod
    def from_tensor(cls, x: "torch.Tensor", sample_ids: np.ndarray, token_ids: np.ndarray, k: int) -> "TopK":
        """x: [N, C]. Takes the top candidates on the device, then resolves ties exactly on the host."""
        import torch

        a = x.detach()
        a = (a if a.dtype == torch.float64 else a.float()).abs()
        a = torch.where(torch.isfinite(a), a, torch.full_like(a, -1.0))
        flat = a.reshape(-1)
        kk = min(flat.numel(), k)
        if kk == 0:
            return cls.empty(k)
        vals, idx = torch.topk(flat, kk)
        # include every element equal to the k-th value so the tie order is exact
        kth = vals[-1]
        tie_idx = torch.nonzero(flat == kth).reshape(-1)
        idx = torch.unique(torch.cat([idx, tie_idx]))
        v = _as_np(flat[idx]).astype(np.float64)
        idx = _as_np(idx).astype(np.int64)
        keep = v >= 0
        rows, cols = idx // a.shape[1], idx % a.shape[1]
        return cls._select(k, v[keep], cols[keep], np.asarray(sample_ids)[rows[keep]], np.asarray(token_ids)[rows[keep]])

    def merge(self, other: "TopK") -> "TopK":
        return TopK._select(
            max(self.k, other.k),
            np.concatenate([self.value, other.value]),
            np.concatenate([self.channel, other.channel]),
            np.concatenate([self.sample, other.sample]),
            np.concatenate([self.token, other.token]),
        )

    def to_dict(self) -> dict[str, np.ndarray]:
        return {"topk_value": self.value, "topk_channel": self.channel, "topk_sample": self.sample, "topk_token": self.token}

    @classmethod
    def from_dict(cls, d: Mapping[str, np.ndarray], k: int) -> "TopK":
        return cls(k, *(np.asarray(d[n]) for n in ("topk_value", "topk_channel", "topk_sample", "topk_token")))


def __getattr__(name: str) -> object:
    """``summarize`` (and its bit histogram) live in :mod:`layerscope.batch_stats`, which builds
    on the classes here; resolved on first use, so importing either module first works."""
    if name in ("summarize", "_hist_from_bits"):
        from layerscope import batch_stats

        return getattr(batch_stats, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
