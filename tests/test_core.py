"""The torch-free core holds its line: pipeline/core imports numpy and the standard library only.

One subprocess imports every module of pipeline/core, and the serving path built on it (export.backends,
export.sample), with torch, onnx and onnxruntime blocked, then lists what was imported from outside the
standard library. data_prep imports nothing of the project but the core. A reading of the sources checks
that the arrows between the layers point one way (docs/DESIGN.md, "Layers").
"""

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import pipeline.core

REPO = Path(__file__).resolve().parents[1]
CORE = sorted(f"pipeline.core.{m.name}" for m in pkgutil.iter_modules(pipeline.core.__path__))
SERVING = ["export.backends", "export.sample"]
PROJECT = ("pipeline", "export", "benchmarks", "data_prep")

BLOCKED_IMPORTS = """
import importlib, importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'onnx', 'onnxruntime'):
            raise ImportError(f'{name} is blocked in this test')
sys.meta_path.insert(0, Block())
before = set(sys.modules)  # the interpreter's own start-up (site hooks) is not the core's doing
for name in sys.argv[1:]:
    importlib.import_module(name)
outside = {m.split('.')[0] for m in set(sys.modules) - before} - set(sys.stdlib_module_names)
print(' '.join(sorted(outside)))
print(' '.join(sorted(m for m in sys.modules if m.startswith(('pipeline', 'export')))))
"""


def imported_by(*modules: str) -> tuple[set[str], set[str]]:
    """(top-level packages from outside the standard library, project modules) after importing `modules`."""
    out = subprocess.run(
        [sys.executable, "-c", BLOCKED_IMPORTS, *modules], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout.splitlines()
    return set(out[0].split()), set(out[1].split())


def test_core_imports_numpy_and_the_standard_library_only():
    assert {"pipeline.core.schedule", "pipeline.core.sampling", "pipeline.core.sidecar"} <= set(CORE)
    outside, _ = imported_by(*CORE)
    assert outside == {"numpy", "pipeline"}


def test_serving_path_needs_no_torch_onnx_or_yaml():
    outside, project = imported_by(*SERVING)
    assert outside <= {"numpy", "pipeline", "export"}, outside
    assert {m for m in project if m.startswith("pipeline.")} <= {"pipeline.core", *CORE}


def test_data_prep_imports_only_the_core():
    outside, project = imported_by("data_prep.__main__", "data_prep.build")
    assert "torch" not in outside and "yaml" not in outside
    assert {m for m in project if m.startswith("pipeline")} <= {"pipeline", "pipeline.core", *CORE}


def project_imports(package: str) -> dict[str, set[str]]:
    """{module file: project modules it imports, at any depth}, read from the source."""
    found = {}
    for path in sorted((REPO / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
        found[str(path.relative_to(REPO))] = {n for n in names if n.split(".")[0] in PROJECT}
    return found


def test_arrows_point_one_way():
    """export -> pipeline and benchmarks -> anything, never back; the core and data_prep see only the core."""
    for path, names in project_imports("pipeline").items():
        assert not {n for n in names if n.split(".")[0] in ("export", "benchmarks", "data_prep")}, path
        if path.startswith("pipeline/core/"):
            assert all(n == "pipeline.core" or n.startswith("pipeline.core.") for n in names), (path, names)
    for path, names in project_imports("data_prep").items():
        outside = {n for n in names if n.split(".")[0] != "data_prep"}
        assert all(n == "pipeline.core" or n.startswith("pipeline.core.") for n in outside), (path, outside)
    for path, names in project_imports("export").items():
        assert not {n for n in names if n.split(".")[0] == "benchmarks"}, path
