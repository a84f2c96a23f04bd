"""The results folder of an execution (PROTOCOL.md §7) and RunCommandResult summaries."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from schemas.callbacks import RunCommandResult

SUMMARY_BYTES = 2048


def results_dir(root: Path, execution_id: str) -> Path:
    """``<data-dir>/results/<ExecutionID>`` (the ID is a checked subject token)."""
    return root / execution_id


def prepare(root: Path, execution_id: str) -> Path:
    """Create a fresh, private results folder for an execution (one mkdir in the usual
    case: system calls on the event loop are what the executor's overhead is made of)."""
    path = results_dir(root, execution_id)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:  # a run before a restart left it
        shutil.rmtree(path)
        os.mkdir(path, 0o700)
    except FileNotFoundError:  # the root itself is missing
        path.mkdir(parents=True, mode=0o700)
    return path


def remove(root: Path, execution_id: str) -> None:
    shutil.rmtree(results_dir(root, execution_id), ignore_errors=True)


def discard(path: Path) -> None:
    """Remove a folder: one rmdir when it is empty (the usual work folder), else rmtree."""
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError:
        shutil.rmtree(path, ignore_errors=True)


def summary(data: bytes) -> tuple[str, bool]:
    """The first 2048 bytes cut back to a UTF-8 boundary (invalid bytes → U+FFFD), and
    whether the stream was longer."""
    head = data[:SUMMARY_BYTES]
    truncated = len(data) > SUMMARY_BYTES
    if truncated:
        # Drop a multi-byte sequence cut in half at the end (at most 3 continuation bytes).
        for back in range(1, 4):
            if len(head) < back:
                break
            byte = head[-back]
            if byte & 0b1100_0000 == 0b1000_0000:
                continue
            if byte & 0b1000_0000:
                need = 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 else 4
                if need > back:
                    head = head[:-back]
            break
    return head.decode("utf-8", errors="replace"), truncated


def read_head(path: Path) -> bytes:
    """Up to SUMMARY_BYTES + 1 bytes of a file (enough to know if it was truncated)."""
    try:
        with path.open("rb") as f:
            return f.read(SUMMARY_BYTES + 1)
    except FileNotFoundError:
        return b""


def write_results(folder: Path, *, stdout: bytes, stderr: bytes, exit_code: int) -> None:
    base = os.fspath(folder)
    for name, data in (("stdout", stdout), ("stderr", stderr), ("exitCode", b"%d" % exit_code)):
        fd = os.open(os.path.join(base, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)


def run_command_result(folder: Path, exit_code: int, runner_error: str = "") -> RunCommandResult:
    """Build the RunCommandResult from the files an engine wrote."""
    out, out_trunc = summary(read_head(folder / "stdout"))
    err, err_trunc = summary(read_head(folder / "stderr"))
    return RunCommandResult(
        stdout=out,
        stdouttruncated=out_trunc,
        stderr=err,
        stderrtruncated=err_trunc,
        exitCode=exit_code,
        runnerError=runner_error,
    )
