"""Every third-party module the code imports is declared in pyproject.toml.

Read from the source with `ast` (every import counts, as in test_layering.py): the four
packages' imports must be in `dependencies`, or in an optional extra when they import it
only inside a function (sim/sweep.py's Dask); benchmarks' and tests' in `dependencies` or
an extra. An import name maps to its distribution through the installed metadata
(`nacl` is PyNaCl, `dns` is dnspython). A module only pulled in by another dependency is
not declared: an upgrade of that one can drop it.
"""

from __future__ import annotations

import ast
import functools
import re
import sys
import tomllib
from collections.abc import Mapping
from importlib.metadata import packages_distributions
from pathlib import Path

from tests.test_layering import PACKAGES, REPO

LOCAL = {*PACKAGES, "benchmarks", "tests"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(spec: str) -> str:
    return _norm(re.split(r"[\s<>=!~;\[]", spec.strip(), maxsplit=1)[0])


def _declared() -> tuple[set[str], set[str]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runtime = {_requirement_name(s) for s in project["dependencies"]}
    extras = {_requirement_name(s) for specs in project.get("optional-dependencies", {}).values()
              for s in specs}
    return runtime, extras


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(top-level module, line, at module level) of each absolute import in `path`."""
    tree = ast.parse(path.read_text(), str(path))
    top = {id(n) for n in tree.body}
    for stmt in tree.body:  # `if TYPE_CHECKING:` and `try:` at module level count as top
        if isinstance(stmt, ast.If | ast.Try):
            top |= {id(n) for n in ast.walk(stmt)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name.split(".")[0], node.lineno, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.module.split(".")[0], node.lineno, id(node) in top))
    return out


@functools.cache
def _distributions() -> Mapping[str, list[str]]:
    return packages_distributions()


def _third_party(module: str) -> bool:
    return module not in sys.stdlib_module_names and module not in LOCAL and module != "conftest"


def undeclared(path: Path, *, package_code: bool, runtime: set[str],
               extras: set[str]) -> list[str]:
    """`path:line: module (distribution)` for each import of `path` not declared where it
    must be: module-level imports of the packages' code in `runtime`, others in either."""
    dists = _distributions()
    missing = []
    for module, line, at_top in _imports(path):
        if not _third_party(module):
            continue
        names = {_norm(d) for d in dists.get(module, [])}
        assert names, f"{path}:{line}: {module} is not installed"
        allowed = runtime if package_code and at_top else runtime | extras
        if not names & allowed:
            missing.append(f"{path}:{line}: {module} ({', '.join(sorted(names))})")
    return missing


def test_every_import_is_declared() -> None:
    runtime, extras = _declared()
    missing = [m.removeprefix(f"{REPO}/") for folder in (*PACKAGES, "benchmarks", "tests")
               for path in sorted((REPO / folder).rglob("*.py"))
               for m in undeclared(path, package_code=folder in PACKAGES, runtime=runtime,
                                   extras=extras)]
    assert not missing, "imported but not declared in pyproject.toml:\n" + "\n".join(missing)


def test_the_check_sees_an_undeclared_import(tmp_path: Path) -> None:
    # aioice comes with aiortc; imported by a module of ours, it must be declared itself.
    probe = tmp_path / "probe.py"
    probe.write_text("import aioice\nfrom nacl import bindings\n\ndef f():\n    import qh3\n")
    assert _imports(probe) == [("aioice", 1, True), ("nacl", 2, True), ("qh3", 5, False)]
    assert {_norm(d) for d in packages_distributions()["nacl"]} == {"pynacl"}
    runtime, extras = _declared()
    assert "pynacl" in runtime and "aioice" not in runtime
    # In the packages' code the module-level aioice import is refused, and so would be
    # qh3 at module level were it only an extra; inside a function an extra is enough.
    assert undeclared(probe, package_code=True, runtime=runtime, extras=extras) == [
        f"{probe}:1: aioice (aioice)"]
    assert undeclared(probe, package_code=False, runtime=runtime, extras=extras) == []
    assert undeclared(probe, package_code=True, runtime=runtime - {"qh3"},
                      extras=extras | {"qh3"}) == [f"{probe}:1: aioice (aioice)"]
