"""lowbit's own warning category, so callers (and the CLI) can tell lowbit's warnings apart.

`warnings.filterwarnings("error", category=lowbit.LowbitWarning)` turns them into errors;
`"ignore"` silences them without hiding other libraries' warnings.
"""

from __future__ import annotations


class LowbitWarning(UserWarning):
    """A warning about what lowbit did to a model (a layer left in float, a fallback kernel)."""
