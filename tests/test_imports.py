"""Imports run one way: config and models are the base, visualization draws and records what it is
given, and experiments joins them. (Inside experiments, the data, training and evaluation modules
still use visualization's JSON files and progress bar: issue 16 moves those.)"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_packages(package: str, root: Path = ROOT) -> dict[str, set[str]]:
    """module path -> the top-level packages it imports (anywhere in the file, lazy imports too)."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        out[str(path.relative_to(root))] = names
    return out


@pytest.mark.parametrize("package, forbidden", [
    ("config", {"experiments", "visualization", "models"}),
    ("models", {"experiments", "visualization"}),
    ("visualization", {"experiments"}),
])
def test_imports_run_one_way(package, forbidden):
    modules = imported_packages(package)
    assert modules, package
    wrong = {module: sorted(names & forbidden) for module, names in modules.items() if names & forbidden}
    assert not wrong, wrong


def test_the_check_sees_lazy_imports(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("def f():\n    from experiments import faults\n    import visualization.plots\n")
    assert imported_packages("pkg", tmp_path) == {"pkg/a.py": {"experiments", "visualization"}}
