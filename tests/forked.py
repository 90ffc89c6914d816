"""`python run_experiments.py ARGS` in a process forked from one that has imported the harness.

Every process of a run pays about 9 s of imports (torch, matplotlib, transformer_lens and
transformers) before it does any work; the kill/resume chain starts nine of them. Here one server
process per pytest worker imports those modules once, then forks a child per run: the child gets
the run's environment, working directory, stdout and stderr, runs `run_experiments.main` and exits
as the script would (atexit handlers, then the exit code). A child is a process of its own, killed
by the faults' SIGKILL like a fresh one, and shares no state with the runs before it: each is forked
from the server, which has only imported. What it does not repeat is a cold interpreter's start,
which the tests that need one (the offline Hugging Face message, the signals, imports from outside
the repository, Ray) keep through `subprocess`.

The server imports, never computes: a process forked after torch has run parallel work can hang in
its thread pool, and runs compared bit for bit must pick their torch threads as a fresh process does.
Nothing an import sets up may be used up by a run: W&B is left to each run, because it makes its
media folder at import and the first run's exit removes it; nor may anything read from the
environment at import time differ between runs (HF_HUB_OFFLINE does: the Hugging Face test keeps
its own subprocess).
"""
from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# What a run imports on its way (runner, subject model, UMAP), imported once by the server.
_SERVER = """
import atexit, json, os, selectors, sys, threading, traceback
sys.path.insert(0, sys.argv[1])
import run_experiments
import experiments.studies.runner, experiments.eval.embedding, transformer_lens.model_bridge, umap
print("ready", flush=True)
for line in sys.stdin:
    request = json.loads(line)
    pipes = [os.pipe(), os.pipe()]  # the run's stdout and stderr
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setpgid(0, 0)  # a kill of the run's group reaches only the run and its children
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # not the server's requests
            for fd, (read, write) in zip((1, 2), pipes):
                os.dup2(write, fd)
                os.close(read)
                os.close(write)
            os.environ.clear()
            os.environ.update(request["env"])
            os.chdir(request["cwd"])
            sys.argv = ["run_experiments.py", *request["args"]]
            code = run_experiments.main(request["args"])
        except SystemExit as stop:
            code = 0 if stop.code is None else stop.code if isinstance(stop.code, int) else 1
            if not isinstance(stop.code, (int, type(None))):
                print(stop.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
        finally:  # what the interpreter does on exit: wait for the threads left running, then atexit
            threading._shutdown()
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print(json.dumps({"pid": pid}), flush=True)
    # Read until every holder of the pipes has closed them, as subprocess.run does: processes the run
    # started (W&B's service, which writes the run's last records) outlive it and keep them open.
    sel = selectors.DefaultSelector()
    for (read, write), name in zip(pipes, ("stdout", "stderr")):
        os.close(write)
        sel.register(read, selectors.EVENT_READ, open(request[name], "wb"))
    while sel.get_map():
        for key, _ in sel.select():
            chunk = os.read(key.fd, 65536)
            if chunk:
                key.data.write(chunk)
            else:
                sel.unregister(key.fd)
                os.close(key.fd)
                key.data.close()
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)
"""


class _Server:
    def __init__(self) -> None:
        # NVML's check, so that nothing imported initialises CUDA before a fork (tests/test_gpu.py)
        env = {**os.environ, "PYTORCH_NVML_BASED_CUDA_CHECK": "1"}
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER, str(ROOT)], cwd=ROOT, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        self.pending = b""  # read from the server, not yet a whole line
        atexit.register(self.close)
        if self.line(120) != "ready":
            raise RuntimeError(f"the fork server did not start (exit code {self.proc.wait()})")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def line(self, timeout: float | None) -> str:
        """The server's next line; unbuffered reads, so a line already read is never left behind a
        select() that waits for more."""
        while b"\n" not in self.pending:
            if not select.select([self.proc.stdout], [], [], timeout)[0]:
                raise TimeoutError
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError(f"the fork server died (exit code {self.proc.wait()})")
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return line.decode()

    def send(self, request: dict) -> None:
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        self.proc.stdin.flush()


_server: _Server | None = None


def run_forked(args: list[str], env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python run_experiments.py *args` from the repository root, as `subprocess.run` with
    `capture_output=True, text=True` returns it (a killed run's returncode is minus its signal)."""
    global _server
    if _server is None or _server.proc.poll() is not None:
        _server = _Server()
    command = ["run_experiments.py", *map(str, args)]
    with tempfile.TemporaryDirectory(prefix="forked-run-") as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        try:
            _server.send({"args": command[1:], "env": dict(os.environ if env is None else env), "cwd": str(ROOT),
                          "stdout": str(out), "stderr": str(err)})
            pid = json.loads(_server.line(30))["pid"]
            try:
                code = json.loads(_server.line(timeout))["returncode"]
            except TimeoutError:
                os.killpg(pid, signal.SIGKILL)
                raise subprocess.TimeoutExpired(command, timeout, out.read_text(), err.read_text()) from None
        except BaseException:  # the server may be mid-request: the next run gets a new one
            _server.close()
            _server = None
            raise
        return subprocess.CompletedProcess(command, code, out.read_text(), err.read_text())
