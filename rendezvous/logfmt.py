"""Structured logging: one line per event, `key=value` pairs (logfmt), to stderr.

Call sites write `log.info(kv("conn.open", peer=peer))`; `KeyValueFormatter` puts the
time, level and logger in front, so every line is machine-readable.
"""

from __future__ import annotations

import logging
import time
from typing import Any


def _quote(value: Any) -> str:
    text = value.hex() if isinstance(value, bytes) else str(value)
    if not text or any(c in text for c in ' ="\n\t'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def kv(event: str, **fields: Any) -> str:
    """Render an event name and its fields as `event=NAME k=v ...`."""
    parts = [f"event={_quote(event)}"]
    parts.extend(f"{k}={_quote(v)}" for k, v in fields.items())
    return " ".join(parts)


class KeyValueFormatter(logging.Formatter):
    """`ts=... level=... logger=... <message>` (the message is already key=value)."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = (f"ts={ts}.{int(record.msecs):03d}Z level={record.levelname.lower()} "
                f"logger={record.name} {record.getMessage()}")
        if record.exc_info:
            line += " exc=" + _quote(self.formatException(record.exc_info))
        return line


def configure(level: int = logging.INFO) -> None:
    """Send this process's logs to stderr in key=value form."""
    handler = logging.StreamHandler()
    handler.setFormatter(KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
