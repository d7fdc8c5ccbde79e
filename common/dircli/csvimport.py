"""preboot-dir workstations import FILE.csv: register many workstations at once.

The file has a header row naming its columns, in any order: `mac` (required; any spelling of a
MAC address), `name`, `image` and `next_boot` (yes/no, true/false, 1/0: the "image on next boot"
flag). Header names ignore case, blanks and `-`/`_` (`Next Boot` is `next_boot`;
`image_on_next_boot` is accepted too). A column not in that list is an error naming it. The file
may start with a UTF-8 BOM (as spreadsheets write it), use CRLF line ends and quote fields as CSV
does (a quoted field may hold commas and line breaks).

A MAC already registered has its record updated with the values the row gives; a cell left
empty (or a column left out) keeps the record's value (a new record: no name, no image, not
flagged). Each bad row is reported as `FILE:LINE: reason`, and a MAC listed twice is a bad row;
then nothing is written, unless --skip-bad, which writes the good rows. The writes are one
Directory.apply: one transaction on SQLite.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import re
import sys
from dataclasses import dataclass

from common.machine import normalize_mac
from common.policy.directory import DirectoryChange
from common.policy.model import Workstation

COLUMNS = ("mac", "name", "image", "next_boot")
ALIASES = {"image_on_next_boot": "next_boot", "nextboot": "next_boot", "mac_address": "mac"}
TRUE = {"yes", "true", "1"}
FALSE = {"no", "false", "0"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class CsvFileError(ValueError):
    """The file as a whole cannot be read (no header, an unknown column): exit 65."""


@dataclass(frozen=True)
class Row:
    line: int
    mac: str
    values: dict[str, object]       # the non-empty cells: name, image, image_on_next_boot


@dataclass
class Parsed:
    rows: list[Row]
    problems: list[str]             # "FILE:LINE: reason", in file order


def _column(header: str) -> str:
    key = re.sub(r"[\s\-_]+", "_", header.strip().lower()).strip("_")
    return ALIASES.get(key, key)


def parse_csv(text: str, source: str) -> Parsed:
    """Read the file's rows; a bad row goes into `problems`, a bad header raises CsvFileError."""
    if text.startswith("\ufeff"):
        text = text[1:]
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
        while header is not None and not any(cell.strip() for cell in header):
            header = next(reader, None)           # blank lines before the header
    except csv.Error as exc:
        raise CsvFileError(f"{source}:{reader.line_num}: {exc}") from None
    if header is None:
        raise CsvFileError(f"{source}: empty file: a header row (mac,name,image,next_boot) "
                           "is expected")
    header_line = reader.line_num
    columns = [_column(cell) for cell in header]
    unknown = [cell.strip() for cell, column in zip(header, columns) if column not in COLUMNS]
    if unknown:
        raise CsvFileError(f"{source}:{header_line}: unknown column"
                           f"{'s' if len(unknown) > 1 else ''} "
                           f"{', '.join(repr(u) for u in unknown)} (known: {', '.join(COLUMNS)})")
    for column in columns:
        if columns.count(column) > 1:
            raise CsvFileError(f"{source}:{header_line}: column '{column}' is named twice")
    if "mac" not in columns:
        raise CsvFileError(f"{source}:{header_line}: no 'mac' column (known: "
                           f"{', '.join(COLUMNS)})")

    parsed = Parsed([], [])
    seen: dict[str, int] = {}
    line = reader.line_num + 1
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            parsed.problems.append(f"{source}:{line}: {exc}")
            break                   # the reader cannot go on after a broken quote
        start, line = line, reader.line_num + 1
        if not any(cell.strip() for cell in cells):
            continue                # blank line
        if len(cells) != len(columns):
            parsed.problems.append(f"{source}:{start}: {len(cells)} fields, the header has "
                                   f"{len(columns)}")
            continue
        fields = {column: cell.strip() for column, cell in zip(columns, cells)}
        reason, row = _row(fields, start)
        if row is not None and row.mac in seen:
            reason = f"MAC {row.mac} is also on line {seen[row.mac]}"
        if reason:
            parsed.problems.append(f"{source}:{start}: {reason}")
            continue
        assert row is not None
        seen[row.mac] = start
        parsed.rows.append(row)
    return parsed


