"""Signalling asyncio child processes without reaping them behind the child watcher.

On Python 3.11, ``asyncio.subprocess.Process.kill`` / ``terminate`` / ``send_signal``
end in ``subprocess.Popen.send_signal``, which first polls the child with
``waitpid(WNOHANG)``. When the child has just died (a process-group kill a moment
before), that poll reaps it, and asyncio's child watcher, waiting on the same pid in its
thread, gets ECHILD: it logs "Unknown child process pid …" and reports exit status 255
instead of the real one (CPython gh-87744; since 3.13 asyncio sends the signal with
``os.kill`` itself, as these helpers do). Until asyncio has seen the exit, the pid is this
process's child, alive or a zombie, but for the moment between the watcher's reap and its
report to the loop (a window CPython accepts as well: a pid is not reused that fast).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal


def send(proc: asyncio.subprocess.Process, sig: int) -> None:
    """``sig`` to the child, unless asyncio already saw it exit; a child that is gone
    meanwhile is fine."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)


def kill_group(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL the child's process group (it must be started with
    ``start_new_session=True``, so the child itself is in it); a group already gone is
    fine."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
