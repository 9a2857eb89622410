"""lowbit's own warning category, so callers (and the CLI) can tell lowbit's warnings apart,
and the errors a caller may want to catch by type.

`warnings.filterwarnings("error", category=lowbit.LowbitWarning)` turns them into errors;
`"ignore"` silences them without hiding other libraries' warnings.
"""

from __future__ import annotations


class LowbitWarning(UserWarning):
    """A warning about what lowbit did to a model (a layer left in float, a fallback kernel)."""


class OpPointMismatch(ValueError):
    """A module's forward called another number of functional ops of a quantized kind than
    when its op quantizers were placed (`QuantConfig.ops`): the points would no longer match."""
