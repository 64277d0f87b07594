"""The user's preferences (`peerpost prefs`), kept in `node.db`.

Scalar settings are msgpack values in the `pref` table, checked on the way in and again on
the way out: saved state passes the same validators as wire input. Sender rules
are rows of `sender_rule`: a pattern is a full address (`bob@example.net`) or a whole domain
(`@example.net`, that domain only, not its subdomains), and it is either `priority` or `junk`,
never both: adding it to one list takes it off the other.

`classify` lets the more specific rule win: an address rule beats a domain rule, so a user
can mark `@spam.example` junk and still have `friend@spam.example` as a priority sender.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from crypto.address import domain_of, normalize_address
from crypto.codec import packb, unpackb
from crypto.errors import DecodeError
from overlay.mail.db import NodeDB, RecordLimitError, RecordsError, count_rows

Retention = Literal["keep", "delete", "archive"]
SenderClass = Literal["priority", "junk", "normal"]
RETENTIONS: tuple[Retention, ...] = ("keep", "delete", "archive")
# The names `prefs set` takes (`prefs --json` spells them with underscores, also taken).
SETTABLE = ("auto-download", "auto-download-max", "retention", "archive-dir", "max-upload-rate")
MAX_SENDER_RULES = 1000
MAX_PATH_LEN = 4096
MAX_UPLOAD_RATE = 100 * 1024**3  # bytes/s; anything larger is a typo, not a limit
# Messages larger than this wait in `offered` for `peerpost fetch` instead of starting by
# themselves: a stranger can't fill the disk or the memory with one message.
DEFAULT_AUTO_DOWNLOAD_MAX = 2 * 1024**3
MAX_AUTO_DOWNLOAD_MAX = 1 << 44  # the largest content a message may describe
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3,
          "gb": 1000**3, "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2,
          "gib": 1024**3, "tib": 1024**4}
_MAX_VALUE_BYTES = 8 * 1024


def unknown_pref(key: str) -> str | None:
    """None for a name `prefs set` takes, else the error that names the closest one."""
    name = key.replace("_", "-")
    if name in SETTABLE:
        return None
    import difflib

    near = difflib.get_close_matches(name, SETTABLE, n=1)
    hint = f"did you mean {near[0]}? " if near else ""
    return f"unknown preference {key!r}: {hint}`prefs set` takes {', '.join(SETTABLE)}"


def _check_bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"expected true or false, got {v!r}")
    return v


def _check_retention(v: Any) -> str:
    if v not in RETENTIONS:
        raise ValueError(f"retention is one of {', '.join(RETENTIONS)}; got {v!r}")
    return str(v)


def _check_dir(v: Any) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str) or not 0 < len(v) <= MAX_PATH_LEN or "\0" in v:
        raise ValueError(f"archive_dir must be a path of 1..{MAX_PATH_LEN} characters")
    return v


def _check_rate(v: Any) -> int | None:
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or not 0 < v <= MAX_UPLOAD_RATE:
        raise ValueError(f"max_upload_rate is bytes/s in 1..{MAX_UPLOAD_RATE}, or none")
    return v


def _check_size_limit(v: Any) -> int | None:
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_AUTO_DOWNLOAD_MAX:
        raise ValueError(f"auto_download_max is bytes in 0..{MAX_AUTO_DOWNLOAD_MAX}, or none")
    return v


def parse_size(text: str) -> int | None:
    """`500MB`, `2GB`, `1GiB`, `1.5 GB`, `123` (bytes) or `none` -> bytes (None: no limit).

    KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB powers of 1024; ValueError otherwise."""
    n = _parse_bytes(text, "a size", "500MB, 2GB, 1GiB")
    return None if n is None else _check_size_limit(n)


def parse_rate(text: str) -> int | None:
    """`500KiB/s`, `1MB/s`, `1MB`, `8000000` (bytes/s) or `none`/`0` -> bytes/s (None: no
    cap). Units as for `parse_size`; a trailing `/s` or `ps` is optional."""
    t = text.strip().lower()
    if not t:
        return None
    for suffix in ("/s", "ps"):
        if t.endswith(suffix) and len(t) > len(suffix):
            t = t[:-len(suffix)]
            break
    n = _parse_bytes(t, "a rate", "500KiB/s, 1MB/s")
    return None if not n else _check_rate(n)


def _parse_bytes(text: str, what: str, examples: str) -> int | None:
    t = text.strip().lower().replace(" ", "").replace("_", "")
    if t in ("none", "off", "unlimited"):
        return None
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num):]
    bad = f"not {what}: {text!r} (say e.g. {examples} or none)"
    if unit not in _UNITS or not num or len(num) > 20:
        raise ValueError(bad)
    try:
        value = float(num) if "." in num else int(num)
    except ValueError:
        raise ValueError(bad) from None
    if value < 0:
        raise ValueError(bad)
    return int(value * _UNITS[unit])


def size_text(n: float) -> str:
    """A byte count as the inbox and the web inbox show it: `1.2 GiB`, `300 B`."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


# name -> (default, checker). The checker runs on every write and every read.
_SETTINGS: dict[str, tuple[Any, Callable[[Any], Any]]] = {
    "auto_download": (True, _check_bool),
    "retention": ("keep", _check_retention),
    "archive_dir": (None, _check_dir),
    "max_upload_rate": (None, _check_rate),
    "auto_download_max": (DEFAULT_AUTO_DOWNLOAD_MAX, _check_size_limit),
}


def sender_pattern(text: str) -> str:
    """Normalise an address or `@domain` pattern; raise ValueError on anything else."""
    text = text.strip().lower()
    if text.startswith("@"):
        # Borrow the address grammar for the domain part.
        return "@" + domain_of(normalize_address("x" + text))
    return normalize_address(text)


