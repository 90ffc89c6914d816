import os
from pathlib import Path

import pytest

from models.tinylm import TinyLM, load_or_train_tinylm


@pytest.fixture(scope="session")
def tinylm_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models dir holding the default tinylm, trained once per test session (~2 min on 2 cores).

    Set TINYLM_MODELS_DIR (e.g. to checkpoints/models) to reuse a cached model while developing;
    it is validated against the spec and retrained there if stale. CI leaves it unset.
    """
    reuse = os.environ.get("TINYLM_MODELS_DIR")
    models_dir = Path(reuse) if reuse else tmp_path_factory.mktemp("models")
    load_or_train_tinylm(models_dir, progress=False)
    return models_dir


@pytest.fixture(scope="session")
def tinylm(tinylm_models_dir: Path) -> TinyLM:
    return load_or_train_tinylm(tinylm_models_dir, progress=False)
