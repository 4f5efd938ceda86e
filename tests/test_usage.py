import argparse

import pytest

from gigatrain.usage import Parser, UsageError, count, number


@pytest.mark.parametrize("kwargs, text, value", [
    ({}, "0", 0.0), ({}, "0.8", 0.8), ({"minimum": 1, "integer": True}, "3", 3), ({"above": True}, "1e-3", 1e-3),
])
def test_number_accepts(kwargs, text, value):
    assert number("fix", **kwargs)(text) == value


@pytest.mark.parametrize("kwargs, text, words", [
    ({}, "-1", "-1 is not valid; fix"), ({}, "nan", "nan is not valid"), ({}, "x", "'x' is not a number; fix"),
    ({"minimum": 1, "integer": True}, "0", "0 is not valid"), ({"integer": True}, "1.5", "'1.5' is not an integer"),
    ({"above": True}, "0", "0 is not valid"),
])
def test_number_refuses_with_the_fix(kwargs, text, words):
    with pytest.raises(argparse.ArgumentTypeError, match=words):
        number("fix", **kwargs)(text)


def test_count_takes_suffixes_and_names_what_it_reads():
    assert count("gpus", whole=True)("16Ki") == 16384 and count("tokens")("15.6T") == 15.6e12
    with pytest.raises(argparse.ArgumentTypeError, match="gpus '1.5' must be a whole number"):
        count("gpus", whole=True)("1.5")


def test_a_bad_argument_is_a_usage_error_that_points_to_help():
    parser = Parser(prog="gigatrain x")
    parser.add_argument("--n", type=number("use 1 or more", minimum=1, integer=True))
    with pytest.raises(UsageError, match=r"argument --n: 0 is not valid; use 1 or more \(see `gigatrain x --help`\)"):
        parser.parse_args(["--n", "0"])
