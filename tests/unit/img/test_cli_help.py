"""Every option of every `img` subcommand has a help text, and `img --help` lists the exit
codes."""

from __future__ import annotations

import argparse

from img.__main__ import _parser
from img.errors import EXIT_FAILED, EXIT_NOT_GROWN, EXIT_OK, EXIT_USAGE


def _parsers(parser: argparse.ArgumentParser, name: str = "img"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, child in action.choices.items():
                yield from _parsers(child, f"{name} {sub}")


def test_every_option_of_every_subcommand_has_a_help_text() -> None:
    missing = [f"{name} {'/'.join(action.option_strings) or action.dest}"
               for name, parser in _parsers(_parser())
               for action in parser._actions
               if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction))
               and not action.help]
    assert not missing, "options without a help text: " + ", ".join(missing)


def test_img_help_lists_the_exit_codes() -> None:
    text = _parser().format_help()
    for code in (EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_GROWN):
        assert f"  {code}  " in text, text
