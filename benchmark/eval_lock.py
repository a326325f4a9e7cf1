"""One evaluation per output directory (issue 17.2), and appends that are whole lines.

Two ``deltakv-eval`` runs writing into one folder used to interleave their ``predictions.jsonl``
(duplicated rows, mixed methods, torn lines dropped by the next resume = lost work). A run now takes
``OutputDirLock`` on its folder before touching anything in it:

* an OS lock (``fcntl.flock``, exclusive, non-blocking) on ``<dir>/.eval.lock``: a second run fails
  at once with ``OutputDirLocked``, one sentence naming the holder (pid, host, command, start time,
  which the holder writes into the lock file) and the fix;
* the kernel drops the lock when the holder dies, so a lock file left by a killed run is simply
  taken (with a warning naming the dead pid). If the lock is still held but the pid written in the
  file is dead on this host (the fd leaked into a forked child that outlived the run), the file is
  replaced and the lock taken over, with a warning;
* POSIX only: without ``fcntl`` (Windows) ``OutputDirLock`` raises a clear error.

``append_lines`` writes records as ONE ``os.write`` of complete lines on an ``O_APPEND`` fd, then
fsyncs: a kill leaves at most one torn last line, which ``PredictionStore`` drops on resume.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

log = logging.getLogger("deltakv.eval")

LOCK_NAME = ".eval.lock"


class OutputDirLocked(RuntimeError):
    """Another live evaluation holds the output directory."""


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (a zombie counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    try:  # a zombie (exited, not reaped) holds no resources: dead for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def read_holder(path: Path) -> dict:
    """The holder record written in a lock file ({} when unreadable / empty)."""
    try:
        return json.loads(Path(path).read_text() or "{}")
    except (OSError, ValueError):
        return {}


def describe_holder(h: dict) -> str:
    if not h:
        return "an unknown process (the lock file names no holder)"
    cmd = h.get("command") or "?"
    if len(cmd) > 200:
        cmd = cmd[:197] + "..."
    return f"pid {h.get('pid', '?')} on host {h.get('host', '?')} (started {h.get('started', '?')}, command: {cmd})"


class OutputDirLock:
    """Exclusive lock of an evaluation output directory; a context manager. ``what`` names the
    holder's job in the lock file (e.g. ``eval``, ``shard 0/2``, ``merge``)."""

    def __init__(self, directory: Path, what: str = "eval"):
        self.dir = Path(directory)
        self.path = self.dir / LOCK_NAME
        self.what = what
        self.fd: int | None = None

    def acquire(self) -> "OutputDirLock":
        if fcntl is None:
            raise OSError("deltakv-eval locks its output directory with fcntl.flock, which this platform "
                          "(Windows) lacks; run it on Linux/macOS (or WSL)")
        self.dir.mkdir(parents=True, exist_ok=True)
        for _ in range(5):  # retried only when the file was replaced under us
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                holder = read_holder(self.path)
                if self._stale(holder):
                    log.warning("output dir %s: taking over the lock of %s, which is dead (its lock fd outlived it)",
                                self.dir, describe_holder(holder))
                    self._unlink_if_same(holder)
                    continue
                raise OutputDirLocked(
                    f"output directory {self.dir} is in use by another evaluation: {describe_holder(holder)}; "
                    "wait for it to finish, or give this run another output_dir (or run_name / results_root)"
                ) from None
            if not self._same_file(fd):  # unlinked / replaced between open and flock: lock the new file
                os.close(fd)
                continue
            old = read_holder(self.path)
            if old.get("pid") and old.get("host") == socket.gethostname() and not pid_alive(int(old["pid"])):
                log.warning("output dir %s: stale lock file of dead %s taken over", self.dir, describe_holder(old))
            self._write_holder(fd)
            self.fd = fd
            return self
        raise OutputDirLocked(f"output directory {self.dir}: could not take {self.path} (it kept being replaced)")

    def _stale(self, holder: dict) -> bool:
        return (bool(holder.get("pid")) and holder.get("host") == socket.gethostname()
                and not pid_alive(int(holder["pid"])))

    def _unlink_if_same(self, holder: dict) -> None:
        if read_holder(self.path) == holder:  # not already replaced by another taker
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def _same_file(self, fd: int) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        fst = os.fstat(fd)
        return (st.st_ino, st.st_dev) == (fst.st_ino, fst.st_dev)

    def _write_holder(self, fd: int) -> None:
        rec = {"pid": os.getpid(), "host": socket.gethostname(), "what": self.what,
               "command": " ".join(sys.argv), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(rec) + "\n").encode(), 0)
        os.fsync(fd)

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)  # an empty lock file: nobody holds it
        except OSError:
            pass
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "OutputDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def append_lines(path: Path, lines: list[str], fsync: bool = True) -> None:
    """Append complete lines (each ending in a newline) to ``path`` as one ``os.write`` on an
    ``O_APPEND`` fd: concurrent appenders cannot interleave inside a line, and a kill leaves at most
    one torn last line (a short write is only possible when the disk is full / a signal interrupts
    it; the rest is then written right after, still from this single holder of the lock)."""
    data = "".join(lines).encode("utf-8")
    if not data:
        return
    assert data.endswith(b"\n"), "append_lines takes complete lines"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Write a whole file through a temp file + rename: readers see the old or the new file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
