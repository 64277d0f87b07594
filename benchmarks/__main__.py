"""Run one benchmark by name: `python -m benchmarks NAME [options]`, or `all`;
`python -m benchmarks list` names them, one a line.

Each benchmark is a module `benchmarks/NAME.py` with `main(argv: list[str]) -> int`.
It prints a table and writes `benchmarks/out/NAME.json` (or `--out PATH`).
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path

_SKIP = {"common", "__main__"}


def _names() -> list[str]:
    here = Path(__file__).parent
    return sorted(m.name for m in pkgutil.iter_modules([str(here)]) if m.name not in _SKIP)


def main(argv: list[str]) -> int:
    names = _names()
    if not argv or argv[0] in {"-h", "--help"}:
        print(__doc__)
        print("benchmarks:", ", ".join(names) or "(none)")
        return 0 if argv else 2
    if argv[0] == "list":
        if argv[1:]:
            print(f"`list` takes no arguments, not {' '.join(argv[1:])!r}", file=sys.stderr)
            return 2
        print("\n".join(names))
        return 0
    name, rest = argv[0], argv[1:]
    if name == "all":
        codes = [importlib.import_module(f"benchmarks.{n}").main(rest) for n in names]
        return max(codes, default=0)
    if name not in names:
        print(f"unknown benchmark {name!r}; choose from: {', '.join(names)}", file=sys.stderr)
        return 2
    rc: int = importlib.import_module(f"benchmarks.{name}").main(rest)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
