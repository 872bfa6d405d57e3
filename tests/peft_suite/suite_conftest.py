"""conftest.py of the patched PEFT suite (copied there by ``run_peft_suite.py``): the runner's skips."""

import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest

if importlib.util.find_spec("diffusers") is None:  # testing_common imports it, for Stable Diffusion tests only
    sys.modules["diffusers"] = types.SimpleNamespace(StableDiffusionPipeline=None)

SKIPS = json.loads(Path(__file__).with_name("fishird_skips.json").read_text())


def pytest_collection_modifyitems(config, items):
    for item in items:
        name = getattr(item, "originalname", None) or item.name
        for key, reason in SKIPS.items():
            func, _, part = key.partition("[")
            if func == name and part.rstrip("]") in item.name:
                item.add_marker(pytest.mark.skip(reason=reason))
