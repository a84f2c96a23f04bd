"""Inline inputs: the data travels in the job spec as an RFC 2397 data URL in ``URL``.

``data:[<media type>][;base64],<data>``, base64 or percent-encoded. The input is written
to ``dest/<name>`` (``name`` = the spec's ``Name``, else ``inline``) and that path is
returned. As in Bacalhau, whose CLI sends a folder as a gzipped tar with media type
``application/gzip``, an archive media type (gzip or tar: a tar archive; zip: a zip
archive) is extracted into the folder ``dest/<name>`` instead, with the checks of
:mod:`worker.storage.archive`. Both the decoded data and the extracted bytes are bounded by
``max_bytes``. The size known at bid time is computed from the URL's length, without
decoding it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
from pathlib import Path
from urllib.parse import unquote, unquote_to_bytes

from schemas.job import StorageSpec
from worker.errors import EngineError
from worker.storage.archive import ArchiveKind, Budget, NewFile, extract
from worker.storage.paths import check_name

ARCHIVES: dict[str, ArchiveKind] = {
    "application/gzip": "tar",
    "application/x-gzip": "tar",
    "application/x-tar": "tar",
    "application/x-gtar": "tar",
    "application/zip": "zip",
}


class DataURL:
    """The parts of a data URL: ``media_type`` (lowercase, parameters dropped), whether the
    payload is base64, and the payload as written."""

    def __init__(self, url: str) -> None:
        if url[:5].lower() != "data:":
            raise EngineError("Inline input: URL is not a data URL (RFC 2397 data:...)")
        header, comma, payload = url[5:].partition(",")
        if not comma:
            raise EngineError("Inline input: invalid data URL: no ',' before the data")
        params = [p.strip() for p in header.split(";")]
        self.base64 = len(params) > 1 and params[-1].lower() == "base64"
        self.media_type = params[0].lower() or "text/plain"
        self.payload = payload

    def size(self) -> int:
        """The decoded size, from lengths only (exact for well-formed data)."""
        if not self.base64:
            return len(self.payload) - 2 * self.payload.count("%")
        text = unquote(self.payload) if "%" in self.payload else self.payload
        text = "".join(text.split())
        return len(text.rstrip("=")) * 3 // 4

    def decode(self) -> bytes:
        if not self.base64:
            return unquote_to_bytes(self.payload)
        text = "".join(unquote(self.payload).split())
        text += "=" * (-len(text) % 4)
        try:
            if "-" in text or "_" in text:
                return base64.urlsafe_b64decode(text)
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise EngineError(f"Inline input: invalid base64 data: {exc}") from None


class Inline:
    """``StorageSource: Inline``."""

    name = "Inline"

    def __init__(self, *, max_bytes: int = 1 << 30) -> None:
        self.max_bytes = max_bytes

    def is_installed(self) -> bool:
        return True

    def is_local(self, spec: StorageSpec) -> bool:
        return True

    def known_size(self, spec: StorageSpec) -> int:
        try:
            return max(DataURL(spec.URL).size(), 0)
        except EngineError:
            return 0  # refused when prepared, with the reason

    async def prepare(self, spec: StorageSpec, dest: Path, *, requester: str) -> Path:
        data_url = DataURL(spec.URL)
        budget = Budget(self.max_bytes, "Inline input")
        budget.check(data_url.size())
        data = data_url.decode()
        path = dest / check_name(spec.Name or "inline", "Inline input name")
        kind = ARCHIVES.get(data_url.media_type)
        if kind is not None:
            await asyncio.to_thread(
                extract,
                io.BytesIO(data),
                path,
                kind=kind,
                max_bytes=self.max_bytes,
                what="Inline input",
            )
            return path
        with NewFile(path, budget) as out:
            out.write(data)
        return path
