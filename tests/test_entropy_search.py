"""The entropy calibrator's KL search (prefix sums) against a direct per-candidate float64 loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowbit.calib.entropy import SMOOTHING_COUNTS, _divergences, entropy_bins


def _reference_kl(bins: np.ndarray, i: int, levels: int) -> float:
    """KL(P || Q) for keeping i bins, written out bin by bin as the module docstring says."""
    p = bins[:i].astype(np.float64).copy()
    p[i - 1] += bins[i:].sum()  # clipped outliers go into the last kept bin
    level = np.arange(i) * levels // i
    q = np.zeros(i)
    for k in range(levels):
        members = (level == k) & (p > 0)
        if members.any():
            q[members] = bins[:i][level == k].sum() / members.sum()
    q[(p > 0) & (q <= 0)] = SMOOTHING_COUNTS
    p, q = p / p.sum(), q / q.sum()
    keep = p > 0
    return float((p[keep] * np.log(p[keep] / q[keep])).sum())


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("levels", [8, 128])
def test_kl_of_every_candidate_matches_a_direct_loop(seed: int, levels: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(levels + 20, 600))
    x = np.abs(rng.standard_t(3, 20000)) * n / 10
    counts = np.bincount(np.minimum(x.astype(np.int64), n - 1), minlength=n).astype(np.float64)
    counts[rng.integers(0, n, n // 5)] = 0  # empty bins, inside levels and at the end
    counts[n - 1] = 3.0
    kept = torch.arange(levels, n + 1)
    ours = _divergences(torch.from_numpy(counts), kept, levels).numpy()
    expected = [_reference_kl(counts, int(i), levels) for i in kept]
    np.testing.assert_allclose(ours, expected, rtol=1e-9, atol=1e-12)
    best = int(kept[len(expected) - 1 - int(np.argmin(expected[::-1]))])
    assert entropy_bins(torch.from_numpy(counts), levels) == best
