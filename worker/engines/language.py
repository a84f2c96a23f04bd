"""The Language engine: ``Language: python`` jobs in the process sandbox (``sandbox.py``).

The program is ``Language.Command`` (Python source, fed to ``python -I -S -`` on stdin
rather than ``-c``: every user can read every process's command line in ``/proc``, and an
argument is capped at 128 KiB) or ``Language.ProgramPath`` (``python -I -S /proc/self/cwd/<path>``,
relative to the job context, ``Language.JobContext`` fetched through ``request.fetch``).
``-I -S``: no ``PYTHON*`` variables, no site-packages, no user site, and the script's
folder is not on ``sys.path``.

The interpreter is the system's ``python3`` (``/usr/local/bin``, ``/usr/bin``, ``/bin``),
not ``sys.executable``: the node's interpreter is usually a virtualenv, or lives in a
private home (``/root/.pyenv``, under a 0700 ``/root``) that a job uid cannot even reach.
:attr:`LanguageEngine.version` is its ``major.minor``, read once by running it as a job
uid (which also proves that uids can use it). ``LanguageVersion`` must be empty or equal.

Permission layout (no mount namespace, PROTOCOL.md §4: ``/outputs`` → ``./outputs``)::

    <data-dir>/                 0700 root    the job can name nothing in here
      worker.db, results/<id>/  0700 root
      work/<id>/                0700 root    the execution's work_dir
        inputs/N/…                           fetched, then moved into sandbox/
        program.py              0600 root    Command, opened by the node as the job's stdin
        sandbox.json            0600 root    the supervisor's configuration
        sandbox/                1770 root:U  the job's working dir; U = its own uid and gid
          .home/ .tmp/          0700 U       HOME, TMPDIR (see below)
          <context entries>     root, a=rX   the job context, read-only
          <input path>          root, a=rX   each input at its path (parents root 0755)
          <output path>         0700 U       each output folder at its path

The job reaches its working dir only because the supervisor enters it as root before
dropping to uid U: the kernel checks no parent folder for a path relative to the cwd, so
every parent stays 0700 root and the job can open nothing under the data dir by absolute
path: not the store, not another execution's results or sandbox (which only that
execution's group could enter anyway). ``HOME`` and ``TMPDIR`` are therefore
``/proc/self/cwd/.home`` and ``/proc/self/cwd/.tmp`` (a job that ``chdir``s away takes
them along). Inputs and the context are root's and read-only; the working dir is
writable by the job's group and sticky, so the job adds files there but cannot rename or
delete the read-only entries. The job owns its output folders; after the run each is
moved into ``results/<id>/<Name>`` and adopted: what the job owns becomes root's (set-id
bits dropped, hard links broken); what it does not own, special files and symlinks
leaving the folder are deleted.

Limits: RLIMIT_AS = ``Resources.Memory`` (else the memory reserved at bid time) + 64 MiB
for the interpreter's own mappings; RLIMIT_CPU ≈ the timeout; RLIMIT_FSIZE =
``max_output_bytes``; RLIMIT_NOFILE; RLIMIT_NPROC per uid. No network (an empty network
namespace) unless ``Network.Type`` is Full and the node accepts networked jobs; then the
job shares the host's network, loopback included. Not limited: CPU share, disk space.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import shutil
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from schemas.callbacks import Usage
from schemas.job import NetworkType, Spec
from worker.bidding.types import BID, BidDecision, BidRequest, decline
from worker.capacity.parse import ResourceParseError, parse_bytes
from worker.engines import outputs, sandbox, uids
from worker.errors import EngineError
from worker.protocols import RunOutcome, RunRequest
from worker.storage.paths import check_relative, inside

log = logging.getLogger(__name__)

SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"
INTERPRETER_SLACK = 64 << 20  # address space of the interpreter itself, beyond Memory
DEFAULT_MEMORY = 1 << 30  # when neither the job nor the reservation says
CPU_GRACE = 1  # CPU seconds past the timeout before SIGXCPU
RESERVED = (".home", ".tmp")
SIGNAL_HINTS = {"SIGXCPU": "CPU time limit exceeded", "SIGXFSZ": "file size limit exceeded"}


class LanguageStrategy:
    """The engine's bid check (a ``SemanticStrategy``); ``check_spec`` is also applied at
    run time, so a node wired without it still refuses what it cannot run."""

    def __init__(self, version: Callable[[], str]) -> None:
        self.version = version

    async def should_bid(self, req: BidRequest) -> BidDecision:
        return self.check(req)

    def check(self, req: BidRequest) -> BidDecision:
        return self.check_spec(req.job.Spec)

    def check_spec(self, spec: Spec) -> BidDecision:
        lang = spec.Language
        try:
            version = self.version()
        except EngineError as exc:
            return decline(f"python not usable: {exc.message}")
        if lang.Language.strip().lower() != "python":
            name = lang.Language or '""'
            return decline(f"language {name} not supported: this node runs python {version}")
        if lang.LanguageVersion and lang.LanguageVersion.strip() != version:
            return decline(
                f"language version {lang.LanguageVersion} not supported: "
                f"this node runs python {version}"
            )
        if lang.RequirementsPath:
            return decline("requirements not supported")
        if spec.Network.Type == NetworkType.HTTP:
            return decline("networking type HTTP not supported")
        if not lang.Command and not lang.ProgramPath:
            return decline("no program: Language.Command and Language.ProgramPath are empty")
        if not lang.Command and lang.JobContext.StorageSource is None:
            return decline("Language.ProgramPath needs a Language.JobContext")
        return BID


class LanguageEngine:
    """Runs ``Engine: Language`` jobs; the constructor only stores settings."""

    name = "Language"
    scratch = True

    def __init__(
        self,
        *,
        uid_range: str,
        data_dir: Path,
        accept_networked: bool = False,
        python: str | None = None,
        max_processes: int = 128,
        max_open_files: int = 1024,
    ) -> None:
        self.uids = uids.UidAllocator(uids.UidRange.parse(uid_range))
        self.data_dir = Path(data_dir)
        self.accept_networked = accept_networked
        self.python = python
        self.limits = sandbox.Limits(processes=max_processes, open_files=max_open_files)
        self.bid_strategy = LanguageStrategy(lambda: self.version)
        self._version: str | EngineError | None = None
        self._probe_lock = threading.Lock()

    @property
    def version(self) -> str:
        """``major.minor`` of the job interpreter, run once as a job uid to find out (a
        failure is kept too: bids must not start processes)."""
        with self._probe_lock:  # one probe, even when the first runs start together
            if self._version is None:
                try:
                    self._version = self._probe()
                except EngineError as exc:
                    self._version = exc
        if isinstance(self._version, EngineError):
            raise self._version
        return self._version

    def interpreter(self) -> str:
        found = shutil.which(self.python or "python3", path=SYSTEM_PATH)
        if found is None:
            raise EngineError(f"{self.python or 'python3'} not found in {SYSTEM_PATH}")
        return os.path.abspath(found)

    def _probe(self) -> str:
        python = self.interpreter()
        code = "import sys; print('%d.%d' % sys.version_info[:2])"
        with self.uids.lease() as uid:
            try:
                done = subprocess.run(
                    [python, "-I", "-S", "-c", code],
                    user=uid,
                    group=uid,
                    extra_groups=[],
                    cwd="/",
                    env={"PATH": SYSTEM_PATH},
                    capture_output=True,
                    timeout=30,
                    check=False,
                )
            except (OSError, subprocess.SubprocessError) as exc:
                raise EngineError(f"cannot run {python} as uid {uid}: {exc}") from None
        if done.returncode != 0:
            err = done.stderr.decode(errors="replace").strip()[-300:]
            raise EngineError(f"{python} failed as uid {uid}: {err}")
        return done.stdout.decode().strip()

    def is_installed(self) -> bool:
        if os.geteuid() != 0 or not hasattr(os, "pidfd_open"):
            log.info("the Language engine needs root on Linux (it runs jobs as other uids)")
            return False
        try:
            log.info("Language engine: python %s (%s)", self.version, self.interpreter())
        except EngineError as exc:
            log.warning("the Language engine cannot run python: %s", exc.message)
            return False
        return True

    async def run(self, request: RunRequest) -> RunOutcome:
        started = time.monotonic()
        spec = request.execution.job.Spec
        await asyncio.to_thread(lambda: self.version)  # probed once, off the event loop
        decision = self.bid_strategy.check_spec(spec)
        if not decision.bid:
            raise EngineError(decision.reason)
        self._guard_data_dir()
        context = await _fetch_context(request)
        uid = self.uids.acquire()
        try:
            if not await asyncio.to_thread(uids.clear, uid):
                raise EngineError(f"job uid {uid} still has processes of an earlier run")
            job_sandbox = sandbox.Spec(
                argv=await asyncio.to_thread(self._prepare, request, uid, context),
                cwd=request.work_dir / "sandbox",
                uid=uid,
                gid=uid,
                env=_environment(),
                limits=self._limits(request),
                isolate_network=not self._networked(spec),
                stdin=request.work_dir / "program.py" if spec.Language.Command else None,
            )
            out = outputs.CappedOutput(request.results_dir / "stdout", request.max_output_bytes)
            err = outputs.CappedOutput(request.results_dir / "stderr", request.max_output_bytes)
            ended = await sandbox.run(
                job_sandbox,
                out,
                err,
                config_path=request.work_dir / "sandbox.json",
                timeout=request.timeout if request.timeout > 0 else None,
            )
            await asyncio.to_thread(_collect_outputs, request, uid)
        finally:
            await self._release(uid)
        (request.results_dir / "exitCode").write_text(str(ended.exit_code))
        return RunOutcome(
            result=outputs.command_result(out, err, ended.exit_code, _describe(ended)),
            usage=Usage(
                WallSeconds=time.monotonic() - started,
                CPUSeconds=ended.cpu_seconds,
                PeakMemoryBytes=ended.max_rss_bytes,
            ),
        )

    async def _release(self, uid: int) -> None:
        """Give the uid back once nothing of the job is left (quarantine it otherwise)."""
        if await asyncio.shield(asyncio.to_thread(uids.clear, uid)):
            self.uids.release(uid)
        else:
            log.error("job uid %d still has processes: not reused by this node", uid)

    def _guard_data_dir(self) -> None:
        mode = stat.S_IMODE(self.data_dir.stat().st_mode)
        if mode & 0o077:
            log.warning("data dir %s was mode %o: set to 0700 for jobs", self.data_dir, mode)
            self.data_dir.chmod(0o700)

    def _networked(self, spec: Spec) -> bool:
        return spec.Network.Type == NetworkType.FULL and self.accept_networked

    def _limits(self, request: RunRequest) -> sandbox.Limits:
        try:
            memory = parse_bytes(request.execution.job.Spec.Resources.Memory)
        except ResourceParseError as exc:
            raise EngineError(f"invalid memory limit: {exc}") from None
        memory = memory or request.execution.usage.Memory or DEFAULT_MEMORY
        timeout = request.timeout
        return sandbox.Limits(
            address_space=memory + INTERPRETER_SLACK,
            cpu_seconds=math.ceil(timeout) + CPU_GRACE if 0 < timeout < 1e9 else None,
            file_size=request.max_output_bytes,
            open_files=self.limits.open_files,
            processes=self.limits.processes,
        )

    def _prepare(self, request: RunRequest, uid: int, context: Path | None) -> list[str]:
        """Lay out the working dir (see the module docstring); the job's argv."""
        lang = request.execution.job.Spec.Language
        root = request.work_dir / "sandbox"
        root.mkdir(mode=0o700)
        for name in RESERVED:
            _owned_dir(root / name, uid)
        if context is not None:
            entries = sorted(context.iterdir()) if context.is_dir() else [context]
            for entry in entries:
                _place_read_only(entry, root / entry.name, request.work_dir)
        for item in request.inputs:
            dest = _mapped(root, item.target, "input")
            _place_read_only(item.source, dest, request.work_dir)
        for output in request.outputs:
            _owned_dir(_mapped(root, output.target, "output"), uid)
        os.chown(root, 0, uid)  # the job's group may add files; the sticky bit keeps it
        root.chmod(0o1770)  # from renaming or deleting the read-only entries
        argv = [self.interpreter(), "-I", "-S"]
        if lang.Command:
            program = request.work_dir / "program.py"
            program.write_text(lang.Command)
            program.chmod(0o600)
            return [*argv, "-"]
        path = check_relative(lang.ProgramPath, "Language.ProgramPath")
        if not (root / path).is_file() or not inside(root, root / path):
            raise EngineError(f"Language.ProgramPath {lang.ProgramPath} not found in the context")
        return [*argv, f"/proc/self/cwd/{path}"]  # python makes a relative one absolute


