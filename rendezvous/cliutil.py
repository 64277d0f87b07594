"""What the three console scripts share: `--version`, help that shows defaults, a
`completion SHELL` command that prints a shell completion script (shtab), and a quiet end
when the reader of their output leaves early (`| head -1`).

Kept in the lowest package that has a command line so `peerpost-rendezvous`, `peerpost`
and `peerpost-sim` all import it downward.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, ParamSpec

from crypto.address import format_hostport

# A writer to a pipe whose reader has gone dies of SIGPIPE in C tools; shells report 128 + 13.
EXIT_BROKEN_PIPE = 141
_P = ParamSpec("_P")

SHELLS = ("bash", "zsh", "tcsh")
# The choices of `--log-level` and `--log-format` (rendezvous.logfmt reads them from here): a
# command line offers them without importing logging, which a command that logs nothing
# (`peerpost send`) does not load.
LEVELS = ("debug", "info", "warning", "error", "critical")
FORMATS = ("text", "json")


def counted(n: int, noun: str) -> str:
    """"1 device", "3 devices": a count and its noun (plural with an s)."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def package_version() -> str:
    # importlib.metadata and the lookup cost about 15 ms: only when --version asks.
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("peerpost")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


class _VersionAction(argparse._VersionAction):
    """argparse's `version` action, the version looked up when --version is given."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: str | Sequence[Any] | None, option_string: str | None = None) -> None:
        self.version = f"{parser.prog} {package_version()}"
        super().__call__(parser, namespace, values, option_string)


def _columns() -> int:
    """The terminal's width as `shutil.get_terminal_size` finds it (COLUMNS, else the
    terminal on stdout, else 80), without importing shutil: argparse's formatter imports
    it for its width, and makes a formatter for every argument added, so every command
    paid for shutil's import (and bz2's, lzma's) before its first request to the node:
    2-10 ms of `peerpost send`'s start here."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        out = sys.__stdout__
        try:
            columns = os.get_terminal_size(out.fileno()).columns if out is not None else 0
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written; every option's help ends with its default,
    unless the help already names it or there is none worth showing (None, False)."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        super().__init__(prog, indent_increment, max_help_position,
                         _columns() - 2 if width is None else width)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text or default in (None, False, argparse.SUPPRESS, [], "")
                or (not action.option_strings and action.nargs not in ("?", "*"))):
            return text
        if isinstance(default, tuple):  # a parsed HOST:PORT
            shown = format_hostport(str(default[0]), int(default[1]))
            return f"{text} (default: {shown.replace('%', '%%')})"
        return f"{text} (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with HelpFormatter from the start, and its subcommands too:
    add_subparsers makes them of this class."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def add_version(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action=_VersionAction,
                        help="print the version and exit")


def add_completion(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                   prog: str) -> None:
    """`completion SHELL`: the command `main` answers with `completion_script`."""
    c = sub.add_parser("completion", help="print a shell completion script, e.g. "
                       f"`eval \"$({prog} completion bash)\"` in ~/.bashrc")
    c.add_argument("shell", choices=SHELLS, help="the shell to complete for")


def completion_script(parser: argparse.ArgumentParser, shell: str) -> str:
    import shtab

    text: str = shtab.complete(parser, shell=shell)
    return text


def reader_may_leave(main: Callable[_P, int]) -> Callable[_P, int]:
    """`main` of a console script, ending with EXIT_BROKEN_PIPE and no traceback when its
    output's reader stops reading (`peerpost inbox | head -1`). Python ignores SIGPIPE, so
    the write, or the flush at exit, raised BrokenPipeError and printed a traceback."""

    @functools.wraps(main)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> int:
        try:
            code = main(*args, **kwargs)
            sys.stdout.flush()
            return code
        except BrokenPipeError:
            # Nothing more can reach the reader; the flush at exit must not try again.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
            return EXIT_BROKEN_PIPE

    return run
