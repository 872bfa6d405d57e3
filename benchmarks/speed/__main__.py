"""``python -m benchmarks.speed``: see the package docstring for the commands."""

from benchmarks.speed.cli import main

main()
