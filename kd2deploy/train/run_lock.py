"""One trainer per run folder. Two trainers in one folder (a relaunch while the first still runs, an orphaned child
of a stopped script, two torchrun jobs given one `output.dir`) would interleave their checkpoints and share the
cores, so the first holds an exclusive `flock` on `<run folder>/.lock` while it trains and any other stops with a
clear error (exit 2). The kernel drops the lock when its process ends, however it ends, so no stale lock is left to
clean up. Where `fcntl` is missing (Windows) there is no lock.
"""
from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from ..errors import UserError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LOCK_FILE = ".lock"


def _take(f: IO[str], run_dir: Path) -> None:
    if fcntl is None:
        return
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        raise UserError(f"The run folder {run_dir} is in use by another training run ({holder}). Two trainers in "
                        "one folder would overwrite each other's checkpoints: wait for that run to finish or stop "
                        "its `kd2deploy train` process, or pick another `output.dir`.") from None


def check_run_folder_free(run_dir: Path) -> None:
    """Raise the in-use error now, before a second trainer spends minutes building its models and data."""
    path = Path(run_dir) / LOCK_FILE
    if path.is_file():
        with open(path, "a+") as f:
            _take(f, run_dir)  # closing the file releases it


@contextmanager
def run_folder_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run folder (created if missing) for the `with` block; the lock file names the holder."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOCK_FILE, "a+") as f:
        _take(f, run_dir)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        yield
