"""The sandbox's supervisor process: root, single-threaded, stdlib only.

Started by :mod:`worker.engines.sandbox` with ``posix_spawn`` (never forked from the
node); it sets up the job (network namespace, rlimits, uid drop, NO_NEW_PRIVS), reaps
every orphan of it and reports the exit and usage on ``STATUS_FD``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import resource
import signal
from typing import Any, NoReturn

from worker.engines.sandbox import STATUS_FD

CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
_IGNORED_BY_PYTHON = (signal.SIGPIPE, signal.SIGXFSZ)  # and SIG_IGN survives execve


def main(argv: list[str]) -> int:
    """``kill UID`` or ``CONFIG.json`` (see the module docstring)."""
    if argv[:1] == ["kill"]:
        _become(int(argv[1]), int(argv[1]))
        os.kill(-1, signal.SIGKILL)  # every process of the uid but this one
        return 0
    with open(argv[0], encoding="utf-8") as f:
        config = json.load(f)
    return _Supervise(config).run()


def _libc(call: str, *args: int) -> None:
    """A libc call that returns 0 or sets errno (prctl, unshare)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if getattr(libc, call)(*(ctypes.c_ulong(a) for a in args)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{call}: {os.strerror(err)}")


def _become(uid: int, gid: int) -> None:
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


def _report(message: dict[str, Any]) -> None:
    os.write(STATUS_FD, (json.dumps(message) + "\n").encode())


class _Supervise:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.uid: int = config["uid"]
        self.me = os.getpid()
        self.job = 0
        self.stopping = False

    def run(self) -> int:
        _libc("prctl", PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != self.config["parent"]:
            return 1  # the node died before the line above
        os.closerange(STATUS_FD + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        os.chdir("/")
        try:
            if os.geteuid() != 0:
                raise PermissionError("the sandbox needs root")
            _libc("prctl", PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
            if self.config["isolate_network"]:
                _libc("unshare", CLONE_NEWNET)
        except OSError as exc:
            _report({"error": str(exc)})
            return 0
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_stop)
        self.job = os.fork()
        if self.job == 0:
            self._exec_job()
        if self.stopping:
            self._kill_all()
        while True:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            if pid == self.job:
                _report({"exit": status})
                self._kill_all()
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        _report({"usage": [ru.ru_utime, ru.ru_stime, ru.ru_maxrss]})
        return 0

    def _on_stop(self, signum: int, frame: object) -> None:
        self.stopping = True
        if self.job:
            self._kill_all()

    def _kill_all(self) -> None:
        for kill in (os.killpg, os.kill):
            with contextlib.suppress(ProcessLookupError):
                kill(self.job, signal.SIGKILL)
        if os.fork() == 0:  # the helper is reaped by the loop in run()
            try:
                _become(self.uid, self.uid)
                os.kill(-1, signal.SIGKILL)
            finally:
                os._exit(0)

    def _exec_job(self) -> NoReturn:
        config = self.config
        try:
            os.setpgid(0, 0)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, *_IGNORED_BY_PYTHON):
                signal.signal(sig, signal.SIG_DFL)
            os.chdir(config["cwd"])
            for limit, soft, hard in config["rlimits"]:
                resource.setrlimit(limit, (soft, hard))
            os.umask(config["umask"])
            _become(self.uid, config["gid"])
            _libc("prctl", PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # a uid change cleared it
            if os.getppid() != self.me:
                os._exit(1)  # the supervisor died before the line above
            _libc("prctl", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
            os.set_inheritable(STATUS_FD, False)
            signal.pthread_sigmask(signal.SIG_SETMASK, [])
            os.execve(config["argv"][0], config["argv"], config["env"])
        except BaseException as exc:
            with contextlib.suppress(BaseException):
                _report({"error": f"{config['argv'][0]}: {exc}"})
        os._exit(127)