def _row(fields: dict[str, str], line: int) -> tuple[str | None, Row | None]:
    if not fields["mac"]:
        return "no MAC address", None
    mac = normalize_mac(fields["mac"])
    if mac is None:
        return f"'{fields['mac']}' is not a MAC address", None
    values: dict[str, object] = {}
    for column in ("name", "image"):
        value = fields.get(column, "")
        if _CONTROL.search(value):
            return f"{column}: control characters (a line break?) are not allowed", None
        if value:
            values[column] = value
    flag = fields.get("next_boot", "").lower()
    if flag:
        if flag not in TRUE | FALSE:
            return (f"next_boot: '{fields['next_boot']}' is not yes/no, true/false or 1/0",
                    None)
        values["image_on_next_boot"] = flag in TRUE
    return None, Row(line, mac, values)


def plan(rows: list[Row], existing: dict[str, Workstation]
         ) -> tuple[list[Workstation], int, int, int]:
    """The records to write, and how many are new, updated and unchanged."""
    put: list[Workstation] = []
    new = updated = unchanged = 0
    for row in rows:
        old = existing.get(row.mac)
        station = dataclasses.replace(old or Workstation(row.mac), **row.values)
        if old is None:
            new += 1
        elif station == old:
            unchanged += 1
            continue
        else:
            updated += 1
        put.append(station)
    return put, new, updated, unchanged


def run(args: argparse.Namespace, open_directory, usage_error) -> int:
    """The command; open_directory(args, create) and usage_error(message) come from __main__."""
    source = "<stdin>" if args.file == "-" else args.file
    try:
        if args.file == "-":
            text = sys.stdin.buffer.read().decode("utf-8")
        else:
            with open(args.file, "rb") as handle:
                text = handle.read().decode("utf-8")
    except OSError as exc:
        raise usage_error(f"{source}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise usage_error(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})"
                          ) from None
    try:
        parsed = parse_csv(text, source)
    except CsvFileError as exc:
        raise usage_error(str(exc)) from None
    for problem in parsed.problems:
        print(problem, file=sys.stderr)
    bad = len(parsed.problems)
    if bad and not args.skip_bad:
        raise usage_error(f"{source}: {bad} bad row{'s' if bad > 1 else ''}; nothing written "
                          "(--skip-bad writes the good rows)")
    with open_directory(args, create=not args.dry_run) as directory:
        existing = {station.mac: station for station in directory.workstations()}
        put, new, updated, unchanged = plan(parsed.rows, existing)
        if put and not args.dry_run:
            directory.apply(DirectoryChange(put_workstations=tuple(put)))
        where = directory.url.redacted()
    skipped = f"; {bad} bad row{'s' if bad > 1 else ''} skipped" if bad else ""
    verb = "would register" if args.dry_run else "registered"
    print(f"{source}: {verb} {new} new, {updated} updated, {unchanged} unchanged "
          f"workstations in {where}{skipped}" + ("; dry run: nothing written"
                                                 if args.dry_run else ""))
    return 0


def add_command(ws_commands, open_directory, usage_error) -> None:
    sub = ws_commands.add_parser(
        "import", help="register workstations from a CSV file (mac,name,image,next_boot)",
        description="Register or update workstations from a CSV file with a header row: mac "
                    "(required), name, image, next_boot (yes/no). An empty cell keeps the "
                    "record's value. A bad row is reported as FILE:LINE and nothing is written.")
    sub.add_argument("file", help="the CSV file, - for stdin")
    sub.add_argument("--skip-bad", action="store_true",
                     help="write the good rows and report the bad ones (default: write nothing "
                          "if any row is bad)")
    sub.add_argument("--dry-run", action="store_true", help="report, write nothing")
    sub.set_defaults(run=lambda args: run(args, open_directory, usage_error))