async def _fetch_context(request: RunRequest) -> Path | None:
    context = request.execution.job.Spec.Language.JobContext
    if context.StorageSource is None:
        return None
    if request.fetch is None:
        raise EngineError("cannot fetch the job context: no storage on this node")
    return await request.fetch(context)


def _environment() -> dict[str, str]:
    return {
        "PATH": SYSTEM_PATH,
        "HOME": "/proc/self/cwd/.home",
        "TMPDIR": "/proc/self/cwd/.tmp",
        "LANG": "C.UTF-8",
        "MALLOC_ARENA_MAX": "1",  # a thread's malloc arena reserves 64 MiB of RLIMIT_AS
    }


def _describe(ended: sandbox.Exit) -> str:
    """The runnerError of a job killed by a signal ("" when it exited)."""
    sig = ended.signal
    if sig is None:
        return ""
    try:
        name = signal.Signals(sig).name
    except ValueError:
        name = f"signal {sig}"
    hint = SIGNAL_HINTS.get(name)
    return f"killed by {name}" + (f": {hint}" if hint else "")


def _mapped(root: Path, target: str, what: str) -> Path:
    """Where the job sees ``target``: ``/a/b`` → ``<root>/a/b``, parents made (root 0755)."""
    parts = PurePosixPath(target).parts[1:]
    if not parts:
        raise EngineError(f"{what} path {target} cannot be mapped: it is the working dir")
    if parts[0] in RESERVED:
        raise EngineError(f"{what} path {target} is reserved by the Language engine")
    dest = root.joinpath(*parts)
    for parent in reversed(dest.relative_to(root).parents[:-1]):
        folder = root / parent
        if not folder.is_dir() or folder.is_symlink():
            folder.mkdir(mode=0o755)
    if os.path.lexists(dest):
        raise EngineError(f"two things at {what} path {target}")
    return dest


