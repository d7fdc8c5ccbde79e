"""File sets (docs/image-format.md, "File sets"): the variants of one base image that leave some
files out. Pure: the pattern language, the `NAME:PATTERN[,PATTERN...]` spec `img make
--fileset` takes, the image metadata's "filesets" object (written and read, checked as hostile
input), and matching a path against a pattern. No files, no mounts (img/filesets.py does those).

Set 1 is the whole image and excludes nothing; an image declares sets 2..10, each a name and up
to MAX_PATTERNS exclude patterns. A pattern names a partition (as Linux numbers it; 0 for a
disk without a partition table) and a glob relative to that filesystem's root:
`2:/home/*/Downloads`. Components are matched one by one with fnmatch's `*`, `?` and `[...]`
(never across a `/`); a whole component `**` matches any number of components, none included.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Any

MAX_SETS = 10                    # set 1 (everything) and up to 9 declared ones
MAX_PATTERNS = 32                # per set
MAX_PATTERN_CHARS = 255          # one pattern, partition number included
MAX_NAME_CHARS = 32
MAX_PARTITION = 4096
FILESETS_VERSION = 1             # of the metadata's "filesets" object
WHOLE_IMAGE = 1

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.+-]*\Z")
_BAD_CHARS = re.compile(r"[\x00-\x1f\x7f,\\]")
_ANY = re.compile(r"[*?]+\Z")


class FilesetError(ValueError):
    """A file set, pattern or spec that is refused; str() is the one-line reason."""


@dataclass(frozen=True)
class Pattern:
    """One exclude pattern: a partition and the glob's components (each an fnmatch glob or
    the literal `**`)."""

    partition: int
    parts: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.partition}:/{'/'.join(self.parts)}"

    def matches(self, path: tuple[str, ...], fold_case: bool = False) -> bool:
        """Whether the path (components below the filesystem root) is excluded."""
        return _match(self.parts, path, fold_case, prefix=False)

    def may_match_below(self, folder: tuple[str, ...], fold_case: bool = False) -> bool:
        """Whether something inside `folder` could match (so a walk must go into it)."""
        return _match(self.parts, folder, fold_case, prefix=True)


@dataclass(frozen=True)
class FileSet:
    number: int                  # 2..MAX_SETS
    name: str
    exclude: tuple[Pattern, ...]

    def partitions(self) -> tuple[int, ...]:
        return tuple(sorted({p.partition for p in self.exclude}))

    def patterns_for(self, partition: int) -> tuple[Pattern, ...]:
        return tuple(p for p in self.exclude if p.partition == partition)

    def describe(self) -> str:
        return f"{self.number} {self.name}: excludes {', '.join(map(str, self.exclude))}"


@dataclass(frozen=True)
class FileSets:
    """An image's declared sets, numbered 2.. in order; empty for an image without any."""

    sets: tuple[FileSet, ...] = ()

    def choose(self, number: int) -> FileSet | None:
        """The set to restore with: None for set 1 (nothing excluded); FilesetError for a
        number the image does not declare."""
        if number == WHOLE_IMAGE:
            return None
        for fileset in self.sets:
            if fileset.number == number:
                return fileset
        have = ", ".join(["1 (everything)"] + [f"{s.number} ({s.name})" for s in self.sets])
        raise FilesetError(f"file set {number}: the image has no such set (it has {have})")

    def describe(self) -> list[str]:
        return ["1 (everything): excludes nothing"] + [s.describe() for s in self.sets]


# -- patterns -------------------------------------------------------------------------------

def parse_pattern(text: str) -> Pattern:
    """`PARTITION:/GLOB` -> Pattern, or FilesetError naming the pattern and what is wrong."""
    label = f"pattern '{text[:60]}'"
    if len(text) > MAX_PATTERN_CHARS:
        raise FilesetError(f"{label}: longer than {MAX_PATTERN_CHARS} characters")
    if _BAD_CHARS.search(text):
        raise FilesetError(f"{label}: has a comma, a backslash or a control character "
                           "(paths use '/')")
    number, colon, path = text.partition(":")
    if not colon or not number.isdigit() or not number.isascii():
        raise FilesetError(f"{label}: must start with a partition number and ':', "
                           "e.g. 2:/home/*/Downloads")
    partition = int(number)
    if partition > MAX_PARTITION:
        raise FilesetError(f"{label}: partition {partition} is above {MAX_PARTITION}")
    if not path.startswith("/"):
        raise FilesetError(f"{label}: the path must start with '/' (the filesystem's root)")
    parts = path[1:].split("/")
    if path.endswith("/") and len(parts) > 1:
        parts = parts[:-1]                       # "2:/tmp/" is "2:/tmp"
    for part in parts:
        if part == "":
            raise FilesetError(f"{label}: an empty component (the root itself, or '//')")
        if part in (".", ".."):
            raise FilesetError(f"{label}: '{part}' components are not allowed")
        if "**" in part and part != "**":
            raise FilesetError(f"{label}: '**' must be a whole component")
    collapsed: list[str] = []
    for part in parts:                           # '**/**' is '**': keeps matching linear
        if not (part == "**" and collapsed and collapsed[-1] == "**"):
            collapsed.append(part)
    if all(_ANY.match(part) for part in collapsed):
        raise FilesetError(f"{label}: matches everything at its depth; name what to leave out")
    return Pattern(partition, tuple(collapsed))


