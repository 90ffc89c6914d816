"""Which code produced a result: the git commit of the checkout, so a report or a docs figure
can say what it was measured on."""
from __future__ import annotations

import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def code_commit(root: Path = REPO_ROOT) -> str:
    """Short commit hash of `root`'s checkout, with "+changes" when tracked files other than
    Markdown pages differ from it (docs do not change results, and are rewritten from them);
    "unknown" outside a git checkout (an unpacked archive) or without git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short=7", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)*.md")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+changes" if changed else "")
