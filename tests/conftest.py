"""Session fixtures.

The suite's subject model is tinylm with its shapes and grammar but a shorter training (TEST_SPEC,
set in the environment so that subprocess runs use it too): about 25 s on 2 cores instead of the
real model's 2.5 minutes, with validation loss 1.2, the name-copying gap and every concept word a
single token. So that the session does not wait for it, it trains in a background process started
once the tests are collected, and the tests that do not need it run first (ordered below); the
first test that needs it waits for the process. The process runs at the lowest CPU priority: it
soaks up what those mostly single-threaded tests leave idle instead of slowing them down. It sets
up its memory as run_experiments.py does. Set TINYLM_SPEC='{}' to run the suite on the real model.
"""
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from models.tinylm import TinyLM, load_or_train_tinylm
from models.tinylm.model import SPEC_ENV

ROOT = Path(__file__).resolve().parents[1]
TEST_SPEC = '{"n_train_stories": 4000, "train_steps": 150}'
os.environ.setdefault(SPEC_ENV, TEST_SPEC)
NEEDS_MODEL = "tinylm_models_dir"
_TRAIN = "import os, sys, pathlib; os.nice(19); from experiments.host_memory import retain_freed_memory; " \
         "retain_freed_memory(); from models.tinylm import load_or_train_tinylm; " \
         "load_or_train_tinylm(pathlib.Path(sys.argv[1]), progress=False)"
_background: dict = {}


def _needs_model(item: pytest.Item) -> bool:
    return NEEDS_MODEL in getattr(item, "fixturenames", ())


@pytest.hookimpl(tryfirst=True)  # before -m selects: `-m "not slow"` then trains no model
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _needs_model(item):
            item.add_marker(pytest.mark.slow)
    items.sort(key=_needs_model)  # stable: file order is kept within each group


def pytest_collection_finish(session: pytest.Session) -> None:
    """Set TINYLM_MODELS_DIR (e.g. to checkpoints/models) to reuse a cached model while developing;
    it is validated against the spec and retrained there if stale. CI leaves it unset."""
    if not any(_needs_model(item) for item in session.items):
        return
    reuse = os.environ.get("TINYLM_MODELS_DIR")
    models_dir = Path(reuse) if reuse else Path(tempfile.mkdtemp(prefix="tinylm-models-"))
    log = Path(tempfile.mkstemp(prefix="tinylm-training-", suffix=".log")[1])
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-c", _TRAIN, str(models_dir)], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT)
    _background.update(proc=proc, models_dir=models_dir, log=log, temporary=not reuse)


def pytest_sessionfinish(session: pytest.Session) -> None:
    if not _background:
        return
    if _background["proc"].poll() is None:
        _background["proc"].kill()
        _background["proc"].wait()
    _background["log"].unlink(missing_ok=True)
    if _background["temporary"]:
        shutil.rmtree(_background["models_dir"], ignore_errors=True)


@pytest.fixture(scope="session")
def tinylm_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models dir holding the default tinylm, trained once per test session."""
    if not _background:  # collected without the hook's knowledge (e.g. requested dynamically)
        models_dir = Path(os.environ.get("TINYLM_MODELS_DIR") or tmp_path_factory.mktemp("models"))
    else:
        models_dir = _background["models_dir"]
        if _background["proc"].wait() != 0:
            pytest.fail(f"training tinylm failed:\n{_background['log'].read_text()[-3000:]}")
    load_or_train_tinylm(models_dir, progress=False)  # checks what the process left (and trains if need be)
    return models_dir


@pytest.fixture(scope="session")
def tinylm(tinylm_models_dir: Path) -> TinyLM:
    return load_or_train_tinylm(tinylm_models_dir, progress=False)