def _match(pattern: tuple[str, ...], path: tuple[str, ...], fold_case: bool,
           prefix: bool) -> bool:
    """Glob matching by components in O(len(pattern) x len(path)): the set of pattern
    positions the path so far can reach. '**' matches any number of components, except that
    a trailing '**' matches at least one ('2:/home/**' is what is inside /home, not /home).
    prefix: whether some deeper path below `path` could match."""
    if pattern and pattern[-1] == "**":
        pattern = pattern[:-1] + ("*", "**")
    if fold_case:
        pattern = tuple(p if p == "**" else p.casefold() for p in pattern)
        path = tuple(p.casefold() for p in path)
    reach = _close(pattern, {0})
    for name in path:
        step = set()
        for i in reach:
            if i == len(pattern):
                continue
            if pattern[i] == "**":
                step.add(i)                       # '**' takes this component too
            elif fnmatch.fnmatchcase(name, pattern[i]):
                step.add(i + 1)
        reach = _close(pattern, step)
        if not reach:
            return False
    if prefix:
        return any(i < len(pattern) for i in reach)
    return len(pattern) in reach


def _close(pattern: tuple[str, ...], reach: set[int]) -> set[int]:
    """Add the positions reached by letting each '**' match nothing."""
    for i in sorted(reach):
        while i < len(pattern) and pattern[i] == "**":
            i += 1
            reach.add(i)
    return reach


# -- sets -----------------------------------------------------------------------------------

def check_name(name: str) -> str:
    """Why `name` cannot name a file set; "" when it can."""
    if not name or len(name) > MAX_NAME_CHARS or not _NAME.match(name):
        return (f"file set name '{name[:40]}' must be 1 to {MAX_NAME_CHARS} letters, digits, "
                "spaces or . _ + -, starting with a letter or digit")
    return ""


def make_set(number: int, name: str, patterns: list[str]) -> FileSet:
    why = check_name(name)
    if why:
        raise FilesetError(why)
    if not patterns:
        raise FilesetError(f"file set '{name}': no patterns (set 1 already excludes nothing)")
    if len(patterns) > MAX_PATTERNS:
        raise FilesetError(f"file set '{name}': more than {MAX_PATTERNS} patterns")
    parsed = []
    for text in patterns:
        try:
            parsed.append(parse_pattern(text))
        except FilesetError as exc:
            raise FilesetError(f"file set '{name}': {exc}") from None
    return FileSet(number, name, tuple(parsed))


def parse_spec(text: str, number: int) -> FileSet:
    """`img make --fileset` text: `NAME:PATTERN[,PATTERN...]`, e.g.
    `lean:2:/home/*/Downloads,2:/var/cache/**`."""
    name, colon, rest = text.partition(":")
    if not colon:
        raise FilesetError(f"--fileset '{text[:60]}': expected NAME:PATTERN[,PATTERN...]")
    return make_set(number, name.strip(), [p.strip() for p in rest.split(",") if p.strip()])


def build(specs: list[str]) -> FileSets:
    """Every --fileset, in order, as sets 2, 3, ...; names unique regardless of case."""
    if len(specs) > MAX_SETS - 1:
        raise FilesetError(f"at most {MAX_SETS - 1} file sets (2 to {MAX_SETS}; set 1 is the "
                           f"whole image), {len(specs)} given")
    sets = tuple(parse_spec(spec, number) for number, spec in enumerate(specs, 2))
    _unique(sets)
    return FileSets(sets)


def _unique(sets: tuple[FileSet, ...]) -> None:
    seen: dict[str, int] = {}
    for fileset in sets:
        key = fileset.name.casefold()
        if key in seen:
            raise FilesetError(f"file sets {seen[key]} and {fileset.number} are both named "
                               f"'{fileset.name}'")
        seen[key] = fileset.number


# -- the image metadata ---------------------------------------------------------------------

def to_metadata(filesets: FileSets) -> dict[str, Any]:
    return {"version": FILESETS_VERSION,
            "sets": [{"number": s.number, "name": s.name, "exclude": [str(p) for p in s.exclude]}
                     for s in filesets.sets]}


def from_metadata(metadata: dict[str, Any]) -> FileSets:
    """The image's sets; an image without "filesets" (older images) has set 1 only. Checked
    as strictly as `img make --fileset` checks them: the header is input like any other."""
    value = metadata.get("filesets")
    if value is None:
        return FileSets()
    if not isinstance(value, dict) or not isinstance(value.get("sets"), list):
        raise FilesetError("image metadata: 'filesets' is not an object with a 'sets' list")
    version = value.get("version")
    if version != FILESETS_VERSION:
        raise FilesetError(f"image metadata: file sets version {version!r} is not supported "
                           f"(this img reads version {FILESETS_VERSION})")
    rows = value["sets"]
    if len(rows) > MAX_SETS - 1:
        raise FilesetError(f"image metadata: more than {MAX_SETS - 1} file sets")
    sets = []
    for number, row in enumerate(rows, 2):
        if not isinstance(row, dict) or row.get("number") != number:
            raise FilesetError(f"image metadata: file set {number} is missing or out of order")
        name, exclude = row.get("name"), row.get("exclude")
        if not isinstance(name, str) or not isinstance(exclude, list) or \
                not all(isinstance(p, str) for p in exclude):
            raise FilesetError(f"image metadata: file set {number} needs a name and a list "
                               "of patterns")
        sets.append(make_set(number, name, exclude))
    result = tuple(sets)
    _unique(result)
    return FileSets(result)
