"""PEFT's own contract tests (its ``tests/test_custom_models.py``) pass on a FishIRD subset.

The full FishIRD set (~300 tests): ``python tests/peft_suite/run_peft_suite.py``, which also fills
the sdist cache this test reads; skipped when the installed PEFT's sdist tests are not available
offline (no cache, no ``$FISHIRD_PEFT_TESTS``).
"""

import importlib.util
from pathlib import Path

import pytest

RUNNER = Path(__file__).resolve().parent / "peft_suite" / "run_peft_suite.py"
# case 5 (modules_to_save, magnitude mask, head in the budget) through every single-adapter test but the
# dtype matrix, plus every multiple-active-adapter test of the "Same" pair (forward, merge, sequential merge)
SUBSET = "FishIRD and (kwargs4 and not autocast and not bias or Same)"


def _runner():
    spec = importlib.util.spec_from_file_location("run_peft_suite", RUNNER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_peft_contract_subset_passes(tmp_path):
    runner = _runner()
    tests = runner.find_tests(None, runner.DEFAULT_CACHE, download=False)
    if tests is None:
        pytest.skip("PEFT's sdist tests are not cached: run `python tests/peft_suite/run_peft_suite.py` once.")
    status = runner.run(tests, ["-q", "-W", "ignore"], work=tmp_path, timeout=300, keyword=SUBSET)
    assert status == 0, f"PEFT's contract tests failed on FishIRD (pytest status {status}); see the output above."


def test_patch_prepends_fishird_cases_and_refuses_an_unknown_layout():
    runner = _runner()
    source = (
        "import torch\nTEST_CASES = [\n    ('LoRA', 'MLP', LoraConfig, {}),\n]\n"
        "ALL_PEFT_CONFIG_CLASSES = sorted({row[2] for row in TEST_CASES})\n"
        "MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES = [\n]\n"
    )
    patched = runner.patch_source(source)
    assert patched.startswith("import peft_fish_ird")
    assert patched.index("Vanilla MLP 1 FishIRD") < patched.index("'LoRA'")
    assert "'FishIRD Same', 'fishird', FishIRDConfig" in patched
    assert "FishIRDDataFreeConfig if c is FishIRDConfig" in patched
    with pytest.raises(RuntimeError, match="update the runner"):
        runner.patch_source(source.replace("TEST_CASES = [", "CASES = ["))
