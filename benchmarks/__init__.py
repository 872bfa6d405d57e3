"""Benchmarks of peft_fish_ird, each a package run from the repository root: ``python -m benchmarks.<name>``."""
