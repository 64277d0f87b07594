"""Structured logging: one line per event, to stderr (and a file when asked).

Call sites write `log.info(kv("conn.open", peer=peer))`. Two line formats, the same for
the server and the node (`--log-format`):

- `text` (logfmt): `ts=... level=... logger=... event=NAME k=v ...`; a message that was
  not made by `kv` (a plain `log.info("...")`) comes out as `event=log msg="..."`.
- `json`: one JSON object per line with `ts`, `level`, `logger`, `event` and the fields
  (bytes as hex, anything else not JSON as its `str`); a plain message has `event: "log"`
  and `msg`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from rendezvous.cliutil import FORMATS as FORMATS
from rendezvous.cliutil import LEVELS as LEVELS


def _quote(value: Any) -> str:
    text = value.hex() if isinstance(value, bytes) else str(value)
    if not text or any(c in text for c in ' ="\n\t'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


class KvMessage(str):
    """The text of `kv(...)`, keeping the event and fields for the JSON formatter."""

    __slots__ = ("event", "fields")
    event: str
    fields: dict[str, Any]


def kv(event: str, **fields: Any) -> str:
    """Render an event name and its fields as `event=NAME k=v ...`."""
    parts = [f"event={_quote(event)}"]
    parts.extend(f"{k}={_quote(v)}" for k, v in fields.items())
    msg = KvMessage(" ".join(parts))
    msg.event = event
    msg.fields = fields
    return msg


def _ts(record: logging.LogRecord) -> str:
    return (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z")


class KeyValueFormatter(logging.Formatter):
    """`ts=... level=... logger=... <message>` (the message is already key=value)."""

    def format(self, record: logging.LogRecord) -> str:
        if isinstance(record.msg, KvMessage) and not record.args:
            body = str(record.msg)
        else:
            body = "event=log msg=" + _quote(record.getMessage())
        line = f"ts={_ts(record)} level={record.levelname.lower()} logger={record.name} {body}"
        if record.exc_info:
            line += " exc=" + _quote(self.formatException(record.exc_info))
        return line


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, event, then the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {"ts": _ts(record), "level": record.levelname.lower(),
                               "logger": record.name}
        msg = record.msg
        if isinstance(msg, KvMessage) and not record.args:
            doc["event"] = msg.event
            for key, value in msg.fields.items():
                doc.setdefault(key, _jsonable(value))
        else:
            doc["event"] = "log"
            doc["msg"] = record.getMessage()
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def formatter(fmt: str = "text") -> logging.Formatter:
    """The formatter of `--log-format` FMT ("text" or "json")."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    return JsonFormatter() if fmt == "json" else KeyValueFormatter()


def configure(level: int | str = logging.INFO, fmt: str = "text", *,
              file: Path | None = None, file_bytes: int = 10 << 20, file_count: int = 3) -> None:
    """Send this process's logs to stderr in format `fmt`, and to `file` too when given
    (rotated at `file_bytes`, `file_count` old files kept)."""
    if isinstance(level, str):
        level = logging.getLevelNamesMapping()[level.upper()]
    form = formatter(fmt)
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if file is not None:
        # Imported here: it loads pickle and queue, 2.6 ms of every `peerpost` command's
        # start (this module comes with the CLI), and only daemons log to a file.
        from logging.handlers import RotatingFileHandler

        handlers.append(RotatingFileHandler(
            file, maxBytes=file_bytes, backupCount=file_count, encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(form)
    root = logging.getLogger()
    for old in root.handlers:
        if old not in handlers:
            old.close()
    root.handlers[:] = handlers
    root.setLevel(level)
