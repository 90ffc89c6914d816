"""Entry point: `python run_experiments.py --help` lists every flag with its default."""
from __future__ import annotations

import atexit
import os
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import NoReturn


def main(argv: list[str] | None = None) -> int:
    from config.cli import parse_args
    from config.schema import UsageError

    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = parse_args(argv)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from experiments.host_memory import retain_freed_memory

    retain_freed_memory()  # before the threads of the libraries imported next exist: they share its arena
    # Heavy imports only after the arguments are checked, so --help and bad flags answer at once.
    from experiments.studies.runner import OutOfSpace, export_study, rebuild_report, run_study, search_study
    from experiments.train.trainer import StopFlag, StopRequested

    stop = StopFlag()

    def request_stop(signum, _frame) -> None:
        if stop.requested:  # a second signal: give up without waiting for the checkpoint
            raise KeyboardInterrupt
        stop.requested = True
        print(f"\n{signal.Signals(signum).name} received: stopping after this step (or cache chunk) with a "
              f"checkpoint ...", file=sys.stderr, flush=True)

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        if cfg.study.report:
            return rebuild_report(cfg)
        if cfg.study.search:
            return search_study(cfg)
        if cfg.study.export:
            return export_study(cfg)
        if cfg.study.serve:
            from experiments.explorer.app import serve_study
            return serve_study(cfg)
        return run_study(cfg, stop)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OutOfSpace as err:
        print(f"error: {err}; free some space, then continue with: {resume_command(argv, err.study_id)}",
              file=sys.stderr)
        return 2
    except StopRequested as stopped:
        print(f"stopped {stopped.where}. Continue with:\n"
              f"  {resume_command(argv, getattr(stopped, 'study_id', None))}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # a second signal, or Ctrl-C outside the training loop
        print(f"\nstopped at once; every arm keeps its last checkpoint. Continue with:\n  {resume_command(argv, None)}",
              file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def resume_command(argv: list[str], study_id: str | None) -> str:
    """The command that continues this run; without a study id, --resume finds the latest
    unfinished study run with the same settings."""
    args = [a for a in argv if a != "--resume"]
    if study_id and not any(a == "--study-id" or a.startswith("--study-id=") for a in args):
        args += ["--study-id", study_id]
    return f"{interpreter()} run_experiments.py {shlex.join(args + ['--resume'])}"


def interpreter() -> str:
    """This Python as a command that runs from the repository root in a fresh shell: the project's
    venv (.venv/bin/python) by its relative path, any other by its absolute path. Symlinks are
    kept: a venv's python resolved is the base interpreter, which lacks the venv's packages."""
    path = Path(os.path.abspath(sys.executable))
    root = Path(os.path.abspath(os.path.dirname(__file__)))
    return shlex.quote(str(path.relative_to(root) if path.is_relative_to(root) else path))


def exit_without_teardown(code: int) -> NoReturn:
    """Exit as Python would (its threads joined, every exit handler run: W&B's, multiprocessing's,
    logging's, coverage's), minus its finalisation, which frees every object of every module one by
    one: 1.5 s after a study (torch, transformer_lens, numba's LLVM) spent on memory the OS reclaims
    at once. Every file the harness writes is closed by then; the standard streams are flushed here."""
    # CPython's own steps at exit, in its order: the threads' exit hooks (they stop idle thread and
    # process pools) and the join of the non-daemon threads, then the exit handlers.
    threading._shutdown()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    code = main()  # where main raises (SystemExit included), Python exits as usual
    if sys.getprofile() is None and sys.gettrace() is None:  # profilers and coverage report after the script
        exit_without_teardown(code)
    sys.exit(code)
