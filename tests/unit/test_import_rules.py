"""The house as drawn: who may import whom (the table in common/__init__.py's docstring).

Every .py file of the product is parsed (ast; nothing is imported) and each import of the
project is checked against RULES: a daemon importing another daemon, common/ importing a daemon,
img or zmgmcast, a wing importing a wing it may not, all fail here with the file, the line and
the rule. Imports inside functions and under `if TYPE_CHECKING:` count like any other: a lazy
import is still a dependency.
"""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# The product's top-level packages (tests/ and bench/ are not product).
PRODUCT = ("common", "tftpd", "proxydhcpd", "prebootpolicyd", "imgsrvd", "img", "zmgmcast")
FOUNDATION = "foundation"          # common itself and its top-level modules

# part -> the other parts it may import (each part may always import itself).
RULES: dict[str, frozenset[str]] = {
    FOUNDATION: frozenset(),
    "common.daemon": frozenset({FOUNDATION}),
    "common.policy": frozenset({FOUNDATION, "common.daemon"}),
    "common.imaging": frozenset({FOUNDATION}),
    "common.dircli": frozenset({FOUNDATION, "common.daemon", "common.policy", "common.imaging"}),
    "tftpd": frozenset({FOUNDATION, "common.daemon"}),
    "proxydhcpd": frozenset({FOUNDATION, "common.daemon"}),
    "prebootpolicyd": frozenset({FOUNDATION, "common.daemon", "common.policy"}),
    "imgsrvd": frozenset({FOUNDATION, "common.daemon", "common.policy", "common.imaging"}),
    "img": frozenset({FOUNDATION, "common.imaging"}),
    "zmgmcast": frozenset({FOUNDATION, "common.daemon"}),
}

# (file, imported module) -> why this one import may break the table. Each needs a line in
# common/__init__.py's docstring too. None today.
EXCEPTIONS: dict[tuple[str, str], str] = {}


# ---------------------------------------------------------------------------------- the checker

def _module_exists(root: Path, dotted: str) -> bool:
    path = root.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def part_of_module(dotted: str, root: Path = REPO) -> str | None:
    """The part a module of the project belongs to; None for anything else (stdlib,
    third-party). A common.<name> that is neither a top-level module nor a wing is returned as
    it is, so it meets no rule and is reported."""
    names = dotted.split(".")
    if names[0] not in PRODUCT:
        return None
    if names[0] != "common":
        return names[0]
    if len(names) == 1:
        return FOUNDATION
    if (root / "common" / names[1] / "__init__.py").is_file():
        return f"common.{names[1]}"
    if (root / "common" / f"{names[1]}.py").is_file():
        return FOUNDATION
    return f"common.{names[1]}"


def part_of_file(relative: str) -> str:
    """The part a file of the product (a path relative to the repository) belongs to."""
    names = relative.split("/")
    if names[0] != "common":
        return names[0]
    if len(names) == 2:
        return FOUNDATION
    return f"common.{names[1]}"


def _package_of(relative: str) -> list[str]:
    names = relative[:-3].split("/")
    return names[:-1]             # __init__.py's package is its folder, like any module's