class Prefs:
    """Getters and setters for the settings, the sender lists, and `classify`."""

    __slots__ = ("_db",)

    def __init__(self, db: NodeDB) -> None:
        self._db = db

    @property
    def auto_download(self) -> bool:
        """Start fetching as soon as a message arrives (default True)."""
        return bool(self._get("auto_download"))

    @auto_download.setter
    def auto_download(self, value: bool) -> None:
        self._set("auto_download", value)

    @property
    def retention(self) -> Retention:
        """What the sender does with its copy once every recipient has it (default keep)."""
        value: Retention = self._get("retention")
        return value

    @retention.setter
    def retention(self, value: Retention) -> None:
        self._set("retention", value)

    @property
    def archive_dir(self) -> str | None:
        """Where `archive` retention moves sent files (None: not configured)."""
        value: str | None = self._get("archive_dir")
        return value

    @archive_dir.setter
    def archive_dir(self, value: str | None) -> None:
        self._set("archive_dir", value)

    @property
    def max_upload_rate(self) -> int | None:
        """Cap on serving chunks to others, bytes per second (None: no cap)."""
        value: int | None = self._get("max_upload_rate")
        return value

    @max_upload_rate.setter
    def max_upload_rate(self, value: int | None) -> None:
        self._set("max_upload_rate", value)

    @property
    def auto_download_max(self) -> int | None:
        """Largest message (bytes) fetched without a `fetch`; None: no limit (default 2 GiB)."""
        value: int | None = self._get("auto_download_max")
        return value

    @auto_download_max.setter
    def auto_download_max(self, value: int | None) -> None:
        self._set("auto_download_max", value)

    def priority_senders(self) -> frozenset[str]:
        return self._patterns("priority")

    def junk_senders(self) -> frozenset[str]:
        return self._patterns("junk")

    def add_priority(self, pattern: str) -> str:
        """Put an address or `@domain` on the priority list; returns the stored pattern."""
        return self._add_rule(pattern, "priority")

    def add_junk(self, pattern: str) -> str:
        """Put an address or `@domain` on the junk list; returns the stored pattern."""
        return self._add_rule(pattern, "junk")

    def remove_sender(self, pattern: str, kind: str) -> bool:
        """Take a pattern off the `kind` list (`priority` or `junk`); False if that list
        did not have it (the other list is left alone)."""
        key = sender_pattern(pattern)
        with self._db.transaction() as conn:
            return conn.execute("DELETE FROM sender_rule WHERE pattern = ? AND kind = ?",
                                (key, kind)).rowcount > 0

    def list_of(self, pattern: str) -> str | None:
        """The list (`priority` or `junk`) that has this very pattern, or None."""
        rows = self._db.query("SELECT kind FROM sender_rule WHERE pattern = ?",
                              (sender_pattern(pattern),))
        return str(rows[0]["kind"]) if rows else None

    def classify(self, sender: str) -> SenderClass:
        """`priority`, `junk` or `normal` for a sender address (address rules beat domains).

        An address that doesn't parse is `junk`: nothing legitimate arrives from it.
        """
        try:
            rule = self.rule_for(sender)
        except DecodeError:
            return "junk"
        return "normal" if rule is None else rule[1]

    def rule_for(self, sender: str) -> tuple[str, Literal["priority", "junk"]] | None:
        """The pattern that classifies a sender address (its own, else `@` its domain) and
        its list, or None. Raises DecodeError for an address that doesn't parse."""
        addr = normalize_address(sender)
        domain = "@" + domain_of(addr)
        rows = self._db.query(
            "SELECT pattern, kind FROM sender_rule WHERE pattern IN (?, ?)", (addr, domain))
        kinds = {r["pattern"]: r["kind"] for r in rows}
        for pattern in (addr, domain):
            kind = kinds.get(pattern)
            if kind in ("priority", "junk"):
                return pattern, kind
        return None

    def as_dict(self) -> dict[str, Any]:
        """Every setting and both lists, JSON-ready (for `peerpost prefs`)."""
        out: dict[str, Any] = {name: self._get(name) for name in _SETTINGS}
        out["priority_senders"] = sorted(self.priority_senders())
        out["junk_senders"] = sorted(self.junk_senders())
        return out

    def _get(self, name: str) -> Any:
        default, check = _SETTINGS[name]
        row = self._db.query_one("SELECT value FROM pref WHERE name = ?", (name,))
        if row is None:
            return default
        try:
            return check(unpackb(bytes(row["value"]), max_bytes=_MAX_VALUE_BYTES))
        except (DecodeError, ValueError) as exc:
            raise RecordsError(f"stored preference {name} is damaged: {exc}") from None

    def _set(self, name: str, value: Any) -> None:
        _, check = _SETTINGS[name]
        data = packb(check(value))
        with self._db.transaction() as conn:
            conn.execute(
                "INSERT INTO pref (name, value) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (name, data),
            )

    def _patterns(self, kind: str) -> frozenset[str]:
        rows = self._db.query("SELECT pattern FROM sender_rule WHERE kind = ?", (kind,))
        return frozenset(r["pattern"] for r in rows)

    def _add_rule(self, pattern: str, kind: str) -> str:
        key = sender_pattern(pattern)
        with self._db.transaction() as conn:
            known = conn.execute("SELECT 1 FROM sender_rule WHERE pattern = ?", (key,)).fetchone()
            if not known and count_rows(conn, "sender_rule") >= MAX_SENDER_RULES:
                raise RecordLimitError(f"at most {MAX_SENDER_RULES} sender rules")
            conn.execute(
                "INSERT INTO sender_rule (pattern, kind) VALUES (?, ?)"
                " ON CONFLICT (pattern) DO UPDATE SET kind = excluded.kind",
                (key, kind),
            )
        return key
