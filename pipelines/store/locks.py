"""Name locks: one job per `--run-name` at a time, and one ingest per table, so a second job stops
with a clear message instead of racing the first. It lives in `<runs.path>/.locks/<name>.lock`; how
it is held depends on where runs.path is: a local file lock (RunLock) or, on a Hadoop filesystem,
an exclusive lock file (HadoopRunLock). Both take the lock when made and are context managers that
release it.
"""
from __future__ import annotations

import os
import socket
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from pipelines.core.errors import UserError
from pipelines.store import rundir

LOCKS = ".locks"


@dataclass(frozen=True)
class Subject:
    """What a lock guards, for its messages: a run name, or a table being ingested."""

    noun: str        # "run name", "table"
    busy: str        # what the holder is doing
    advice: str      # what the user can do instead of waiting
    prefix: str      # of the lock file's name, so a table and a run of one name never share a lock

    def file(self, name: str) -> str:
        return f"{self.prefix}{name}.lock"


RUN_NAME = Subject("run name", "running it", "or choose another --run-name", "")
TABLE = Subject("table", "ingesting into it", "(two ingests of one table at once could append a file twice)",
                "table-")


def _in_use(subject: Subject, name: str, holder: str, where: object, hint: str = "") -> UserError:
    return UserError(f"{subject.noun} {name!r} is in use: a job ({holder}) is {subject.busy} now "
                     f"(lock {where}); wait for it to end {subject.advice}{hint}")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class NameLock(ABC):
    """An exclusive lock on a run name, held from `acquire` (called when the lock is made) to
    `release` (called when the `with` block ends)."""

    def __init__(self, root: str, name: str, subject: Subject = RUN_NAME) -> None:
        self.name, self.subject = name, subject
        self.acquire(root)

    @abstractmethod
    def acquire(self, runs_path: str) -> None:
        """Take the lock, or raise UserError naming the job that holds it."""

    @abstractmethod
    def release(self) -> None:
        """Give the lock up."""

    def __enter__(self) -> NameLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class RunLock(NameLock):
    """The local lock: an flock on the lock file. The OS drops it when the process ends, even by
    SIGKILL, so a killed job never leaves a stale lock behind. (A runs.path on a shared file system
    needs the jobs' drivers on one machine, as cron gives.)"""

    def acquire(self, runs_path: str) -> None:
        import fcntl

        lock_dir = Path(runs_path) / LOCKS
        lock_dir.mkdir(parents=True, exist_ok=True)
        self.path = lock_dir / self.subject.file(self.name)
        self._fh = open(self.path, "a+")
        try:
            fcntl.flock(self._fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._fh.seek(0)
            holder = self._fh.read().strip() or "another process"
            self._fh.close()
            raise _in_use(self.subject, self.name, holder, self.path) from None
        self._fh.truncate(0)
        self._fh.write(f"pid {os.getpid()} since {_now()}")
        self._fh.flush()

    def release(self) -> None:
        self._fh.close()  # releases the lock


def _started(pid: int) -> str | None:
    """A process's start time in clock ticks since boot (Linux), or None when it is not running:
    with the pid, it names a process even after the pid is reused."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _holder() -> str:
    pid = os.getpid()
    return f"host {socket.gethostname()} pid {pid} start {_started(pid)} since {_now()}"


def _is_stale(holder: str) -> bool:
    """A lock left by a job on this host whose process is gone (killed hard)."""
    words = holder.split()
    fields = dict(zip(words[::2], words[1::2], strict=False))
    if fields.get("host") != socket.gethostname() or not fields.get("pid", "").isdigit():
        return False
    pid = int(fields["pid"])
    if not os.path.isdir("/proc/self"):   # no /proc: only whether that pid is alive
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        return False
    return _started(pid) != fields.get("start")


class HadoopRunLock(NameLock):
    """The lock on a Hadoop filesystem, where there is no flock: the lock file is created only if
    it does not exist (atomic on HDFS), holding the holder's host, pid and process start, and
    deleted when the job ends. A job killed hard (SIGKILL, a lost container) leaves it behind: a
    later job on the same host takes it over once that process is gone; from another host the
    message names the file to delete once no job holds the name. Correct for one scheduler starting
    the jobs; on S3 (no atomic create) two jobs started in the same instant can both get it."""

    def acquire(self, runs_path: str) -> None:
        self.fs = rundir.HadoopFS(runs_path)
        self.uri = rundir.join(runs_path, LOCKS, self.subject.file(self.name))
        self.me = _holder()
        for attempt in range(2):
            if self.fs.create_new(self.uri, self.me.encode()):
                return
            holder = (self.fs.read(self.uri) or b"").decode().strip() or "another process"
            if attempt == 0 and _is_stale(holder):
                stale = f"{self.uri}.stale-{socket.gethostname()}-{os.getpid()}"
                if self.fs.rename(self.uri, stale):   # only one job can move it
                    moved = (self.fs.read(stale) or b"").decode().strip()
                    if moved != holder:   # a live job took the lock after we read it: give it back
                        self.fs.rename(stale, self.uri)
                        raise _in_use(self.subject, self.name, moved, self.uri)
                    self.fs.delete(stale)
                    print(f"taking over the lock of {self.subject.noun} {self.name!r} from a job that is gone "
                          f"({holder})", flush=True)
                continue
            raise _in_use(self.subject, self.name, holder, self.uri,
                          " (if that job was killed on another host, delete the lock file)")

    def release(self) -> None:
        if (self.fs.read(self.uri) or b"").decode().strip() == self.me:
            self.fs.delete(self.uri)


def lock_run_name(runs_path: str, name: str) -> NameLock:
    """The run-name lock for runs.path: a file lock locally, an exclusive lock file on Hadoop."""
    return (HadoopRunLock if rundir.is_remote(runs_path) else RunLock)(runs_path, name)


def lock_table(lake_path: str, table: str) -> NameLock:
    """One ingest of `table` at a time (`<lake.path>/.locks/<table>.lock`), the same two kinds."""
    return (HadoopRunLock if rundir.is_remote(lake_path) else RunLock)(lake_path, table, TABLE)
