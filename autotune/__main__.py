"""`python -m autotune tune FILE ...`: the `recdsl tune` command (see autotune/cli.py)."""

import sys

from .cli import main

sys.exit(main())
