"""A job's processes end with the job: no orphan keeps training or writing after a cancel.

* :func:`raise_on_termination` turns SIGTERM and SIGHUP (a ``timeout``, a CI cancel, a closed
  terminal) into :class:`Terminated`, an exception that unwinds the stack like Ctrl-C does, so
  ``finally`` blocks and context managers (the staged outputs of :mod:`kdlib.outputs`) clean up.
* :func:`die_with_parent` asks Linux to signal this process when its parent dies
  (``prctl(PR_SET_PDEATHSIG)``): for DataLoader workers and measurement subprocesses, whose parent
  is the training process.
* :func:`watch_process` signals this process when another one (an ancestor that is not the direct
  parent, e.g. the ``dvc`` that started the shell that started us) is gone: ``kill -9`` of that
  process then still ends us within ``interval_s``.

Elsewhere than Linux the parent-death calls are no-ops (the watchdog still works where ``/proc``
or ``os.kill(pid, 0)`` does).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time
from pathlib import Path

_PR_SET_PDEATHSIG = 1


class Terminated(BaseException):
    """The process got SIGTERM or SIGHUP. A ``BaseException`` (like ``KeyboardInterrupt``), so an
    ``except Exception`` in library code cannot swallow a cancel."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"terminated by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """The shell's convention for a death by signal: 128 + the signal number."""
        return 128 + self.signum


def raise_on_termination(signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGHUP)) -> None:
    """Raise :class:`Terminated` in the main thread when one of ``signals`` arrives.

    The handler raises once; a second signal while unwinding is ignored so that cleanup is not
    itself interrupted (a SIGKILL still ends everything)."""
    def handler(signum: int, _frame: object) -> None:
        for sig in signals:
            signal.signal(sig, signal.SIG_IGN)
        raise Terminated(signum)

    for sig in signals:
        signal.signal(sig, handler)


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def die_with_parent(sig: int = signal.SIGKILL, expected_parent: int | None = None) -> bool:
    """Have Linux send ``sig`` to this process when its parent exits; returns whether it could.

    If the parent already died before the call (``os.getppid()`` is no longer
    ``expected_parent``), the signal is sent at once: there is no parent left to outlive."""
    libc = _libc()
    if libc is None:
        return False
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    if expected_parent is not None and os.getppid() != expected_parent:
        os.kill(os.getpid(), sig)
    return True


def child_initializer(*_args: object) -> None:
    """For ``worker_init_fn`` / pool ``initializer``: die (SIGKILL) with the parent process."""
    die_with_parent(signal.SIGKILL)


def process_start_time(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot (Linux ``/proc/<pid>/stat`` field 22), or
    ``None`` when there is no such process. With the pid, it names a process even after pid reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may contain spaces: split after the last ")"
    fields = stat[stat.rfind(")") + 2:].split()
    return int(fields[19])


def process_alive(pid: int, start_time: int | None = None) -> bool:
    """Whether ``pid`` runs (and, given ``start_time``, is still the process that had it)."""
    if pid <= 0:
        return False
    if Path("/proc").is_dir():
        now = process_start_time(pid)
        if now is None or _is_zombie(pid):
            return False
        return start_time is None or now == start_time
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rfind(")") + 2:].split()[0] == "Z"


def parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rfind(")") + 2:].split()[1])


def command_line(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def ancestors(pid: int | None = None) -> list[int]:
    """The pids above ``pid`` (default: this process), nearest first, up to but excluding pid 1."""
    found: list[int] = []
    current = os.getpid() if pid is None else pid
    while True:
        parent = parent_of(current)
        if parent is None or parent <= 1 or parent in found:
            return found
        found.append(parent)
        current = parent


def watch_process(pid: int, start_time: int | None, sig: int = signal.SIGTERM,
                  interval_s: float = 0.5) -> threading.Thread:
    """Send ``sig`` to this process as soon as ``pid`` (started at ``start_time``) is gone.

    A daemon thread polls every ``interval_s``; with :func:`raise_on_termination` the signal
    becomes :class:`Terminated` in the main thread, which cleans up and exits."""
    def watch() -> None:
        while process_alive(pid, start_time):
            time.sleep(interval_s)
        os.kill(os.getpid(), sig)

    thread = threading.Thread(target=watch, name=f"watch-{pid}", daemon=True)
    thread.start()
    return thread
