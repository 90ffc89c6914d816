"""One process per study: a live holder blocks a second run, a dead holder's lock is taken over."""
import os
import subprocess
import sys

import pytest

from config.schema import UsageError
from experiments.study import StudyLock


def test_live_holder_blocks_and_is_named(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / ".lock").write_text(str(holder.pid))
        with pytest.raises(UsageError, match=f"process {holder.pid}"):
            with StudyLock(tmp_path):
                pass
        assert (tmp_path / ".lock").read_text() == str(holder.pid)  # not stolen
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_is_taken_over_and_released(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".lock").write_text(str(dead.pid))
    with StudyLock(tmp_path):
        assert (tmp_path / ".lock").read_text() == str(os.getpid())
    assert not (tmp_path / ".lock").exists()
