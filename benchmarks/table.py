"""A benchmark's table: printed row by row as it is measured and, with --docs FILE, written into the
page's block for the benchmark (visualization/generated.py), stamped with the command that made it,
the commit, the date and the machine, so benchmarks/README.md never holds a retyped figure."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path
from typing import NoReturn


from config.schema import UsageError
from experiments.provenance import REPO_ROOT, code_commit, machine
from visualization.generated import block_kinds, fill_blocks, markdown_table


def add_docs_flag(parser: argparse.ArgumentParser, block: str) -> None:
    parser.add_argument("--docs", metavar="FILE", default=None,
                        help=f"also write the results into FILE between '<!-- generated table from benchmark {block} "
                             f"-->' and '<!-- end of generated -->', stamped and sealed (default: print only)")


def refuse(message: str) -> NoReturn:
    """A benchmark's answer to bad input: one clear line and exit code 2, as run_experiments.py's."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def check_docs(args: argparse.Namespace, block: str) -> None:
    """Refuse a --docs page without the block before the benchmark runs, not after."""
    if args.docs is not None:
        try:
            block_kinds(Path(args.docs), "benchmark", block, "--docs")
        except UsageError as err:
            refuse(str(err))


class Table:
    """Columns of at least their header's width; right-aligned but for the first `left` columns."""

    def __init__(self, headers: list[str], widths: list[int] | None = None, left: int = 1):
        self.headers, self.rows, self.left = headers, [], left
        widths = [*(widths or []), *[0] * len(headers)]
        self.widths = [max(len(h), w) for h, w in zip(headers, widths)]
        line = self._line(headers)
        print(line, "-" * len(line), sep="\n", flush=True)

    def _line(self, cells: list[str]) -> str:
        return "  ".join(f"{c:<{w}}" if i < self.left else f"{c:>{w}}"
                         for i, (c, w) in enumerate(zip(cells, self.widths))).rstrip()

    def add(self, *cells: str) -> None:
        self.rows.append([str(c) for c in cells])
        print(self._line(self.rows[-1]), flush=True)

    def markdown(self) -> str:
        return markdown_table(self.headers, self.rows)


def _command() -> str:
    """This process's command line as a reader would type it from the repository root, --docs left out."""
    argv, shown = sys.argv[1:], []
    while argv:
        arg = argv.pop(0)
        if arg == "--docs":
            argv = argv[1:]
        elif not arg.startswith("--docs="):
            shown.append(arg)
    venv = Path(sys.executable).parent.parent.name  # the main venv is the README's `python`; .venv-peers is named
    interpreter = f"{venv}/bin/python" if venv.startswith(".venv-") else "python"
    script = Path(sys.argv[0]).resolve().relative_to(REPO_ROOT.resolve())
    return shlex.join([interpreter, str(script), *shown])


def write_docs(args: argparse.Namespace, block: str, parts: list[str]) -> None:
    """The block `block` of the --docs page: a stamp line, then `parts` (tables, sentences)."""
    if args.docs is None:
        return
    stamp = (f"*Generated on {time.strftime('%Y-%m-%d')} by `{_command()}` at commit {code_commit()}, on "
             f"{os.cpu_count()} CPU cores of {machine()}; do not edit by hand.*")
    fill_blocks(Path(args.docs), "benchmark", block, lambda kind: "\n\n".join([stamp, *parts]), "--docs")
    print(f"docs: {args.docs}")
