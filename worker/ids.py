"""Random IDs without a system call each: UUIDv4 text from a pool of ``os.urandom`` bytes.

``uuid.uuid4()`` reads 16 bytes from the kernel per call; on the bid path that system call
released the GIL, and with ``--sync full`` the event loop then waited for the store's
writer thread to give it back. The pool reads 4 KiB at a time (256 IDs), from the same source.
"""

from __future__ import annotations

import os

_POOL_BYTES = 4096


class _Pool:
    __slots__ = ("_buf", "_pos")

    def __init__(self) -> None:
        self._buf = b""
        self._pos = 0

    def take(self, n: int) -> bytes:
        if self._pos + n > len(self._buf):
            self._buf, self._pos = os.urandom(_POOL_BYTES), 0
        start = self._pos
        self._pos = start + n
        return self._buf[start : start + n]


_pool = _Pool()


def uuid4_text() -> str:
    """A random (version 4, RFC 9562 variant) UUID as text, like ``str(uuid.uuid4())``."""
    b = bytearray(_pool.take(16))
    b[6] = (b[6] & 0x0F) | 0x40
    b[8] = (b[8] & 0x3F) | 0x80
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
