"""Blocks of a Markdown page that a script writes, so that no figure in the docs is retyped.

A page marks where a script's output goes:

    <!-- generated results from study default -->          (run_experiments.py --report ID --docs FILE)
    <!-- generated table from benchmark bench_train -->    (python benchmarks/bench_train.py --docs FILE)
    <!-- end of generated -->

The script replaces what lies between the two lines with its text, sealed by a hash of that text:
an edit by hand breaks the seal, which the docs test checks. Imports nothing heavy: the benchmarks
use it in .venv-peers too.
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from pathlib import Path

from config.schema import UsageError

BLOCK = re.compile(r"(?P<start><!-- generated (?P<kind>[a-z]+) from (?P<source>study|benchmark) (?P<id>\S+) -->\n)"
                   r"(?P<block>.*?)(?P<end><!-- end of generated -->)", flags=re.S)
_SEAL = re.compile(r"<!-- sha256 (?P<digest>[0-9a-f]{16}) -->\n")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def block_kinds(path: Path, source: str, block_id: str, flag: str) -> list[str]:
    """The kinds of `source` `block_id`'s blocks in the page at `path`; UsageError when it has none,
    checked before the (possibly long) work that fills them."""
    if not path.is_file():
        raise UsageError(f"{flag}: {path} is {'a folder' if path.is_dir() else 'no such file'}; name the page "
                         f"(a Markdown file) whose block for {source} {block_id} to fill")
    text = path.read_text()
    kinds = [m["kind"] for m in BLOCK.finditer(text) if m["source"] == source and m["id"] == block_id]
    if not kinds:
        kind, other = ("results", " (or 'summary')") if source == "study" else ("table", "")
        raise UsageError(f"{flag}: {path} has no block for {source} {block_id}: put the lines '<!-- generated {kind} "
                         f"from {source} {block_id} -->'{other} and '<!-- end of generated -->' where it goes")
    return kinds


def fill_blocks(path: Path, source: str, block_id: str, render: Callable[[str], str], flag: str) -> None:
    """Replace each block of `source` `block_id` in the page at `path` with render(kind), sealed."""
    block_kinds(path, source, block_id, flag)

    def fill(match: re.Match) -> str:
        if match["source"] != source or match["id"] != block_id:
            return match[0]
        body = render(match["kind"]).rstrip("\n") + "\n"
        return f"{match['start']}<!-- sha256 {_digest(body)} -->\n{body}{match['end']}"

    path.write_text(BLOCK.sub(fill, path.read_text()))


def check_blocks(text: str) -> list[str]:
    """The ids of the generated blocks in `text`; raises ValueError where a block was edited after it
    was generated (its hash no longer matches) or carries no seal."""
    found = []
    for match in BLOCK.finditer(text):
        seal = _SEAL.match(match["block"])
        if seal is None or _digest(match["block"][seal.end():]) != seal["digest"]:
            raise ValueError(f"the generated block of {match['source']} {match['id']} was edited by hand or lost its "
                             f"seal")
        found.append(match["id"])
    return found
