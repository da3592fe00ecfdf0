"""Mergeable statistics against numpy on the concatenated data."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch

from layerscope.stats import HIST_NBINS, MagnitudeHistogram, Moments, TopK, hist_edges


def _random_splits(n: int, parts: int, rng: random.Random) -> list[tuple[int, int]]:
    cuts = sorted(rng.sample(range(1, n), parts - 1))
    b = [0, *cuts, n]
    return list(zip(b[:-1], b[1:]))


@pytest.fixture
def data() -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.standard_t(df=3, size=(503, 7)) * np.array([1, 10, 0.01, 1e3, 1, 5, 2]) + np.array([0, 5, -1, 1e4, 0, 0, 3])
    return x


def test_moments_merge_any_grouping_equals_one_pass(data):
    ref_mean, ref_std = data.mean(axis=0), data.std(axis=0)
    rng = random.Random(1)
    for parts in (2, 3, 7):
        chunks = [data[a:b] for a, b in _random_splits(len(data), parts, rng)]
        stats = [Moments.from_numpy(c) for c in chunks]
        for order in itertools.islice(itertools.permutations(range(parts)), 6):
            acc = Moments.empty(data.shape[1])
            for i in order:
                acc = acc.merge(stats[i])
            np.testing.assert_array_equal(acc.count, np.full(7, len(data)))
            np.testing.assert_allclose(acc.mean, ref_mean, rtol=1e-12, atol=1e-9)
            np.testing.assert_allclose(acc.std, ref_std, rtol=1e-10)
            np.testing.assert_array_equal(acc.max_abs, np.abs(data).max(axis=0))
        # tree-shaped grouping: ((a+b)+(c+...)) equals left fold
        if parts >= 3:
            tree = stats[0].merge(stats[1]).merge(stats[2:][0] if parts == 3 else stats[2].merge(stats[3]))
            if parts == 3:
                np.testing.assert_allclose(tree.mean, ref_mean, rtol=1e-12, atol=1e-9)


def test_moments_from_tensor_matches_numpy(data):
    x = torch.tensor(data, dtype=torch.float32)
    m = Moments.from_tensor(x)
    ref = data.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(m.mean, ref.mean(axis=0), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(m.std, ref.std(axis=0), rtol=1e-4)
    np.testing.assert_array_equal(m.max_abs, np.abs(ref).max(axis=0))


def test_nonfinite_values_are_counted_not_dropped(data):
    d = data.copy()
    d[3, 1] = np.nan
    d[10, 1] = np.inf
    d[11, 4] = -np.inf
    for m in (Moments.from_numpy(d), Moments.from_tensor(torch.tensor(d))):
        np.testing.assert_array_equal(m.nonfinite, [0, 2, 0, 0, 1, 0, 0])
        np.testing.assert_array_equal(m.count, len(d) - np.array([0, 2, 0, 0, 1, 0, 0]))
        finite_col = np.delete(d[:, 1], [3, 10])
        np.testing.assert_allclose(m.mean[1], finite_col.mean(), rtol=1e-9)
        assert np.isfinite(m.std).all()
    # merge keeps the counts
    a, b = Moments.from_numpy(d[:200]), Moments.from_numpy(d[200:])
    np.testing.assert_array_equal(a.merge(b).nonfinite, [0, 2, 0, 0, 1, 0, 0])


def test_empty_channel_has_nan_std_not_zero():
    m = Moments.from_numpy(np.full((4, 2), np.nan))
    assert np.isnan(m.std).all() and (m.count == 0).all() and (m.nonfinite == 4).all()


def test_histogram_bins_match_explicit_edges_and_merge(data):
    a = np.abs(data.ravel())
    edges = np.concatenate([[0.0], hist_edges(), [2.0**24, np.inf]])
    ref = np.histogram(a, bins=edges)[0]
    h = MagnitudeHistogram.from_numpy(data)
    np.testing.assert_array_equal(h.counts, ref)
    ht = MagnitudeHistogram.from_tensor(torch.tensor(data, dtype=torch.float64))
    np.testing.assert_array_equal(ht.counts, ref)
    parts = [MagnitudeHistogram.from_numpy(c) for c in np.array_split(data, 5)]
    acc = MagnitudeHistogram.empty()
    for p in reversed(parts):
        acc = acc.merge(p)
    np.testing.assert_array_equal(acc.counts, ref)
    assert len(h.counts) == HIST_NBINS


def test_histogram_median_within_bin_resolution():
    rng = np.random.default_rng(3)
    for scale in (1e-3, 1.0, 250.0):
        x = rng.lognormal(mean=np.log(scale), sigma=1.5, size=20001)
        med = MagnitudeHistogram.from_numpy(x).median
        assert abs(med - np.median(x)) / np.median(x) < 0.125
    # zeros land in the underflow bin and give a median of 0
    assert MagnitudeHistogram.from_numpy(np.zeros(10)).median == 0.0


def test_topk_merge_is_exact_and_order_free(data):
    n = len(data)
    sid = np.arange(n) // 10
    tok = np.arange(n) % 10
    ref = TopK.from_numpy(data, sid, tok, 5)
    flat = np.abs(data).ravel()
    np.testing.assert_array_equal(ref.value, np.sort(flat)[::-1][:5])
    parts = [(data[a:b], sid[a:b], tok[a:b]) for a, b in [(0, 100), (100, 101), (101, 400), (400, n)]]
    for order in ([0, 1, 2, 3], [3, 1, 0, 2]):
        acc = TopK.empty(5)
        for i in order:
            x, s, t = parts[i]
            acc = acc.merge(TopK.from_tensor(torch.tensor(x), s, t, 5))
        np.testing.assert_array_equal(acc.value, ref.value)
        np.testing.assert_array_equal(acc.channel, ref.channel)
        np.testing.assert_array_equal(acc.sample, ref.sample)
        np.testing.assert_array_equal(acc.token, ref.token)
        # positions point at the values
        for v, c, s, t in zip(acc.value, acc.channel, acc.sample, acc.token):
            assert abs(data[s * 10 + t, c]) == v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_fused_summary_equals_separate_statistics(dtype):
    from layerscope.stats import _hist_from_bits, summarize

    rng = np.random.default_rng(5)
    x = torch.tensor(rng.standard_t(df=2, size=(300, 40)) * 3, dtype=dtype)
    x[7, 3] = 0.0
    x[8, 4] = 1e-9  # underflow bin
    x[9, 5] = 2.0**30  # overflow bin (finite)
    sid, tok = np.arange(300) // 6, np.arange(300) % 6
    before = x.clone()
    mom, hist, tk = summarize(x, sid, tok, 8)
    assert torch.equal(x, before)  # its in-place temporaries never touch the input
    xf = x if dtype in (torch.float32, torch.float64) else x.float()
    ref_h = MagnitudeHistogram.from_numpy(xf.double().numpy())
    np.testing.assert_array_equal(hist.counts, ref_h.counts)
    if dtype != torch.bfloat16:  # the signed path of the bit histogram, input untouched too
        np.testing.assert_array_equal(_hist_from_bits(x), ref_h.counts)
        assert torch.equal(x, before)
    ref_t = TopK.from_numpy(xf.double().numpy(), sid, tok, 8)
    np.testing.assert_array_equal(tk.value, ref_t.value)
    np.testing.assert_array_equal(tk.channel, ref_t.channel)
    np.testing.assert_array_equal(tk.sample, ref_t.sample)
    ref_m = Moments.from_numpy(xf.double().numpy())
    np.testing.assert_array_equal(mom.count, ref_m.count)
    np.testing.assert_array_equal(mom.max_abs, ref_m.max_abs)
    np.testing.assert_allclose(mom.mean, ref_m.mean, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(mom.std, ref_m.std, rtol=1e-5)
    # with a NaN it falls back to the masked path and counts it
    x[0, 0] = float("nan")
    mom, hist, _ = summarize(x, sid, tok, 8)
    assert mom.nonfinite[0] == 1 and mom.nonfinite.sum() == 1 and hist.total == x.numel() - 1


@pytest.mark.parametrize("scale", [1e37, 3.0e38, 1e-38])
def test_moments_near_float32_limits_match_numpy_float64(scale):
    """Finite float32 values near the type's limits: the float32 sum/squares overflow (or lose
    everything to underflow), the statistics must not. Reference: numpy in float64 on the same data."""
    rng = np.random.default_rng(7)
    x32 = (rng.uniform(-1.0, 1.0, size=(40, 6)) * scale).astype(np.float32)
    x32[0, 0] = np.float32(scale)  # one channel at the scale itself
    assert np.isfinite(x32).all()
    ref = x32.astype(np.float64)
    want_mean, want_std = ref.mean(axis=0), ref.std(axis=0)
    from layerscope.stats import summarize

    for m in (Moments.from_tensor(torch.from_numpy(x32)),
              summarize(torch.from_numpy(x32), np.zeros(40, np.int64), np.arange(40), 3)[0]):
        assert (m.nonfinite == 0).all() and (m.count == 40).all()
        assert np.isfinite(m.mean).all() and np.isfinite(m.std).all()
        np.testing.assert_allclose(m.mean, want_mean, rtol=1e-5, atol=1e-6 * scale)
        np.testing.assert_allclose(m.std, want_std, rtol=1e-5)
        np.testing.assert_array_equal(m.max_abs, np.abs(ref).max(axis=0))
    # and shards of such data merge to the one-pass value
    a, b = Moments.from_tensor(torch.from_numpy(x32[:13])), Moments.from_tensor(torch.from_numpy(x32[13:]))
    np.testing.assert_allclose(a.merge(b).std, want_std, rtol=1e-6)