def _owned_dir(path: Path, uid: int) -> None:
    path.mkdir(mode=0o700)
    os.chown(path, uid, uid)


def _place_read_only(source: Path, dest: Path, scratch: Path) -> None:
    """Move (from the execution's scratch) or copy ``source`` to ``dest``; root-owned,
    readable by all, writable by none."""
    if os.path.lexists(dest):
        raise EngineError(f"two things at {dest.name} in the working dir")
    if inside(scratch, source):
        os.rename(source, dest)
    elif source.is_dir():
        shutil.copytree(source, dest, symlinks=True)
    else:
        shutil.copy2(source, dest, follow_symlinks=False)
    paths = [str(dest)]
    for dirpath, dirnames, filenames in os.walk(dest):  # not into symlinked folders
        paths += [os.path.join(dirpath, name) for name in (*dirnames, *filenames)]
    for path in paths:
        os.lchown(path, 0, 0)
        mode = os.lstat(path).st_mode
        if stat.S_ISDIR(mode):
            os.chmod(path, 0o755)
        elif stat.S_ISREG(mode):
            os.chmod(path, 0o755 if mode & 0o111 else 0o644)


def _collect_outputs(request: RunRequest, uid: int) -> None:
    """Each output folder the job filled → ``results/<id>/<Name>``, adopted by root."""
    root = request.work_dir / "sandbox"
    deepest_first = sorted(request.outputs, key=lambda o: -len(PurePosixPath(o.target).parts))
    for output in deepest_first:
        made = root.joinpath(*PurePosixPath(output.target).parts[1:])
        st = made.lstat() if os.path.lexists(made) else None
        if st is None or not stat.S_ISDIR(st.st_mode) or st.st_uid != uid:
            log.info("output %s: the job left no folder at %s", output.spec.Name, output.target)
            continue
        output.source.rmdir()
        try:
            os.rename(made, output.source)
        except OSError:
            shutil.copytree(made, output.source, symlinks=True)
        uids.adopt(output.source, uid)
