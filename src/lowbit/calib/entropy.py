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

import torch
from torch import Tensor

# Where Q is empty but P is not (a level whose only non-empty bin holds clipped outliers), Q gets
# this many counts instead of 0, as the smoothing of MXNet / ONNX Runtime does, so KL stays finite.
SMOOTHING_COUNTS = 1e-4
_CHUNK = 256  # candidates per vectorised block: bounds memory at a few [256, num_bins] tensors


def entropy_bins(counts: Tensor, num_quant_bins: int) -> int:
    """How many leading bins of `counts` (a histogram of |x|) to keep: the KL-optimal i."""
    counts = counts.to(torch.float64)
    nonzero = torch.nonzero(counts).flatten()
    if nonzero.numel() == 0:
        return 0
    last = int(nonzero[-1]) + 1
    if last <= num_quant_bins:
        return last  # everything fits without clipping
    bins = counts[:last]
    total = float(bins.sum())
    cumulative = torch.cumsum(bins, 0)
    candidates = torch.arange(num_quant_bins, last + 1)
    divergences = torch.cat(
        [
            _divergences(bins, total, cumulative, block, num_quant_bins)
            for block in candidates.split(_CHUNK)
        ]
    )
    best = divergences.numel() - 1 - int(torch.argmin(divergences.flip(0)))
    return int(candidates[best])


def _divergences(
    bins: Tensor, total: float, cumulative: Tensor, kept: Tensor, num_quant_bins: int
) -> Tensor:
    """KL(P || Q) for each candidate number of kept bins in `kept`."""
    rows = torch.arange(kept.numel())
    j = torch.arange(bins.numel())
    inside = j[None, :] < kept[:, None]
    p = torch.where(inside, bins[None, :], 0.0)
    p[rows, kept - 1] += total - cumulative[kept - 1]  # outliers into the last kept bin
    level = torch.where(inside, j[None, :] * num_quant_bins // kept[:, None], num_quant_bins)
    occupied = p > 0
    sums = torch.zeros(kept.numel(), num_quant_bins + 1, dtype=torch.float64)
    sums.scatter_add_(1, level, torch.where(inside, bins[None, :], 0.0))
    sizes = torch.zeros_like(sums).scatter_add_(1, level, occupied.to(torch.float64))
    q = torch.where(occupied, sums.gather(1, level) / sizes.gather(1, level).clamp_min(1.0), 0.0)
    q = torch.where(occupied & (q <= 0), SMOOTHING_COUNTS, q)
    p = p / p.sum(1, keepdim=True)
    q = q / q.sum(1, keepdim=True)
    terms = torch.where(occupied, p * torch.log(p / torch.where(occupied, q, 1.0)), 0.0)
    return terms.sum(1)