def imported_modules(relative: str, source: str, root: Path = REPO
                     ) -> list[tuple[int, str]]:
    """(line, absolute module) for every import in the source; relative imports resolved
    against the file's package; `from X import name` is X.name when that is a module."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source, relative)):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = _package_of(relative)
                base = package[:len(package) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                candidate = f"{module}.{alias.name}"
                found.append((node.lineno, candidate if alias.name != "*" and
                              _module_exists(root, candidate) else module))
    return found


def violations(relative: str, source: str, root: Path = REPO) -> list[str]:
    """Each import in `source` (the file `relative`) that the table forbids, as
    'file:line: part imports module (part): not allowed'."""
    importer = part_of_file(relative)
    allowed = RULES.get(importer)
    problems = []
    for line, module in imported_modules(relative, source, root):
        imported = part_of_module(module, root)
        if imported is None or imported == importer:
            continue
        if (relative, module) in EXCEPTIONS:
            continue
        if allowed is None:
            problems.append(f"{relative}:{line}: {importer} has no rules (add it to RULES "
                            "and to common/__init__.py)")
        elif imported not in RULES:
            problems.append(f"{relative}:{line}: {module}: {imported} is no part of the "
                            "table (add it to RULES and to common/__init__.py)")
        elif imported not in allowed:
            problems.append(f"{relative}:{line}: {importer} imports {module} ({imported}): "
                            f"{importer} may import only "
                            f"{', '.join(sorted(allowed)) or 'itself'}")
    return problems


def product_files() -> list[str]:
    return sorted(str(path.relative_to(REPO)) for top in PRODUCT
                  for path in (REPO / top).rglob("*.py") if "__pycache__" not in path.parts)


def existing_parts() -> set[str]:
    parts = {FOUNDATION} | {top for top in PRODUCT if top != "common"}
    parts |= {f"common.{path.parent.name}" for path in (REPO / "common").glob("*/__init__.py")}
    return parts


# ---------------------------------------------------------------------------------- the tree

def test_the_product_keeps_the_import_rules():
    problems = [problem for relative in product_files()
                for problem in violations(relative, (REPO / relative).read_text())]
    assert not problems, "forbidden imports:\n" + "\n".join(problems)


def test_every_part_has_rules_and_every_rule_a_part():
    """A new wing or daemon without a line in the table fails here, as does a stale line."""
    assert set(RULES) == existing_parts()


def test_every_package_is_a_product_package():
    """A new top-level package must join PRODUCT (and so the table)."""
    packages = {path.parent.name for path in REPO.glob("*/__init__.py")}
    assert packages == set(PRODUCT)


def test_pyproject_lists_every_package():
    """Every product folder with an __init__.py is installed (a new wing too)."""
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())
                 ["tool"]["setuptools"]["packages"])
    packages = {".".join(path.parent.relative_to(REPO).parts) for top in PRODUCT
                for path in (REPO / top).rglob("__init__.py") if "__pycache__" not in path.parts}
    assert listed == packages


def _docstring_table() -> dict[str, frozenset[str]]:
    text = ast.get_docstring(ast.parse((REPO / "common" / "__init__.py").read_text())) or ""
    lines = text.split("\n")
    start = next(i for i, line in enumerate(lines) if re.match(r"\s*part\s+may import$", line))
    table: dict[str, frozenset[str]] = {}
    for line in lines[start + 1:]:
        if not line.strip():
            break
        parts, allowed = re.split(r"\s{2,}", line.strip(), maxsplit=1)
        allowed = re.sub(r"\(.*\)", "", allowed).strip()
        names = frozenset() if allowed == "-" else frozenset(
            name.strip() for name in allowed.split(","))
        for part in parts.split(","):
            table[part.strip()] = names
    return table


def test_the_docstring_table_is_the_rules():
    """common/__init__.py tells readers the same rules this test enforces."""
    assert _docstring_table() == RULES


def test_exceptions_are_still_used():
    imports = {(relative, module) for relative in product_files()
               for _, module in imported_modules(relative, (REPO / relative).read_text())}
    assert set(EXCEPTIONS) <= imports, "stale exceptions: " + str(set(EXCEPTIONS) - imports)


# ---------------------------------------------------------------------------------- the checker itself

@pytest.mark.parametrize("relative,source", [
    ("tftpd/server.py", "from proxydhcpd import packet\n"),                  # daemon -> daemon
    ("imgsrvd/x.py", "import prebootpolicyd.script\n"),
    ("common/fileio.py", "from img.disklayout import DiskLayout\n"),         # common -> img
    ("common/daemon/runner.py", "from zmgmcast.__main__ import main\n"),
    ("common/daemon/runner.py", "from common.policy.model import Rule\n"),   # wing -> wing
    ("common/imaging/protocol.py", "from common.policy.model import ActionKind\n"),
    ("common/imaging/protocol.py", "from ..policy import model\n"),          # relative
    ("common/imaging/protocol.py",
     "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from common.policy import model\n"),
    ("common/imaging/protocol.py", "def f():\n    from common.daemon import config\n"),  # lazy
    ("common/machine.py", "from common.daemon.config import Key\n"),         # foundation -> wing
    ("common/policy/rules.py", "from common.imaging import imagefile\n"),
    ("img/client.py", "from common.policy.directory import open_directory\n"),
    ("img/client.py", "from common import daemon\n"),                        # wing as a name
    ("zmgmcast/__main__.py", "from common.nowing import x\n"),               # unknown wing
    ("newdaemon/__main__.py", "from common.errors import EX_OK\n"),          # part without rules
])
def test_the_checker_flags_a_forbidden_import(relative, source):
    assert violations(relative, source), f"{relative}: {source!r} passed"


@pytest.mark.parametrize("relative,source", [
    ("tftpd/server.py", "from . import packet\nfrom .config import Settings\nimport os\n"),
    ("common/daemon/runner.py", "from common import __version__\nfrom .config import Key\n"),
    ("common/policy/directory/settings.py", "from common.daemon.config import Key\n"
                                            "from . import open_directory\n"),
    ("common/policy/model.py", "from common.machine import MachineFacts\n"),
    ("img/client.py", "from common.imaging.protocol import image_url\nimport json\n"),
    ("imgsrvd/server.py", "from common.imaging import protocol\n"
                          "from common.policy.model import assign_work\n"),
    ("common/dircli/__main__.py", "from common.policy.directory import open_directory\n"),
])
def test_the_checker_passes_an_allowed_import(relative, source):
    assert violations(relative, source) == []
