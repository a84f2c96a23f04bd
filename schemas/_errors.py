"""The codec's one error, and how it quotes the values it names (PROTOCOL.md §3).

Messages are one line and bounded: they go into the Nats-Service-Error header. Values
echoed in them are JSON-quoted with ASCII escapes.
"""

from __future__ import annotations

import json

_MAX_MESSAGE = 400
_MAX_ECHO = 64


class DecodeError(Exception):
    """A body that cannot be decoded into the requested type (a 400 reply)."""

    def __init__(self, message: str) -> None:
        message = " ".join(message.splitlines())
        if len(message) > _MAX_MESSAGE:
            message = message[: _MAX_MESSAGE - 3] + "..."
        super().__init__(message)
        self.message = message


def echo(value: object) -> str:
    """A bounded, one-line, ASCII, JSON-quoted rendering of a value for an error message."""
    if isinstance(value, str) and len(value) > _MAX_ECHO:
        value = value[:_MAX_ECHO] + "..."
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return ascii(value)[:_MAX_ECHO]
