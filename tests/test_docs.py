"""The README and docs/ say what the code does: every command they show uses flags that exist, and
the pages they link to are there."""
import re
import shlex
from pathlib import Path

import pytest

from config.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]


def shown_commands(page: Path) -> list[str]:
    """`python run_experiments.py ...` lines of the page's code blocks, comments dropped."""
    commands, in_block = [], False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_block = not in_block
        elif in_block and line.strip().startswith("python run_experiments.py"):
            commands.append(line.split("#", 1)[0].strip())
    return commands


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_shown_parses(page):
    parser = build_parser()
    flags = {option for action in parser._actions for option in action.option_strings}
    for command in shown_commands(page):
        args = shlex.split(command)[2:]
        unknown = [a.split("=", 1)[0] for a in args if a.startswith("--") and a.split("=", 1)[0] not in flags]
        assert not unknown, f"{page.name}: {command}: {unknown}"
        parser.parse_args(args)  # values of the right type too (argparse exits on an error)


def test_readme_is_a_front_page_whose_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert "make run" in readme and "make test" in readme
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#]+\.md)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).resolve().exists(), f"{page.name} links to a missing {target}"
