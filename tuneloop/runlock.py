"""One live run per folder: a lock held by process 0 for the run's whole life.

`OUT/.tuneloop.lock` is locked with `filelock` (an OS lock, `flock` on POSIX), which the kernel releases
when its holder exits, however it exits; `OUT/.tuneloop.lock.json` names the holder (host, pid, start
time, command) for the one line a second run into the folder ends with. A holder file whose lock is free
was left by a run that died (kill -9, a crash, a lost machine): its lock is taken over with a warning.

A search folder is shared by the workers of one study, so it is *claimed* rather than locked:
`OUT/.tuneloop-study.json` names the study (and its storage, password masked), and a search of another
study into that folder is refused. Each trial folder is locked like any run.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

from tuneloop import atomic
from tuneloop.errors import TuneloopError
from tuneloop.redact import mask_command, mask_url

log = logging.getLogger(__name__)

LOCK_FILE = ".tuneloop.lock"
HOLDER_FILE = ".tuneloop.lock.json"
STUDY_FILE = ".tuneloop-study.json"
# How long a second run waits for a lock before naming its holder: long enough for a claim's brief lock.
WAIT_SECONDS = 0.0


def holder_record() -> dict[str, Any]:
    """Who is running: this process, its machine, when it started and the (masked) command."""
    argv = ["tuneloop", *sys.argv[1:]] if Path(sys.argv[0]).name in ("tuneloop", "__main__.py") else sys.argv
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(mask_command(list(argv)))}


def describe_holder(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "a run whose holder is not recorded"
    return (f"host {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('started')}, "
            f"command: {holder.get('command')}")


def read_holder(folder: str | Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(folder) / HOLDER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


class RunLock:
    """`with RunLock(folder):` holds the folder for this run; a second holder gets a TuneloopError naming the first."""

    def __init__(self, folder: str | Path, what: str = "output folder", wait: float = WAIT_SECONDS):
        from filelock import FileLock

        self.folder, self.what, self.wait = Path(folder), what, wait
        self._lock = FileLock(str(self.folder / LOCK_FILE), timeout=wait)

    def acquire(self) -> "RunLock":
        from filelock import Timeout

        if self.folder.exists() and not self.folder.is_dir():
            raise TuneloopError(f"{self.what} {self.folder} exists and is not a folder")
        self.created = not self.folder.exists()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._lock.acquire()
        except Timeout:
            raise TuneloopError(f"{self.what} {self.folder} is in use by another run ({describe_holder(read_holder(self.folder))}); "
                                f"wait for it to finish, or choose another --output-dir") from None
        except OSError as e:
            raise TuneloopError(f"cannot write to {self.what} {self.folder}: {e.strerror or e}") from None
        stale = read_holder(self.folder)
        if stale is not None:
            log.warning("taking over the lock of %s: the run that held it (%s) is no longer alive",
                        self.folder, describe_holder(stale))
        try:
            atomic.write_json(self.folder / HOLDER_FILE, holder_record())
        except OSError as e:
            self._lock.release()
            raise TuneloopError(f"cannot write to {self.what} {self.folder}: {e.strerror or e}") from None
        return self

    def release(self) -> None:
        if self._lock.is_locked:
            (self.folder / HOLDER_FILE).unlink(missing_ok=True)  # first: a holder file alone means "died"
            self._lock.release()
            if self.created and [p.name for p in self.folder.iterdir()] == [LOCK_FILE]:
                # A run refused before it wrote anything leaves no folder behind (it made it only to lock it).
                (self.folder / LOCK_FILE).unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    self.folder.rmdir()

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def is_alive(folder: str | Path) -> bool:
    """Whether a live run holds `folder` (its lock is taken)."""
    from filelock import FileLock, Timeout

    folder = Path(folder)
    if not (folder / LOCK_FILE).exists():
        return False
    probe = FileLock(str(folder / LOCK_FILE), timeout=0)
    try:
        probe.acquire()
    except Timeout:
        return True
    except OSError:
        return False
    probe.release()
    return False


def claim_for_study(folder: str | Path, study_name: str, storage: str) -> None:
    """Make `folder` the study's, or refuse if it belongs to another study; workers of one study share it."""
    folder = Path(folder)
    wanted = {"study_name": study_name, "storage": mask_url(storage)}
    with RunLock(folder, what="search folder", wait=30.0):  # a brief lock: only the claim is read and written
        path = folder / STUDY_FILE
        try:
            owner = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            owner = None
        except (OSError, ValueError):
            owner = None  # a claim cut short is no claim
        if owner is None:
            atomic.write_json(path, {**wanted, "claimed": holder_record()["started"]})
        elif {k: owner.get(k) for k in wanted} != wanted:
            raise TuneloopError(f"search folder {folder} belongs to study '{owner.get('study_name')}' in "
                                f"{owner.get('storage')}; a search of study '{study_name}' in {wanted['storage']} "
                                f"would overwrite its trials: choose another --output-dir (or the same "
                                f"--study-name and --storage to continue that study)")
