"""``python -m benchmarks.quality``: see the package docstring for the commands."""

import sys

from benchmarks.quality.cli import main

sys.exit(main())
