#!/usr/bin/env python3
"""Write the bash completion of img, preboot-dir and zmgmcast from their argument parsers
(the same parsers packaging/man/genman.py documents), so completion cannot drift from them.

    python3 packaging/completion/gencompletion.py --out DIR     DIR/img, DIR/preboot-dir, ...

Run at package build time (packaging/rpm/preboot.spec, %build); installed in
/usr/share/bash-completion/completions. Completes subcommands, the options of the subcommand
typed so far, the values of options with choices, and file names where a value is a path.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "man"))
import genman  # noqa: E402  (the commands and the parser walk)

COMMANDS = ("img", "preboot-dir", "zmgmcast")
# A value completed as a file name: its metavar or destination says it is a path.
FILE_VALUE = re.compile(r"(PATH|FILE|DIR|DISK|CONFIG|CREDENTIALS|SOCKET|IMAGE|RESULTS_LOG)")


def quote(word: str) -> str:
    return "'" + word.replace("'", "'\\''") + "'"


def takes_value(action: argparse.Action) -> bool:
    return action.nargs not in (0, "?")


def value_kind(action: argparse.Action) -> str:
    """'choices', 'file' or '' (anything: nothing to offer)."""
    if action.choices:
        return "choices"
    name = f"{action.metavar or ''} {action.dest.upper()}"
    return "file" if FILE_VALUE.search(name) else ""


def function_name(command: str) -> str:
    return "_preboot_complete_" + re.sub(r"\W", "_", command)


def script(command: genman.Command) -> str:
    parser = command.parser()
    fn = function_name(command.name)
    descend, skip, values, words, positional = [], [], [], [], []
    for path, sub, _text in genman.walk(parser):
        key = " ".join((command.name,) + path)
        children = [p[0] for p, _s, _t in genman.walk(sub) if len(p) == 1]
        for child in children:
            descend.append(quote(f"{key} {child}"))
        offered = list(children)
        for action in genman.options(sub):
            if not action.option_strings:
                if quote(key) not in positional:
                    positional.append(quote(key))
                continue
            offered += action.option_strings
            if takes_value(action):
                for option in action.option_strings:
                    skip.append(quote(f"{key}:{option}"))
                    kind = value_kind(action)
                    if kind == "choices":
                        choices = " ".join(str(c) for c in action.choices)
                        values.append(f"        {quote(f'{key}:{option}')}) "
                                      f"mapfile -t COMPREPLY < <(compgen -W {quote(choices)} -- \"$cur\")"
                                      f"; return ;;")
                    elif kind == "file":
                        values.append(f"        {quote(f'{key}:{option}')}) "
                                      f"mapfile -t COMPREPLY < <(compgen -f -- \"$cur\"); return ;;")
                    else:
                        values.append(f"        {quote(f'{key}:{option}')}) return ;;")
        words.append(f"        {quote(key)}) words={quote(' '.join(offered))} ;;")
    lines = [
        f"# bash completion for {command.name}: generated from its argument parser by",
        "# packaging/completion/gencompletion.py; do not edit.",
        f"{fn}()",
        "{",
        '    local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD-1]}',
        f"    local path={quote(command.name)} word words='' skip='' i",
        "    COMPREPLY=()",
        "    # the subcommand typed so far: skip options and the values they take",
        "    for ((i = 1; i < COMP_CWORD; i++)); do",
        "        word=${COMP_WORDS[i]}",
        "        if [[ -n $skip ]]; then skip=''; continue; fi",
        *(['        case "$path $word" in',
           f"            {'|'.join(descend)}) path=\"$path $word\"; continue ;;",
           "        esac"] if descend else []),
        *(['        case "$path:$word" in',
           f"            {'|'.join(skip)}) skip=1 ;;",
           "        esac"] if skip else []),
        "    done",
        "    # the value of an option",
        '    case "$path:$prev" in',
        *values,
        "    esac",
        '    case "$path" in',
        *words,
        "    esac",
        '    if [[ $cur != -* ]]; then',
        "        # not an option: a subcommand, else a file where the command takes operands",
        '        local subs=""',
        "        for word in $words; do [[ $word == -* ]] || subs+=\" $word\"; done",
        '        if [[ -n $subs ]]; then',
        '            mapfile -t COMPREPLY < <(compgen -W "$subs" -- "$cur")',
        "            return",
        "        fi",
        *(['        case "$path" in',
           f"            {'|'.join(positional)}) mapfile -t COMPREPLY < <(compgen -f -- \"$cur\")"
           f"; return ;;",
           "        esac"] if positional else []),
        "        return",
        "    fi",
        '    mapfile -t COMPREPLY < <(compgen -W "$words" -- "$cur")',
        "}",
        f"complete -F {fn} {command.name}",
    ]
    return "\n".join(lines) + "\n"


def scripts() -> dict[str, str]:
    return {c.name: script(c) for c in genman.commands() if c.name in COMMANDS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gencompletion.py",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="the folder to write the scripts in")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in scripts().items():
        (out / name).write_text(text, encoding="utf-8")
        print(out / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
