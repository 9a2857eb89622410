"""TensorRT's KL-divergence threshold search over a histogram of |x|, vectorised over candidates.

For each candidate i (bins kept, from num_quant_bins to the last non-empty bin):
  P = counts[:i], with everything beyond added to its last bin (clipping keeps the outliers);
  Q = counts[:i] merged into num_quant_bins levels, each level's sum spread evenly over its
      non-empty bins (P's non-empty bins, so that Q covers the clipped outliers too);
and the threshold is the upper edge of the i with the smallest KL(P || Q) (the last such i on ties,
as TensorRT). Bin j goes to level floor(j * num_quant_bins / i), as np.digitize on TensorRT's
linspace(0, i, num_quant_bins + 1).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Where Q is empty but P is not (a level whose only non-empty bin holds clipped outliers), Q gets
# this many counts instead of 0, as the smoothing of MXNet / ONNX Runtime does, so KL stays finite.
SMOOTHING_COUNTS = 1e-4


def entropy_bins(counts: Tensor, num_quant_bins: int) -> int:
    """How many leading bins of `counts` (a histogram of |x|) to keep: the KL-optimal i."""
    counts = counts.to(torch.float64)
    nonzero = torch.nonzero(counts).flatten()
    if nonzero.numel() == 0:
        return 0
    last = int(nonzero[-1]) + 1
    if last <= num_quant_bins:
        return last  # everything fits without clipping
    candidates = torch.arange(num_quant_bins, last + 1)
    divergences = _divergences(counts[:last], candidates, num_quant_bins)
    best = divergences.numel() - 1 - int(torch.argmin(divergences.flip(0)))
    return int(candidates[best])


def _divergences(bins: Tensor, kept: Tensor, num_quant_bins: int) -> Tensor:
    """KL(P || Q) for each candidate number of kept bins in `kept`, from prefix sums.

    Level k of candidate i holds the contiguous bins [ceil(k i / n), ceil((k + 1) i / n)), so
    its sum of counts and of non-empty bins are differences of prefix sums, and with P and Q
    constant per bin and per level, KL = sum P log P - sum_k P_k log q_k + log sum q: O(n) per
    candidate instead of O(bins).
    """
    total = float(bins.sum())
    zero = torch.zeros(1, dtype=torch.float64)
    occupied = (bins > 0).to(torch.float64)
    bins_log_bins = torch.where(bins > 0, bins * torch.log(torch.where(bins > 0, bins, 1.0)), 0.0)
    cum_counts = torch.cat([zero, torch.cumsum(bins, 0)])  # cum_counts[j] = sum of bins[:j]
    cum_occupied = torch.cat([zero, torch.cumsum(occupied, 0)])
    cum_entropy = torch.cat([zero, torch.cumsum(bins_log_bins, 0)])
    n = num_quant_bins
    edges = (torch.arange(n + 1)[None, :] * kept[:, None] + n - 1) // n  # [candidates, n + 1]
    lo, hi = edges[:, :-1], edges[:, 1:]
    sums = cum_counts[hi] - cum_counts[lo]  # Q's counts per level (clipped outliers not in it)
    sizes = cum_occupied[hi] - cum_occupied[lo]
    outliers = total - cum_counts[kept]  # clipping adds them to the last kept bin (P only)
    last_bin = bins[kept - 1] + outliers
    sizes[:, -1] += ((bins[kept - 1] == 0) & (outliers > 0)).to(torch.float64)
    p_levels = sums.clone()
    p_levels[:, -1] += outliers
    q = torch.where(sizes > 0, sums / sizes.clamp_min(1.0), 0.0)
    q = torch.where((sizes > 0) & (q <= 0), SMOOTHING_COUNTS, q)
    p_log_p = (cum_entropy[kept - 1] + last_bin * torch.log(last_bin.clamp_min(1e-300))) / total
    cross = torch.where(p_levels > 0, p_levels * torch.log(torch.where(p_levels > 0, q, 1.0)), 0.0)
    return p_log_p - math.log(total) - cross.sum(1) / total + torch.log((q * sizes).sum(1))
