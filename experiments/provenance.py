"""Which code and which machine produced a result: the git commit of the checkout and the processor
with the kernels torch ran on it, so a report or a docs figure can say what it was measured on."""
from __future__ import annotations

import platform
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


def machine(device: str = "cpu") -> str:
    """The processor a result was computed on, as a report or a docs stamp names it: the CPU's model
    and the vector instructions torch's kernels use there (AVX2, AVX512, ...), or the GPU's name.
    Results equal bit for bit only where these agree: another instruction set rounds differently,
    and training carries the difference on (docs/reliability.md)."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(torch.device(device))}, torch {torch.__version__}"
    return f"{cpu_model()} ({torch.backends.cpu.get_cpu_capability()}), torch {torch.__version__}"


def cpu_model() -> str:
    """The CPU's model name ("AMD EPYC", "Intel(R) Xeon(R) ..."); the architecture where the OS does not say."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"
