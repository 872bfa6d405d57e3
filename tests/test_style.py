"""The repository passes its own lint and format settings (pyproject.toml's [tool.ruff])."""

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(
    importlib.util.find_spec("ruff") is None, reason="ruff is in the dev extra: pip install -e '.[dev]'"
)
@pytest.mark.parametrize("command", [["check", "."], ["format", "--check", "."]], ids=["lint", "format"])
def test_repository_passes_ruff(command):
    done = subprocess.run(
        [sys.executable, "-m", "ruff", *command], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr


PACKAGE = REPO / "peft_fish_ird"
MAX_PACKAGE_FILE_LINES = 400
MAX_FUNCTION_LINES = 60
MAX_BENCHMARK_FILE_LINES = 500


def _package_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Package modules that ``name`` imports anywhere in its file (deferred imports included)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
            target = ".".join([*base, node.module] if node.module else base) if node.level else node.module or ""
            if target in modules:
                submodules = {f"{target}.{a.name}" for a in node.names} & set(modules)
                found |= submodules or {target}
                if submodules and len(submodules) < len(node.names):
                    found.add(target)
    found.discard(name)
    return found


def test_package_files_and_functions_stay_small():
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        if len(source.splitlines()) > MAX_PACKAGE_FILE_LINES:
            too_long.append(f"{path.relative_to(REPO)}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {length} lines")
    assert not too_long, too_long


def test_benchmark_files_stay_small():
    big = [
        f"{p.relative_to(REPO)}: {n}"
        for p in sorted((REPO / "benchmarks").rglob("*.py"))
        if (n := len(p.read_text().splitlines())) > MAX_BENCHMARK_FILE_LINES
    ]
    assert not big, big


def test_no_package_module_imports_the_package_init():
    modules = _package_modules()
    offenders = [
        name
        for name, path in modules.items()
        if name != "peft_fish_ird" and "peft_fish_ird" in _imported_modules(name, path, modules)
    ]
    assert not offenders, offenders


def test_package_has_no_import_cycle():
    modules = _package_modules()
    graph = {name: _imported_modules(name, path, modules) for name, path in modules.items()}
    # a package's __init__ re-exporting its own submodules is not a cycle through them
    graph = {
        n: {m for m in deps if not (n.startswith(m + ".") and modules[m].name == "__init__.py")}
        for n, deps in graph.items()
    }
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep) :] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles
