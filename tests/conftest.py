from pathlib import Path

import pytest

from models.tinylm import TinyLM, load_or_train_tinylm


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: long-running test (deselect with -m 'not slow')")


@pytest.fixture(scope="session")
def tinylm_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models dir holding the default tinylm, trained once per test session (~2 min on 2 cores)."""
    models_dir = tmp_path_factory.mktemp("models")
    load_or_train_tinylm(models_dir, progress=False)
    return models_dir


@pytest.fixture(scope="session")
def tinylm(tinylm_models_dir: Path) -> TinyLM:
    return load_or_train_tinylm(tinylm_models_dir, progress=False)
