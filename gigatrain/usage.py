"""The command lines' argument parsing (`gigatrain ...` and `gigatrain plan ...`): a parser that
raises UsageError instead of exiting, the help layout, and the types of the options' numbers.

Every bad input then ends the same way in both programs: one line, `gigatrain: error: ...`,
and exit code 2 (fault.EXIT_USAGE), printed by the program's `main`.
"""

from __future__ import annotations

import argparse
import math

from gigatrain.plan.units import parse_count, parse_int_count


class UsageError(Exception):
    """Raised instead of argparse's exit, so every bad input ends the same way."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each option's default after its help (unless it has none, is off, or the help already
    says it); descriptions and epilogs (examples, the config keys) keep their line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if action.option_strings and "default" not in text and not (default is None or default is False or
                                                                    default in ("", []) or default is argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def error(self, message: str):
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def number(fix: str, minimum: float = 0, integer: bool = False, above: bool = False):
    """An argparse type: a finite number (an integer if `integer`) of at least `minimum`, or above
    it if `above`; `fix`, in the error, says what to pass instead."""
    def parse(text: str):
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if integer else 'a number'}; {fix}") from None
        if not (math.isfinite(value) and (value > minimum if above else value >= minimum)):
            raise argparse.ArgumentTypeError(f"{text} is not valid; {fix}")
        return value
    return parse


def count(what: str, whole: bool = False):
    """An argparse type: a positive count with an optional suffix, '15.6T', '16M', '8k', '16Ki'
    (plan.units), a whole number if `whole`; the error names `what`."""
    def parse(text: str):
        try:
            return parse_int_count(text, what) if whole else parse_count(text, what)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    parse.__name__ = what  # argparse names the type in its message when the error has no text
    return parse
