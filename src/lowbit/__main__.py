"""`python -m lowbit`: the `lowbit` command (what `torchrun -m lowbit` starts on each rank)."""

import sys

from lowbit.cli import main

sys.exit(main())
