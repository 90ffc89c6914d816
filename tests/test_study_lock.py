"""One process per study: a live holder blocks a second run and is named; a dead holder's lock is
free, even when its pid now belongs to another process; racing processes get one lock."""
import multiprocessing
import os
import subprocess
import sys

import pytest

from config.schema import UsageError
from experiments.studies.runner import StudyLock

# A holder in the lock's protocol (flock, then its pid), without importing the harness.
HOLDER = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
          "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, str(os.getpid()).encode()); print('held', flush=True); "
          "time.sleep(60)")


def test_live_holder_blocks_and_is_named(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UsageError, match=f"is being run by process {holder.pid}; wait for it"):
            with StudyLock(tmp_path):
                pass
        assert (tmp_path / ".lock").read_text() == str(holder.pid)  # not stolen
    finally:
        holder.kill()
        holder.wait()
    with StudyLock(tmp_path):  # its holder was killed: the kernel dropped the lock
        assert (tmp_path / ".lock").read_text() == str(os.getpid())
    assert not (tmp_path / ".lock").exists()


def test_stale_lock_is_taken_over_even_if_its_pid_is_alive_again(tmp_path):
    # a killed run's lock file, whose pid the system has since given to a live process (ours)
    (tmp_path / ".lock").write_text(str(os.getppid()))
    with StudyLock(tmp_path):
        assert (tmp_path / ".lock").read_text() == str(os.getpid())
    assert not (tmp_path / ".lock").exists()


N_RACERS = 6


def _contend(path, start, blocked, results):
    start.wait()
    try:
        with StudyLock(path):
            results.put("won")
            # hold it until every other process has been refused, so that none can start late
            # and take it after the release (a timed hold would race with a slow starter)
            for _ in range(N_RACERS - 1):
                if not blocked.acquire(timeout=60):
                    break
    except UsageError:
        results.put("blocked")
        blocked.release()



def test_processes_racing_for_a_stale_lock_get_exactly_one(tmp_path):
    (tmp_path / ".lock").write_text("999999999")  # stale: no process holds it
    ctx = multiprocessing.get_context("fork")  # the children reuse this process's imports
    start, blocked, results = ctx.Barrier(N_RACERS), ctx.Semaphore(0), ctx.Queue()
    procs = [ctx.Process(target=_contend, args=(tmp_path, start, blocked, results)) for _ in range(N_RACERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(90)
    assert sorted(results.get(timeout=5) for _ in procs) == ["blocked"] * (N_RACERS - 1) + ["won"]
