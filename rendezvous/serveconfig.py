"""`serve --config FILE`: a TOML file with a key per `serve` flag, and the service ports.

Every flag of `serve` has a key of the same name with underscores (`--relay-rate` is
`relay_rate`, `--block-domain` is `block_domain`, a list); a flag on the command line
overrides the file, the file overrides the built-in default. Relative paths in the file
(`data`, `tls_cert`, `tls_key`) are relative to the file's folder. Values are checked as the
flags' are; an unknown key is an error, so a misspelt limit is never silently ignored.

On SIGHUP `serve` reads the file again (`RESTART_KEYS` keep their first value: changing
where or what the server serves needs a restart). See README "Running a server".

STUN and the DHT bootstrap node run by default, both on UDP next to the TCP port P of
`--listen`: STUN at P (its own protocol, so it can share the number), the DHT at P + 1.
STUN over TCP (for the TCP hole punch) runs with STUN, at TCP P + 1. With P = 0 all three
take any free port. `--stun-port N` / `--dht-port N` move one, `off` turns
it off.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

OFF = "off"
# What a reload cannot change in a running process.
RESTART_KEYS = ("domain", "listen", "listen_also", "data", "plaintext",
                "stun_port", "dht_port", "config", "resolver", "store", "advertise",
                "instance_heartbeat", "outbound_claim")


class ConfigError(Exception):
    """The config file cannot be used; the text names the file and the key."""


def service_port(text: str) -> int | str:
    """A `--stun-port`/`--dht-port` value: 0..65535 or `off`."""
    text = text.strip().lower()
    if text == OFF:
        return OFF
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"expected a port 0..65535 or 'off', got {text!r}")
    return int(text)


def service_ports(listen_port: int, stun: int | str | None,
                  dht: int | str | None) -> dict[str, int]:
    """The UDP port of each service to run: STUN at the listen port, the DHT one above,
    unless given (`off`: not run). Port 0 stays 0 (any free port)."""
    out: dict[str, int] = {}
    for name, given, offset in (("stun", stun, 0), ("dht", dht, 1)):
        if given == OFF:
            continue
        if isinstance(given, int):
            out[name] = given
        elif listen_port == 0:
            out[name] = 0
        elif listen_port + offset > 65535:
            raise ConfigError(f"no port above {listen_port} for the {name.upper()} "
                              f"service: give --{name}-port")
        else:
            out[name] = listen_port + offset
    return out


def read_config(path: Path) -> dict[str, Any]:
    import tomllib  # 20 ms: only `serve --config` reads TOML, not every command's parser

    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"config {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path}: not TOML: {exc}") from None


def apply_config(serve: argparse.ArgumentParser, doc: dict[str, Any], path: Path) -> None:
    """Make the file's values the defaults of `serve`'s flags (so flags still win)."""
    actions = {a.dest: a for a in serve._actions
               if a.option_strings and a.dest not in ("help", "config")}
    values: dict[str, Any] = {}
    for key, value in doc.items():
        action = actions.get(key)
        if action is None:
            import difflib

            near = difflib.get_close_matches(str(key).replace("-", "_"), actions, n=1)
            hint = f"did you mean {near[0]}? " if near else ""
            raise ConfigError(f"config {path}: unknown key {key!r} ({hint}keys are the serve "
                              "flags with underscores, e.g. relay_rate)")
        values[key] = _convert(action, key, value, path)
    serve.set_defaults(**values)


def _convert(action: argparse.Action, key: str, value: Any, path: Path) -> Any:
    where = f"config {path}: {key}"
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if isinstance(action, argparse._AppendAction):
        if not isinstance(value, list):
            value = [value]
        return [_scalar(action, where, v, path) for v in value]
    return _scalar(action, where, value, path)


def _scalar(action: argparse.Action, where: str, value: Any, path: Path) -> Any:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ConfigError(f"{where}: expected a string or a number, got {value!r}")
    text = str(value)
    if action.type is Path:
        p = Path(text).expanduser()
        return p if p.is_absolute() else path.parent / p
    try:
        out = action.type(text) if callable(action.type) else text
    except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if action.choices is not None and out not in action.choices:
        raise ConfigError(f"{where}: expected one of {', '.join(map(str, action.choices))}, "
                          f"got {value!r}")
    return out
