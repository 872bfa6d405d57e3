"""Run PEFT's own contract tests (``tests/test_custom_models.py``) against FishIRD.

Command (from the repository root)::

    OMP_NUM_THREADS=1 python tests/peft_suite/run_peft_suite.py            # every FishIRD case
    python tests/peft_suite/run_peft_suite.py --tests /path/to/peft-X.Y.Z/tests -- -x -q

It takes the test folder of the *installed* PEFT version's sdist (``--tests PATH``, else
``$FISHIRD_PEFT_TESTS``, else a cache filled by ``pip download peft==<version> --no-deps
--no-binary :all:``), writes a patched copy of ``test_custom_models.py`` whose ``TEST_CASES`` and
``MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES`` start with the FishIRD cases below, and runs pytest on
it with ``-k FishIRD`` (test ids hold the case name and ``FishIRDConfig``). Tests that do not
apply to FishIRD are skipped with their reason (``SKIPS``). Extra arguments after ``--`` go to
pytest. The exit status is pytest's.

Also patched: tests parametrised by the config class alone (``ALL_PEFT_CONFIG_CLASSES`` and the
two mixed-``modules_to_save`` lists that name SHiRA) get ``fishird_cases.FishIRDDataFreeConfig``,
FishIRDConfig with ``mask_init="random"`` and the head outside the budget as defaults, because
the real default (``"fisher"``) needs data. Where ``diffusers`` is not installed, a stub stands in
for the import PEFT's ``testing_common`` makes for its Stable Diffusion tests.

Why ``keep_ratio=0.5, head_in_budget=False``: PEFT's ``MLP`` has 262 parameters (lin0 10->20,
lin1 20->2). FISH's default 0.005 would give int(262 * 0.005) = 1 entry, and with the head
(``modules_to_save=["lin1"]``, 42 parameters) in the budget none would be left. 131 entries make
training and merging change outputs measurably; keeping the head out of the budget keeps k the
same with and without ``modules_to_save`` (case 5 keeps the head in the budget, k = 89). An
adapter on ``lin1`` alone (42 candidates) needs ``keep_ratio <= 42/262``: 0.1 gives k = 26.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DEFAULT_CACHE = Path(os.environ.get("FISHIRD_PEFT_CACHE", Path.home() / ".cache" / "peft_fish_ird" / "peft_sdist"))
PATCHED_NAME = "test_custom_models_patched.py"  # no "fishird" in node names: -k FishIRD must pick cases

_BASE = {"keep_ratio": 0.5, "head_in_budget": False}
_LIN1 = {"keep_ratio": 0.1, "head_in_budget": False}
TEST_CASES = [
    ("Vanilla MLP 1 FishIRD", "MLP", {**_BASE, "target_modules": "lin0", "mask_init": "random"}),
    ("Vanilla MLP 2 FishIRD", "MLP", {**_BASE, "target_modules": ["lin0"], "mask_init": "magnitude"}),
    ("Vanilla MLP 3 FishIRD", "MLP", {**_LIN1, "target_modules": ["lin1"], "mask_init": "random"}),
    ("Vanilla MLP 4 FishIRD", "MLP", {**_BASE, "target_modules": ["lin0", "lin1"], "mask_init": "random", "seed": 56}),
    (
        "Vanilla MLP 5 FishIRD",
        "MLP",
        {"keep_ratio": 0.5, "target_modules": ["lin0"], "modules_to_save": ["lin1"], "mask_init": "magnitude"},
    ),
]
_NOISY = {"mask_init": "random", "init_weights": False}
MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES = [
    (
        "FishIRD Same",
        "fishird",
        {**_BASE, **_NOISY, "target_modules": ["lin0"]},
        {**_BASE, **_NOISY, "target_modules": ["lin0"], "seed": 1},
    ),
    (
        "FishIRD Different",
        "fishird",
        {**_LIN1, **_NOISY, "target_modules": ["lin0"]},
        {**_LIN1, **_NOISY, "target_modules": ["lin1"]},
    ),
]

# test function name (or "name[id substring]") -> why it does not apply to FishIRD. Empty at PEFT 0.21.2:
# every FishIRD case passes; the 21 skips in a run are PEFT's own (FishIRD has no `bias` option).
SKIPS: dict[str, str] = {}


def _case_source() -> str:
    rows = [f"    ({name!r}, {model!r}, FishIRDConfig, {kwargs!r})," for name, model, kwargs in TEST_CASES]
    return "\n".join(rows) + "\n"


def _multi_source() -> str:
    rows = [f"    ({n!r}, {m!r}, FishIRDConfig, {a!r}, {b!r})," for n, m, a, b in MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES]
    return "\n".join(rows) + "\n"


def patch_source(source: str) -> str:
    """``test_custom_models.py`` with peft_fish_ird imported first and the FishIRD cases prepended."""
    out = "import peft_fish_ird  # noqa: F401  (registers FISH_IRD before PEFT's tests import)\n"
    out += "from peft_fish_ird import FishIRDConfig\n"
    out += "from .fishird_cases import FishIRDDataFreeConfig\n"
    for marker, rows in (
        ("\nTEST_CASES = [\n", _case_source()),
        ("\nMULTIPLE_ACTIVE_ADAPTERS_TEST_CASES = [\n", _multi_source()),
    ):
        if source.count(marker) != 1:
            raise RuntimeError(f"PEFT's test_custom_models.py no longer has one {marker.strip()!r}: update the runner.")
        source = source.replace(marker, marker + rows)
    marker = "\nALL_PEFT_CONFIG_CLASSES = sorted("
    start = source.index(marker) + 1
    end = source.index("\n", start)
    # tests parametrised by config class alone build it from its defaults: see fishird_cases.py
    swap = "ALL_PEFT_CONFIG_CLASSES = [FishIRDDataFreeConfig if c is FishIRDConfig else c"
    swap += " for c in ALL_PEFT_CONFIG_CLASSES]"
    source = source[:end] + "\n" + swap + source[end:]
    # config-class lists written out in decorators (test_multiple_adapters_mixed_modules_to_save*): next to SHiRA
    shira = "\n            ShiraConfig,\n"
    return out + source.replace(shira, shira + "            FishIRDDataFreeConfig,\n")


def installed_peft_version() -> str:
    from importlib.metadata import version

    return version("peft")


def find_tests(tests: Optional[str], cache: Path, download: bool = True, pip_timeout: float = 300) -> Optional[Path]:
    """The sdist's ``tests`` folder: the given one, ``$FISHIRD_PEFT_TESTS``, the cache, or a fresh download.

    None when none of them has ``test_custom_models.py`` (e.g. offline with an empty cache)."""
    given = tests or os.environ.get("FISHIRD_PEFT_TESTS")
    if given:
        path = Path(given)
        return path if (path / "test_custom_models.py").exists() else None
    ver = installed_peft_version()
    unpacked = cache / f"peft-{ver}" / "tests"
    if (unpacked / "test_custom_models.py").exists():
        return unpacked
    if not download:
        return None
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", f"peft=={ver}", "--no-deps", "--no-binary", ":all:"]
    cmd += ["--retries", "1", "--timeout", "15", "-d", str(cache)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=pip_timeout)
    except subprocess.TimeoutExpired:
        return None
    archive = cache / f"peft-{ver}.tar.gz"
    if done.returncode != 0 or not archive.exists():
        return None
    with tarfile.open(archive) as tar:
        tar.extractall(cache, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    return unpacked if (unpacked / "test_custom_models.py").exists() else None


def write_suite(tests: Path, work: Path) -> Path:
    """Copy PEFT's tests into ``work/tests`` with the patched module, a package marker and the skips."""
    target = work / "tests"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(tests, target, ignore=shutil.ignore_patterns("__pycache__"))
    (target / "__init__.py").touch()
    (target / PATCHED_NAME).write_text(patch_source((tests / "test_custom_models.py").read_text()))
    shutil.copy(HERE / "suite_conftest.py", target / "conftest.py")
    shutil.copy(HERE / "fishird_cases.py", target / "fishird_cases.py")
    (target / "fishird_skips.json").write_text(json.dumps(SKIPS, indent=1))
    return target / PATCHED_NAME


