"""`python -m recurrence_dsl COMMAND ...`: the `recdsl` command line, without the installed script."""

import sys

from .cli import main

sys.exit(main())
