"""Session fixtures.

The suite's subject model is tinylm with its shapes and grammar but a shorter training (TEST_SPEC,
set in the environment so that subprocess runs use it too): about 25 s on 2 cores instead of the
real model's 2.5 minutes, with validation loss 1.2, the name-copying gap and every concept word a
single token. So that the session does not wait for it, it trains in a background process started
once the tests are collected, and the tests that do not need it run first (ordered below); the
first test that needs it waits for the process. The process runs at normal priority: at the
lowest it got no CPU on a loaded machine (beside five busy loops, load 9, it had 0.4% of a core after
6 minutes and every test needing the model waited), and on a quiet one the two workers and it keep
both cores busy either way. It sets up its memory as run_experiments.py does. Set TINYLM_SPEC='{}' to run the suite on the real model.

`make test` runs the suite on two pytest-xdist workers (`-n 2`). Then the controller starts the
training (it collects no tests itself) and hands the models dir to the workers through the
environment; whoever loads the model first waits on a file lock that the training holds, so the
model is trained once. Workers keep torch's default threads: runs compared bit for bit must
compute alike, in the worker and in the subprocesses it starts.
"""
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# Before torch loads OpenMP (read once, at load; the workers, subprocess and forked runs inherit it):
# threads waiting for work sleep instead of spinning. Two workers of two threads each share two cores,
# and a spinning thread holds a core its neighbour's work needs: two processes training SAEs side by
# side took 164 s each spinning, 16 s sleeping (alone: 11-12 s either way). Results are the same.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from models.tinylm import TinyLM, load_or_train_tinylm  # noqa: E402
from models.tinylm.model import SPEC_ENV  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEST_SPEC = '{"n_train_stories": 4000, "train_steps": 150}'
os.environ.setdefault(SPEC_ENV, TEST_SPEC)
NEEDS_MODEL = "tinylm_models_dir"
MODELS_DIR_ENV = "TINYLM_MODELS_DIR"
# The longest work units first among the tests needing the model, each started while the other worker
# has the rest to do: the Ray tests (one worker, ~125 s), the kill/resume chain (~120 s), the quick study
# of all four studies (~50 s). The Ray group goes first: xdist queues the next unit behind a worker's
# last test, so a group after the chain would wait behind it on the same worker.
LONGEST = ("tests/test_ray.py::", "test_killed_anywhere_then_resumed_equals_an_uninterrupted_run",
           "test_quick_study_all_trains_each_arm_once_and_logs_everything")
_TRAIN = "import fcntl, os, sys, pathlib; from experiments.host_memory import retain_freed_memory; " \
         "retain_freed_memory(); from models.tinylm import load_or_train_tinylm; " \
         "lock = open(sys.argv[2], 'w'); fcntl.flock(lock, fcntl.LOCK_EX); " \
         "load_or_train_tinylm(pathlib.Path(sys.argv[1]), progress=False)"


def _lock_path(models_dir: Path) -> Path:
    """Held while the model trains, so that nobody else trains it at the same time (outside the
    models dir, which holds only models)."""
    digest = hashlib.sha256(str(Path(models_dir).resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"tinylm-training-{digest}.lock"
_background: dict = {}


def _needs_model(item: pytest.Item) -> bool:
    return NEEDS_MODEL in getattr(item, "fixturenames", ())


@pytest.hookimpl(tryfirst=True)  # before -m selects: `-m "not slow"` then trains no model
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _needs_model(item):
            item.add_marker(pytest.mark.slow)
    # Stable: file order is kept within each group, but the longest start first among those needing
    # the model. xdist hands the work out in this order (`--no-loadscope-reorder`: its default would put
    # the groups of several tests first, the Ray tests before the model-free ones that need no wait).
    items.sort(key=lambda item: (_needs_model(item), _longest_rank(item)))


def _longest_rank(item: pytest.Item) -> int:
    return next((rank for rank, name in enumerate(LONGEST) if name in item.nodeid), len(LONGEST))


def _start_training() -> None:
    """Set TINYLM_MODELS_DIR (e.g. to checkpoints/models) to reuse a cached model while developing;
    it is validated against the spec and retrained there if stale. CI leaves it unset."""
    reuse = os.environ.get(MODELS_DIR_ENV)
    models_dir = Path(reuse) if reuse else Path(tempfile.mkdtemp(prefix="tinylm-models-"))
    os.environ[MODELS_DIR_ENV] = str(models_dir)  # for xdist workers, started after this
    log = Path(tempfile.mkstemp(prefix="tinylm-training-", suffix=".log")[1])
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-c", _TRAIN, str(models_dir), str(_lock_path(models_dir))], cwd=ROOT,
                                stdout=out,
                                stderr=subprocess.STDOUT)
    _background.update(proc=proc, models_dir=models_dir, log=log, temporary=not reuse)


def pytest_configure(config: pytest.Config) -> None:
    # The xdist controller collects nothing; it trains unless the selection leaves out every slow test.
    if getattr(config.option, "numprocesses", None) and not os.environ.get("PYTEST_XDIST_WORKER"):
        if "not slow" not in (config.option.markexpr or ""):
            _start_training()


def pytest_collection_finish(session: pytest.Session) -> None:
    if _background or os.environ.get("PYTEST_XDIST_WORKER") or not any(_needs_model(i) for i in session.items):
        return
    _start_training()


def pytest_sessionfinish(session: pytest.Session) -> None:
    if not _background:
        return
    if _background["proc"].poll() is None:
        _background["proc"].kill()
        _background["proc"].wait()
    _background["log"].unlink(missing_ok=True)
    _lock_path(_background["models_dir"]).unlink(missing_ok=True)
    if _background["temporary"]:
        shutil.rmtree(_background["models_dir"], ignore_errors=True)


@pytest.fixture(scope="session")
def tinylm_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models dir holding the default tinylm, trained once per test session."""
    if not _background:  # an xdist worker, or collected without the hook's knowledge
        models_dir = Path(os.environ.get(MODELS_DIR_ENV) or tmp_path_factory.mktemp("models"))
    else:
        models_dir = _background["models_dir"]
        if _background["proc"].wait() != 0:
            pytest.fail(f"training tinylm failed:\n{_background['log'].read_text()[-3000:]}")
    models_dir.mkdir(parents=True, exist_ok=True)
    with open(_lock_path(models_dir), "w") as lock:  # waits for a training under way elsewhere
        fcntl.flock(lock, fcntl.LOCK_EX)
        load_or_train_tinylm(models_dir, progress=False)  # checks what was left (and trains if need be)
    return models_dir


@pytest.fixture(scope="session")
def tinylm(tinylm_models_dir: Path) -> TinyLM:
    return load_or_train_tinylm(tinylm_models_dir, progress=False)