def run(
    tests: Path,
    pytest_args: list[str],
    work: Optional[Path] = None,
    timeout: Optional[float] = None,
    keyword: str = "FishIRD",
) -> int:
    """Write the patched suite and run pytest on the tests matching ``keyword`` (``-k``); returns pytest's status."""
    with tempfile.TemporaryDirectory(prefix="peft_contract_") as tmp:
        work = work or Path(tmp)
        module = write_suite(tests, work)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        env.setdefault("HF_HUB_OFFLINE", "1")
        cmd = [sys.executable, "-m", "pytest", str(module), "-p", "no:cacheprovider", "-o", "addopts="]
        cmd += ["--rootdir", str(work), "-c", os.devnull, "-k", keyword, *pytest_args]
        return subprocess.run(cmd, cwd=work, env=env, timeout=timeout).returncode


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tests", help="PEFT sdist tests folder (default: $FISHIRD_PEFT_TESTS or the cache)")
    parser.add_argument("--cache", default=str(DEFAULT_CACHE), help="where the downloaded sdist is kept")
    parser.add_argument("--work", help="keep the patched suite in this folder (default: a temporary one)")
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest (put them after --)")
    args = parser.parse_args(argv)
    tests = find_tests(args.tests, Path(args.cache))
    if tests is None:
        print("PEFT's sdist tests could not be found or downloaded; pass --tests PATH.", file=sys.stderr)
        return 2
    return run(tests, args.pytest_args, Path(args.work) if args.work else None)


if __name__ == "__main__":
    sys.exit(main())
