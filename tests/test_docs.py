"""The README and docs/ say what the code does: every command they show uses flags that exist, and
the pages they link to are there."""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from config.cli import build_parser
from experiments.provenance import code_commit, cpu_model, machine
from visualization.generated import check_blocks

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


def in_this_repository(commit: str) -> bool:
    found = subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{commit}^{{commit}}"], capture_output=True)
    return found.returncode == 0


def test_figures_in_the_docs_are_generated_by_a_script_and_not_edited():
    """docs/results.md's study figures come from `--report ID --docs FILE`, and every benchmark table
    from `benchmarks/bench_*.py --docs FILE` (sealed with a hash of the block, stamped with the commit
    they were measured at); editing a number by hand breaks the seal, an empty block has none."""
    results = (ROOT / "docs" / "results.md").read_text()
    benchmarks = (ROOT / "benchmarks" / "README.md").read_text()
    assert check_blocks(results), "docs/results.md has no generated block"
    assert check_blocks(benchmarks) == ["bench_train", "bench_peers", "bench_harvest", "bench_study",
                                        "bench_study_baseline"]
    for page in PAGES:
        check_blocks(page.read_text())
    stamps = re.findall(r"from study `[^`]+`, which ran at commit ([^;]+?)(?: on [^;]+)?; do not edit by hand", results)
    stamps += re.findall(r"at commit (\S+), on \d+ CPU cores (?:with torch \S+|of [^;]+); do not edit by hand",
                         results + benchmarks)
    assert len(stamps) >= 4 + 2 + 4
    for commit in stamps:  # a commit of this repository, with nothing uncommitted
        assert re.fullmatch(r"[0-9a-f]{7}", commit), commit
        assert in_this_repository(commit), f"a docs block was generated at {commit}, which is not in this repository"


def test_a_benchmark_writes_its_table_into_the_page_block(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Speed\n\nProse.\n")
    script = [sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--shapes", "tinylm", "--architectures", "relu",
              "--steps", "1", "--docs", str(page)]
    refused = subprocess.run(script, capture_output=True, text=True, cwd=tmp_path)
    assert refused.returncode == 2 and refused.stdout == ""  # refused before measuring anything
    assert refused.stderr.startswith("error: --docs:") and "has no block for benchmark bench_train" in refused.stderr
    page.write_text("# Speed\n\n<!-- generated table from benchmark bench_train -->\nold\n<!-- end of generated -->\n"
                    "\nProse.\n")
    done = subprocess.run(script, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    text = page.read_text()
    assert check_blocks(text) == ["bench_train"] and "old" not in text and text.endswith("-->\n\nProse.\n")
    assert (f"by `python benchmarks/bench_train.py --shapes tinylm --architectures relu --steps 1` at commit "
            f"{code_commit()}, on {os.cpu_count()} CPU cores of {machine()}; do not edit by hand") in text
    printed = [line.split() for line in done.stdout.splitlines() if line.startswith("relu ")]
    (row,) = [line.strip("| ").split(" | ") for line in text.splitlines() if line.startswith("| relu |")]
    assert printed == [[*row[:4], *row[4].split(), *row[5:9]]]  # the printed row, as Markdown


def test_code_commit_names_the_commit_and_says_when_code_differs(tmp_path):
    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                       capture_output=True)

    assert code_commit(tmp_path) == "unknown"  # not a checkout
    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "notes.md").write_text("# notes\n")
    git("add", ".")
    git("commit", "-q", "-m", "c")
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "--short=7", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    assert code_commit(tmp_path) == head
    (tmp_path / "notes.md").write_text("# notes, rewritten from a study\n")
    (tmp_path / "new.py").write_text("untracked\n")
    assert code_commit(tmp_path) == head  # docs and untracked files do not change results
    (tmp_path / "a.py").write_text("x = 2\n")
    assert code_commit(tmp_path) == head + "+changes"


def test_machine_names_the_cpu_and_the_kernels_torch_runs_there():
    """Results equal bit for bit only on the same instruction set: the stamp says which ran."""
    import torch

    assert machine() == f"{cpu_model()} ({torch.backends.cpu.get_cpu_capability()}), torch {torch.__version__}"
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1] for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []
    if names:  # Linux on x86: the first "model name" line, its whitespace collapsed
        assert cpu_model() == " ".join(names[0].split())
    assert cpu_model().strip() and "\n" not in cpu_model()
