"""Imports run one way: config and models are the base; experiments' data, training and evaluation
code is used by the studies; visualization draws and records what it is given; only the studies'
runner (and the entry point) joins experiments and visualization."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(folder: str, root: Path = ROOT) -> dict[str, set[str]]:
    """module path -> the dotted modules it imports (anywhere in the file, lazy imports too)."""
    out = {}
    for path in sorted((root / folder).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
        out[str(path.relative_to(root))] = names
    return out


def wrong_imports(folder: str, forbidden: set[str], root: Path = ROOT, allowed: frozenset[str] = frozenset()) -> dict[str, list[str]]:
    def hit(name: str) -> bool:
        inside = any(name == a or name.startswith(a + ".") for a in allowed)
        return not inside and any(name == f or name.startswith(f + ".") for f in forbidden)

    modules = imported_modules(folder, root)
    assert modules, folder
    return {module: sorted(n for n in names if hit(n)) for module, names in modules.items() if any(map(hit, names))}


# config reads the architectures' catalog, which imports nothing, and no other part of models (torch).
@pytest.mark.parametrize("folder, forbidden", [
    ("config", {"experiments", "visualization", "models"}),
    ("models", {"experiments", "visualization"}),
    ("visualization", {"experiments"}),
    ("experiments/data", {"visualization", "experiments.studies", "experiments.train", "experiments.eval"}),
    ("experiments/train", {"visualization", "experiments.studies"}),
    ("experiments/eval", {"visualization", "experiments.studies", "experiments.train"}),
])
def test_imports_run_one_way(folder, forbidden):
    allowed = frozenset({"models.sae.catalog"}) if folder == "config" else frozenset()
    assert not wrong_imports(folder, forbidden, allowed=allowed)


def test_parsing_the_command_line_loads_no_torch():
    """Bad flags and --help answer at once: the catalog of architectures costs no torch import."""
    code = ("import sys; from config.cli import parse_args; parse_args(['--quick', '--activation', 'all']); "
            "import models.sae.catalog; assert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_every_registered_architecture_is_in_the_catalog():
    from models.sae import ARCHITECTURES
    from models.sae.base import register
    from models.sae.catalog import ARCHITECTURE_DEFAULTS, DEAD_HANDLING

    assert set(ARCHITECTURES) == set(ARCHITECTURE_DEFAULTS) == set(DEAD_HANDLING)
    with pytest.raises(TypeError, match="catalog"):
        register("newarch")


def test_the_check_sees_lazy_and_submodule_imports(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("def f():\n    from experiments import studies\n    import visualization.plots\n")
    assert wrong_imports("pkg", {"experiments.studies", "visualization"}, tmp_path) == {
        "pkg/a.py": ["experiments.studies", "visualization.plots"]}
    assert wrong_imports("pkg", {"experiments.train"}, tmp_path) == {}
