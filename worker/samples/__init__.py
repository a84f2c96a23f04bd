"""Sample jobs, as Bacalhau v0.3.25 job specs: what ``worker devstack`` runs and what the
README submits.

* ``noop``: the Noop engine, nothing runs;
* ``wasm``: a WASI hello world, hand-written WAT (:data:`HELLO_WAT`) compiled when the job
  is built and sent inline as an RFC 2397 data URL (``StorageSource: Inline``);
* ``python``: a ``Language: python`` job that prints a line and writes it to
  ``/outputs/hello.txt`` (under its working dir, PROTOCOL.md §4), published with the
  Local publisher when the node offers it, so ``worker submit --download`` fetches it.

The same jobs ship as YAML beside this module (``noop.yaml``, ``hello-wasm.yaml``,
``python.yaml``; the tests check they match), ready for ``worker submit``.
"""

from __future__ import annotations

import base64
import functools
import json
from typing import Any, Final

from schemas.codec import decode
from schemas.job import Job

KINDS: Final = ("noop", "wasm", "python")
ENGINE_OF: Final = {"noop": "Noop", "wasm": "Wasm", "python": "Language"}

HELLO_WAT: Final = """\
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "Hello, world!\\n")
  (func (export "_start")
    ;; one iovec at 0: {base 16, length 14}; bytes written land at 8
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 14))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
    (call $proc_exit (i32.const 0))))
"""

PYTHON_PROGRAM: Final = """\
import platform
line = "Hello from Python " + platform.python_version()
print(line)
with open("/outputs/hello.txt"[1:], "w") as f:  # /outputs is ./outputs (no mounts)
    f.write(line + "\\n")
"""


@functools.cache
def hello_wasm() -> bytes:
    """The compiled hello world module."""
    import wasmtime

    return bytes(wasmtime.wat2wasm(HELLO_WAT))


def wasm_data_url() -> str:
    return "data:application/wasm;base64," + base64.b64encode(hello_wasm()).decode()


def sample_spec(kind: str, *, publisher: str = "Noop") -> dict[str, Any]:
    """The job spec document (no Metadata) of sample ``kind``; ``publisher`` applies to
    the python sample (``Local`` or ``Noop``)."""
    spec: dict[str, Any]
    if kind == "noop":
        spec = {"Engine": "Noop", "Verifier": "Noop", "Publisher": "Noop"}
    elif kind == "wasm":
        spec = {
            "Engine": "Wasm",
            "Verifier": "Noop",
            "Publisher": "Noop",
            "Wasm": {
                "EntryModule": {
                    "StorageSource": "Inline",
                    "Name": "hello.wasm",
                    "URL": wasm_data_url(),
                },
                "EntryPoint": "_start",
            },
            "Timeout": 30,
        }
    elif kind == "python":
        spec = {
            "Engine": "Language",
            "Verifier": "Noop",
            "Language": {"Language": "python", "Command": PYTHON_PROGRAM},
            "outputs": [{"Name": "outputs", "path": "/outputs"}],
            "Timeout": 60,
        }
        if publisher == "Local":
            spec["PublisherSpec"] = {"Type": "Local"}
        else:
            spec["Publisher"] = "Noop"
    else:
        raise ValueError(f"unknown sample {kind!r} (known: {', '.join(KINDS)})")
    spec["Deal"] = {"Concurrency": 1}
    return {"APIVersion": "v1beta1", "Spec": spec}


def sample_job(kind: str, job_id: str, *, publisher: str = "Noop") -> Job:
    """Sample ``kind`` as a Job with ``Metadata.ID = job_id``."""
    document = sample_spec(kind, publisher=publisher)
    document["Metadata"] = {"ID": job_id, "ClientID": "devstack"}
    return decode(json.dumps(document).encode(), Job)
