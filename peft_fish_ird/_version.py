"""The package version: the one place it is written (``pyproject.toml`` reads it from here), and
the check of a saved adapter's version against it."""

from __future__ import annotations

import warnings
from typing import Optional

from packaging.version import InvalidVersion, Version

__version__ = "0.1.0"


def warn_if_newer(saved: Optional[str]) -> None:
    """Warn when an adapter was saved by a newer peft_fish_ird than the installed one."""
    try:
        newer = saved is not None and Version(saved) > Version(__version__)
    except InvalidVersion:
        newer = False  # a hand-edited or foreign version string: nothing to compare
    if newer:
        warnings.warn(
            f"This adapter was saved by peft_fish_ird {saved}, newer than the installed {__version__}: settings it "
            "added are ignored and loading may fail. Install the newer version from its source (`pip install "
            "git+<repository URL>` or `pip install -e <path to a checkout>`).",
            UserWarning,
            stacklevel=3,
        )
