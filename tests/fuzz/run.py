"""One fuzz target under atheris: `python -m tests.fuzz.run TARGET [libFuzzer flags] [dirs]`.

The project's packages are imported inside `atheris.instrument_imports()`, so their branches
guide the mutation. This module imports nothing of them before that.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["crypto", "rendezvous", "overlay"]):
    from tests.fuzz.targets import TARGETS


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: python -m tests.fuzz.run {{{','.join(TARGETS)}}} [libFuzzer args]")
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
